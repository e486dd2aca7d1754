"""The unfused baseline the benchmarks time ours against: permute + NCCL all-to-all +
``torch._grouped_mm`` + SwiGLU (+ ``torch._grouped_mm`` + all-to-all back + weighted sum).

Shape legend: T tokens on this rank, H hidden, I expert FFN width, E experts, L = E / R experts
per rank, K top-k, R ranks, S rows this rank receives. Contiguous placement; one rank per process
(NCCL), or R = 1. The split sizes go through the host, as in a plain PyTorch implementation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megakernel.shapes import MoEShape


def _all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits=None, in_splits=None) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_to_all_single(out, inp, out_splits, in_splits)
    else:
        out.copy_(inp)


def baseline_moe(
    x: torch.Tensor,  # [T, H]
    topk_ids: torch.Tensor,  # [T, K] logical expert ids, -1 dropped
    topk_weights: torch.Tensor | None,  # [T, K]
    w13: torch.Tensor,  # [L, 2I, H] this rank's experts
    w2: torch.Tensor | None,  # [L, H, I]
    shape: MoEShape,
    world_size: int,
    layer: bool = True,
) -> torch.Tensor:
    """One rank's share of the MoE layer (``layer``: ``[T, H]``) or of dispatch + GEMM1 (the
    activations ``[S, I]`` in expert-major order)."""
    R, E, K, H = world_size, shape.num_experts, shape.topk, shape.hidden
    L, T = E // R, x.shape[0]
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(torch.where(flat >= 0, flat, E), stable=True)  # destination-major
    n_send = int((flat >= 0).sum())
    send = x[order[:n_send] // K]
    per_expert = torch.bincount(flat[flat >= 0], minlength=E).int()  # [E]
    got = torch.empty(R * L, dtype=torch.int32, device=x.device)
    _all_to_all(got, per_expert)
    got = got.view(R, L)  # rows from source s for local expert l
    in_splits = per_expert.view(R, L).sum(1).tolist()
    out_splits = got.sum(1).tolist()
    recv = torch.empty(sum(out_splits), H, dtype=x.dtype, device=x.device)
    _all_to_all(recv, send, out_splits, in_splits)
    local = torch.repeat_interleave(
        torch.arange(L, device=x.device).repeat(R), got.reshape(-1).long()
    )
    expert_major = torch.argsort(local, stable=True)
    offs = torch.cumsum(got.sum(0), 0).int()
    h = torch._grouped_mm(recv[expert_major], w13.transpose(1, 2), offs=offs)
    act = F.silu(h[:, : shape.ffn]) * h[:, shape.ffn :]
    if not layer:
        return act
    y = torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)  # [S, H]
    source_major = torch.empty_like(y)
    source_major[expert_major] = y
    back = torch.empty(n_send, H, dtype=x.dtype, device=x.device)
    _all_to_all(back, source_major, in_splits, out_splits)
    per_slot = torch.zeros(T * K, H, dtype=x.dtype, device=x.device)
    per_slot[order[:n_send]] = back
    return topk_sum(per_slot, topk_weights)


def topk_sum(per_slot: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Each token's ``K`` slot outputs (``per_slot [T * K, H]``, slot ``t * K + k``; a dropped
    slot's row 0) weighted by ``topk_weights [T, K]`` and summed in fp32, in ``per_slot``'s dtype.
    """
    T, K = topk_weights.shape
    weighted = per_slot.view(T, K, -1).float() * topk_weights.float().unsqueeze(2)
    return weighted.sum(1).to(per_slot.dtype)


