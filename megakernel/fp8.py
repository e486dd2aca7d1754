"""FP8 (e4m3) block-scaled formats of the FP8 path, as DeepSeek-V3 checkpoints store them, and
their pure-torch reference.

Shape legend: T tokens, H hidden, I expert FFN width, E experts, B = 128 (the block).

- **Weights**: e4m3 ``w13 [E, 2I, H]`` and ``w2 [E, H, I]``, with fp32 scales per 128 x 128
  block, ``[E, 2I/B, H/B]`` and ``[E, H/B, I/B]``: the ``weight_scale_inv`` of the checkpoints,
  so ``w ~ w_fp8 * scale`` blockwise.
- **Activations**: e4m3 per token, with one fp32 scale per 128 columns (``x [T, H]``, scales
  ``[T, H/B]``): quantised at dispatch, and the SwiGLU output again before the down projection.

Scales are ``amax / 448`` (e4m3's largest finite value), so each block's largest magnitude maps
to 448; an all-zero block gets scale 1. ``moe_fp8_ref`` computes what the FP8 layer computes, in
fp32 on dequantised operands; ``FP8_TOLERANCE`` is how far the layer may be from it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from megakernel.reference import expert_ffn_ref, moe_ref_by_expert
from megakernel.shapes import FP8_BLOCK

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
BLOCK = FP8_BLOCK
# the FP8 layer against moe_fp8_ref, elementwise (rtol, atol) and norm-relative: both see the same
# quantised operands; they differ in the bf16 rounding of the combine and in accumulation order,
# which now and then rounds a SwiGLU output to the other e4m3 neighbour (up to 12.5% of it): one
# such flip moved a token by 0.031 on an H100 (outputs are O(1)), hence the atol
FP8_TOLERANCE = (2e-2, 5e-2)
FP8_REF_ERROR = 1.5e-2  # the interpreter's layer: 0.6% (bf16 output rounding, mostly)
# the FP8 layer against moe_ref on the dense weights, as ||out - ref|| / ||ref||: e4m3 keeps 3
# mantissa bits, so rounding one operand moves a product by about 2.6% (rms), and the layer
# rounds four (x, w13, the SwiGLU output, w2): moe_fp8_ref itself is 6.1-6.3% from moe_ref on
# Gaussian tokens and weights (H 512 to 7168), whatever computes it
FP8_DENSE_ERROR = 8e-2


def _check_blocks(t: torch.Tensor, dims: tuple[int, ...]) -> None:
    for d in dims:
        if t.shape[d] % BLOCK:
            raise ValueError(
                f"FP8 blocks are {BLOCK} wide: dimension {d} of shape {tuple(t.shape)} is not a "
                "multiple"
            )


def _scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def quantize_weight_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` -> (e4m3 ``[..., N, K]``, fp32 scales ``[..., N/B, K/B]``), one scale
    per 128 x 128 block."""
    _check_blocks(w, (-2, -1))
    *lead, N, K = w.shape
    blocks = w.float().reshape(*lead, N // BLOCK, BLOCK, K // BLOCK, BLOCK)
    scale = _scale(blocks.abs().amax(dim=(-3, -1)))  # [..., N/B, K/B]
    q = (blocks / scale[..., :, None, :, None]).to(E4M3)
    return q.reshape(w.shape), scale


def quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_weight_blocks`` of ``w [E, N, K]`` one expert at a time (its fp32 working copy
    is one expert's, not all of them: dsv3's w13 is 15 GB in bf16)."""
    _check_blocks(w, (-2, -1))
    E, N, K = w.shape
    q = torch.empty(w.shape, dtype=E4M3, device=w.device)
    scale = torch.empty(E, N // BLOCK, K // BLOCK, dtype=torch.float32, device=w.device)
    for e in range(E):
        q[e], scale[e] = quantize_weight_blocks(w[e])
    return q, scale


def dequantize_weight_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``[..., N, K]`` from e4m3 blocks and their scales (``quantize_weight_blocks``)."""
    *lead, N, K = q.shape
    blocks = q.float().reshape(*lead, N // BLOCK, BLOCK, K // BLOCK, BLOCK)
    return (blocks * scale[..., :, None, :, None]).reshape(q.shape)


def quantize_token_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, H]`` -> (e4m3 ``[T, H]``, fp32 scales ``[T, H/B]``), one scale per token and 128
    columns."""
    _check_blocks(x, (-1,))
    T, H = x.shape
    groups = x.float().reshape(T, H // BLOCK, BLOCK)
    scale = _scale(groups.abs().amax(dim=-1))
    return (groups / scale[..., None]).to(E4M3).reshape(T, H), scale


def dequantize_token_groups(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    T, H = q.shape
    return (q.float().reshape(T, H // BLOCK, BLOCK) * scale[..., None]).reshape(T, H)


def fp8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the FP8 path sees it: quantised per token and 128 columns, then dequantised."""
    return dequantize_token_groups(*quantize_token_groups(x))


def _dequantized_experts(w13, w2, b13=None, b2=None):
    """``expert(e) -> (w13 [2I, H], w2 [H, I], b13 [2I] | None, b2 [H] | None)`` fp32, the
    weights from (e4m3, block scales) pairs."""

    def expert(e: int) -> tuple[torch.Tensor | None, ...]:
        return (
            dequantize_weight_blocks(w13[0][e], w13[1][e]),
            dequantize_weight_blocks(w2[0][e], w2[1][e]),
            None if b13 is None else b13[e],
            None if b2 is None else b2[e],
        )

    return expert


def moe_fp8_ref(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: tuple[torch.Tensor, torch.Tensor],
    w2: tuple[torch.Tensor, torch.Tensor],
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """The FP8 layer's result, fp32 ``[T, H]``: ``x`` quantised per token group (the dispatch),
    each expert's ``w13`` / ``w2`` given as (e4m3, block scales) and dequantised, GEMM1 (plus
    ``b13 [E, 2I]``) and the gated activation (``MoEShape.activation``) in fp32, its output
    quantised per token group again, GEMM2 (plus ``b2 [E, H]``) in fp32, the top-k sum in fp32.
    Dropped slots (id -1) contribute nothing."""
    experts = _dequantized_experts(w13, w2, b13, b2)
    return moe_fp8_ref_by_expert(x, topk_ids, topk_weights, experts, activation)


def moe_fp8_ref_by_expert(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_weights: Callable[[int], tuple[torch.Tensor | None, ...]],
    activation: str = "silu",
) -> torch.Tensor:
    """``moe_fp8_ref`` asking ``expert_weights(e)`` for one expert's dequantised ``(w13, w2)``
    (then its biases, where it has them) at a time, only for the experts the tokens picked
    (``moe_ref_by_expert``)."""
    # the gated output quantised per token group before the down projection, as the path does
    ffn = partial(expert_ffn_ref, activation=activation, between=fp8_roundtrip)
    return moe_ref_by_expert(fp8_roundtrip(x), topk_ids, topk_weights, expert_weights, ffn)


def moe_dequantized_ref(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: tuple[torch.Tensor, torch.Tensor],
    w2: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """``moe_ref`` on the dequantised weights with unquantised activations (fp32): the part of
    the FP8 error that the weights alone bring."""
    return moe_ref_by_expert(x, topk_ids, topk_weights, _dequantized_experts(w13, w2))
