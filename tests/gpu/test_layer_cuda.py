"""The whole MoE layer on one GPU: EmulatedWorld(R, "cuda"), bf16, against moe_ref (and dispatch
and GEMM1 against their references), one- and two-kernel modes, CUDA graphs, repeatability."""

import pytest
import torch

from megakernel import FusedEPMoE, routing
from megakernel.kernel import Megakernel
from megakernel.placement import Placement
from megakernel.shapes import MoEShape
from megakernel.verify import (
    check_calls,
    check_layer_output,
    make_tokens,
    make_w2,
    make_w13,
    run_poisoned,
)
from symm_mem import EmulatedWorld

pytestmark = pytest.mark.gpu

MEDIUM = MoEShape(hidden=1024, ffn=512, num_experts=64, topk=6, max_tokens_per_rank=700)


def layer_call(ws, rt, placement, seed, split, shape=MEDIUM):
    xs = make_tokens(shape, [ids.shape[0] for ids in rt.topk_ids], seed, "cuda")
    w13, w2 = make_w13(shape, seed, "cuda"), make_w2(shape, seed, "cuda")
    rt = rt.to("cuda")
    ranks = ws.world.local_ranks
    w13_local = {r: placement.local_weights(w13, r) for r in ranks}
    w2_local = {r: placement.local_weights(w2, r) for r in ranks}
    handles = run_poisoned(
        ws, xs, rt.topk_ids, w13_local, "layer", rt.topk_weights, w2=w2_local, split=split
    )
    problems = check_calls(handles, xs, rt.topk_ids, w13_local, placement, "layer")
    for r, h in handles.items():
        problems += check_layer_output(
            h.out, xs[r], rt.topk_ids[r], rt.topk_weights[r], shape, seed, r
        )
    assert problems == []


@pytest.mark.parametrize("R", [2, 4, 8])
@pytest.mark.parametrize("split", [False, True])
def test_layer_emulated_ranks(R, split):
    with EmulatedWorld(R, "cuda") as world:
        for seed, case in enumerate(["uniform", "zipf", "dropped", "ragged", "replicated"]):
            rt, pl = routing.edge_case(case, R, 700 - seed, MEDIUM.num_experts, MEDIUM.topk, seed)
            pl = pl or Placement.contiguous(MEDIUM.num_experts, R)
            ws = Megakernel(world, MEDIUM, placement=pl)
            layer_call(ws, rt, pl, seed, split)
            ws.close()


def test_layer_phase_by_phase_on_the_gpu():
    """The CPU tests' launch order, on the GPU: isolates a race from a missing signal."""
    R = 4
    rt = routing.zipf(R, 500, MEDIUM.num_experts, MEDIUM.topk, 1.2, seed=2)
    pl = Placement.contiguous(MEDIUM.num_experts, R)
    with EmulatedWorld(R, "cuda") as world:
        ws = Megakernel(world, MEDIUM)
        xs = make_tokens(MEDIUM, [500] * R, 2, "cuda")
        w13, w2 = make_w13(MEDIUM, 2, "cuda"), make_w2(MEDIUM, 2, "cuda")
        rt = rt.to("cuda")
        handles = run_poisoned(
            ws,
            xs,
            rt.topk_ids,
            {r: pl.local_weights(w13, r) for r in range(R)},
            "layer",
            rt.topk_weights,
            w2={r: pl.local_weights(w2, r) for r in range(R)},
            overlap=False,
        )
        for r in range(R):
            out = handles[r].out
            assert (
                check_layer_output(out, xs[r], rt.topk_ids[r], rt.topk_weights[r], MEDIUM, 2, r)
                == []
            )


def test_module_back_to_back_graph_and_repeatability():
    """20 calls without a host sync, then a CUDA graph of one call replayed on 20 new inputs;
    every output checked, and a repeated call equal bit for bit."""
    R, T, seed = 4, 512, 5
    w13, w2 = make_w13(MEDIUM, seed, "cuda"), make_w2(MEDIUM, seed, "cuda")
    cases = []
    for i in range(20):
        rt = routing.zipf(R, T, MEDIUM.num_experts, MEDIUM.topk, 0.3 * (i % 4), seed=i).to("cuda")
        cases.append((make_tokens(MEDIUM, [T] * R, 100 + i, "cuda"), rt))

    def args(i):
        xs, rt = cases[i]
        return dict(enumerate(xs)), dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))

    def check(i, outs):
        xs, rt = cases[i]
        for r in range(R):
            w, ids = rt.topk_weights[r], rt.topk_ids[r]
            assert check_layer_output(outs[r], xs[r], ids, w, MEDIUM, seed, r) == [], f"call {i}"

    with EmulatedWorld(R, "cuda") as world:
        layer = FusedEPMoE.from_dense(world, MEDIUM, w13, w2)
        outs = [layer(*args(i)) for i in range(20)]  # no sync in between
        layer.check_errors()
        for i, o in enumerate(outs):
            check(i, o)
        again = layer(*args(19))
        assert all(torch.equal(again[r], outs[19][r]) for r in range(R)), "bitwise repeatable"

        static = [{r: t.clone() for r, t in d.items()} for d in args(0)]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_out = layer(*static)
        for i in range(20):
            for dst, src in zip(static, args(i), strict=True):
                for r in range(R):
                    dst[r].copy_(src[r])
            graph.replay()
            check(i, {r: t.clone() for r, t in graph_out.items()})
        layer.check_errors()
        layer.close()
