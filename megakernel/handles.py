"""What a megakernel call takes and gives back, per rank: ``CallInputs`` (the checked inputs)
and ``DispatchHandle`` (device views of the call's results).

Shape legend: T tokens on this rank, H hidden, I expert FFN width, K top-k, L local slots per
rank, C receive rows per rank (the capacity).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from megakernel.plan import STATS, Plan


@dataclass
class DispatchHandle:
    """One rank's result of a call, as device views.

    ``act [C, I]`` (``[C, 2I]`` without SwiGLU) holds the expert activations of rows
    ``[0, num_recv)`` in the receive order (DESIGN §4); rows past that are stale. ``out [T, H]``
    is the layer's output (mode "layer"; a fresh tensor per call). The views are valid until the
    workspace's next call on this rank.
    """

    rank: int
    epoch: int
    act: torch.Tensor  # [C, I]
    recv_x: torch.Tensor  # [C, H] this call's receive rows (indirect rows unresolved in "gemm")
    recv_src: torch.Tensor  # [C] int32 row holding each row's data
    stats: torch.Tensor  # [5] int32 the plan's stats of the first round (megakernel.plan.STATS)
    topk_weights: torch.Tensor | None  # [T, K]
    out: torch.Tensor | None = None  # [T, H] mode "layer"
    trace: torch.Tensor | None = None  # KernelConfig(trace=True): this call's trace records
    plan_views: Callable[[], Plan] | None = field(default=None, repr=False)

    @property
    def plan(self) -> Plan | None:
        """This call's plan (views, overwritten by the next call; made when asked for)."""
        return self.plan_views() if self.plan_views is not None else None

    def num_recv(self) -> int:
        """Rows this rank received (reads the plan's stats back: one sync)."""
        return int(self.stats[STATS.index("num_recv")])

    def snapshot(self) -> DispatchHandle:
        """A copy of the outputs, made on the current stream (no sync), that later calls do not
        overwrite. The copy has no plan."""
        return replace(
            self,
            act=self.act.clone(),
            recv_x=self.recv_x.clone(),
            recv_src=self.recv_src.clone(),
            stats=self.stats.clone(),
            plan_views=None,
        )

    def resolved(self) -> torch.Tensor:
        """``[num_recv, H]`` the received rows with every indirect row resolved (torch gather)."""
        n = self.num_recv()
        return self.recv_x[self.recv_src[:n].long()]


@dataclass
class CallInputs:
    """One rank's checked inputs of a call (``None`` where the mode needs none; the weights'
    scales with ``MoEShape.fp8`` only, the experts' biases with ``MoEShape.bias`` only)."""

    x: torch.Tensor  # [T, H]
    topk_ids: torch.Tensor  # [T, K] int32
    topk_weights: torch.Tensor | None  # [T, K] fp32
    w13: torch.Tensor  # [L, 2I, H]
    w2: torch.Tensor | None  # [L, H, I]
    out: torch.Tensor | None  # [T, H]
    w13_scale: torch.Tensor | None = None  # FP8: [L, 2I/128, H/128] fp32
    w2_scale: torch.Tensor | None = None  # FP8: [L, H/128, I/128] fp32
    b13: torch.Tensor | None = None  # MoEShape.bias: [L, 2I] fp32
    b2: torch.Tensor | None = None  # MoEShape.bias: [L, H] fp32