def blockwise_grouped_mm_refusal(device="cuda") -> str | None:
    """Why PyTorch's grouped FP8 GEMM cannot run DeepSeek-V3's scaling here (1 x 128 token
    scales, 128 x 128 weight scales), in PyTorch's own words; None if a small call ran. Hopper
    builds support only tensor-wise and row-wise scales in ``scaled_grouped_mm``, which is why
    ``DequantizedBaseline`` dequantises; this asks the installed build rather than assume it."""
    grouped = getattr(F, "scaled_grouped_mm", None)
    if grouped is None:
        return f"torch {torch.__version__} has no torch.nn.functional.scaled_grouped_mm"
    G, M, N, K = 2, 128, 256, 256  # two groups of 128 rows
    a = torch.randn(G * M, K, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(G, N, K, device=device).to(torch.float8_e4m3fn).transpose(1, 2)  # [G, K, N]
    scale_a = torch.ones(K // 128, G * M, device=device).t()  # [rows, K / 128], rows innermost
    scale_b = torch.ones(G, N // 128, K // 128, device=device)
    offs = torch.arange(M, G * M + 1, M, device=device, dtype=torch.int32)
    try:
        grouped(
            a, b, scale_a, F.ScalingType.BlockWise1x128, scale_b, F.ScalingType.BlockWise128x128,
            offs=offs, output_dtype=torch.bfloat16,
        )  # fmt: skip
        torch.cuda.synchronize(device)
    except (AttributeError, NotImplementedError, RuntimeError, TypeError, ValueError) as refusal:
        return f"{type(refusal).__name__}: {str(refusal).splitlines()[0][:200]}"
    return None


class DequantizedBaseline:
    """The FP8 layer in plain PyTorch, one rank (``MoEShape.fp8``): the tokens quantised per 128
    columns (``megakernel.fp8``), every expert's e4m3 weights dequantised into bf16 buffers on
    each call, then ``baseline_moe``. PyTorch's grouped FP8 GEMM has no DeepSeek-V3 block
    scales on Hopper (``blockwise_grouped_mm_refusal``; perf/RESULTS.md).

    The dequantisation is two passes over the bf16 buffers, no temporaries: an e4m3 -> bf16
    copy (exact), then an in-place multiply by the block scales (computed in fp32, rounded once
    to bf16: ``dequantize_weight_blocks``'s values): 7 bytes moved a weight. The first version
    went through fp32 working copies (about 19 bytes a weight, by count of its passes) and
    took 105-116 ms a dsv3 call on an H100, where the bf16 baseline took 8.6-18.7 ms."""

    def __init__(self, shape: MoEShape, w13, w2) -> None:
        """``w13`` / ``w2``: (e4m3 weights, fp32 block scales) of every expert."""
        self.shape, self.w13, self.w2 = shape, w13, w2
        self.dense13 = torch.empty(w13[0].shape, dtype=shape.dtype, device=w13[0].device)
        self.dense2 = torch.empty(w2[0].shape, dtype=shape.dtype, device=w2[0].device)

    def __call__(self, x, topk_ids, topk_weights) -> torch.Tensor:
        from megakernel.fp8 import BLOCK, fp8_roundtrip

        for dense, (q, scale) in ((self.dense13, self.w13), (self.dense2, self.w2)):
            L, N, K = q.shape
            blocks = dense.view(L, N // BLOCK, BLOCK, K // BLOCK, BLOCK)
            blocks.copy_(q.view(blocks.shape))
            blocks.mul_(scale[:, :, None, :, None])
        x = fp8_roundtrip(x).to(x.dtype)
        return baseline_moe(x, topk_ids, topk_weights, self.dense13, self.dense2, self.shape, 1)


SCALED_MM_ROWS = 4  # ScaledMMBaseline's GEMMs take rows in multiples of this (see _scaled_mm)


class ScaledMMBaseline:
    """The FP8 layer in plain PyTorch with FP8 GEMMs, one rank (``MoEShape.fp8``): per expert,
    its rows gathered, quantised per 128 columns (``megakernel.fp8``), and ``torch._scaled_mm``
    with DeepSeek-V3's scaling (1 x 128 token groups, 128 x 128 weight blocks: cuBLASLt >= 12.9
    on Hopper), bf16 out; SwiGLU in fp32, quantised again for the down projection; the rows'
    outputs weighted and summed per token. One expert after another, the row counts through the
    host, as a plain PyTorch loop over experts runs.

    ``_scaled_mm`` takes the token scales ``[M, K/128]`` with M innermost and the weight scales
    as ``[K/128, N/128]`` with K/128 innermost and a multiple of 4: the checkpoint's
    ``[N/128, K/128]`` transposed, as it is where K is a multiple of 512."""

    def __init__(self, shape: MoEShape, w13, w2) -> None:
        """``w13`` / ``w2``: (e4m3 weights, fp32 block scales) of every expert."""
        from megakernel.fp8 import BLOCK

        for name, (q, _) in (("w13", w13), ("w2", w2)):
            if q.shape[-1] % (4 * BLOCK):
                raise ValueError(
                    f"torch._scaled_mm's 128 x 128 weight scales need K / 128 a multiple of 4: "
                    f"{name} has K = {q.shape[-1]}"
                )
        self.shape, self.w13, self.w2 = shape, w13, w2

    def __call__(self, x, topk_ids, topk_weights) -> torch.Tensor:
        from megakernel.fp8 import quantize_token_groups

        T, K = topk_ids.shape
        E, H, I = self.shape.num_experts, self.shape.hidden, self.shape.ffn
        flat = topk_ids.reshape(-1).long()
        order = torch.argsort(torch.where(flat >= 0, flat, E), stable=True)  # expert-major
        counts = torch.bincount(flat[flat >= 0], minlength=E).tolist()
        xq, xs = quantize_token_groups(x)
        per_slot = torch.zeros(T * K, H, dtype=x.dtype, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            slots = order[start : start + n]
            tokens = slots // K
            h = _scaled_mm(xq[tokens], xs[tokens], *(w[e] for w in self.w13))
            act = F.silu(h[:, :I].float()) * h[:, I:].float()
            y = _scaled_mm(*quantize_token_groups(act), *(w[e] for w in self.w2))
            per_slot[slots] = y.to(x.dtype)
            start += n
        return topk_sum(per_slot, topk_weights)


def _scaled_mm(a, a_scale, w, w_scale) -> torch.Tensor:
    """bf16 ``a @ w^T`` from e4m3 ``a [M, K]`` with ``a_scale [M, K/128]`` and e4m3 ``w [N, K]``
    with ``w_scale [N/128, K/128]``, in the layouts ``torch._scaled_mm`` takes them. M is padded
    to a multiple of ``SCALED_MM_ROWS`` (zero rows, unit scales) and the padding sliced off:
    on an H100 (torch 2.11, CUDA 13) cuBLASLt found no algorithm for 1 or 117 rows
    (``CUBLAS_STATUS_NOT_SUPPORTED``), and ran 4, 8, 16, 120, 124 and 128."""
    M = a.shape[0]
    pad = -M % SCALED_MM_ROWS
    if pad:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        a_scale = torch.cat([a_scale, a_scale.new_ones(pad, a_scale.shape[1])])
    out = torch._scaled_mm(
        a, w.t(), a_scale.t().contiguous().t(), w_scale.t(), out_dtype=torch.bfloat16
    )
    return out[:M]
