"""Routing statistics the placement policies read.

Shape legend: E logical experts, K top-k, T tokens.

``RoutingStats.load[e]``: the (token, k) slots routed to expert e. ``pairs[a, b]`` (a < b, the
upper triangle only): the sampled tokens that chose both a and b, every ``sample_every``-th token
of each rank. The layer accumulates both on the device (``FusedEPMoE.routing_stats``); here they
can also be counted from routings on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class RoutingStats:
    load: torch.Tensor  # [E] int64 slots routed to each expert
    pairs: torch.Tensor  # [E, E] int64 co-selections of sampled tokens, upper triangle
    tokens: int  # tokens counted in ``load``
    sampled: int  # tokens counted in ``pairs``

    @property
    def num_experts(self) -> int:
        return self.load.numel()

    def coselection(self) -> torch.Tensor:
        """[E, E] float64 symmetric co-selection weights, zero diagonal, scaled to all tokens."""
        w = self.pairs.double()
        w = w + w.T
        w.fill_diagonal_(0)
        return w * (self.tokens / max(self.sampled, 1))

    def __add__(self, other: RoutingStats) -> RoutingStats:
        return RoutingStats(
            self.load + other.load,
            self.pairs + other.pairs,
            self.tokens + other.tokens,
            self.sampled + other.sampled,
        )

    @classmethod
    def count(
        cls,
        topk_ids: Sequence[torch.Tensor],
        num_experts: int,
        sample_every: int = 1,
        chunk: int = 1,
    ) -> RoutingStats:
        """From every rank's ``topk_ids [T, K]`` (ids < 0: dropped slots, not counted). The pairs
        count the tokens of every ``sample_every``-th chunk of ``chunk`` tokens, as the plan's
        count kernel samples them (``chunk``: ``PlanConfig.tokens_per_chunk``)."""
        E = num_experts
        load = torch.zeros(E, dtype=torch.int64)
        pairs = torch.zeros(E * E, dtype=torch.int64)
        tokens = sampled = 0
        for ids in topk_ids:
            ids = ids.cpu().long()
            live = ids >= 0
            load += torch.bincount(ids[live], minlength=E)
            tokens += ids.shape[0]
            rows = ids[(torch.arange(ids.shape[0]) // chunk) % sample_every == 0]
            sampled += rows.shape[0]
            a, b = rows[:, :, None], rows[:, None, :]
            both = (a >= 0) & (b >= 0) & (a < b)
            pairs += torch.bincount((a * E + b)[both], minlength=E * E)
        return cls(load, pairs.view(E, E), tokens, sampled)
