"""MoE shapes and named presets.

Shape legend: T tokens per rank (at most ``max_tokens_per_rank``), H hidden, I expert FFN width,
E experts (global), L = E / R experts per rank, K top-k, R ranks.

``fp8``: the experts' weights are e4m3 with one fp32 scale per 128 x 128 block, and the tokens
are quantised per 128 columns on their way to the experts (``megakernel.fp8``); ``dtype`` is
still that of the layer's input and output, and of the combine.

``activation``: how an expert gates its FFN, from ``gate = x @ w_gate^T`` and ``up = x @ w_up^T``
(plus the biases, with ``bias``):

- ``"silu"``: ``silu(gate) * up`` (SwiGLU: Qwen, Mixtral, DeepSeek);
- ``"swigluoai"``: gpt-oss's clamped form, ``g * sigmoid(1.702 g) * (u + 1)`` with
  ``g = min(gate, 7)`` and ``u = clamp(up, -7, 7)``.

``bias``: every expert adds ``b13 [2I]`` to its gate and up columns and ``b2 [H]`` to its output
(gpt-oss); the routing weight scales the biased output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_BLOCK = 128  # the FP8 path's scale block (megakernel.fp8.BLOCK)
ACTIVATIONS = ("silu", "swigluoai")  # MoEShape.activation; the kernels take the index
# gpt-oss's constants ("swigluoai"): the sigmoid's slope and the clamp on gate and up
SWIGLUOAI_ALPHA = 1.702
SWIGLUOAI_LIMIT = 7.0


@dataclass(frozen=True)
class MoEShape:
    hidden: int  # H
    ffn: int  # I, the width of one expert's FFN
    num_experts: int  # E
    topk: int  # K
    max_tokens_per_rank: int  # T at most
    dtype: torch.dtype = torch.bfloat16
    fp8: bool = False  # e4m3 expert weights with 128 x 128 block scales (see the module doc)
    activation: str = "silu"  # one of ACTIVATIONS (see the module doc)
    bias: bool = False  # experts carry b13 [2I] and b2 [H] (see the module doc)

    def __post_init__(self) -> None:
        for name in ("hidden", "ffn", "num_experts", "topk", "max_tokens_per_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoEShape.{name} must be a positive int, got {value!r}")
        if self.topk > self.num_experts:
            raise ValueError(
                f"MoEShape.topk is {self.topk} but there are only {self.num_experts} experts"
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"MoEShape.dtype must be one of {_DTYPES}, got {self.dtype}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"MoEShape.activation must be one of {ACTIVATIONS}, got {self.activation!r}"
            )
        for name in ("fp8", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"MoEShape.{name} must be True or False, got {getattr(self, name)!r}"
                )
        if self.fp8 and (self.hidden % FP8_BLOCK or self.ffn % FP8_BLOCK):
            raise ValueError(
                f"MoEShape(fp8=True) scales blocks of {FP8_BLOCK}: hidden {self.hidden} and ffn "
                f"{self.ffn} must both be multiples of {FP8_BLOCK}"
            )

    @property
    def gemm_dtype(self) -> torch.dtype:
        """What the expert GEMMs read (weights, received rows, activations): e4m3 with ``fp8``,
        else ``dtype``."""
        return torch.float8_e4m3fn if self.fp8 else self.dtype

    def weight_scale_shapes(self, experts: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """With ``fp8``: the fp32 block scales of ``experts`` experts' ``w13`` and ``w2``,
        ``[experts, 2I/128, H/128]`` and ``[experts, H/128, I/128]``."""
        H, I = self.hidden // FP8_BLOCK, self.ffn // FP8_BLOCK
        return (experts, 2 * I, H), (experts, H, I)

    def bias_shapes(self, experts: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """With ``bias``: the fp32 biases of ``experts`` experts, ``b13 [experts, 2I]`` (gate
        columns, then up columns) and ``b2 [experts, H]``."""
        return (experts, 2 * self.ffn), (experts, self.hidden)

    def experts_per_rank(self, world_size: int) -> int:
        """L for contiguous placement; E must split evenly over the ranks."""
        if self.num_experts % world_size:
            raise ValueError(
                f"{self.num_experts} experts do not split evenly over {world_size} ranks"
            )
        return self.num_experts // world_size

    def with_tokens(self, max_tokens_per_rank: int) -> MoEShape:
        return replace(self, max_tokens_per_rank=max_tokens_per_rank)


PRESETS: dict[str, MoEShape] = {
    # DeepSeek-V3: 256 routed experts, top-8
    "dsv3": MoEShape(hidden=7168, ffn=2048, num_experts=256, topk=8, max_tokens_per_rank=4096),
    "qwen3_235b": MoEShape(
        hidden=4096, ffn=1536, num_experts=128, topk=8, max_tokens_per_rank=4096
    ),
    "qwen3_30b": MoEShape(hidden=2048, ffn=768, num_experts=128, topk=8, max_tokens_per_rank=4096),
    "mixtral": MoEShape(hidden=4096, ffn=14336, num_experts=8, topk=2, max_tokens_per_rank=4096),
    # gpt-oss-20b's sizes with plain SwiGLU, the computation the peers run (the model itself:
    # activation="swigluoai", bias=True)
    "gpt_oss": MoEShape(hidden=2880, ffn=2880, num_experts=32, topk=4, max_tokens_per_rank=4096),
    # small shapes for the interpreter and unit tests
    "tiny": MoEShape(
        hidden=32, ffn=16, num_experts=8, topk=2, max_tokens_per_rank=40, dtype=torch.float32
    ),
    "small": MoEShape(
        hidden=64, ffn=32, num_experts=16, topk=4, max_tokens_per_rank=100, dtype=torch.float32
    ),
}


def preset(name: str) -> MoEShape:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
