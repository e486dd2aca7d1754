"""The FP8 layer (``MoEShape(fp8=True)``) under the interpreter, EmulatedWorld: e4m3 rows and
scales through dispatch, block-scaled GEMMs, bf16 combine.

Every output is checked against ``moe_fp8_ref`` (the same quantised operands in fp32) within
``FP8_TOLERANCE`` and against ``moe_ref`` on the dense experts within ``FP8_DENSE_ERROR``;
outputs are NaN-poisoned first (``out=``)."""

import pytest
import torch

from megakernel import FusedEPMoE, KernelConfig, Megakernel, routing
from megakernel.fp8 import (
    E4M3,
    FP8_REF_ERROR,
    moe_fp8_ref,
    quantize_experts,
    quantize_weight_blocks,
)
from megakernel.shapes import MoEShape
from megakernel.testing import check_layer_output, make_tokens, make_w2, make_w13
from symm_mem import EmulatedWorld

# two scale blocks of H, one of I; bf16 tokens and output (the FP8 path's usual dtype)
SHAPE = MoEShape(hidden=256, ffn=128, num_experts=8, topk=2, max_tokens_per_rank=24, fp8=True)
T = 19  # not a multiple of the tile (16) or the chunk (4)


def config(**kw) -> KernelConfig:
    return KernelConfig.interpreter(combine_block=8, **kw)


def run_and_check(layer: FusedEPMoE, R: int, counts: list[int], seed: int, rt=None) -> None:
    """One call of ``layer`` on fresh tokens (poisoned outputs), every rank checked."""
    E, K = SHAPE.num_experts, SHAPE.topk
    rt = rt or routing.uniform(R, counts, E, K, seed=seed)
    xs = make_tokens(SHAPE, counts, seed=seed + 1, device="cpu")
    ids, w = dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))
    outs = {r: torch.full_like(xs[r], float("nan")) for r in range(R)}
    handles = layer.workspace.run(
        dict(enumerate(xs)), ids, w, mode="layer", out=outs, **layer._experts_by_rank()
    )
    layer.check_errors()
    for r in range(R):
        assert handles[r].out is outs[r]
        assert check_layer_output(outs[r], xs[r], ids[r], w[r], SHAPE, 3, r) == []


@pytest.mark.parametrize("R,block_h", [(1, 64), (2, 64), (4, 64), (2, 256)])
def test_fp8_layer_matches_the_fp8_reference(R, block_h):
    """Dense bf16 experts quantised by ``from_dense``; uniform routing, then a second call with
    a rank of no tokens (the double-buffered receive side and scales). The dispatch quantises
    one 128-column group a step (``block_h`` below 128) or two (256, as the GPU's 1024 takes 8)."""
    with EmulatedWorld(R) as world:
        layer = FusedEPMoE.from_dense(
            world, SHAPE, make_w13(SHAPE, 3, "cpu"), make_w2(SHAPE, 3, "cpu"),
            config=config(block_h=block_h),
        )  # fmt: skip
        assert layer.workspace.meta("layer").BLOCK_H == block_h
        assert layer.w13["0"].dtype == E4M3 and layer.w13_scale["0"].dtype == torch.float32
        run_and_check(layer, R, [T] * R, seed=10)
        run_and_check(layer, R, [T - 5 * r for r in range(R - 1)] + [0], seed=20)
        layer.close()


def test_fp8_layer_loads_pre_quantised_weights_as_given():
    """(e4m3, block scales) pairs, as FP8 checkpoints store them, load unchanged; skewed routing
    takes rounds at a small capacity (the scales follow their rows in every round)."""
    R = 2
    w13, w2 = make_w13(SHAPE, 3, "cpu"), make_w2(SHAPE, 3, "cpu")
    q13, q2 = quantize_weight_blocks(w13), quantize_weight_blocks(w2)
    with EmulatedWorld(R) as world:
        layer = FusedEPMoE.from_dense(world, SHAPE, q13, q2, config=config(), capacity=24)
        for r in range(R):
            L = SHAPE.num_experts // R
            want = q13[0][r * L : (r + 1) * L].view(torch.uint8)
            assert torch.equal(layer.w13[str(r)].view(torch.uint8), want)
            assert torch.equal(layer.w2_scale[str(r)], q2[1][r * L : (r + 1) * L])
        rt = routing.all_to_one_rank(R, [T] * R, SHAPE.num_experts, SHAPE.topk, 0, seed=4)
        run_and_check(layer, R, [T] * R, seed=30, rt=rt)
        assert layer.stats()["calls_in_rounds"] == 1
        layer.close()


@pytest.mark.parametrize("half_tiles, group", [(True, 1), (False, 1), (True, 2)])
def test_fp8_half_tiles_match_the_fp8_reference(half_tiles, group):
    """``half_tiles`` (on by default): tiles of at most block_m / 2 rows (8 here)
    run GEMM1 and the down projection at half the height (off: every tile at full height);
    the routing gives experts tails of both heights. ``gemm1_group=2``: GEMM1's tasks column
    block major over an expert's tiles two at a time."""
    R = 2
    rt = routing.uniform(R, [T] * R, SHAPE.num_experts, SHAPE.topk, seed=40)
    rows = torch.bincount(torch.cat(rt.topk_ids).flatten(), minlength=SHAPE.num_experts)
    tails = rows % 16
    assert ((tails > 0) & (tails <= 8)).any() and (rows > 8).any()  # both heights run
    with EmulatedWorld(R) as world:
        layer = FusedEPMoE.from_dense(
            world, SHAPE, make_w13(SHAPE, 3, "cpu"), make_w2(SHAPE, 3, "cpu"),
            config=config(half_tiles=half_tiles, gemm1_group=group),
        )  # fmt: skip
        assert layer.workspace.meta("layer").HALF_TILES == half_tiles
        run_and_check(layer, R, [T] * R, seed=41, rt=rt)
        layer.close()


