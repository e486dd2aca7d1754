"""Hugging Face ``transformers`` MoE blocks on the fused layer.

``from_hf(block, world)`` (also ``FusedEPMoE.from_hf``) builds a ``FusedEPMoE`` holding one
sparse MoE block's routed experts; ``replace_moe_blocks(model, world)`` swaps the routed experts
of every MoE block of a model, in place. The model's router stays its own: the same logits,
softmax or sigmoid, top-k, renormalisation, bias and scaling; the layer receives its
``topk_ids`` and ``topk_weights``. Shared experts stay beside the layer, as the block runs them.

Two module forms:

- **fused experts** (transformers 5): ``block.experts`` holds ``gate_up_proj [E, 2I, H]`` (gate
  rows, then up rows) and ``down_proj [E, H, I]``, and the block calls
  ``experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])`` after its router. Only
  ``block.experts`` is replaced (by ``FusedExperts``): the block's own code runs the rest.
  Qwen3-MoE, Qwen2-MoE (its gated shared expert kept), Mixtral, DeepSeek-V3 (its shared experts
  and grouped top-k router kept).
- **per-expert modules** (transformers 4): ``block.experts`` is an ``nn.ModuleList`` of MLPs
  (``gate_proj`` / ``up_proj`` / ``down_proj``, or Mixtral's ``w1`` / ``w3`` / ``w2``) and the
  block's forward loops over them, with the router inline: the whole block is replaced by
  ``PerExpertBlock``, which routes as those blocks did (softmax in fp32, top-k, renormalised
  where ``norm_topk_prob`` or for Mixtral, weights cast to the hidden dtype; Qwen2-MoE's gated
  shared expert added) and returns ``(hidden, router_logits)`` as they did. Qwen3-MoE, Qwen2-MoE
  and Mixtral.

FP8 checkpoints: where transformers holds a block's experts quantised (its ``FP8Experts``, as
DeepSeek-V3's FP8 checkpoints load: e4m3 ``gate_up_proj`` / ``down_proj`` with fp32 or UE8M0
``*_scale_inv`` per 128 x 128 block, activations quantised per token and 128 columns on the fly),
the layer is an FP8 one (``MoEShape.fp8``) holding those weights and scales as they are.

gpt-oss is refused: its experts compute ``(up + 1) * gate * sigmoid(alpha * gate)`` with both
halves clamped, add biases and interleave gate and up columns; the layer computes
``silu(gate) * up``. Any other activation than SiLU is refused too.

Where it runs: a world whose process runs one rank, ``EmulatedWorld(1, "cuda")`` or
``NvshmemWorld`` under ``symm_mem.launch`` (each rank then holds the experts of its slots and
calls the model with its own batch). ``from_hf`` also takes worlds of several local ranks (the
layer is then called with dicts keyed by rank); ``replace_moe_blocks`` does not, since a model's
forward passes one tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from megakernel.shapes import MoEShape
from symm_mem.buffer import World

if TYPE_CHECKING:
    from megakernel.layer import FusedEPMoE

DEFAULT_MAX_TOKENS = 4096  # tokens per rank per call a converted block accepts (max_tokens=)
SILU = ("SiLU", "SiLUActivation")  # the class names transformers' ACT2FN["silu"] has had
LEGACY_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))  # Mixtral: w1, w3, w2


def is_moe_block(module: nn.Module) -> bool:
    """A sparse MoE block: a router (``gate``, or gpt-oss's ``router``) beside ``experts``."""
    return (hasattr(module, "gate") or hasattr(module, "router")) and hasattr(module, "experts")


def _refuse_unsupported(block: nn.Module) -> None:
    name = type(block.experts).__name__ + type(block).__name__
    # (transformers' FP8Experts registers gate_up_proj_bias as None)
    if "GptOss" in name or getattr(block.experts, "gate_up_proj_bias", None) is not None:
        raise NotImplementedError(
            f"{type(block).__name__}: gpt-oss experts compute (up + 1) * gate * sigmoid(alpha * "
            "gate) with clamped halves, biases and interleaved gate/up columns; FusedEPMoE "
            "computes silu(gate) * up without biases, so this block is not supported"
        )
    act = getattr(block.experts, "act_fn", None)
    if isinstance(block.experts, nn.ModuleList) and len(block.experts):
        first = block.experts[0]
        act = getattr(first, "act_fn", None) or getattr(first, "act", None)
    if act is not None and type(act).__name__ not in SILU:
        raise NotImplementedError(
            f"{type(block).__name__}: experts use {type(act).__name__}; FusedEPMoE computes "
            "SwiGLU (silu(gate) * up) only"
        )


def dense_weights(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's routed experts as ``w13 [E, 2I, H]`` (gate rows, then up rows) and
    ``w2 [E, H, I]``, from either module form (views of the fused form's parameters)."""
    _refuse_unsupported(block)
    experts = block.experts
    if isinstance(experts, nn.ModuleList):
        names = next((n for n in LEGACY_NAMES if hasattr(experts[0], n[0])), None)
        if names is None:
            raise ValueError(
                f"{type(block).__name__}: experts are {type(experts[0]).__name__} modules with "
                f"none of {LEGACY_NAMES} (gate, up, down projections)"
            )
        gate, up, down = (
            torch.stack([getattr(e, n).weight for e in experts]).detach() for n in names
        )
        return torch.cat([gate, up], dim=1), down
    if not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
        raise ValueError(
            f"{type(block).__name__}: its experts ({type(experts).__name__}) hold neither "
            "gate_up_proj / down_proj nor an nn.ModuleList of expert MLPs"
        )
    return experts.gate_up_proj.detach(), experts.down_proj.detach()


def fp8_weights(block: nn.Module):
    """The block's routed experts as (e4m3 weights, fp32 block scales) pairs, ``w13`` and
    ``w2``, where transformers holds them quantised (``FP8Experts``: ``gate_up_proj`` with
    ``gate_up_proj_scale_inv``, ``down_proj`` with ``down_proj_scale_inv``); else None. Scales
    stored as UE8M0 (powers of two) become fp32 exactly."""
    experts = block.experts
    weight = getattr(experts, "gate_up_proj", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float8_e4m3fn:
        return None
    _refuse_unsupported(block)
    kind = f"{type(block).__name__}'s FP8 experts"
    block_size = tuple(getattr(experts, "block_size", None) or ())
    if block_size != (128, 128):
        raise NotImplementedError(
            f"{kind} use {block_size or 'per-tensor'} scale blocks; FusedEPMoE's FP8 path takes "
            "128 x 128 weight blocks (MoEShape.fp8)"
        )
    if getattr(experts, "activation_scheme", "dynamic") != "dynamic":
        raise NotImplementedError(
            f"{kind} use static activation scales; FusedEPMoE quantises activations per token "
            "and 128 columns as it dispatches them (the dynamic scheme)"
        )
    if getattr(experts, "limit", None) is not None:
        raise NotImplementedError(f"{kind} clamp their SwiGLU; FusedEPMoE computes silu(gate) * up")
    return tuple(
        (getattr(experts, name).detach(), getattr(experts, f"{name}_scale_inv").detach().float())
        for name in ("gate_up_proj", "down_proj")
    )


def block_topk(block: nn.Module) -> int:
    """K: the router's ``top_k`` (transformers 5), else the block's (transformers 4)."""
    for owner in (getattr(block, "gate", None), block):
        k = getattr(owner, "top_k", None)
        if isinstance(k, int):
            return k
    raise ValueError(f"{type(block).__name__}: found no top_k on the block or its gate")


def from_hf(
    block: nn.Module,
    world: World,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    dtype: torch.dtype | None = None,
    **kw: object,
) -> FusedEPMoE:
    """A ``FusedEPMoE`` holding ``block``'s routed experts, sharded onto ``world``'s ranks by the
    placement (``kw``: as for ``FusedEPMoE``). ``max_tokens``: tokens per rank per call;
    ``dtype``: the layer's (default: the experts', bf16 for FP8 experts, whose layer is FP8)."""
    from megakernel.layer import FusedEPMoE

    fp8 = fp8_weights(block)
    w13, w2 = fp8 or dense_weights(block)
    E, two_i, H = (w13[0] if fp8 else w13).shape
    shape = MoEShape(
        hidden=H,
        ffn=two_i // 2,
        num_experts=E,
        topk=block_topk(block),
        max_tokens_per_rank=max_tokens,
        dtype=dtype or (torch.bfloat16 if fp8 else w13.dtype),
        fp8=fp8 is not None,
    )
    return FusedEPMoE.from_dense(world, shape, w13, w2, **kw)


class FusedExperts(nn.Module):
    """Stands in for a fused-form ``block.experts``: ``forward(hidden [T, H], top_k_index [T, K],
    top_k_weights [T, K]) -> [T, H]`` runs the layer on this process's one rank."""

    def __init__(self, layer: FusedEPMoE) -> None:
        super().__init__()
        if len(layer.world.local_ranks) != 1:
            raise ValueError(
                f"a model's forward passes one tensor, but this world runs ranks "
                f"{layer.world.local_ranks} in one process: use a world of one rank per process"
            )
        self.layer = layer

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        x = hidden.to(self.layer.shape.dtype).contiguous()
        out = self.layer(x, top_k_index.to(torch.int32), top_k_weights)
        return out.to(hidden.dtype)


class PerExpertBlock(nn.Module):
    """Stands in for a per-expert-form (transformers 4) sparse MoE block of Qwen3-MoE, Qwen2-MoE
    or Mixtral: routes as the block did, runs the routed experts on the layer, adds Qwen2-MoE's
    gated shared expert, and returns ``(hidden [B, S, H], router_logits [B * S, E])``."""

    def __init__(self, block: nn.Module, experts: FusedExperts) -> None:
        super().__init__()
        self.gate = block.gate  # nn.Linear(H, E)
        self.experts = experts
        self.top_k = block_topk(block)
        # Mixtral's block always renormalised; its experts are the ones named w1 / w3 / w2
        mixtral = "Mixtral" in type(block).__name__ or hasattr(block.experts[0], "w1")
        self.renormalize = mixtral or bool(getattr(block, "norm_topk_prob", False))
        self.shared_expert = getattr(block, "shared_expert", None)
        self.shared_expert_gate = getattr(block, "shared_expert_gate", None)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, H = hidden_states.shape
        x = hidden_states.reshape(-1, H)
        router_logits = self.gate(x)
        weights = torch.softmax(router_logits, dim=1, dtype=torch.float)
        weights, ids = torch.topk(weights, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, ids, weights.to(x.dtype))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out.reshape(B, S, H), router_logits


def replace_moe_blocks(model: nn.Module, world: World, **kw: object) -> nn.Module:
    """Swap the routed experts of every sparse MoE block of ``model`` for ``FusedEPMoE`` layers,
    in place (``kw`` as for ``from_hf``); returns ``model``. Raises where a block is of a form
    or family that is not supported (nothing is swapped then)."""
    blocks = [(name, m) for name, m in model.named_modules() if is_moe_block(m)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no sparse MoE block (gate + experts)")
    for _, block in blocks:  # refuse before changing anything
        fp8_weights(block) or dense_weights(block)
    for name, block in blocks:
        experts = FusedExperts(from_hf(block, world, **kw))
        if isinstance(block.experts, nn.ModuleList):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, PerExpertBlock(block, experts))
        else:
            block.experts = experts
    return model


def close_moe_blocks(model: nn.Module) -> None:
    """Free the symmetric workspaces of every layer ``replace_moe_blocks`` put into ``model``
    (collective, like ``FusedEPMoE.close``)."""
    for module in model.modules():
        if isinstance(module, FusedExperts):
            module.layer.close()
