"""Experts other than bias-free SwiGLU (``MoEShape.activation``, ``MoEShape.bias``) under the
interpreter, EmulatedWorld: gpt-oss's clamped ``swigluoai`` and the experts' biases, through
every path that computes them (the layer, mode "gemm" with and without the gated epilogue, the
FP8 layer, rebalancing).

Every layer call is checked three ways (dispatch bit for bit, GEMM1 against ``expert_act_ref``,
the output against ``moe_ref``), outputs poisoned first; the biases' spread puts some gate and
up values past the clamps (``megakernel.testing.B13_SCALE``)."""

import pytest
import torch

from megakernel import FusedEPMoE, KernelConfig, Megakernel, routing
from megakernel.placement import Placement
from megakernel.reference import glu_ref, moe_ref
from megakernel.shapes import SWIGLUOAI_LIMIT, MoEShape
from megakernel.testing import (
    check_calls,
    check_layer_output,
    compare_layer_output,
    local_biases,
    make_biases,
    make_tokens,
    make_w2,
    make_w13,
    run_layer_checked,
    run_poisoned,
)
from symm_mem import EmulatedWorld

# H 64, I 32, E 16, K 4 (the layer tests' "small" preset), in bf16 unless a test says otherwise
BASE = MoEShape(64, 32, 16, 4, 100)
T = 21  # not a multiple of the tile (16), the combine block (8) or the chunk (4)


def small_config(**kw) -> KernelConfig:
    knobs = dict(block_m=16, block_n=16, block_k=16, down_block_n=32, down_block_k=16)
    knobs |= dict(combine_block=8, reduce_h=32, block_h=32, chunk=4)
    return KernelConfig(**(knobs | kw))


def gpt_oss_like(**kw) -> MoEShape:
    return MoEShape(**(dict(hidden=64, ffn=32, num_experts=16, topk=4, max_tokens_per_rank=100)
                       | dict(activation="swigluoai", bias=True) | kw))  # fmt: skip


def test_the_test_biases_reach_the_clamps():
    """With the test experts' biases, some of gpt-oss's gate and up values pass +-7 (so the
    clamps are exercised), and the clamped activation differs from SwiGLU there."""
    shape = gpt_oss_like(dtype=torch.float32)
    w13, b13 = make_w13(shape, 4, "cpu"), make_biases(shape, 4, "cpu")["b13"]
    x = make_tokens(shape, [64], 4, "cpu")[0]
    h = torch.einsum("th,eih->tei", x, w13) + b13  # [T, E, 2I]
    gate, up = h[..., : shape.ffn], h[..., shape.ffn :]
    assert (gate > SWIGLUOAI_LIMIT).float().mean() > 0.01
    assert (up.abs() > SWIGLUOAI_LIMIT).float().mean() > 0.01
    assert not torch.allclose(glu_ref(gate, up, "swigluoai"), glu_ref(gate, up, "silu"))


@pytest.mark.parametrize(
    "R, activation, bias, dtype",
    [
        (1, "swigluoai", True, torch.bfloat16),
        (2, "swigluoai", True, torch.bfloat16),
        (2, "swigluoai", True, torch.float32),
        (2, "silu", True, torch.float16),
        (4, "swigluoai", False, torch.bfloat16),
    ],
)
def test_layer_with_the_experts_kind(R, activation, bias, dtype):
    """The whole layer, one kernel and two (``split``): GEMM1 adds b13 and applies the
    activation, the down projection adds b2 before the top-k reduce weights the rows."""
    shape = gpt_oss_like(activation=activation, bias=bias, dtype=dtype)
    rt = routing.zipf(R, [T] * R, shape.num_experts, shape.topk, 1.1, seed=R)
    placement = Placement.contiguous(shape.num_experts, R)
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, shape, config=small_config())
        meta = ws.meta("layer")
        assert (meta.ACT, meta.BIAS) == (("silu", "swigluoai").index(activation), bias)
        for split in (False, True):
            _, problems = run_layer_checked(ws, rt, placement, 7, shape, "cpu", split=split)
            assert problems == []


@pytest.mark.parametrize("swiglu", [True, False])
def test_dispatch_gemm_adds_b13(swiglu):
    """Mode "gemm": the activations ``glu(x @ w_gate^T + b_gate, x @ w_up^T + b_up)``, or,
    without the gated epilogue, the raw ``x @ w13^T + b13`` ``[C, 2I]``."""
    R, shape, seed = 2, gpt_oss_like(), 8
    rt = routing.uniform(R, [T] * R, shape.num_experts, shape.topk, seed=seed)
    placement = Placement.contiguous(shape.num_experts, R)
    xs = make_tokens(shape, [T] * R, seed, "cpu")
    w13 = {r: placement.local_weights(make_w13(shape, seed, "cpu"), r) for r in range(R)}
    b13 = {r: local_biases(shape, placement, r, seed, "cpu")["b13"] for r in range(R)}
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, shape, config=small_config(), swiglu=swiglu, combine=False)
        handles = run_poisoned(ws, xs, rt.topk_ids, w13, "gemm", b13=b13)
        problems = check_calls(
            handles, xs, rt.topk_ids, w13, placement, "gemm", swiglu, b13, shape.activation
        )
        assert problems == []


