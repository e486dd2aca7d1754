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
  and grouped top-k router kept), gpt-oss (below). The experts' layout flags of transformers 5
  (``is_transposed``, ``is_concatenated``, ``has_bias``) are read and undone.
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

gpt-oss: its experts add biases and compute ``(u + 1) * g * sigmoid(1.702 g)`` with ``g`` and
``u`` the gate and up values clamped at 7 (``u`` at -7 too), from transposed weights with gate
and up columns interleaved: the layer is built with ``activation="swigluoai"``, ``bias=True``
and the weights in its own layout (a copy). A fused form's gate (``_apply_gate``) is identified
by what it computes on a probe, not by its name; one that computes neither SwiGLU nor that, or
experts without a gate or with another activation function, are refused.

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

from megakernel.reference import glu_ref
from megakernel.shapes import ACTIVATIONS, SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT, MoEShape
from symm_mem.buffer import World

if TYPE_CHECKING:
    from megakernel.layer import FusedEPMoE

DEFAULT_MAX_TOKENS = 4096  # tokens per rank per call a converted block accepts (max_tokens=)
SILU = ("SiLU", "SiLUActivation")  # the class names transformers' ACT2FN["silu"] has had
LEGACY_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))  # Mixtral: w1, w3, w2


def is_moe_block(module: nn.Module) -> bool:
    """A sparse MoE block: a router (``gate``, or gpt-oss's ``router``) beside ``experts``."""
    return (hasattr(module, "gate") or hasattr(module, "router")) and hasattr(module, "experts")


def expert_activation(block: nn.Module) -> str:
    """The ``MoEShape.activation`` of ``block``'s experts; raises ``NotImplementedError`` for
    experts the layer cannot compute. A fused form's ``_apply_gate`` (transformers 5) is told by
    what it computes on a probe (``_probe_gate``): SwiGLU, or gpt-oss's clamped form with its
    constants."""
    experts = block.experts
    kind = type(block).__name__
    if getattr(experts, "has_gate", True) is False:
        raise NotImplementedError(
            f"{kind}: its experts have no gate (act(x @ up^T) only); FusedEPMoE computes gated "
            "experts"
        )
    act = getattr(experts, "act_fn", None)
    if isinstance(experts, nn.ModuleList) and len(experts):
        first = experts[0]
        act = getattr(first, "act_fn", None) or getattr(first, "act", None)
    if act is not None and type(act).__name__ not in SILU:
        raise NotImplementedError(
            f"{kind}: experts use {type(act).__name__}; FusedEPMoE computes SwiGLU "
            "(silu(gate) * up) or gpt-oss's clamped form only"
        )
    if isinstance(experts, nn.ModuleList) or not hasattr(experts, "_apply_gate"):
        return "silu"
    return _probe_gate(experts, kind)


def _probe_gate(experts: nn.Module, kind: str) -> str:
    """Which of ``ACTIVATIONS`` the experts' ``_apply_gate(gate_up)`` computes, from gate and up
    values of either sign with magnitudes spread from 1e-3 to 1e4 (a clamp anywhere below that
    shows: gpt-oss's at 7, DeepSeek-V4's at 10), laid out as the experts lay out their columns
    (gate then up, or interleaved where ``is_concatenated`` is False)."""
    g = torch.Generator().manual_seed(0)

    def spread() -> torch.Tensor:
        magnitude = 10 ** (7 * torch.rand(8, 64, generator=g, dtype=torch.float64) - 3)
        sign = torch.randint(0, 2, (8, 64), generator=g) * 2 - 1
        return (sign * magnitude).float()

    gate, up = spread(), spread()
    if getattr(experts, "is_concatenated", True):
        probe = torch.cat([gate, up], dim=-1)
    else:
        probe = torch.stack([gate, up], dim=-1).flatten(-2)
    try:
        with torch.no_grad():
            got = experts._apply_gate(probe).float()
    except Exception as e:  # a gate that needs more than its columns: not one of ours
        raise NotImplementedError(
            f"{kind}: its experts' gate could not be probed ({e!r}); FusedEPMoE computes "
            f"one of {ACTIVATIONS}"
        ) from e
    for name in ACTIVATIONS:
        want = glu_ref(gate, up, name)
        if got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            return name
    raise NotImplementedError(
        f"{kind}: its experts' gate ({type(experts).__name__}._apply_gate) computes none of "
        f"{ACTIVATIONS} (SwiGLU, or gpt-oss's clamped form with alpha {SWIGLUOAI_ALPHA} and "
        f"limit {SWIGLUOAI_LIMIT}), so this block is not supported"
    )


