"""Per-SM traces of the megakernel (DESIGN §7): decode, align, export, draw, summarise.

With ``KernelConfig(trace=True)`` every program of the megakernel records, per task it runs,
(kind << 32 | task id, start, end, ns spent waiting on flags) from ``%globaltimer`` into its own
slice of a ``[programs, 1 + CAP, 4]`` int64 buffer, whose row 0 is a header (SM id, rank, events,
0); events past CAP are counted, never written. This module turns those buffers into
``TaskRecord``s, aligns the ranks' clocks, and writes a Chrome-trace / Perfetto JSON (one track
per rank x program, named by its SM), a PNG timeline and a text summary.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from megakernel.tasks import TaskKind
from symm_mem.device import deadline_in, globaltimer, peer_ptr, wait_flag

KIND_NAMES = {int(kind): kind.label for kind in TaskKind}  # in task id order
KIND_COLOURS = {
    "dispatch": "#1f77b4",
    "gemm1": "#2ca02c",
    "resolve": "#17becf",
    "down_combine": "#ff7f0e",
    "topk_reduce": "#d62728",
}


@dataclass(frozen=True)
class TaskRecord:
    rank: int
    program: int
    sm: int
    kind: str
    task: int
    start_ns: int
    end_ns: int
    wait_ns: int

    @property
    def dur_ns(self) -> int:
        return self.end_ns - self.start_ns


def decode(trace: torch.Tensor, rank: int) -> tuple[list[TaskRecord], int]:
    """One rank's buffer ``[programs, 1 + CAP, 4]`` -> (records, events dropped for lack of
    room). Programs that ran no task (header still zero) contribute nothing."""
    t = trace.cpu()
    cap = t.shape[1] - 1
    records, dropped = [], 0
    for p in range(t.shape[0]):
        sm, _, n, _ = (int(v) for v in t[p, 0])
        kept = min(n, cap)
        dropped += n - kept
        for tag, start, end, wait in t[p, 1 : 1 + kept].tolist():
            kind = KIND_NAMES.get(tag >> 32, f"kind{tag >> 32}")
            records.append(TaskRecord(rank, p, sm, kind, tag & 0xFFFFFFFF, start, end, wait))
    return records, dropped


def align(records: list[TaskRecord], offsets: dict[int, int]) -> list[TaskRecord]:
    """Shift each rank's times by ``-offsets[rank]`` (its clock minus the reference clock), then
    make the earliest start 0."""
    shifted = [
        TaskRecord(
            r.rank,
            r.program,
            r.sm,
            r.kind,
            r.task,
            r.start_ns - offsets.get(r.rank, 0),
            r.end_ns - offsets.get(r.rank, 0),
            r.wait_ns,
        )
        for r in records
    ]
    t0 = min((r.start_ns for r in shifted), default=0)
    return [
        TaskRecord(**{**asdict(r), "start_ns": r.start_ns - t0, "end_ns": r.end_ns - t0})
        for r in shifted
    ]


# ----------------------------------------------------------------------------- exporters


def chrome_trace(records: list[TaskRecord]) -> dict:
    """The Chrome-trace JSON object (``traceEvents``; times in microseconds): a process per rank,
    a thread per program (named by its SM), one complete ("X") event per task."""
    events: list[dict] = []
    for rank in sorted({r.rank for r in records}):
        events.append(
            {
                "name": "process_name",
                "ph": "M",
                "pid": rank,
                "tid": 0,
                "args": {"name": f"rank {rank}"},
            }
        )
    for rank, program, sm in sorted({(r.rank, r.program, r.sm) for r in records}):
        name = f"SM {sm} (program {program})"
        events.append(
            {"name": "thread_name", "ph": "M", "pid": rank, "tid": program, "args": {"name": name}}
        )
    for r in records:
        events.append(
            {
                "name": r.kind,
                "cat": r.kind,
                "ph": "X",
                "ts": r.start_ns / 1e3,
                "dur": r.dur_ns / 1e3,
                "pid": r.rank,
                "tid": r.program,
                "args": {"task": r.task, "sm": r.sm, "wait_us": r.wait_ns / 1e3},
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ns"}


def write_chrome_trace(records: list[TaskRecord], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(records)))
    return path


def draw_timeline(records: list[TaskRecord], path: str | Path, title: str = "") -> Path:
    """A PNG: one panel per rank, one row per program (sorted by SM), tasks coloured by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    ranks = sorted({r.rank for r in records}) or [0]
    fig, axes = plt.subplots(
        len(ranks), 1, figsize=(12, 1.2 + 2.3 * len(ranks)), sharex=True, squeeze=False
    )
    for ax, rank in zip(axes[:, 0], ranks, strict=True):
        mine = [r for r in records if r.rank == rank]
        rows = {p: i for i, (_, p) in enumerate(sorted({(r.sm, r.program) for r in mine}))}
        # one bar collection per (kind, row): a call per task takes minutes at 100k tasks
        spans: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
        for r in mine:
            width = max(r.dur_ns / 1e3, 1e-3)
            spans[(r.kind, rows[r.program])].append((r.start_ns / 1e3, width))
        for (kind, y), bars in spans.items():
            ax.broken_barh(bars, (y - 0.4, 0.8), color=KIND_COLOURS.get(kind, "grey"))
        ax.set_ylabel(f"rank {rank}\nprogram (by SM)")
        ax.set_ylim(-1, max(len(rows), 1))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("time (us)")
    kinds = sorted({r.kind for r in records})
    fig.legend(
        handles=[Patch(color=KIND_COLOURS.get(k, "grey"), label=k) for k in kinds],
        loc="upper right",
        ncol=len(kinds) or 1,
    )
    if title:
        fig.suptitle(title, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # room for title and legend
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- summary


@dataclass
class KindStats:
    count: int
    total_us: float
    mean_us: float
    wait_us: float
    first_start_us: float
    last_end_us: float


@dataclass
class Summary:
    kinds: dict[str, KindStats]
    busy: dict[tuple[int, int], float]  # (rank, program) -> busy fraction of its rank's span
    span_us: dict[int, float]  # rank -> first task start to last task end
    critical_rank: int
    critical_path: list[tuple[str, float]]  # (phase, us) on the rank that finished last
    dropped: int = 0

    def text(self) -> str:
        lines = [
            f"{'kind':<13} {'count':>6} {'total us':>10} {'mean us':>8} {'wait us':>10} "
            f"{'first us':>9} {'last us':>9}"
        ]
        for kind, s in self.kinds.items():
            lines.append(
                f"{kind:<13} {s.count:6d} {s.total_us:10.1f} {s.mean_us:8.2f} {s.wait_us:10.1f} "
                f"{s.first_start_us:9.1f} {s.last_end_us:9.1f}"
            )
        for rank, span in sorted(self.span_us.items()):
            fractions = [f for (r, _), f in self.busy.items() if r == rank]
            mean = sum(fractions) / len(fractions) if fractions else 0.0
            lines.append(
                f"rank {rank}: span {span:.1f} us, {len(fractions)} programs busy "
                f"{100 * mean:.1f}% on average (min {100 * min(fractions, default=0):.1f}%)"
            )
        path = " -> ".join(f"{phase} {us:.1f} us" for phase, us in self.critical_path)
        total = sum(us for _, us in self.critical_path)
        lines.append(f"critical path (rank {self.critical_rank}, {total:.1f} us): {path}")
        if self.dropped:
            lines.append(f"WARNING: {self.dropped} events did not fit the trace buffers")
        return "\n".join(lines)


PHASES = tuple(KIND_NAMES.values())


def summarize(records: list[TaskRecord], dropped: int = 0) -> Summary:
    """Per kind: count, busy and waiting time, first start and last end; per program: busy
    fraction of its rank's span; and the critical path estimate: on the rank that finished last,
    the task kinds in id order, each from the end of the previous one to its own last end."""
    kinds: dict[str, KindStats] = {}
    for kind in [k for k in PHASES if any(r.kind == k for r in records)]:
        mine = [r for r in records if r.kind == kind]
        total = sum(r.dur_ns for r in mine) / 1e3
        kinds[kind] = KindStats(
            count=len(mine),
            total_us=total,
            mean_us=total / len(mine),
            wait_us=sum(r.wait_ns for r in mine) / 1e3,
            first_start_us=min(r.start_ns for r in mine) / 1e3,
            last_end_us=max(r.end_ns for r in mine) / 1e3,
        )
    span, first = {}, {}
    for rank in {r.rank for r in records}:
        mine = [r for r in records if r.rank == rank]
        first[rank] = min(r.start_ns for r in mine)
        span[rank] = (max(r.end_ns for r in mine) - first[rank]) / 1e3
    busy: dict[tuple[int, int], float] = defaultdict(float)
    for r in records:
        busy[(r.rank, r.program)] += r.dur_ns / 1e3 / max(span[r.rank], 1e-9)
    critical = max(span, key=lambda k: first[k] / 1e3 + span[k]) if span else 0
    path, t = [], first.get(critical, 0)
    for kind in PHASES:
        ends = [r.end_ns for r in records if r.rank == critical and r.kind == kind]
        if ends and max(ends) > t:
            path.append((kind, (max(ends) - t) / 1e3))
            t = max(ends)
    return Summary(kinds, dict(busy), span, critical, path, dropped)


# ----------------------------------------------------------------------------- clocks


@triton.jit(do_not_specialize=["rank", "peer", "rounds", "timeout_ns"])
def _clock_sync_kernel(
    box_base,  # [R] int64: every rank's sym box [3] int64: ping, pong, the peer's clock
    box_ptr,  # this rank's box
    out_ptr,  # [rounds, 3] int64 (leader): sent, back, the peer's clock in between
    err_ptr,
    rank,
    peer,
    rounds,
    timeout_ns,
    LEADER: tl.constexpr,
):
    """Ping-pong between the leader (rank 0) and ``peer``: per round the leader notes its clock,
    pings, and notes its clock again when the pong arrives with the peer's clock."""
    deadline = deadline_in(timeout_ns, err_ptr)
    peer_box = peer_ptr(box_base, peer, box_ptr)
    i = 1
    ok = i <= rounds
    while ok:
        seq = tl.full((), 0, tl.int64) + i
        if LEADER:
            sent = globaltimer()
            tl.atomic_xchg(peer_box, seq, sem="release", scope="sys")
            arrived = wait_flag(box_ptr + 1, seq, deadline, err_ptr, rank, 1, i)
            back = globaltimer()
            j = tl.arange(0, 4)
            theirs = tl.load(box_ptr + 2)
            word = tl.where(j == 0, sent, tl.where(j == 1, back, theirs))
            tl.store(out_ptr + (i - 1) * 3 + j, word, mask=j < 3)
        else:
            arrived = wait_flag(box_ptr, seq, deadline, err_ptr, rank, 0, i)
            tl.store(peer_box + 2, globaltimer())
            tl.debug_barrier()
            tl.atomic_xchg(peer_box + 1, seq, sem="release", scope="sys")
        i += 1
        ok = arrived & (i <= rounds)


def clock_offsets(world, rounds: int = 64) -> dict[int, int]:
    """Each rank's ``%globaltimer`` minus rank 0's, in ns (valid on rank 0), from the ping-pong
    round with the shortest round trip (error: half of it). Ranks of an emulated world share one
    clock: all 0. Collective: every rank calls it."""
    if not dist.is_initialized() or world.world_size == 1:
        return {r: 0 for r in range(world.world_size)}
    rank, dev = world.rank, world.device
    box = world.alloc((3,), torch.int64)
    out = torch.zeros(rounds, 3, dtype=torch.int64, device=dev)

    def launch(peer: int, n: int) -> None:
        _clock_sync_kernel[(1,)](
            box.peer_base,
            box.peer(rank),
            out,
            world.error_record(rank),
            rank,
            peer,
            n,
            world.timeout_ns(),
            LEADER=rank == 0,
        )

    launch(0, 0)  # NOTE: compile and load before anything spins
    torch.cuda.synchronize()
    world.barrier()
    offsets = {0: 0}
    for peer in range(1, world.world_size):
        box.peer(rank).zero_()
        world.barrier()
        if rank in (0, peer):
            launch(peer if rank == 0 else 0, rounds)
        world.check_errors()
        world.barrier()
        if rank == 0:
            sent, back, theirs = out.cpu().unbind(1)
            best = int(torch.argmin(back - sent))
            offsets[peer] = int(theirs[best]) - (int(sent[best]) + int(back[best])) // 2
    world.free(box)
    return offsets


def gather_records(world, records: list[TaskRecord]) -> list[TaskRecord]:
    """Every rank's records on rank 0 (others get theirs back); a no-op in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return records
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, [asdict(r) for r in records])
    return [TaskRecord(**r) for part in everyone for r in part]