def test_half_tiles_default_to_on_and_fp8_keeps_the_choice():
    assert KernelConfig().half_tiles is True
    assert KernelConfig().for_fp8().half_tiles is True
    assert KernelConfig(half_tiles=False).for_fp8().half_tiles is False
    with pytest.raises(ValueError, match="half_tiles must be True or False, got 'yes'"):
        KernelConfig(half_tiles="yes")
    with pytest.raises(ValueError, match="token_saving must be True or False, got None"):
        KernelConfig(token_saving=None)


@pytest.mark.parametrize("tma", [True, False])
def test_fp8_down_tasks_span_scale_blocks_and_k_steps_keep_their_scales(tma):
    """Down tasks 256 columns wide (two w2 scale blocks side by side) over H = 384, so the second
    task's last 128 columns are past H; the token blocks, w13's k blocks, w2's column blocks and
    its k blocks scaled apart by up to 2500x before quantisation, so a scale taken for the wrong
    block or k step shows. Each 128-column block against ``moe_fp8_ref``."""
    shape = MoEShape(hidden=384, ffn=256, num_experts=4, topk=2, max_tokens_per_rank=24, fp8=True)
    R, E, K = 2, shape.num_experts, shape.topk
    w13, w2 = make_w13(shape, 5, "cpu"), make_w2(shape, 5, "cpu")
    w13[:, :, 128:256] *= 40  # GEMM1's k block 1
    w2[:, 128:256] *= 50  # down column blocks 1 and 2
    w2[:, 256:] *= 0.02
    w2[:, :, 128:] *= 30  # down's k block 1
    q13, q2 = quantize_experts(w13), quantize_experts(w2)
    rt = routing.uniform(R, [T] * R, E, K, seed=6)
    xs = make_tokens(shape, [T] * R, seed=7, device="cpu")
    for x in xs:
        x[:, 256:] *= 25
    ids, w = dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))
    with EmulatedWorld(R) as world:
        cfg = config(down_block_n=256, gemm1_tma=tma, down_tma=tma)
        layer = FusedEPMoE.from_dense(world, shape, q13, q2, config=cfg)
        assert layer.workspace.config.down_block_n == 256
        out = layer(dict(enumerate(xs)), ids, w)
        layer.check_errors()
        for r in range(R):
            want = moe_fp8_ref(xs[r], ids[r], w[r], q13, q2)
            for c in range(0, shape.hidden, 128):
                got, ref = out[r][:, c : c + 128].float(), want[:, c : c + 128]
                error = float((got - ref).norm() / ref.norm())
                assert error < FP8_REF_ERROR, f"rank {r} columns {c}+: {error:.3g}"
        layer.close()


def test_fp8_refusals_name_what_to_change():
    with pytest.raises(ValueError, match="multiples of 128"):
        MoEShape(hidden=192, ffn=128, num_experts=8, topk=2, max_tokens_per_rank=8, fp8=True)
    with EmulatedWorld(1) as world:
        with pytest.raises(ValueError, match="does not"):
            Megakernel(world, SHAPE, config=KernelConfig(pack="scan"))
        q13 = quantize_weight_blocks(make_w13(SHAPE, 3, "cpu"))
        w2 = make_w2(SHAPE, 3, "cpu")
        q2 = quantize_weight_blocks(w2)
        with pytest.raises(ValueError, match="give w13_scale and w2_scale"):
            FusedEPMoE(world, SHAPE, q13[0], q2[0])
        with pytest.raises(ValueError, match="w13 of rank 0 is torch.bfloat16"):
            FusedEPMoE(world, SHAPE, w2.new_zeros(8, 256, 256), q2[0], w13_scale=q13[1],
                       w2_scale=q2[1])  # fmt: skip
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            scales = q2[1].clone()
            scales[3, 1, 0] = bad
            with pytest.raises(
                ValueError, match=r"w2_scale of rank 0 has 1 block scales .*\(3, 1, 0\)"
            ):
                FusedEPMoE(world, SHAPE, q13[0], q2[0], w13_scale=q13[1], w2_scale=scales)
        ws = Megakernel(world, SHAPE, config=config())
        with pytest.raises(ValueError, match='runs mode "layer" only'):
            ws.run({0: torch.zeros(1, 256)}, {0: torch.zeros(1, 2, dtype=torch.int32)}, None,
                   {0: q13[0]}, mode="gemm")  # fmt: skip
        ws.close()


def test_fp8_rebalance_moves_weights_and_scales():
    """``rebalance`` moves every expert's e4m3 weights and their block scales together (a
    reversed placement moves all of them between the ranks); the next call is still right."""
    from megakernel.placement import Placement

    R, E = 2, SHAPE.num_experts
    L = E // R
    with EmulatedWorld(R) as world:
        layer = FusedEPMoE.from_dense(
            world, SHAPE, make_w13(SHAPE, 3, "cpu"), make_w2(SHAPE, 3, "cpu"), config=config()
        )
        before = {r: layer.w13_scale[str(r)].clone() for r in range(R)}
        flipped = [[(1 - e // L, e % L)] for e in range(E)]  # rank 0's experts to rank 1, ...
        layer.rebalance(Placement.from_slots(R, L, flipped))
        for r in range(R):
            assert torch.equal(layer.w13_scale[str(r)], before[1 - r])
        run_and_check(layer, R, [T] * R, seed=40)
        layer.close()
