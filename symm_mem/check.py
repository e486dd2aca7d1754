"""Symmetric-memory self-check: an all-to-all exchange with epoch flags, ping-pong latency and
peer-store bandwidth. ``python -m symm_mem.check`` is the project's main job for now.

Shape legend: R ranks, N elements each rank sends to every rank (itself included).

Exchange protocol (one call = one epoch e):
  put task (peer, blk):  store this rank's block into peer's ``data[e % 2, rank, blk]``, barrier,
                         release ``flags[rank, blk] = e`` on the peer.
  recv task (src, blk):  wait until the local ``flags[src, blk] >= e``, copy
                         ``data[e % 2, src, blk]`` into ``out[src, blk]``.
Put tasks have lower ids than receive tasks and never wait, so a persistent grid cannot deadlock,
and the interpreter can run all ranks' puts, then all ranks' receives (phase by phase).

NOTE: data is double-buffered by epoch parity. A rank can start call e+1 while a peer still reads
call e, but it cannot reach call e+2 before every peer finished call e (call e+1 waits on each
peer's e+1 puts, which that peer issues only after its call e kernel ended), so no slot is
overwritten while it is read. Flags only grow, so nothing is ever reset.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from symm_mem.buffer import World
from symm_mem.device import (
    NVSHMEM_CMP_GE,
    NVSHMEM_SIGNAL_SET,
    deadline_in,
    globaltimer,
    my_pe,
    n_pes,
    peer_ptr,
    ptr,
    putmem_signal_nbi_block,
    quiet,
    signal_flag,
    signal_wait_until,
    wait_flag,
)
from symm_mem.runtime import uses_nvshmem

EXCHANGE_BLOCK = 1024  # elements per task: small enough that the interpreter tests stay quick


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _put_block(
    src_ptr,
    data_base,
    flag_base,
    data_like,
    flag_like,
    rank,
    peer,
    blk,
    parity,
    epoch,
    N,
    num_blocks,
    R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row = tl.cast(parity * R + rank, tl.int64) * N
    x = tl.load(src_ptr + offs, mask=mask)
    tl.store(peer_ptr(data_base, peer, data_like) + row + offs, x, mask=mask)
    tl.debug_barrier()  # every thread's stores before the one release below
    signal_flag(peer_ptr(flag_base, peer, flag_like) + rank * num_blocks + blk, epoch)


@triton.jit
def _recv_block(
    out_ptr,
    data_like,
    flag_like,
    err_ptr,
    rank,
    src,
    blk,
    parity,
    epoch,
    deadline,
    task,
    N,
    num_blocks,
    R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    flag_idx = src * num_blocks + blk
    if wait_flag(flag_like + flag_idx, epoch, deadline, err_ptr, rank, flag_idx, task):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        row = tl.cast(parity * R + src, tl.int64) * N
        x = tl.load(data_like + row + offs, mask=mask)
        tl.store(out_ptr + tl.cast(src, tl.int64) * N + offs, x, mask=mask)


# NOTE: per-call scalars are not specialised (Triton would make `rank == 1` or `epoch == 1` a
# separate kernel): a second compile + module load while a peer's kernel spins deadlocks.
@triton.jit(do_not_specialize=["rank", "epoch", "task_begin", "task_end"])
def exchange_kernel(
    src_ptr,  # [N] this rank's payload for this epoch
    data_base,  # [R] int64: every rank's sym data [2, R, N]
    flag_base,  # [R] int64: every rank's sym flags [R, num_blocks]
    data_ptr,  # this rank's sym data (its type is used for peer pointers)
    flag_ptr,  # this rank's sym flags
    out_ptr,  # [R, N] what this rank received from each rank
    err_ptr,
    rank,
    epoch,
    timeout_ns,
    N,
    task_begin,
    task_end,
    R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    num_blocks = tl.cdiv(N, BLOCK)
    num_puts = R * num_blocks
    deadline = deadline_in(timeout_ns, err_ptr)
    parity = epoch % 2
    # NOTE: a while loop, not range(): the interpreter's program_id is not a valid range bound
    task = task_begin + tl.program_id(0)
    while task < task_end:
        if task < num_puts:
            _put_block(
                src_ptr,
                data_base,
                flag_base,
                data_ptr,
                flag_ptr,
                rank,
                task // num_blocks,
                task % num_blocks,
                parity,
                epoch,
                N,
                num_blocks,
                R,
                BLOCK,
            )
        else:
            t = task - num_puts
            _recv_block(
                out_ptr,
                data_ptr,
                flag_ptr,
                err_ptr,
                rank,
                t // num_blocks,
                t % num_blocks,
                parity,
                epoch,
                deadline,
                task,
                N,
                num_blocks,
                R,
                BLOCK,
            )
        task += tl.num_programs(0)


@triton.jit(do_not_specialize=["rank", "peer", "epoch0", "iters"])
def pingpong_kernel(
    flag_base,
    flag_ptr,
    err_ptr,
    time_ptr,
    rank,
    peer,
    epoch0,
    iters,
    timeout_ns,
    INITIATOR: tl.constexpr,
):
    """``iters`` round trips of one flag each way; writes the elapsed ns into ``time_ptr``."""
    peer_flag = peer_ptr(flag_base, peer, flag_ptr)
    start = globaltimer()
    deadline = deadline_in(timeout_ns, err_ptr)
    for i in range(iters):
        epoch = epoch0 + i
        if INITIATOR:
            signal_flag(peer_flag, epoch)
            wait_flag(flag_ptr, epoch, deadline, err_ptr, rank, 0, i)
        else:
            wait_flag(flag_ptr, epoch, deadline, err_ptr, rank, 0, i)
            signal_flag(peer_flag, epoch)
    tl.store(time_ptr, globaltimer() - start)


@triton.jit
def peer_store_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """Persistent grid-stride copy; ``dst_ptr`` is a peer's buffer (stores cross NVLink)."""
    base = tl.program_id(0).to(tl.int64) * BLOCK
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    while base < n:
        offs = base + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)
        base += step


