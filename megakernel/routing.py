"""Routers and synthetic routings.

Shape legend: T tokens per rank, E experts, K top-k, R ranks.

A ``Routing`` is the *global view*: every rank's ``topk_ids [T_r, K]`` (logical expert ids,
int32, -1 = dropped) and ``topk_weights [T_r, K]`` (fp32), built from one seeded generator, so
every rank can compute every other rank's inputs (and its own expected output) alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def route_topk(
    logits: torch.Tensor, topk: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k router: ``logits [T, E]`` -> (``topk_weights [T, K]`` fp32, ``topk_ids
    [T, K]`` int32). ``renormalize`` makes each token's K weights sum to 1."""
    if logits.dim() != 2:
        raise ValueError(f"router logits must be [T, E], got shape {tuple(logits.shape)}")
    if not 1 <= topk <= logits.shape[1]:
        raise ValueError(f"topk is {topk} but the router has {logits.shape[1]} experts")
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = probs.topk(topk, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


@dataclass
class Routing:
    topk_ids: list[torch.Tensor]  # R x [T_r, K] int32
    topk_weights: list[torch.Tensor]  # R x [T_r, K] fp32

    @property
    def world_size(self) -> int:
        return len(self.topk_ids)

    def to(self, device: torch.device | str) -> Routing:
        return Routing(
            [t.to(device) for t in self.topk_ids], [w.to(device) for w in self.topk_weights]
        )


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layout(seed: int, layout_seed: int | None) -> int:
    """The seed of a routing's fixed structure (a ranking, expert sets): ``seed`` unless given."""
    return seed + 7_919 if layout_seed is None else layout_seed


def _weights(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.softmax(torch.randn(shape, generator=g), dim=-1)


def _tokens(num_tokens: int | Sequence[int], world_size: int) -> list[int]:
    counts = [num_tokens] * world_size if isinstance(num_tokens, int) else list(num_tokens)
    if len(counts) != world_size or any(t < 0 for t in counts):
        raise ValueError(f"need {world_size} non-negative token counts, got {counts}")
    return counts


def _from_scores(scores: torch.Tensor, topk: int, g: torch.Generator, counts: list[int]) -> Routing:
    """Top-k of per-token scores ``[sum T_r, E]`` (distinct experts per token), split by rank."""
    ids = scores.topk(topk, dim=-1).indices.to(torch.int32)
    weights = _weights(tuple(ids.shape), g)
    return Routing(list(ids.split(counts)), list(weights.split(counts)))


def uniform(
    world_size: int, num_tokens: int | Sequence[int], num_experts: int, topk: int, seed: int
) -> Routing:
    """Each token picks K distinct experts uniformly at random."""
    counts = _tokens(num_tokens, world_size)
    g = _generator(seed)
    return _from_scores(torch.rand(sum(counts), num_experts, generator=g), topk, g, counts)


def zipf(
    world_size: int,
    num_tokens: int | Sequence[int],
    num_experts: int,
    topk: int,
    s: float,
    seed: int,
    layout_seed: int | None = None,
) -> Routing:
    """K distinct experts per token, expert popularity ~ 1 / rank^s over a random ranking
    (Gumbel top-k sampling without replacement). ``s = 0`` is uniform. ``layout_seed`` (default
    ``seed``) draws the ranking: two routings with the same one share their popular experts."""
    counts = _tokens(num_tokens, world_size)
    g = _generator(seed)
    popularity = torch.arange(1, num_experts + 1, dtype=torch.float64) ** -s
    ranking = torch.randperm(num_experts, generator=_generator(_layout(seed, layout_seed)))
    logp = popularity[ranking].log()
    gumbel = -torch.log(
        -torch.log(torch.rand(sum(counts), num_experts, generator=g, dtype=torch.float64))
    )
    return _from_scores(logp + gumbel, topk, g, counts)


def hot_expert(
    world_size: int,
    num_tokens: int | Sequence[int],
    num_experts: int,
    topk: int,
    fraction: float,
    seed: int,
    hot: int = 0,
) -> Routing:
    """Uniform, except a ``fraction`` of the tokens always include expert ``hot``
    (``fraction = 1``: every token goes to that expert)."""
    counts = _tokens(num_tokens, world_size)
    g = _generator(seed)
    scores = torch.rand(sum(counts), num_experts, generator=g)
    chosen = torch.rand(sum(counts), generator=g) < fraction
    scores[chosen, hot] = 2.0  # above every uniform score: always in the top k
    return _from_scores(scores, topk, g, counts)


def correlated(
    world_size: int,
    num_tokens: int | Sequence[int],
    num_experts: int,
    topk: int,
    group_size: int,
    affinity: float,
    seed: int,
    layout_seed: int | None = None,
) -> Routing:
    """Tokens in classes with correlated expert sets: the experts are split at random into sets
    of ``group_size``; each token belongs to one set (uniformly) and, with probability
    ``affinity``, picks its K experts within it (else K uniform experts). Contiguous placement
    spreads each set over many ranks; a placement that keeps a set on one rank sends such a
    token's row once. ``layout_seed`` (default ``seed``) draws the sets."""
    if num_experts % group_size or group_size < topk:
        raise ValueError(
            f"group_size {group_size} must divide {num_experts} experts and be >= top-k {topk}"
        )
    counts = _tokens(num_tokens, world_size)
    g = _generator(seed)
    layout = _generator(_layout(seed, layout_seed))
    sets = torch.randperm(num_experts, generator=layout).view(-1, group_size)  # [classes, size]
    n = sum(counts)
    scores = torch.rand(n, num_experts, generator=g)
    cls = torch.randint(0, sets.shape[0], (n,), generator=g)
    on = torch.rand(n, generator=g) < affinity
    rows = torch.nonzero(on).flatten()
    scores[rows[:, None], sets[cls[rows]]] += 1.0  # above every other score: picked first
    return _from_scores(scores, topk, g, counts)


def restricted(
    world_size: int,
    num_tokens: int | Sequence[int],
    num_experts: int,
    topk: int,
    experts: Sequence[int],
    seed: int,
) -> Routing:
    """Tokens pick K distinct experts among ``experts`` only (all tokens to one rank, a rank
    that receives nothing, empty experts)."""
    if len(set(experts)) < topk:
        raise ValueError(f"need at least {topk} distinct experts to pick from, got {list(experts)}")
    counts = _tokens(num_tokens, world_size)
    g = _generator(seed)
    scores = torch.full((sum(counts), num_experts), -1.0)
    allowed = torch.tensor(sorted(set(experts)))
    scores[:, allowed] = torch.rand(sum(counts), len(allowed), generator=g)
    return _from_scores(scores, topk, g, counts)


def all_to_one_rank(
    world_size: int,
    num_tokens: int | Sequence[int],
    num_experts: int,
    topk: int,
    dst: int,
    seed: int,
) -> Routing:
    """Every token of every rank goes to experts of rank ``dst`` (contiguous placement)."""
    L = num_experts // world_size
    return restricted(
        world_size, num_tokens, num_experts, topk, range(dst * L, (dst + 1) * L), seed
    )


def drop(routing: Routing, probability: float, seed: int) -> Routing:
    """Mark each (token, k) dropped (id -1, weight 0) with the given probability."""
    g = _generator(seed)
    ids, weights = [], []
    for i, w in zip(routing.topk_ids, routing.topk_weights, strict=True):
        dropped = torch.rand(i.shape, generator=g) < probability
        ids.append(torch.where(dropped, -1, i))
        weights.append(torch.where(dropped, 0.0, w))
    return Routing(ids, weights)


EDGE_CASES = (
    "uniform",
    "zipf",
    "one_expert",
    "empty_experts",
    "to_one_rank",
    "rank_gets_nothing",
    "dropped",
    "ragged",
    "replicated",
)


def edge_case(name: str, world_size: int, num_tokens: int, num_experts: int, topk: int, seed: int):
    """A named routing for tests and benchmarks: ``(Routing, Placement or None)``; None means
    contiguous placement. Needs ``num_experts / world_size >= topk``."""
    from megakernel.placement import Placement

    R, T, E, K = world_size, num_tokens, num_experts, topk
    L = E // R
    if name == "uniform":
        return uniform(R, T, E, K, seed), None
    if name == "zipf":
        return zipf(R, T, E, K, 1.5, seed), None
    if name == "one_expert":  # every token includes expert 0
        return hot_expert(R, T, E, K, 1.0, seed, hot=0), None
    if name == "empty_experts":  # most experts are never chosen
        return restricted(R, T, E, K, range(K) if E < 3 * K else range(0, E, 3), seed), None
    if name == "to_one_rank":
        return all_to_one_rank(R, T, E, K, dst=R - 1, seed=seed), None
    if name == "rank_gets_nothing":  # nothing goes to rank 0
        return restricted(R, T, E, K, range(L, E) if R > 1 else range(E), seed), None
    if name == "dropped":
        return drop(uniform(R, T, E, K, seed), 0.3, seed + 1), None
    if name == "ragged":  # every other rank has no tokens, the others a partial block
        return uniform(R, [T if r % 2 else 0 for r in range(R)], E, K, seed), None
    if name == "replicated":  # a shuffled placement with expert 0 on every rank
        g = torch.Generator().manual_seed(seed)
        free = [(r, lo) for r in range(R) for lo in range(L + 1) if lo != L]
        order = torch.randperm(len(free), generator=g).tolist()
        table = [[(r, L) for r in range(R)]] + [[free[i]] for i in order[: E - 1]]
        return hot_expert(R, T, E, K, 0.5, seed, hot=0), Placement.from_slots(R, L + 1, table)
    raise ValueError(f"unknown edge case {name!r}; known: {', '.join(EDGE_CASES)}")
