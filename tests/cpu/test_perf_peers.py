"""perf.bench_peers on CPU: the rows per expert and the operand loads it reports
(``megakernel.traffic.rows_per_expert``, ``operand_bytes``), and its two PyTorch FP8 layers
(``perf.baseline``'s ``DequantizedBaseline`` and ``ScaledMMBaseline``)."""

from dataclasses import replace

import pytest
import torch

from megakernel import KernelConfig
from megakernel.fp8 import (
    FP8_DENSE_ERROR,
    dequantize_token_groups,
    dequantize_weight_blocks,
    moe_fp8_ref,
    quantize_experts,
)
from megakernel.reference import moe_ref
from megakernel.shapes import MoEShape
from megakernel.traffic import operand_bytes, rows_per_expert
from perf import baseline
from perf.baseline import DequantizedBaseline, ScaledMMBaseline


def test_rows_per_expert_skip_dropped_slots():
    ids = torch.tensor([[0, 3], [3, -1], [7, 0]])
    assert rows_per_expert(ids, 8).tolist() == [2, 0, 0, 2, 0, 0, 0, 1]
    assert rows_per_expert(torch.full((4, 2), -1), 3).tolist() == [0, 0, 0]


def test_operand_loads_count_a_weight_stream_per_tile_and_the_rows_per_column_block():
    """By hand: experts of 0, 16, 17 and 5 rows in tiles of 16 are 4 tiles (the 17-row expert
    streams its weights twice), 38 rows, 3 experts touched."""
    shape = MoEShape(hidden=256, ffn=128, num_experts=4, topk=2, max_tokens_per_rank=32)
    rows = torch.tensor([0, 16, 17, 5])
    cfg = KernelConfig(block_m=16, block_n=32, down_block_n=64)
    got = operand_bytes(rows, shape, cfg)
    assert got.weights == 3 * (3 * 256 * 128) * 2
    gemm1 = (128 // 32) * (4 * 2 * 32 * 256 + 38 * 256)  # column blocks x (w13 blocks + rows)
    down = (256 // 64) * (4 * 64 * 128 + 38 * 128)  # column blocks x (w2 blocks + act rows)
    assert got.streamed == 2 * (gemm1 + down)
    assert got.over(1e-3) == got.streamed * 1e3
    # FP8: one byte an operand; GEMM1 column blocks of 128, down blocks of at least 128
    fp8 = operand_bytes(rows, replace(shape, fp8=True), cfg)
    assert fp8.weights == got.weights // 2
    assert fp8.streamed == 1 * (4 * 2 * 128 * 256 + 38 * 256) + 2 * (4 * 128 * 128 + 38 * 128)
    # tail_rows: the 17-row expert's last row joins its first tile, one weight stream fewer
    tails = operand_bytes(rows, shape, replace(cfg, tail_rows=8))
    gemm1 = (128 // 32) * (3 * 2 * 32 * 256 + 38 * 256)
    down = (256 // 64) * (3 * 64 * 128 + 38 * 128)
    assert tails.streamed == 2 * (gemm1 + down)


def test_bench_layer_counts_the_busiest_ranks_loads():
    """perf.bench_layer's FP8 line: the rank whose experts get the most rows loads the most."""
    from megakernel import Megakernel
    from perf.bench_layer import busiest_rank_loads
    from symm_mem import EmulatedWorld

    shape = MoEShape(hidden=256, ffn=128, num_experts=4, topk=2, max_tokens_per_rank=32)
    ids = [torch.tensor([[0, 1], [1, 0]]), torch.tensor([[3, -1], [0, 1]])]  # rank 0: 6 rows
    with EmulatedWorld(2) as world:
        ws = Megakernel(world, shape, config=KernelConfig.interpreter())
        want = operand_bytes(torch.tensor([3, 3]), shape, ws.config).streamed
        assert busiest_rank_loads(ids, ws) == want
        ws.close()


def test_the_torch_fp8_baseline_dequantises_as_the_reference_does():
    """``DequantizedBaseline`` (bench_peers' torch_fp8) fills its bf16 weights with exactly
    ``dequantize_weight_blocks``' values, rounded once, and computes the layer: within the FP8
    bound of ``moe_ref`` on the bf16 weights the e4m3 ones came from."""
    E, H, I, K, T = 4, 256, 128, 2, 16
    shape = replace(MoEShape(H, I, E, K, T), fp8=True)
    gen = torch.Generator().manual_seed(3)
    w13 = (0.02 * torch.randn(E, 2 * I, H, generator=gen)).to(torch.bfloat16)
    w2 = (0.02 * torch.randn(E, H, I, generator=gen)).to(torch.bfloat16)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).int()
    weights = torch.rand(T, K, generator=gen)
    q13, q2 = quantize_experts(w13), quantize_experts(w2)
    base = DequantizedBaseline(shape, q13, q2)
    out = base(x, ids, weights)
    assert torch.equal(base.dense13, dequantize_weight_blocks(*q13).to(torch.bfloat16))
    assert torch.equal(base.dense2, dequantize_weight_blocks(*q2).to(torch.bfloat16))
    want = moe_ref(x.float(), ids, weights, w13.float(), w2.float())
    error = ((out.float() - want).norm() / want.norm()).item()
    assert error <= FP8_DENSE_ERROR, error


def _dequantized_scaled_mm(a, b, scale_a, scale_b, out_dtype):
    """``torch._scaled_mm`` with DeepSeek-V3's scaling as cuBLASLt takes it (rows in multiples of
    ``SCALED_MM_ROWS``, both scales with their first dimension innermost), computed from the
    dequantised operands in fp32 and left in fp32 (the GPU's is ``out_dtype``): the CPU build has
    no block-scaled FP8 GEMM."""
    assert a.shape[0] % baseline.SCALED_MM_ROWS == 0 and out_dtype == torch.bfloat16
    assert scale_a.stride(0) == 1 and scale_b.stride(0) == 1
    return dequantize_token_groups(a, scale_a) @ dequantize_weight_blocks(b.t(), scale_b.t()).t()


def test_the_scaled_mm_baseline_runs_the_fp8_layer(monkeypatch):
    """``ScaledMMBaseline`` (bench_peers' scaled_mm) routes, quantises and sums as the FP8 path
    does: with the GEMMs in fp32 (the GPU's ``torch._scaled_mm`` is checked by the benchmark),
    within the rows' bf16 roundings of ``moe_fp8_ref``, dropped slots and an expert nobody
    picks included."""
    monkeypatch.setattr(torch, "_scaled_mm", _dequantized_scaled_mm)
    E, H, I, K, T = 5, 512, 512, 2, 23  # experts get row counts that need padding
    shape = replace(MoEShape(H, I, E, K, T), fp8=True)
    gen = torch.Generator().manual_seed(4)
    w13 = (0.02 * torch.randn(E, 2 * I, H, generator=gen)).to(torch.bfloat16)
    w2 = (0.02 * torch.randn(E, H, I, generator=gen)).to(torch.bfloat16)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(T)]).int()
    ids[3, 1] = ids[10, 0] = -1  # dropped; expert E - 1 unpicked
    weights = torch.rand(T, K, generator=gen)
    assert (torch.bincount(ids[ids >= 0]) % baseline.SCALED_MM_ROWS != 0).any()
    q13, q2 = quantize_experts(w13), quantize_experts(w2)
    out = ScaledMMBaseline(shape, q13, q2)(x, ids, weights)
    want = moe_fp8_ref(x, ids, weights, q13, q2)
    assert ((out.float() - want).norm() / want.norm()).item() < 4e-3
    with pytest.raises(ValueError, match="multiple of 4"):
        ScaledMMBaseline(shape, quantize_experts(w13[:, :, :256]), q2)


def test_bench_layer_checks_other_experts_then_times_them_beside_the_default(monkeypatch):
    """perf.bench_layer ``--experts``: each kind is built on the same weights (biases from the
    seed), checked against ``moe_ref`` and timed in alternation with the default layer. On the
    CPU, with the graph capture and the timer stood in for by plain calls."""
    import argparse

    from megakernel import FusedEPMoE, routing
    from megakernel.placement import Placement
    from megakernel.testing import local_w2, local_w13, make_tokens
    from perf import bench_layer
    from symm_mem import EmulatedWorld

    def time_many(calls):
        return {name: {"median": float(len(name)), "ran": call()} for name, call in calls.items()}

    monkeypatch.setattr(bench_layer, "graphed", lambda fn: fn)
    monkeypatch.setattr(bench_layer, "time_many", time_many)
    monkeypatch.setattr(bench_layer, "KernelConfig", lambda **kw: KernelConfig.interpreter())
    shape = MoEShape(hidden=64, ffn=32, num_experts=8, topk=2, max_tokens_per_rank=16)
    R, seed = 2, 4
    args = argparse.Namespace(experts=list(bench_layer.EXPERT_KINDS), seed=seed, ctas=0)
    placement = Placement.contiguous(shape.num_experts, R)
    rt = routing.uniform(R, [16] * R, shape.num_experts, shape.topk, seed=seed)
    xs = make_tokens(shape, [16] * R, seed, "cpu")
    case = dict(xs=xs, x=dict(enumerate(xs)), ids=dict(enumerate(rt.topk_ids)))
    case["weights"] = dict(enumerate(rt.topk_weights))
    with EmulatedWorld(R) as world:
        w13 = {r: local_w13(shape, placement, r, seed, "cpu") for r in range(R)}
        w2 = {r: local_w2(shape, placement, r, seed, "cpu") for r in range(R)}
        layer = FusedEPMoE(world, shape, w13, w2, config=KernelConfig.interpreter())
        inputs = (case["x"], case["ids"], case["weights"], w13, w2)
        row = bench_layer.time_experts(world, layer.workspace, case, inputs, shape, "tiny", args)
        assert set(row["experts_us"]) == set(bench_layer.EXPERT_KINDS)
        assert row["experts_us"]["bias"]["median"] == len("variant")
        assert row["experts_paired_default_us"]["bias"]["median"] == len("default")
        layer.close()
