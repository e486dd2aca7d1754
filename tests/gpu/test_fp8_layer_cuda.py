"""The FP8 layer (``MoEShape(fp8=True)``) on one GPU, ranks emulated: e4m3 dispatch rows with
their scales, e4m3 warpgroup MMAs with block scales, bf16 combine. Every output is checked
against ``moe_fp8_ref`` (``FP8_TOLERANCE``) and against ``moe_ref`` on the dense experts
(``FP8_DENSE_ERROR``); calls 2-3 of a T are replayed from the layer's graph."""

from dataclasses import replace

import pytest
import torch

from megakernel import FusedEPMoE, KernelConfig, routing
from megakernel.fp8 import FP8_REF_ERROR
from megakernel.shapes import MoEShape
from megakernel.testing import (
    check_layer_output,
    fp8_layer_ref,
    make_biases,
    make_tokens,
    make_w2,
    make_w13,
)
from symm_mem import EmulatedWorld

MEDIUM = MoEShape(hidden=1024, ffn=512, num_experts=64, topk=6, max_tokens_per_rank=700, fp8=True)


@pytest.mark.parametrize(
    "R,knobs",
    [
        (1, {}),
        (2, {}),
        (4, {}),
        (8, {}),
        (2, dict(gemm1_tma=False, down_tma=False)),
        (1, dict(half_tiles=False)),
        (2, dict(gemm1_group=8)),
    ],
    ids=["R1", "R2", "R4", "R8", "R2-pointers", "R1-full_height_tails", "R2-gemm1_groups"],
)
def test_fp8_layer_matches_the_fp8_reference(R, knobs):
    """T = 700 per rank (uniform routing: about 66 rows an expert, so tiles of both halves'
    heights), then T = 300 with zipf routing, three calls each; weights by TMA (the default) or
    by pointers; remainder tiles at half height (the default) or full."""
    seed, E, K = 40 + R, MEDIUM.num_experts, MEDIUM.topk
    w13, w2 = make_w13(MEDIUM, seed, "cuda"), make_w2(MEDIUM, seed, "cuda")
    with EmulatedWorld(R, "cuda") as world:
        config = KernelConfig(**knobs)
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


@pytest.mark.parametrize("R", [1, 2])
def test_fp8_layer_with_gpt_oss_experts(R):
    """FP8 experts with biases and gpt-oss's clamped SwiGLU (``activation="swigluoai"``,
    ``bias=True``): b13 added to the scaled gate and up products before the clamps and the
    requantisation, b2 to the down projection's output; against ``moe_fp8_ref`` and the dense
    ``moe_ref`` as every FP8 case (the test biases put some values past the clamps)."""
    seed, E, K = 60 + R, MEDIUM.num_experts, MEDIUM.topk
    shape = replace(MEDIUM, activation="swigluoai", bias=True)
    w13, w2 = make_w13(shape, seed, "cuda"), make_w2(shape, seed, "cuda")
    with EmulatedWorld(R, "cuda") as world:
        layer = FusedEPMoE.from_dense(world, shape, w13, w2, **make_biases(shape, seed, "cuda"))
        rt = routing.uniform(R, 700, E, K, seed=seed).to("cuda")
        xs = make_tokens(shape, [700] * R, seed, "cuda")
        out = layer(
            dict(enumerate(xs)), dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))
        )
        layer.check_errors()
        for r in range(R):
            ids, w = rt.topk_ids[r], rt.topk_weights[r]
            assert check_layer_output(out[r], xs[r], ids, w, shape, seed, r) == []
        layer.close()


def test_fp8_long_k_products_keep_their_precision():
    """dsv3's widths (H = 7168: 56 k blocks in GEMM1) on one rank: Hopper's e4m3 MMAs add into
    their accumulator with too few bits, so a chain over the whole k loop drifts from
    ``moe_fp8_ref`` as k grows (1.52% on an H100, past ``FP8_REF_ERROR``). With partials of 128 k
    elements added in fp32 (``fp8_promote_k``, the default) the layer stays well inside it, and
    closer than the whole-loop chain."""
    seed, T = 7, 256
    shape = MoEShape(hidden=7168, ffn=2048, num_experts=8, topk=4, max_tokens_per_rank=T, fp8=True)
    w13, w2 = make_w13(shape, seed, "cuda"), make_w2(shape, seed, "cuda")
    rt = routing.uniform(1, T, shape.num_experts, shape.topk, seed=seed).to("cuda")
    x = make_tokens(shape, [T], seed, "cuda")[0]
    ids, w = rt.topk_ids[0], rt.topk_weights[0]
    want = fp8_layer_ref(x, ids, w, shape, seed)
    errors = {}
    with EmulatedWorld(1, "cuda") as world:
        for promote in (128, 0):
            config = KernelConfig(fp8_promote_k=promote)
            layer = FusedEPMoE.from_dense(world, shape, w13, w2, config=config)
            out = layer({0: x}, {0: ids}, {0: w})[0]
            layer.check_errors()
            errors[promote] = ((out.float() - want).norm() / want.norm()).item()
            layer.close()
    print(f"\nH 7168 norm-relative error from moe_fp8_ref: promoted {errors[128]:.4f}, "
          f"whole-loop chain {errors[0]:.4f}")  # fmt: skip
    assert errors[128] <= FP8_REF_ERROR / 2, errors
    assert errors[128] < errors[0], errors
