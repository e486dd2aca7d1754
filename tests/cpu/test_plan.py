"""The plan kernels (interpreter, emulated world) against plan_ref, bit for bit."""

import dataclasses

import pytest
import torch

from megakernel import routing
from megakernel.placement import Placement
from megakernel.plan import STATS, PlanConfig, PlanWorkspace
from megakernel.reference import recv_layout_ref, resolve_all_ref
from megakernel.testing import small_case
from symm_mem import CapacityError, EmulatedWorld


def run_plan(world, ws, rt):
    ws.run({r: rt.topk_ids[r] for r in world.local_ranks})
    world.check_errors()


def assert_plan_equal(ws, rt):
    assert ws.mismatches(rt.topk_ids) == {}


@pytest.mark.parametrize("R", [1, 2, 4, 8])
@pytest.mark.parametrize("case", routing.EDGE_CASES)
@pytest.mark.parametrize("token_saving", [True, False])
def test_plan_equals_reference(R, case, token_saving):
    rt, placement, cfg = small_case(case, R, token_saving)
    with EmulatedWorld(R) as world:
        ws = PlanWorkspace(world, cfg, placement)
        run_plan(world, ws, rt)
        assert_plan_equal(ws, rt)


@pytest.mark.parametrize("R", [2, 4])
@pytest.mark.parametrize("case", routing.EDGE_CASES)
def test_plan_with_tails_equals_reference(R, case):
    """``tail_rows``: a slot's last tile of at most tail_rows rows after a full one joins it
    (tiles of up to block_m + tail_rows rows); the tile table and its count as the reference
    makes them."""
    rt, placement, cfg = small_case(case, R, True)
    cfg = dataclasses.replace(cfg, tail_rows=cfg.block_m // 2)
    with EmulatedWorld(R) as world:
        ws = PlanWorkspace(world, cfg, placement)
        run_plan(world, ws, rt)
        assert_plan_equal(ws, rt)


@pytest.mark.parametrize("case", routing.EDGE_CASES)
@pytest.mark.parametrize("token_saving", [True, False])
def test_unsorted_plan_equals_reference(case, token_saving):
    """Unsorted dispatch: units grouped by destination only, one task chain per destination."""
    rt, placement, cfg = small_case(case, 4, token_saving)
    cfg = dataclasses.replace(cfg, sorted_dispatch=False)
    with EmulatedWorld(4) as world:
        ws = PlanWorkspace(world, cfg, placement)
        run_plan(world, ws, rt)
        assert_plan_equal(ws, rt)
        plan = ws.plan(0)
        groups = plan.dispatch_tasks[: plan.stat("num_dispatch_tasks"), 0]
        assert set(groups.tolist()) == set(range(4)), "every destination has a task, even empty"


@pytest.mark.parametrize("R,E,K", [(2, 2, 1), (4, 4, 1), (4, 4, 4), (8, 8, 2), (2, 16, 1)])
def test_plan_small_k_and_one_expert_per_rank(R, E, K):
    placement = Placement.contiguous(E, R)
    cfg = PlanConfig(R, E // R, K, max_tokens=300, capacity=300 * K * R, block_m=16, chunk=5)
    rt = routing.zipf(R, 300, E, K, 1.0, seed=E * K)  # 300 tokens: several plan blocks
    with EmulatedWorld(R) as world:
        ws = PlanWorkspace(world, cfg, placement)
        run_plan(world, ws, rt)
        assert_plan_equal(ws, rt)


def test_back_to_back_calls_without_reset():
    R, E, K = 4, 16, 2
    placement = Placement.contiguous(E, R)
    cfg = PlanConfig(R, 4, K, max_tokens=64, capacity=64 * K * R, block_m=8, chunk=4)
    with EmulatedWorld(R) as world:
        ws = PlanWorkspace(world, cfg, placement)
        for epoch in range(1, 5):
            rt = routing.drop(routing.zipf(R, [64, 50, 1, 33], E, K, 0.8, seed=epoch), 0.1, epoch)
            run_plan(world, ws, rt)
            assert_plan_equal(ws, rt)
            assert ws.calls == epoch
            assert ws.sym_ready.peer(0).tolist() == [epoch] * R


def test_overflow_raises_on_every_rank():
    R, E, K = 4, 8, 2
    placement = Placement.contiguous(E, R)
    cfg = PlanConfig(R, 2, K, max_tokens=32, capacity=100, block_m=8, chunk=4)
    rt = routing.all_to_one_rank(R, 32, E, K, dst=2, seed=0)  # rank 2 gets 4 * 32 * 2 = 256 rows
    with EmulatedWorld(R) as world:
        ws = PlanWorkspace(world, cfg, placement)
        ws.run({r: rt.topk_ids[r] for r in range(R)})
        records = torch.stack([world.error_record(r).clone() for r in range(R)])
        assert bool((records[:, 0] == 2).all()), "every rank reports the overflow"
        assert records[:, 2].tolist() == [2] * R and records[:, 4].tolist() == [256] * R
        with pytest.raises(
            CapacityError, match="rank 2 would receive 256 rows .*holds 100.*capacity="
        ):
            world.check_errors()


def test_plan_input_validation():
    R, E, K = 2, 8, 2
    cfg = PlanConfig(R, 4, K, max_tokens=16, capacity=64)
    with EmulatedWorld(R) as world:
        ws = PlanWorkspace(world, cfg, Placement.contiguous(E, R))
        good = torch.zeros(4, K, dtype=torch.int32)
        bad = {
            "expert 8 but the layer has 8 experts": good + 8,
            "expert -2": good - 2,
            "int32 or int64": good.float(),
            r"must be \[T, 2\]": torch.zeros(4, 3, dtype=torch.int32),
            "17 tokens but max_tokens_per_rank is 16": torch.zeros(17, K, dtype=torch.int32),
            "is on meta": torch.zeros(4, K, dtype=torch.int32, device="meta"),
        }
        for message, ids in bad.items():
            with pytest.raises(ValueError, match=message):
                ws.launch(0, ids)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        PlanConfig(2, 4, 2, 16, 64, chunk=0)


def dispatch_task_of(plan, unit_index):
    for i in range(plan.stat("num_dispatch_tasks")):
        _, start, count, _ = plan.dispatch_tasks[i].tolist()
        if start <= unit_index < start + count:
            return i
    raise AssertionError(f"unit {unit_index} is in no dispatch task")


@pytest.mark.parametrize("token_saving", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_task_table_ordering_rule(token_saving, seed):
    """DESIGN §5: a tile waits on the flags that dispatch tasks raise (here or on peers; they
    never wait), and those waits cover the dispatch task that carries every row it reads; the
    table holds exactly the call's dispatch tasks, zero rows after them."""
    R, E, K = 4, 16, 4
    placement = Placement.contiguous(E, R)
    L = placement.slots_per_rank
    cfg = PlanConfig(
        R, L, K, max_tokens=48, capacity=48 * K * R, block_m=8, chunk=3, token_saving=token_saving
    )
    rt = routing.drop(routing.zipf(R, 48, E, K, 1.0, seed), 0.1, seed)
    with EmulatedWorld(R) as world:
        ws = PlanWorkspace(world, cfg, placement)
        run_plan(world, ws, rt)
        plans = [ws.plan(r) for r in range(R)]
    phys = resolve_all_ref(rt.topk_ids, placement)
    for d, plan in enumerate(plans):
        n = plan.stat("num_dispatch_tasks")
        assert n <= cfg.max_dispatch_tasks
        assert plan.dispatch_tasks[n:].eq(0).all(), "rows past the call's tasks are zero"
        # a task's group is (local slot, destination): g = local * R + dst
        groups = {}
        for s, p in enumerate(plans):
            for i in range(p.stat("num_dispatch_tasks")):
                g = p.dispatch_tasks[i, 0].item()
                groups.setdefault((s, g // R, g % R), []).append(i)
        layout = recv_layout_ref(phys, placement, d)
        slots = plan.tiles[: plan.stat("num_tiles"), 0].tolist()
        for tile in range(plan.stat("num_tiles")):
            local, row0, rows, src_lo, src_hi, m, n_tiles = plan.tiles[tile].tolist()
            # its index among its slot's tiles, and their number (gemm1_coords' chunks)
            mates = [i for i, slot in enumerate(slots) if slot == local]
            assert (m, n_tiles) == (mates.index(tile), len(mates))
            ls = range(local + 1) if token_saving else [local]
            waits = {
                (s, t)
                for s in range(src_lo, src_hi + 1)
                for l2 in ls
                for t in groups.get((s, l2, d), [])
            }
            for row in range(row0, row0 + rows):
                s, t, k = (int(layout.src_rank[row]), int(layout.token[row]), int(layout.k[row]))
                assert int(layout.local_slot[row]) == local
                carrier = plans[s].data_pos[t, k].item() if token_saving else row
                (ck,) = [
                    kk
                    for kk in range(K)
                    if plans[s].slot_pos[t, kk].item() == carrier and phys[s][t, kk] // L == d
                ]
                unit = (plans[s].send_units == t * K + ck).nonzero().item()
                assert (s, dispatch_task_of(plans[s], unit)) in waits
    assert STATS[2] == "num_tiles"
