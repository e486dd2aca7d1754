"""The experts' gated activations and biases (``MoEShape.activation``, ``MoEShape.bias``), as
GEMM1's epilogues apply them to fp32 products, bf16 and FP8 paths alike.

Shape legend: BM rows of a tile, N columns of a product, L local slots, I expert FFN width,
H hidden.

- ``glu``: ``silu(gate) * up``, or gpt-oss's clamped ``swigluoai``;
- ``bias_row``: one slot's bias over a block of columns, as a ``[1, N]`` row to add.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megakernel import shapes

# KernelMeta.ACT: the index of MoEShape.activation in shapes.ACTIVATIONS
ACT_SILU = tl.constexpr(shapes.ACTIVATIONS.index("silu"))
ACT_SWIGLUOAI = tl.constexpr(shapes.ACTIVATIONS.index("swigluoai"))
SWIGLUOAI_ALPHA = tl.constexpr(shapes.SWIGLUOAI_ALPHA)
SWIGLUOAI_LIMIT = tl.constexpr(shapes.SWIGLUOAI_LIMIT)


@triton.jit
def glu(gate, up, ACT: tl.constexpr):
    """The gated activation of fp32 ``gate`` and ``up`` (same shape): ``silu(gate) * up``, or
    with ``ACT_SWIGLUOAI`` ``g * sigmoid(alpha g) * (u + 1)``, ``g = min(gate, limit)``,
    ``u = clamp(up, -limit, limit)``.

    NOTE: the clamps keep NaN (``PropagateNan.ALL``, as torch's clamp does): a NaN product must
    stay NaN, never become the limit."""
    if ACT == ACT_SWIGLUOAI:
        g = tl.minimum(gate, SWIGLUOAI_LIMIT, propagate_nan=tl.PropagateNan.ALL)
        u = tl.minimum(up, SWIGLUOAI_LIMIT, propagate_nan=tl.PropagateNan.ALL)
        u = tl.maximum(u, -SWIGLUOAI_LIMIT, propagate_nan=tl.PropagateNan.ALL)
        return g * tl.sigmoid(SWIGLUOAI_ALPHA * g) * (u + 1.0)
    else:
        return gate * tl.sigmoid(gate) * up


@triton.jit
def bias_row(bias_ptr, local, cols, WIDTH: tl.constexpr):
    """``bias[local, cols]`` of an fp32 ``[L, WIDTH]`` bias as a ``[1, N]`` row (``cols [N]``;
    0 past ``WIDTH``, where the caller stores nothing)."""
    row = bias_ptr + tl.cast(local, tl.int64) * WIDTH
    return tl.load(row + cols, mask=cols < WIDTH, other=0.0)[None, :]