@uses_nvshmem
@triton.jit(do_not_specialize=["epoch", "peer"])
def nvshmem_put_kernel(dst_ptr, src_ptr, nbytes, sig_ptr, epoch, peer, info_ptr):
    """One block: ``putmem_signal_nbi_block`` (SIGNAL_SET epoch) of ``nbytes`` to ``peer``."""
    tl.store(info_ptr + 0, my_pe())
    tl.store(info_ptr + 1, n_pes())
    tl.store(info_ptr + 2, (ptr(dst_ptr.to(tl.int64), peer) != 0).to(tl.int32))
    putmem_signal_nbi_block(
        dst_ptr.to(tl.int64),
        src_ptr.to(tl.int64),
        tl.cast(nbytes, tl.int64),
        sig_ptr.to(tl.int64),
        tl.cast(epoch, tl.int64),
        tl.full((), NVSHMEM_SIGNAL_SET, tl.int32),
        tl.cast(peer, tl.int32),
    )
    quiet()


@uses_nvshmem
@triton.jit(do_not_specialize=["rank", "epoch"])
def nvshmem_wait_kernel(sig_ptr, err_ptr, rank, epoch, timeout_ns, seen_ptr):
    """Bounded wait for the signal, then ``signal_wait_until`` (which returns at once) on it."""
    deadline = deadline_in(timeout_ns, err_ptr)
    if wait_flag(sig_ptr, epoch, deadline, err_ptr, rank, 0, 0):
        seen = signal_wait_until(
            sig_ptr.to(tl.int64), tl.full((), NVSHMEM_CMP_GE, tl.int32), tl.cast(epoch, tl.int64)
        )
        tl.store(seen_ptr, seen)


# ----------------------------------------------------------------------------- host side


def payload(n: int, rank: int, epoch: int, seed: int, device: torch.device) -> torch.Tensor:
    """What ``rank`` sends in ``epoch``: distinct per rank, epoch and element; int32, exact."""
    i = torch.arange(n, dtype=torch.int64, device=device)
    mix = (i + 1) * 2654435761 + (rank + 1) * 40503 * (epoch + 7) + seed * 97
    return (mix % 2147483629).to(torch.int32)


