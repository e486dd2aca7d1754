"""Input checks for the public entry points: errors name the value and the limit."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megakernel.handles import CallInputs
    from megakernel.shapes import MoEShape

# Megakernel.run(validate=...): "device" checks shapes, dtypes and devices on the host (no sync)
# and every routing id on the device; "host" also reads the id range back (one sync per call)
VALIDATE_MODES = ("device", "host")


class RoutingError(ValueError):
    """A call's routing named an expert outside [-1, E). Found on the device: the id was dropped
    (nothing was read or written with it) and the call's output on that rank is NaN."""

    def __init__(
        self,
        rank: int,
        call: int,
        token: int,
        k: int,
        expert: int,
        num_experts: int,
        poisoned: range = range(0),
    ):
        self.rank, self.call, self.token, self.k, self.expert = rank, call, token, k, expert
        self.poisoned = poisoned  # later calls whose output on this rank is NaN as well
        later = ""
        if poisoned:
            first, last = poisoned[0], poisoned[-1]
            calls = f"call {first}" if first == last else f"calls {first}-{last}"
            later = f" ({calls} too, made before this error was raised)"
        super().__init__(
            f"rank {rank}: call {call} routes token {token} (slot k={k}) to expert {expert}, but "
            f"the layer has {num_experts} experts (ids must be in [-1, {num_experts}); -1 drops "
            f"a slot); that call's output on rank {rank} is NaN, and so is every later call's "
            f"until this error is raised{later}"
        )


def check_tensor(
    rank: int, name: str, t: object, want: tuple, dtype: torch.dtype, device: torch.device
) -> None:
    """One rank's input ``name``: a tensor of shape ``want``, ``dtype``, on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"rank {rank}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != want:
        raise ValueError(f"rank {rank}: {name} has shape {tuple(t.shape)}, expected {want}")
    if t.dtype != dtype:
        raise ValueError(f"rank {rank}: {name} is {t.dtype} but the layer is {dtype}")
    if t.device != device:
        raise ValueError(f"rank {rank}: {name} is on {t.device}, the layer on {device}")


def check_routing(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor | None,
    *,
    num_experts: int,
    topk: int,
    max_tokens: int,
    device: torch.device,
    check_values: bool = True,
    rank: int | None = None,
) -> None:
    """``topk_ids [T, K]`` int32/int64 in [-1, E) (-1 = dropped), ``topk_weights [T, K]`` float,
    both on ``device``, T <= ``max_tokens``. ``check_values`` reads the id range back to the host
    (one sync; skip it while a CUDA graph is being captured). ``rank`` is named in the errors."""
    where = "" if rank is None else f"rank {rank}: "
    if not isinstance(topk_ids, torch.Tensor):
        raise ValueError(where + f"topk_ids must be a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(where + f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[1] != topk:
        raise ValueError(where + f"topk_ids must be [T, {topk}], got shape {tuple(topk_ids.shape)}")
    if topk_ids.device != torch.device(device):
        raise ValueError(where + f"topk_ids is on {topk_ids.device}, the layer on {device}")
    if topk_ids.shape[0] > max_tokens:
        raise ValueError(
            where + f"topk_ids has {topk_ids.shape[0]} tokens but max_tokens_per_rank is "
            f"{max_tokens}"
        )
    if topk_weights is not None:
        if not isinstance(topk_weights, torch.Tensor):
            kind = type(topk_weights).__name__
            raise ValueError(where + f"topk_weights must be a torch.Tensor, got {kind}")
        if not topk_weights.is_floating_point():
            raise ValueError(
                where + f"topk_weights must be floating point, got {topk_weights.dtype}"
            )
        if topk_weights.shape != topk_ids.shape:
            raise ValueError(
                where + f"topk_weights has shape {tuple(topk_weights.shape)} but topk_ids "
                f"{tuple(topk_ids.shape)}"
            )
        if topk_weights.device != topk_ids.device:
            raise ValueError(
                where + f"topk_weights is on {topk_weights.device}, topk_ids on {topk_ids.device}"
            )
    if check_values and topk_ids.numel():
        low, high = int(topk_ids.min()), int(topk_ids.max())
        if high >= num_experts:
            raise ValueError(
                where + f"topk_ids has expert {high} but the layer has {num_experts} experts"
            )
        if low < -1:
            raise ValueError(
                where + f"topk_ids has expert {low}; the only negative id allowed is -1 (dropped)"
            )


def validate_mode(validate: bool | str) -> str | None:
    """``Megakernel.run``'s ``validate`` as one of ``VALIDATE_MODES``, or None (unchecked)."""
    if validate is True:
        return "device"
    if validate is False:
        return None
    if validate not in VALIDATE_MODES:
        raise ValueError(
            f"validate must be one of {VALIDATE_MODES}, True or False, got {validate!r}"
        )
    return validate


def check_call_inputs(
    given: CallInputs,
    *,
    rank: int,
    shape: MoEShape,
    slots_per_rank: int,
    num_experts: int,
    device: torch.device,
    layer: bool,
    values: bool,
    weights: bool = True,
) -> None:
    """Host checks of one rank's inputs to a call: shapes, dtypes, devices, and with ``values``
    the id range, read back (one sync; skipped while a CUDA graph is being captured).
    ``weights``: also the experts' tensors (a layer's own were checked when it was built)."""
    L, H, I = slots_per_rank, shape.hidden, shape.ffn
    if values and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        values = False
    check_routing(
        given.topk_ids, given.topk_weights, num_experts=num_experts, topk=shape.topk,
        max_tokens=shape.max_tokens_per_rank, device=device, check_values=values, rank=rank,
    )  # fmt: skip
    check_tensor(rank, "x", given.x, (given.topk_ids.shape[0], H), shape.dtype, device)
    if weights:
        check_tensor(rank, "w13", given.w13, (L, 2 * I, H), shape.gemm_dtype, device)
    if weights and layer:
        check_tensor(rank, "w2", given.w2, (L, H, I), shape.gemm_dtype, device)
    if weights and shape.fp8:
        w13_scale, w2_scale = shape.weight_scale_shapes(L)
        check_tensor(rank, "w13_scale", given.w13_scale, w13_scale, torch.float32, device)
        check_tensor(rank, "w2_scale", given.w2_scale, w2_scale, torch.float32, device)
    if weights and shape.bias:
        b13, b2 = shape.bias_shapes(L)
        check_tensor(rank, "b13", given.b13, b13, torch.float32, device)
        if layer:
            check_tensor(rank, "b2", given.b2, b2, torch.float32, device)
    if given.out is not None:
        check_tensor(rank, "out", given.out, (given.x.shape[0], H), shape.dtype, device)
        if not given.out.is_contiguous():
            raise ValueError("out must be contiguous")


def check_biases_given(b13: object, b2: object, shape: MoEShape, mode: str) -> None:
    """The experts' biases are given where the shape has them and the call's mode reads them
    (``b13`` with a GEMM, ``b2`` in mode "layer"), and not otherwise."""
    for name, value, reads in (("b13", b13, mode != "dispatch"), ("b2", b2, mode == "layer")):
        if value is not None and not shape.bias:
            raise ValueError(f"{name} given, but the shape's experts have no biases")
        if reads and shape.bias and value is None:
            raise ValueError(f"MoEShape(bias=True): mode {mode!r} needs {name}")
