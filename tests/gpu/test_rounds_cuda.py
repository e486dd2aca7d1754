"""Skewed routing on one GPU, ranks emulated: calls in rounds give moe_ref's result, eagerly and
replayed from the layer's CUDA graphs (DESIGN §4)."""

import pytest
import torch

from megakernel import FusedEPMoE, routing
from megakernel.shapes import MoEShape
from megakernel.testing import check_layer_output, make_tokens, make_w2, make_w13
from symm_mem import EmulatedWorld

MEDIUM = MoEShape(hidden=1024, ffn=512, num_experts=64, topk=6, max_tokens_per_rank=700)


@pytest.mark.parametrize(
    "R,capacity,kind",
    [
        (2, 2000, "all_to_one"),
        (2, 2000, "hot"),
        (4, None, "all_to_one"),
        (4, 3000, "hot"),
        (8, None, "all_to_one"),
        (8, None, "hot"),
    ],
)
def test_skewed_calls_in_rounds_equal_moe_ref(R, capacity, kind):
    """T = max_tokens on every rank, all to one rank's experts (or with one hot expert in every
    token's top k), bf16: four calls (the third and fourth replayed from a graph), each checked."""
    seed, T = R + len(kind), MEDIUM.max_tokens_per_rank
    E, K = MEDIUM.num_experts, MEDIUM.topk
    if kind == "all_to_one":
        rt = routing.all_to_one_rank(R, T, E, K, dst=R // 2, seed=seed)
    else:
        rt = routing.hot_expert(R, T, E, K, fraction=1.0, seed=seed, hot=E - 1)
    rt = rt.to("cuda")
    xs = make_tokens(MEDIUM, [T] * R, seed, "cuda")
    w13, w2 = make_w13(MEDIUM, seed, "cuda"), make_w2(MEDIUM, seed, "cuda")
    args = dict(enumerate(xs)), dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))
    with EmulatedWorld(R, "cuda") as world:
        layer = FusedEPMoE.from_dense(world, MEDIUM, w13, w2, capacity=capacity)
        for call in range(4):
            out = layer(*args)
            layer.check_errors()
            for r in range(R):
                ids, w = rt.topk_ids[r], rt.topk_weights[r]
                wrong = check_layer_output(out[r], xs[r], ids, w, MEDIUM, seed, r)
                assert wrong == [], f"call {call + 1}: {wrong}"
        stats = layer.stats()
        print(f"R={R} {kind} capacity {layer.workspace.capacity}: {stats}")
        assert stats["calls_in_rounds"] == 4 and stats["rounds_of_those_calls"] >= 8
        assert len(layer.graphs.graphs) == 1, "calls 2-4 of one T: captured once, replayed"
        layer.close()
    torch.cuda.synchronize()
