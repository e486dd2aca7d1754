"""perf.bench_peers' bookkeeping, on CPU: the rotating order and the weight-read bytes."""

import torch

from perf.bench_peers import rotations, weight_bytes


def test_each_round_rotates_the_order_so_every_implementation_leads_in_turn():
    order = rotations(["eager", "graph", "liger", "torch"], 5)
    assert order[0] == ["eager", "graph", "liger", "torch"]
    assert order[1] == ["graph", "liger", "torch", "eager"]
    assert order[4] == order[0]
    assert [o[0] for o in order[:4]] == ["eager", "graph", "liger", "torch"]
    assert all(sorted(o) == sorted(order[0]) for o in order)


def test_weight_bytes_count_each_touched_expert_once_and_skip_dropped_slots():
    ids = torch.tensor([[0, 3], [3, -1], [7, 0]])
    assert weight_bytes(ids, hidden=64, ffn=32, itemsize=2) == 3 * (3 * 64 * 32 * 2)
    assert weight_bytes(torch.full((4, 2), -1), 64, 32, 2) == 0