def test_fp8_layer_with_biases_and_the_clamped_activation():
    """FP8 (e4m3 weights, 128 x 128 block scales): b13 added to the scaled gate and up products
    before the activation and the requantisation, b2 to the down projection's output."""
    R, seed = 2, 3
    shape = gpt_oss_like(hidden=256, ffn=128, num_experts=8, topk=2, max_tokens_per_rank=24,
                         fp8=True)  # fmt: skip
    rt = routing.uniform(R, [19] * R, shape.num_experts, shape.topk, seed=seed)
    xs = make_tokens(shape, [19] * R, seed + 1, "cpu")
    ids, w = dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))
    with EmulatedWorld(R) as world:
        layer = FusedEPMoE.from_dense(
            world, shape, make_w13(shape, seed, "cpu"), make_w2(shape, seed, "cpu"),
            **make_biases(shape, seed, "cpu"), config=KernelConfig.interpreter(combine_block=8),
        )  # fmt: skip
        out = layer(dict(enumerate(xs)), ids, w)
        layer.check_errors()
        for r in range(R):
            assert check_layer_output(out[r], xs[r], ids[r], w[r], shape, seed, r) == []
        layer.close()


def test_module_rebalance_moves_the_biases_and_nan_stays_nan():
    """``FusedEPMoE`` holds the biases in fp32 (given in bf16 here) beside the weights;
    ``rebalance`` moves them with the weights, and the next call equals ``moe_ref``. A NaN token
    comes out NaN through the clamps (they keep NaN, as torch's clamp does)."""
    R, seed, shape = 2, 5, gpt_oss_like()
    E, L = shape.num_experts, shape.num_experts // R
    w13, w2 = make_w13(shape, seed, "cpu"), make_w2(shape, seed, "cpu")
    biases = {name: b.bfloat16() for name, b in make_biases(shape, seed, "cpu").items()}
    rt = routing.hot_expert(R, [T] * R, E, shape.topk, 0.5, seed=seed)
    xs = make_tokens(shape, [T] * R, seed, "cpu")
    xs[1][3] = float("nan")
    args = dict(enumerate(xs)), dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))

    def check(out):
        for r in range(R):
            want = moe_ref(xs[r], rt.topk_ids[r], rt.topk_weights[r], w13, w2,
                           biases["b13"], biases["b2"], "swigluoai").float()  # fmt: skip
            assert want[3].isnan().all() == (r == 1)
            assert out[r][3].isnan().all() == (r == 1)
            good = ~want.isnan().any(1)
            assert compare_layer_output(out[r][good], want[good], shape.dtype, r) == []

    with EmulatedWorld(R) as world:
        layer = FusedEPMoE.from_dense(
            world, shape, w13, w2, **biases, config=small_config(),
        )  # fmt: skip
        assert layer.b13["0"].dtype == torch.float32 and tuple(layer.b2["1"].shape) == (L, 64)
        check(layer(*args))
        swapped = Placement.from_slots(R, L, [[divmod((e + L) % E, L)] for e in range(E)])
        layer.rebalance(swapped)
        assert torch.equal(layer.b13["0"][0], biases["b13"][L].float())
        check(layer(*args))
        layer.check_errors()
        layer.close()


def test_bias_and_activation_errors_are_clear():
    with pytest.raises(ValueError, match=r"activation must be one of \('silu', 'swigluoai'\)"):
        MoEShape(64, 32, 16, 4, 100, activation="gelu")
    with pytest.raises(ValueError, match="MoEShape.bias must be True or False, got 1"):
        MoEShape(64, 32, 16, 4, 100, bias=1)
    shape = gpt_oss_like()
    w13, w2 = make_w13(shape, 1, "cpu"), make_w2(shape, 1, "cpu")
    biases = make_biases(shape, 1, "cpu")
    with EmulatedWorld(2) as world:
        with pytest.raises(ValueError, match=r"give b13 \[L, 2I\] and b2 \[L, H\]"):
            FusedEPMoE.from_dense(world, shape, w13, w2, b13=biases["b13"])
        with pytest.raises(ValueError, match=r"b2 has shape \(16, 32\), expected \(16, 64\)"):
            FusedEPMoE.from_dense(world, shape, w13, w2, b13=biases["b13"], b2=w2[:, 0, :])
        plain = MoEShape(64, 32, 16, 4, 100)
        with pytest.raises(ValueError, match="this layer's experts have none"):
            FusedEPMoE.from_dense(world, plain, w13, w2, **biases)
        ws = Megakernel(world, shape, config=small_config())
        rt = routing.uniform(2, [T] * 2, 16, 4, seed=1)
        xs = make_tokens(shape, [T] * 2, 1, "cpu")
        w13_local = {r: Placement.contiguous(16, 2).local_weights(w13, r) for r in range(2)}
        with pytest.raises(ValueError, match="MoEShape\\(bias=True\\): mode 'gemm' needs b13"):
            run_poisoned(ws, xs, rt.topk_ids, w13_local, "gemm")
        ws.close()