class Exchange:
    """All-to-all of N int32 per rank pair over a world's symmetric memory."""

    def __init__(self, world: World, n: int, block: int = EXCHANGE_BLOCK, num_programs: int = 0):
        if n < 1:
            raise ValueError(f"exchange needs n >= 1 elements, got {n}")
        self.world, self.n, self.block = world, n, block
        R = world.world_size
        self.num_blocks = triton.cdiv(n, block)
        self.num_tasks = 2 * R * self.num_blocks
        self.data = world.alloc((2, R, n), torch.int32)  # [2, R, N]: parity, source rank
        self.flags = world.alloc((R, self.num_blocks), torch.int64)  # [R, blocks]: source rank
        self.out = {
            r: torch.empty(R, n, dtype=torch.int32, device=world.device) for r in world.local_ranks
        }
        self.num_programs = num_programs or self.num_tasks

    @property
    def phases(self) -> list[tuple[int, int]]:
        """Task ranges in dependency order: every rank's puts, then every rank's receives."""
        half = self.num_tasks // 2
        return [(0, half), (half, self.num_tasks)]

    def launch(
        self, rank: int, src: torch.Tensor, epoch: int, task_range: tuple[int, int] | None = None
    ):
        begin, end = task_range or (0, self.num_tasks)
        self.out[rank].fill_(-1)  # poison: every element must be written by this call
        grid = (min(self.num_programs, end - begin),)
        exchange_kernel[grid](*self._args(rank, src, epoch, begin, end), **self._meta())

    def warmup(self) -> None:
        """Compile and load the kernel for every local rank before anything spins (a module load
        waits behind running kernels). A no-op under the interpreter."""
        if self.world.device.type != "cuda":
            return
        src = torch.zeros(self.n, dtype=torch.int32, device=self.world.device)
        for r in self.world.local_ranks:
            args = self._args(r, src, 1, 0, 0)
            exchange_kernel.warmup(*args, **self._meta(), grid=(1,))._init_handles()

    def _meta(self) -> dict[str, int]:
        return {"R": self.world.world_size, "BLOCK": self.block}

    def _args(self, rank: int, src: torch.Tensor, epoch: int, begin: int, end: int) -> tuple:
        return (
            src,
            self.data.peer_base,
            self.flags.peer_base,
            self.data.peer(rank),
            self.flags.peer(rank),
            self.out[rank],
            self.world.error_record(rank),
            rank,
            epoch,
            self.world.timeout_ns(),
            self.n,
            begin,
            end,
        )

    def expected(self, epoch: int, seed: int) -> torch.Tensor:
        return torch.stack(
            [
                payload(self.n, r, epoch, seed, self.world.device)
                for r in range(self.world.world_size)
            ]
        )

    def close(self) -> None:
        self.world.free(self.flags)
        self.world.free(self.data)


def shared_seed() -> int:
    """A fresh random seed that every rank agrees on: rank 0 draws it and, under
    torch.distributed, broadcasts it (each rank checks peers' payloads from the seed)."""
    import torch.distributed as dist

    box = [random.randrange(1 << 20)]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def run_exchange(world: World, n: int, epochs: range, seed: int, num_programs: int = 0) -> int:
    """Run ``epochs`` back-to-back exchange calls; returns the number of wrong elements seen.

    Nothing syncs with the host between epochs: the count accumulates on the device. Where ranks
    run concurrently (GPU worlds) each call is one launch per rank; under the CPU interpreter each
    call runs every rank's puts, then every rank's receives.
    """
    ex = Exchange(world, n, num_programs=num_programs or world.sms_per_rank)
    ex.warmup()
    world.barrier()
    wrong = torch.zeros((), dtype=torch.int64, device=world.device)
    for epoch in epochs:
        srcs = {r: payload(n, r, epoch, seed, world.device) for r in world.local_ranks}
        for phase in [None] if world.concurrent else ex.phases:
            world.run_ranks(lambda r, e=epoch, p=phase, s=srcs: ex.launch(r, s[r], e, p))
        expect = ex.expected(epoch, seed)
        for r in world.local_ranks:
            wrong += (ex.out[r] != expect).sum()
            # NOTE: safe without a barrier: no peer writes this parity again before this rank's
            # next call has put its own rows (module docstring)
            wrong += (ex.data.peer(r)[epoch % 2] != expect).sum()
    world.check_errors()
    ex.close()
    return int(wrong)


# ----------------------------------------------------------------------------- the main job


@dataclass
class Row:
    what: str
    value: str
    ok: bool | None = None


def _print_table(title: str, rows: list[Row]) -> None:
    width = max(len(r.what) for r in rows)
    print(f"\n{title}")
    for r in rows:
        mark = "" if r.ok is None else ("  ok" if r.ok else "  FAIL")
        print(f"  {r.what:<{width}}  {r.value}{mark}")