def dense_experts(block: nn.Module) -> dict[str, torch.Tensor]:
    """The block's routed experts as ``FusedEPMoE.from_dense`` takes them: ``w13 [E, 2I, H]``
    (gate rows, then up rows) and ``w2 [E, H, I]``, plus ``b13 [E, 2I]`` and ``b2 [E, H]`` where
    the experts have biases. From either module form; a fused form's layout flags
    (``is_transposed``: ``gate_up_proj [E, H, 2I]`` and ``down_proj [E, I, H]``;
    ``is_concatenated`` False: gate and up columns interleaved, as gpt-oss has them) are undone
    here (copies; the plain layout's tensors are views of the parameters)."""
    expert_activation(block)  # refuses what the layer cannot compute
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
        return {"w13": torch.cat([gate, up], dim=1), "w2": down}
    if not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
        raise ValueError(
            f"{type(block).__name__}: its experts ({type(experts).__name__}) hold neither "
            "gate_up_proj / down_proj nor an nn.ModuleList of expert MLPs"
        )
    transposed = getattr(experts, "is_transposed", False)
    interleaved = not getattr(experts, "is_concatenated", True)

    def gate_then_up(t: torch.Tensor) -> torch.Tensor:  # [E, 2I, ...] rows
        return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1) if interleaved else t

    w13 = experts.gate_up_proj.detach()
    w2 = experts.down_proj.detach()
    if transposed:
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    found = {"w13": gate_then_up(w13).contiguous(), "w2": w2.contiguous()}
    if getattr(experts, "has_bias", False):
        found["b13"] = gate_then_up(experts.gate_up_proj_bias.detach())
        found["b2"] = experts.down_proj_bias.detach()
    return found


def fp8_weights(block: nn.Module):
    """The block's routed experts as (e4m3 weights, fp32 block scales) pairs, ``w13`` and
    ``w2``, where transformers holds them quantised (``FP8Experts``: ``gate_up_proj`` with
    ``gate_up_proj_scale_inv``, ``down_proj`` with ``down_proj_scale_inv``); else None. Scales
    stored as UE8M0 (powers of two) become fp32 exactly."""
    experts = block.experts
    weight = getattr(experts, "gate_up_proj", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float8_e4m3fn:
        return None
    expert_activation(block)
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
        raise NotImplementedError(
            f"{kind} clamp their SwiGLU: FusedEPMoE's FP8 path takes clamped (gpt-oss) experts "
            "from dense weights only (FusedEPMoE.from_dense quantises them)"
        )
    return tuple(
        (getattr(experts, name).detach(), getattr(experts, f"{name}_scale_inv").detach().float())
        for name in ("gate_up_proj", "down_proj")
    )


def block_topk(block: nn.Module) -> int:
    """K: the router's ``top_k`` (transformers 5: ``gate``, or gpt-oss's ``router``), else the
    block's (transformers 4)."""
    for owner in (getattr(block, "gate", None), getattr(block, "router", None), block):
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
    experts = {"w13": fp8[0], "w2": fp8[1]} if fp8 else dense_experts(block)
    w13 = experts["w13"][0] if fp8 else experts["w13"]
    E, two_i, H = w13.shape
    shape = MoEShape(
        hidden=H,
        ffn=two_i // 2,
        num_experts=E,
        topk=block_topk(block),
        max_tokens_per_rank=max_tokens,
        dtype=dtype or (torch.bfloat16 if fp8 else w13.dtype),
        fp8=fp8 is not None,
        activation=expert_activation(block),
        bias="b13" in experts,
    )
    return FusedEPMoE.from_dense(world, shape, **experts, **kw)


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
        fp8_weights(block) or dense_experts(block)
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
