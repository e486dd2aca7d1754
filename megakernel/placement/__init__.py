"""Expert placement as data: logical experts -> physical slots (rank, local index).

Shape legend: E logical experts, R ranks, L physical slots per rank (``slots_per_rank``),
P = R * L physical slots, slot id ``p = rank * L + local``.

The plan and the kernels only see physical slots, so placement policies (non-contiguous blocks,
replicated hot experts) need no kernel change. A logical expert may have several replicas; each
(token, k) picks one with a fixed rule (``resolve_ref``): the replica on the token's own rank if
there is one, else replica ``token % num_replicas``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    world_size: int  # R
    slots_per_rank: int  # L
    replicas: tuple[tuple[int, ...], ...]  # [E] -> physical slot ids

    def __post_init__(self) -> None:
        R, L = self.world_size, self.slots_per_rank
        if R < 1 or L < 1:
            raise ValueError(
                f"placement needs world_size >= 1 and slots_per_rank >= 1, got {R}, {L}"
            )
        owner: dict[int, int] = {}
        for e, slots in enumerate(self.replicas):
            if not slots:
                raise ValueError(f"expert {e} has no physical slot")
            for p in slots:
                if not 0 <= p < R * L:
                    raise ValueError(f"expert {e} is placed on slot {p}; there are {R * L} slots")
                if p in owner:
                    raise ValueError(f"slot {p} holds both expert {owner[p]} and expert {e}")
                owner[p] = e

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> Placement:
        """Rank r holds experts [r * L, (r + 1) * L): the default."""
        if num_experts % world_size:
            raise ValueError(f"{num_experts} experts do not split evenly over {world_size} ranks")
        return cls(world_size, num_experts // world_size, tuple((e,) for e in range(num_experts)))

    @classmethod
    def from_slots(
        cls, world_size: int, slots_per_rank: int, table: Sequence[Sequence[tuple[int, int]]]
    ) -> Placement:
        """``table[e]`` lists expert e's replicas as (rank, local index) pairs."""
        replicas = []
        for e, pairs in enumerate(table):
            ids = []
            for rank, local in pairs:
                if not (0 <= rank < world_size and 0 <= local < slots_per_rank):
                    raise ValueError(
                        f"expert {e} placed on (rank {rank}, local {local}); ranks < {world_size}, "
                        f"local slots < {slots_per_rank}"
                    )
                ids.append(rank * slots_per_rank + local)
            replicas.append(tuple(ids))
        return cls(world_size, slots_per_rank, tuple(replicas))

    # -- queries ----------------------------------------------------------------------------------

    @property
    def num_experts(self) -> int:
        return len(self.replicas)

    @property
    def num_slots(self) -> int:
        return self.world_size * self.slots_per_rank

    @property
    def max_replicas(self) -> int:
        return max(len(r) for r in self.replicas)

    def slot_expert(self) -> list[int]:
        """[P] logical expert held by each physical slot, -1 for an unused slot."""
        table = [-1] * self.num_slots
        for e, slots in enumerate(self.replicas):
            for p in slots:
                table[p] = e
        return table

    def replica_table(
        self, device: torch.device | str = "cpu", width: int | None = None
    ) -> torch.Tensor:
        """[E, width] int32 physical slot ids, padded with -1 (for the resolve kernel); ``width``
        defaults to ``max_replicas``."""
        width = self.max_replicas if width is None else width
        if width < self.max_replicas:
            raise ValueError(f"a replica table of width {width} cannot hold {self.max_replicas}")
        table = torch.full((self.num_experts, width), -1, dtype=torch.int32)
        for e, slots in enumerate(self.replicas):
            table[e, : len(slots)] = torch.tensor(slots, dtype=torch.int32)
        return table.to(device)

    def on_rank(self, rank: int) -> list[int]:
        """[E] this rank's replica of each expert (the first one), -1 where it holds none."""
        L = self.slots_per_rank
        return [next((p for p in slots if p // L == rank), -1) for slots in self.replicas]

    def local_weights(self, weights: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank ``rank``'s slice ``[L, ...]`` of a per-expert weight ``[E, ...]`` (zeros for
        unused slots)."""
        L = self.slots_per_rank
        out = weights.new_zeros((L, *weights.shape[1:]))
        for local, e in enumerate(self.slot_expert()[rank * L : (rank + 1) * L]):
            if e >= 0:
                out[local] = weights[e]
        return out


def resolve_ref(topk_ids: torch.Tensor, src_rank: int, placement: Placement) -> torch.Tensor:
    """(token, k) -> physical slot, ``[T, K]`` int32; -1 (dropped) stays -1, and so does an id
    outside [-1, E) (the plan's count kernel records it as an error and drops it).

    Rule: the replica on ``src_rank`` if the expert has one there, else replica
    ``token % num_replicas`` (in the order of ``placement.replicas[e]``).
    """
    T, K = topk_ids.shape
    table = placement.replica_table()  # [E, max_replicas]
    num_replicas = torch.tensor([len(r) for r in placement.replicas], dtype=torch.int64)
    on_src = torch.full((placement.num_experts,), -1, dtype=torch.int32)
    L = placement.slots_per_rank
    for e, slots in enumerate(placement.replicas):
        mine = [p for p in slots if p // L == src_rank]
        if mine:
            on_src[e] = mine[0]
    ids = topk_ids.cpu().long()
    dropped = (ids < 0) | (ids >= placement.num_experts)
    e = torch.where(dropped, 0, ids)
    token = torch.arange(T).unsqueeze(1).expand(T, K)
    spread = table[e, token % num_replicas[e]]
    phys = torch.where(on_src[e] >= 0, on_src[e], spread)
    return torch.where(dropped, -1, phys).to(torch.int32).to(topk_ids.device)
