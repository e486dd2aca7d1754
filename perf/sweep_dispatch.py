"""Dispatch tile sweep: ``python -m perf.sweep_dispatch [--preset dsv3] [--tokens 4096]``.

Relaunches itself on every visible GPU (NVSHMEM world; ``--emulate R`` for R ranks on one GPU).
For each program count (``--ctas``, several allowed; 0: the op's default) and each (``chunk``: units
per dispatch task, ``block_h``: columns per copy step, ``copy_stages``: copy steps loaded ahead)
it makes one call in mode "dispatch", poisoned and checked bit for bit against
``dispatch_ref``, then times (CUDA-graph replays, median, slowest rank) the dispatch with its plan
(stage "dispatch") and the puts alone (stage "sends"). GB/s: the bytes the busiest sender moves
(remote rows only when there are several ranks; every row it stores at R = 1, where the dispatch
is a local copy) over the time. Table on rank 0; the best row is what ``KernelConfig``'s
``chunk`` / ``block_h`` / ``copy_stages`` should cite.

Mode "dispatch" has no GEMM, so its programs need little shared memory and several fit on one
SM: more programs than SMs put more rows in flight (no task waits on a program that has not
started: tasks are claimed in dependency order).
"""

from __future__ import annotations

import argparse
import itertools
import sys

from megakernel import KernelConfig, Megakernel, routing
from megakernel.placement import Placement
from megakernel.reference import resolve_all_ref
from megakernel.shapes import preset
from megakernel.testing import check_calls, local_w13, make_tokens, run_poisoned
from megakernel.traffic import traffic_model
from perf.timing import graphed, time_us
from symm_mem import World
from symm_mem.launch import run_in_world

# (chunk, block_h, copy_stages)
CONFIGS = [
    (8, 1024, 1),
    (8, 2048, 1),
    (16, 1024, 1),
    (16, 2048, 1),
    (16, 4096, 1),
    (32, 1024, 1),
    (32, 2048, 1),
    (8, 1024, 4),
    (16, 2048, 4),
    (16, 1024, 4),
]


def sweep(world: World, args) -> None:
    shape = preset(args.preset).with_tokens(args.tokens)
    R, E, K, T = world.world_size, shape.num_experts, shape.topk, args.tokens
    ranks, dev = world.local_ranks, world.device
    placement = Placement.contiguous(E, R)
    rt = routing.uniform(R, T, E, K, seed=1).to(dev)
    xs = make_tokens(shape, [T] * R, 1, dev)
    w = {r: local_w13(shape, placement, r, 1, dev) for r in ranks}
    phys = resolve_all_ref([i.cpu() for i in rt.topk_ids], placement)
    traffic = traffic_model(phys, placement.slots_per_rank)
    row_bytes = shape.hidden * shape.dtype.itemsize
    moved = max(traffic.bytes(row_bytes, True)) if R > 1 else T * row_bytes  # token saving
    rows = []
    for ctas, (chunk, block_h, stages) in itertools.product(args.ctas, CONFIGS):
        cfg = KernelConfig(chunk=chunk, block_h=block_h, copy_stages=stages, num_ctas=ctas)
        ws = Megakernel(world, shape, placement=placement, config=cfg, combine=False)
        handles = run_poisoned(ws, xs, rt.topk_ids, w, "dispatch")
        problems = check_calls(handles, xs, rt.topk_ids, w, placement, "dispatch")
        x, ids = {r: xs[r] for r in ranks}, {r: rt.topk_ids[r] for r in ranks}

        def call(stage: str, ws=ws, x=x, ids=ids):
            return lambda: ws.run(x, ids, None, w, mode="dispatch", stage=stage, validate=False)

        timed = {stage: time_us(graphed(call(stage)))["median"] for stage in ("dispatch", "sends")}
        ws.check_errors()
        ws.close()
        knobs = (ws.programs("dispatch"), chunk, block_h, stages)
        rows.append((*knobs, timed["dispatch"], timed["sends"], problems))
    if world.rank != 0:
        return
    print(
        f"\ndispatch sweep, {args.preset}, T={T}, {R} ranks ({type(world).__name__}), "
        f"{moved / 1e6:.1f} MB moved by the busiest sender"
    )
    head = ("programs", "chunk", "block_h", "stages", "dispatch us", "sends us", "GB/s")
    print(" ".join(f"{name:>8}" for name in head), "ok")
    for *knobs, d, s, problems in rows:
        ok = "yes" if not problems else problems[0]
        print(" ".join(f"{v:8d}" for v in knobs), f"{d:8.1f} {s:8.1f} {moved / s / 1e3:8.1f} {ok}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="dsv3")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--emulate", type=int, default=0, help="R ranks on one GPU instead")
    parser.add_argument(
        "--ctas", type=int, nargs="+", default=[0], help="programs per rank (0: the op's default)"
    )
    parser.add_argument("--symmetric-size", default="4G")
    args = parser.parse_args()
    job = lambda world: sweep(world, args)  # noqa: E731
    sys.exit(
        run_in_world(
            "perf.sweep_dispatch", job, emulate=args.emulate, symmetric_size=args.symmetric_size
        )
    )


if __name__ == "__main__":
    main()
