"""The FP8 layer (``MoEShape(fp8=True)``) on one GPU, ranks emulated: e4m3 dispatch rows with
their scales, e4m3 warpgroup MMAs with block scales, bf16 combine. Every output is checked
against ``moe_fp8_ref`` (``FP8_TOLERANCE``) and against ``moe_ref`` on the dense experts
(``FP8_DENSE_ERROR``); calls 2-3 of a T are replayed from the layer's graph."""

import pytest
import torch

from megakernel import FusedEPMoE, KernelConfig, routing
from megakernel.shapes import MoEShape
from megakernel.testing import check_layer_output, make_tokens, make_w2, make_w13
from symm_mem import EmulatedWorld

MEDIUM = MoEShape(hidden=1024, ffn=512, num_experts=64, topk=6, max_tokens_per_rank=700, fp8=True)


@pytest.mark.parametrize("R,tma", [(1, True), (2, True), (4, True), (8, True), (2, False)])
def test_fp8_layer_matches_the_fp8_reference(R, tma):
    """T = 700 per rank (uniform routing), then T = 300 with zipf routing, three calls each;
    weights by TMA (the default) or by pointers."""
    seed, E, K = 40 + R, MEDIUM.num_experts, MEDIUM.topk
    w13, w2 = make_w13(MEDIUM, seed, "cuda"), make_w2(MEDIUM, seed, "cuda")
    with EmulatedWorld(R, "cuda") as world:
        config = KernelConfig(gemm1_tma=tma, down_tma=tma)
        layer = FusedEPMoE.from_dense(world, MEDIUM, w13, w2, config=config)
        for T, rt in (
            (700, routing.uniform(R, 700, E, K, seed=seed)),
            (300, routing.zipf(R, [300] * R, E, K, 1.2, seed=seed)),
        ):
            rt = rt.to("cuda")
            xs = make_tokens(MEDIUM, [T] * R, seed + T, "cuda")
            args = (
                dict(enumerate(xs)),
                dict(enumerate(rt.topk_ids)),
                dict(enumerate(rt.topk_weights)),
            )
            for call in range(3):
                out = layer(*args)
                layer.check_errors()
                for r in range(R):
                    ids, w = rt.topk_ids[r], rt.topk_weights[r]
                    wrong = check_layer_output(out[r], xs[r], ids, w, MEDIUM, seed, r)
                    assert wrong == [], f"T {T} call {call + 1}: {wrong}"
        assert len(layer.graphs.graphs) == 2, "each T captured once, then replayed"
        layer.close()
    torch.cuda.synchronize()