def _time_ms(fn, iters: int = 10, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def peer_bandwidth(world, nbytes: int = 1 << 30) -> tuple[float, float]:
    """GB/s per direction into the next rank's copy: torch ``copy_`` and the Triton peer store,
    every rank sending at once, median over iterations, min over ranks."""
    n = nbytes // 4
    sym = world.alloc((n,), torch.float32)
    peer = (world.rank + 1) % world.world_size
    dst = sym.peer(peer)
    src = torch.randn(n, device=world.device)
    num_sms = torch.cuda.get_device_properties(world.device).multi_processor_count
    grid = (4 * num_sms,)
    results = []
    for fn in (
        lambda: dst.copy_(src),
        lambda: peer_store_kernel[grid](src, dst, n, BLOCK=4096, num_warps=8),
    ):
        world.barrier()
        ms = statistics.median(_time_ms(fn))
        gbps = torch.tensor([nbytes / ms / 1e6], device=world.device)
        torch.distributed.all_reduce(gbps, op=torch.distributed.ReduceOp.MIN)
        results.append(float(gbps))
    world.free(sym)
    return results[0], results[1]


def pingpong_us(world, iters: int, epoch0: int = 1) -> float:
    flags = world.alloc((1,), torch.int64)
    elapsed = torch.zeros(1, dtype=torch.int64, device=world.device)
    peer = world.rank ^ 1
    args = (flags.peer_base, flags.local, world.error_record(), elapsed, world.rank, peer)
    # compile + load before either side spins (a module load waits behind running kernels)
    pingpong_kernel.warmup(
        *args, epoch0, 1, 1, INITIATOR=world.rank == 0, grid=(1,)
    )._init_handles()
    world.barrier()
    pingpong_kernel[(1,)](*args, epoch0, iters, world.timeout_ns(), INITIATOR=world.rank == 0)
    world.check_errors(lambda _: "the ping-pong flag")
    us = int(elapsed) / iters / 1e3
    world.free(flags)
    return us


def nvshmem_world_job() -> int:
    from symm_mem.runtime import init_world

    with init_world() as world:
        R, rank = world.world_size, world.rank
        seed = shared_seed()  # NOTE: per-rank seeds made every peer row look wrong (2 x H200)
        n, epochs = 1 << 20, 100
        wrong = run_exchange(world, n, range(1, epochs + 1), seed)
        rows = [
            Row(
                f"exchange, {epochs} epochs x {R} ranks x {n} int32, no host sync",
                f"{int(wrong)} wrong",
                int(wrong) == 0,
            )
        ]
        if R >= 2:
            rows.append(
                Row(
                    "flag ping-pong round trip (rank 0 <-> 1)",
                    f"{pingpong_us(world, 10000):.2f} us",
                )
            )
        copy_gbps, triton_gbps = peer_bandwidth(world)
        rows.append(Row("torch copy_ into peer view", f"{copy_gbps:.1f} GB/s per direction"))
        rows.append(
            Row(
                "Triton peer store",
                f"{triton_gbps:.1f} GB/s ({triton_gbps / copy_gbps:.0%} of copy_)",
            )
        )
        if rank == 0:
            dev_name = torch.cuda.get_device_name(world.device)
            _print_table(
                f"NVSHMEM world: {R} rank(s) on {dev_name}, libnvshmem {world.libnvshmem_version}",
                rows,
            )
        ok = all(r.ok is not False for r in rows)
    return 0 if ok else 1


def emulated_job(device: str) -> int:
    from symm_mem.emulated import EmulatedWorld

    seed = random.randrange(1 << 20)
    rows = []
    sizes, epochs = ((2, 4, 8), range(1, 1001)) if device == "cuda" else ((2, 4), range(1, 4))
    n = 1 << 16 if device == "cuda" else 2500
    for R in sizes:
        with EmulatedWorld(R, device) as world:
            wrong = run_exchange(world, n, epochs, seed)
        rows.append(
            Row(f"exchange, R={R}, {len(epochs)} epochs x {n} int32", f"{wrong} wrong", wrong == 0)
        )
    where = "one GPU" if device == "cuda" else "CPU, Triton interpreter, phase by phase"
    _print_table(f"Emulated world ({where}): R ranks in one process", rows)
    return 0 if all(r.ok for r in rows) else 1


def main() -> int:
    if "RANK" in os.environ:
        return nvshmem_world_job()
    if torch.cuda.is_available():
        try:
            import nvshmem.core  # noqa: F401
        except ImportError:
            print("nvshmem4py is not installed: running the emulated world on one GPU instead")
            return emulated_job("cuda")
        from symm_mem.launch import run

        return run(None, ["-m", "symm_mem.check"])
    if os.environ.get("TRITON_INTERPRET") != "1":
        # the interpreter must be chosen before triton kernels are defined: start afresh
        print("no GPU: running the emulated CPU world under the Triton interpreter")
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.call([sys.executable, "-m", "symm_mem.check"], env=env)
    return emulated_job("cpu")


if __name__ == "__main__":
    sys.exit(main())
