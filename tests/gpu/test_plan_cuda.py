"""The plan kernels on one GPU: EmulatedWorld(R, "cuda"), ranks concurrent, against plan_ref."""

import pytest
import torch

from megakernel import routing
from megakernel.placement import Placement
from megakernel.plan import PlanConfig, PlanWorkspace
from megakernel.testing import small_case
from symm_mem import EmulatedWorld

pytestmark = pytest.mark.gpu


def check(ws, rt):
    assert ws.mismatches(rt.topk_ids) == {}


@pytest.mark.parametrize("R", [1, 2, 4, 8])
@pytest.mark.parametrize("token_saving", [True, False])
def test_plan_edge_cases_on_gpu(R, token_saving):
    with EmulatedWorld(R, "cuda") as world:
        for case in routing.EDGE_CASES:
            rt, placement, cfg = small_case(case, R, token_saving)
            ws = PlanWorkspace(world, cfg, placement)
            ws.warmup()
            ws.run({r: rt.topk_ids[r].cuda() for r in range(R)})
            world.check_errors()
            check(ws, rt)
            ws.close()


@pytest.mark.parametrize("case", ["uniform", "zipf", "dropped", "one_expert"])
def test_plan_dsv3_8_ranks(case):
    R, E, K, T = 8, 256, 8, 4096
    rt, _ = routing.edge_case(case, R, T, E, K, seed=7)
    placement = Placement.contiguous(E, R)
    cfg = PlanConfig(R, E // R, K, max_tokens=T, capacity=R * T * K // 2)
    with EmulatedWorld(R, "cuda") as world:
        ws = PlanWorkspace(world, cfg, placement)
        ws.warmup()
        ws.run({r: rt.topk_ids[r].cuda() for r in range(R)})
        world.check_errors()
        check(ws, rt)


def test_plan_in_a_cuda_graph_with_fresh_routing_each_replay():
    R, E, K, T = 4, 64, 4, 500
    placement = Placement.contiguous(E, R)
    cfg = PlanConfig(R, E // R, K, max_tokens=T, capacity=T * K * R)
    with EmulatedWorld(R, "cuda") as world:
        ws = PlanWorkspace(world, cfg, placement)
        ws.warmup()
        ids = {r: torch.zeros(T, K, dtype=torch.int32, device="cuda") for r in range(R)}
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ws.run(ids, validate=False)
        for replay in range(10):
            rt = routing.zipf(R, T, E, K, 0.5 * replay, seed=replay)
            for r in range(R):
                ids[r].copy_(rt.topk_ids[r])
            graph.replay()
            world.check_errors()
            check(ws, rt)
            assert ws.epoch[0].item() == replay + 1, "each replay runs under a fresh epoch"
