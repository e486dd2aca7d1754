"""Placement policies on synthetic routings (no kernels): statistics counted right, placements
valid, and each policy meeting its objective against contiguous placement."""

import pytest
import torch

from megakernel import routing
from megakernel.placement import Placement
from megakernel.placement.policies import (
    balanced_replication,
    coactivation_grouping,
    evaluate,
    group_experts,
    grouped_replication,
)
from megakernel.placement.stats import RoutingStats

R, T, E, K = 8, 1024, 64, 4


def test_stats_count_loads_and_coselected_pairs():
    ids = [torch.tensor([[0, 2], [2, 3], [-1, 1]]), torch.tensor([[3, 0]])]
    st = RoutingStats.count(ids, 4)
    assert st.load.tolist() == [2, 1, 2, 2] and st.tokens == 4 and st.sampled == 4
    pairs = {(a, b): int(st.pairs[a, b]) for a in range(4) for b in range(4) if st.pairs[a, b]}
    assert pairs == {(0, 2): 1, (2, 3): 1, (0, 3): 1}, "dropped slots pair with nothing"
    w = st.coselection()
    assert torch.equal(w, w.T) and w[0, 2] == 1 and w.diagonal().eq(0).all()
    half = RoutingStats.count(ids, 4, sample_every=2)  # tokens 0 and 2 of rank 0, token 0 of 1
    assert half.sampled == 3 and half.pairs[2, 3] == 0 and half.load.tolist() == [2, 1, 2, 2]


def check_valid(pl: Placement, slots_per_rank: int) -> None:
    assert pl.world_size == R and pl.slots_per_rank == slots_per_rank
    for e, slots in enumerate(pl.replicas):
        ranks = [p // slots_per_rank for p in slots]
        assert len(set(ranks)) == len(ranks), f"expert {e} twice on one rank"


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2])
def test_balanced_replication_evens_out_a_hot_expert(fraction):
    rt = routing.hot_expert(R, T, E, K, fraction, seed=1)
    st = RoutingStats.count(rt.topk_ids, E)
    pl = balanced_replication(st, R, E // R + 1)  # one spare slot per rank
    check_valid(pl, E // R + 1)
    assert len(pl.replicas[0]) > 1, "the hot expert is replicated"
    ours, base = evaluate(pl, rt.topk_ids), evaluate(Placement.contiguous(E, R), rt.topk_ids)
    assert ours["max_over_mean"] <= 1.15
    assert ours["max_rows"] < base["max_rows"]


def test_coactivation_grouping_halves_remote_rows_of_correlated_routing():
    rt = routing.correlated(R, T, E, K, group_size=8, affinity=0.9, seed=2)
    st = RoutingStats.count(rt.topk_ids, E, sample_every=4)
    pl = coactivation_grouping(st, R)
    check_valid(pl, E // R)
    ours, base = evaluate(pl, rt.topk_ids), evaluate(Placement.contiguous(E, R), rt.topk_ids)
    assert ours["remote_rows"] * 2 <= base["remote_rows"], (ours, base)
    assert ours["max_over_mean"] <= 1.15


def test_grouping_keeps_loads_under_the_cap_where_it_can():
    """Two pairs of always-together experts of equal load: grouped, and no group over the cap."""
    w = torch.zeros(4, 4, dtype=torch.float64)
    w[0, 3] = w[3, 0] = w[1, 2] = w[2, 1] = 10.0
    groups = group_experts(w, torch.tensor([5.0, 5.0, 5.0, 5.0]), 2)
    assert sorted(groups) == [[0, 3], [1, 2]]
    heavy = group_experts(w, torch.tensor([9.0, 1.0, 1.0, 9.0]), 2)  # 0 and 3 together: 18 > 11
    assert sorted(heavy) in ([[0, 1], [2, 3]], [[0, 2], [1, 3]])


@pytest.mark.parametrize("s", [0.5, 1.0, 1.5])
def test_grouped_replication_on_zipf_routing(s):
    rt = routing.zipf(R, T, E, K, s, seed=3)
    st = RoutingStats.count(rt.topk_ids, E, sample_every=2)
    pl = grouped_replication(st, R, E // R + 2)
    check_valid(pl, E // R + 2)
    ours, base = evaluate(pl, rt.topk_ids), evaluate(Placement.contiguous(E, R), rt.topk_ids)
    assert ours["max_rows"] <= base["max_rows"]
    assert ours["remote_rows"] <= base["remote_rows"] * 1.02
