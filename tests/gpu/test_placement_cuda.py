"""Placement on one GPU: dsv3's experts rebalanced over 8 emulated ranks by the balanced
replication its own routing statistics call for; the next call equals moe_ref."""

import pytest
import torch

from megakernel import FusedEPMoE, routing
from megakernel.placement import Placement
from megakernel.placement.policies import balanced_replication, evaluate
from megakernel.shapes import PRESETS
from megakernel.testing import check_layer_output, local_w2, local_w13, make_tokens
from symm_mem import EmulatedWorld

pytestmark = pytest.mark.gpu


def test_rebalance_dsv3_on_8_emulated_ranks():
    R, T, seed = 8, 256, 3
    shape = PRESETS["dsv3"].with_tokens(T)
    E = shape.num_experts
    L = E // R + 1  # one spare slot per rank
    start = Placement.from_slots(R, L, [[(e // (E // R), e % (E // R))] for e in range(E)])
    rt = routing.hot_expert(R, T, E, shape.topk, 0.2, seed=seed).to("cuda")
    xs = make_tokens(shape, [T] * R, seed=seed, device="cuda")
    args = dict(enumerate(xs)), dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))
    w13 = {r: local_w13(shape, start, r, seed, "cuda") for r in range(R)}
    w2 = {r: local_w2(shape, start, r, seed, "cuda") for r in range(R)}
    with EmulatedWorld(R, "cuda") as world:
        layer = FusedEPMoE(world, shape, w13, w2, placement=start)
        del w13, w2
        layer(*args)
        balanced = balanced_replication(layer.routing_stats(), R, L)
        before, after = (evaluate(p, [i.cpu() for i in rt.topk_ids]) for p in (start, balanced))
        assert after["max_over_mean"] < before["max_over_mean"]
        layer.rebalance(balanced)
        out = layer(*args)
        layer.check_errors()
        for r in range(R):
            ids, w = rt.topk_ids[r], rt.topk_weights[r]
            assert check_layer_output(out[r], xs[r], ids, w, shape, seed, r) == []
        layer.close()
    torch.cuda.empty_cache()
