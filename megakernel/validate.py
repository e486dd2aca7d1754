"""Input checks for the public entry points: errors name the value and the limit."""

from __future__ import annotations

import torch


def check_routing(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor | None,
    *,
    num_experts: int,
    topk: int,
    max_tokens: int,
    device: torch.device,
    check_values: bool = True,
) -> None:
    """``topk_ids [T, K]`` int32/int64 in [-1, E) (-1 = dropped), ``topk_weights [T, K]`` float,
    both on ``device``, T <= ``max_tokens``. ``check_values`` reads the id range back to the host
    (one sync; skip it while a CUDA graph is being captured)."""
    if not isinstance(topk_ids, torch.Tensor):
        raise ValueError(f"topk_ids must be a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[1] != topk:
        raise ValueError(f"topk_ids must be [T, {topk}], got shape {tuple(topk_ids.shape)}")
    if topk_ids.device != torch.device(device):
        raise ValueError(f"topk_ids is on {topk_ids.device}, the layer on {device}")
    if topk_ids.shape[0] > max_tokens:
        raise ValueError(
            f"topk_ids has {topk_ids.shape[0]} tokens but max_tokens_per_rank is {max_tokens}"
        )
    if topk_weights is not None:
        if not isinstance(topk_weights, torch.Tensor) or not topk_weights.is_floating_point():
            raise ValueError("topk_weights must be a floating-point torch.Tensor")
        if topk_weights.shape != topk_ids.shape:
            raise ValueError(
                f"topk_weights has shape {tuple(topk_weights.shape)} but topk_ids "
                f"{tuple(topk_ids.shape)}"
            )
        if topk_weights.device != topk_ids.device:
            raise ValueError(
                f"topk_weights is on {topk_weights.device}, topk_ids on {topk_ids.device}"
            )
    if check_values and topk_ids.numel():
        low, high = int(topk_ids.min()), int(topk_ids.max())
        if high >= num_experts:
            raise ValueError(f"topk_ids has expert {high} but the layer has {num_experts} experts")
        if low < -1:
            raise ValueError(
                f"topk_ids has expert {low}; the only negative id allowed is -1 (dropped)"
            )
