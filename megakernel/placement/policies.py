"""Placement policies: pure functions from routing statistics to a ``Placement``.

Shape legend: E logical experts, R ranks, L slots per rank (R * L >= E; the spare slots hold
replicas), P = R * L.

A token's slot is resolved as ``resolve_ref`` says: the replica on its own rank if there is one,
else replica ``token % n``. With tokens spread evenly over the ranks, each of an expert's n
replicas then receives ``load / n`` rows, which is what the policies below assume.

- ``balanced_replication``: replicas for the hottest experts, packed so that the busiest rank
  receives as few rows as possible.
- ``coactivation_grouping``: experts that the same tokens choose, on the same rank, so that token
  saving sends one row where it would send several.
- ``grouped_replication``: both: the groups first, then the spare slots for replicas.

``evaluate`` scores a placement on a routing: remote rows with token saving (``traffic_model``)
and the rows each rank receives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megakernel.placement import Placement, resolve_ref
from megakernel.placement.stats import RoutingStats
from megakernel.traffic import traffic_model


def replica_counts(load: torch.Tensor, slots: int, max_replicas: int) -> list[int]:
    """How many replicas each expert gets from ``slots`` slots (at least one each, at most
    ``max_replicas``): each slot goes to the expert with the most rows per replica."""
    E = load.numel()
    if slots < E:
        raise ValueError(f"{slots} slots cannot hold {E} experts")
    counts = [1] * E
    per = load.double().tolist()
    for _ in range(slots - E):
        e = max(
            (e for e in range(E) if counts[e] < max_replicas), key=lambda e: per[e], default=None
        )
        if e is None:
            break
        counts[e] += 1
        per[e] = float(load[e]) / counts[e]
    return counts


def pack(
    world_size: int,
    slots_per_rank: int,
    counts: Sequence[int],
    load: torch.Tensor,
    fixed: dict[int, list[int]] | None = None,
) -> Placement:
    """Place ``counts[e]`` replicas of each expert, one per rank at most, heaviest replica first,
    each on the rank that receives the fewest rows so far among those with a free slot (a
    replica that finds no such rank is left out, and its expert's rows shared by fewer).
    ``fixed``: experts already placed, rank -> experts (one replica each)."""
    R, L = world_size, slots_per_rank
    held = [list((fixed or {}).get(r, [])) for r in range(R)]
    counts = list(counts)
    rows = [sum(float(load[e]) / counts[e] for e in h) for h in held]
    todo = [e for e, n in enumerate(counts) for _ in range(n - sum(e in h for h in held))]
    todo.sort(key=lambda e: (-float(load[e]) / counts[e], e))
    for e in todo:
        free = [r for r in range(R) if len(held[r]) < L and e not in held[r]]
        if not free:
            counts[e] -= 1
            continue
        r = min(free, key=lambda r: (rows[r], r))
        held[r].append(e)
        rows[r] += float(load[e]) / counts[e]
    table: list[list[tuple[int, int]]] = [[] for _ in counts]
    for r, experts in enumerate(held):
        for local, e in enumerate(experts):
            table[e].append((r, local))
    return Placement.from_slots(R, L, table)


def balanced_replication(stats: RoutingStats, world_size: int, slots_per_rank: int) -> Placement:
    """Objective: the fewest rows on the busiest rank. The ``R * L - E`` spare slots become
    replicas, one at a time, of the expert with the most rows per replica (EPLB's greedy); then
    the replicas, heaviest first, each go to the rank with the fewest rows so far."""
    counts = replica_counts(stats.load, world_size * slots_per_rank, world_size)
    return pack(world_size, slots_per_rank, counts, stats.load)


def group_experts(
    weights: torch.Tensor, load: torch.Tensor, groups: int, slack: float = 0.1
) -> list[list[int]]:
    """``groups`` equal groups of the E experts with a large total co-selection weight inside the
    groups (``weights [E, E]`` symmetric, zero diagonal), none holding more than ``1 + slack``
    times the mean rows (``load``), where the experts allow: each group is grown from the
    heaviest expert left by the expert most co-selected with it that still fits (with room left
    for the lightest experts in its other places); then swaps between two groups while one
    raises the weight inside the groups without breaking the cap (Kernighan-Lin style, best
    swap first)."""
    E = weights.shape[0]
    if E % groups:
        raise ValueError(f"{E} experts do not split into {groups} equal groups")
    size, load = E // groups, load.double()
    cap = (1 + slack) * float(load.sum()) / groups
    left = set(range(E))
    member = torch.empty(E, dtype=torch.long)
    for g in range(groups):
        seed = max(left, key=lambda e: (float(load[e]), -e))
        group, pull, rows = [seed], weights[seed].clone(), float(load[seed])
        left.remove(seed)
        while len(group) < size:
            # room for this expert and, after it, the lightest experts left in the other places
            lightest = sorted(float(load[e]) for e in left)[: size - len(group) - 1]
            fits = [e for e in left if rows + float(load[e]) + sum(lightest) <= cap]
            e = (
                max(fits, key=lambda e: (float(pull[e]), float(load[e]), -e))
                if fits
                else min(left, key=lambda e: (float(load[e]), e))
            )
            group.append(e)
            left.remove(e)
            pull += weights[e]
            rows += float(load[e])
        member[group] = g
    return _improve_by_swaps(weights, load, member, groups, cap)


def _improve_by_swaps(
    weights: torch.Tensor, load: torch.Tensor, member: torch.Tensor, groups: int, cap: float
) -> list[list[int]]:
    W = weights.double()
    one_hot = torch.nn.functional.one_hot(member, groups).double()
    S = W @ one_hot  # [E, G] each expert's weight to each group
    rows = load @ one_hot  # [G]
    for _ in range(4 * W.shape[0]):
        own = S.gather(1, member[:, None])  # [E, 1] weight to its own group
        # swapping a and b gains S[a, g_b] - S[a, g_a] + S[b, g_a] - S[b, g_b] - 2 W[a, b]
        to_other = S[:, member]  # [a, b] = S[a, g_b]
        gain = to_other - own + to_other.T - own.T - 2 * W
        moved = load[None, :] - load[:, None]  # [a, b]: rows g_a gains when a and b swap
        new_a, new_b = rows[member][:, None] + moved, rows[member][None, :] - moved
        worst = torch.maximum(rows[member][:, None], rows[member][None, :]).clamp(min=cap)
        gain[(torch.maximum(new_a, new_b) > worst) | (member[:, None] == member[None, :])] = 0
        best = int(gain.argmax())
        a, b = divmod(best, W.shape[0])
        if gain[a, b] <= 1e-9:
            break
        ga, gb = int(member[a]), int(member[b])
        S[:, ga] += W[:, b] - W[:, a]
        S[:, gb] += W[:, a] - W[:, b]
        rows[ga] += load[b] - load[a]
        rows[gb] += load[a] - load[b]
        member[a], member[b] = gb, ga
    return [sorted(torch.nonzero(member == g).flatten().tolist()) for g in range(groups)]


def coactivation_grouping(stats: RoutingStats, world_size: int) -> Placement:
    """Objective: the fewest remote rows with token saving, which sends a token's row once per
    other rank among its experts: experts that the same tokens choose go to the same rank
    (``group_experts`` on the co-selection weights), no rank taking more than 1.1 times the mean
    rows where the loads allow. One replica each, E / R slots per rank."""
    groups = group_experts(stats.coselection(), stats.load, world_size)
    table = [[] for _ in range(stats.num_experts)]
    for r, experts in enumerate(groups):
        for local, e in enumerate(experts):
            table[e].append((r, local))
    return Placement.from_slots(world_size, stats.num_experts // world_size, table)


def grouped_replication(stats: RoutingStats, world_size: int, slots_per_rank: int) -> Placement:
    """Both objectives: experts grouped by co-selection (``coactivation_grouping``, the rows of
    an expert with n replicas counted as 1 / n), then the spare slots (``R * L - E``) filled
    with replicas as ``balanced_replication`` chooses them, each on the rank with the fewest rows
    so far."""
    counts = replica_counts(stats.load, world_size * slots_per_rank, world_size)
    # the grouped copy of an expert with n replicas carries about 1 / n of its rows
    per_replica = stats.load.double() / torch.tensor(counts, dtype=torch.float64)
    groups = group_experts(stats.coselection(), per_replica, world_size)
    return pack(world_size, slots_per_rank, counts, stats.load, dict(enumerate(groups)))


def evaluate(placement: Placement, topk_ids: Sequence[torch.Tensor]) -> dict[str, float]:
    """How ``placement`` serves a routing (every rank's ``topk_ids``): rows sent to other ranks
    with token saving, and the rows each rank receives (max and mean over ranks)."""
    phys = [resolve_ref(ids, src, placement) for src, ids in enumerate(topk_ids)]
    L, R = placement.slots_per_rank, placement.world_size
    received = torch.zeros(R, dtype=torch.int64)
    for p in phys:
        p = p[p >= 0].long()
        received += torch.bincount(p // L, minlength=R)
    traffic = traffic_model(phys, L)
    mean = float(received.double().mean())
    return dict(
        remote_rows=float(sum(traffic.rows_saved)),
        max_rows=float(received.max()),
        mean_rows=mean,
        max_over_mean=float(received.max()) / mean if mean else 0.0,
    )
