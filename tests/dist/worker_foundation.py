"""torchrun worker for tests/dist/test_foundation.py; prints `[rank r] PASS <case>` per case.

Works on any number of ranks (1 included, where peer = self and ping-pong is skipped).
"""

import random
import statistics
import sys

import torch

import symm_mem
from symm_mem import WaitTimeoutError
from symm_mem.check import (
    shared_seed,
    Exchange,
    nvshmem_put_kernel,
    nvshmem_wait_kernel,
    payload,
    peer_bandwidth,
    pingpong_us,
    run_exchange,
)
from symm_mem.runtime import launch

BANDWIDTH_RATIO = 0.90  # Triton peer store vs torch copy_ into the same peer view


def log(rank, msg):
    print(f"[rank {rank}] {msg}", flush=True)


def check(rank, case, ok, detail=""):
    log(rank, f"{'PASS' if ok else 'FAIL'} {case} {detail}".rstrip())
    return bool(ok)


def nvshmem_put_signal(world, epochs=(1, 2, 3), nbytes=1 << 20):
    """putmem_signal_nbi_block to the next rank; the signal must equal the epoch (SET, once)."""
    rank, R = world.rank, world.world_size
    peer, src_rank = (rank + 1) % R, (rank - 1) % R
    buf = world.alloc((nbytes,), torch.uint8)
    sig = world.alloc((1,), torch.int64)
    info = torch.zeros(4, dtype=torch.int32, device=world.device)
    seen = torch.zeros(1, dtype=torch.int64, device=world.device)
    ok = True
    for epoch in epochs:
        data = ((torch.arange(nbytes, device=world.device) * (rank + 3) + epoch) % 251).to(torch.uint8)
        expect = ((torch.arange(nbytes, device=world.device) * (src_rank + 3) + epoch) % 251).to(torch.uint8)
        world.barrier()
        launch(nvshmem_put_kernel, (1,), buf.local, data, nbytes, sig.local, epoch, peer, info)
        launch(nvshmem_wait_kernel, (1,), sig.local, world.error_record(), rank, epoch,
               world.timeout_ns(), seen)
        world.check_errors(lambda _: "the NVSHMEM signal")
        ok &= torch.equal(buf.local, expect)
        ok &= sig.local.item() == epoch and seen.item() == epoch
        ok &= info[:3].tolist() == [rank, R, 1]
    world.free(sig)
    world.free(buf)
    return ok, f"signal={epoch} info(my_pe, n_pes, p2p)={info[:3].tolist()}"


def timeout_path(world):
    """A wait nobody satisfies must raise within the deadline, naming rank, flag and epoch."""
    ex = Exchange(world, 4096, num_programs=4)
    old = world.timeout_s
    world.timeout_s = 0.5
    try:
        ex.launch(world.rank, payload(4096, world.rank, 7, 0, world.device), 7, ex.phases[1])
        world.check_errors()
        return False, "no error raised"
    except WaitTimeoutError as e:
        ok = e.rank == world.rank and e.epoch == 7 and f"rank {world.rank}" in str(e)
        return ok, str(e)
    finally:
        world.timeout_s = old
        world.barrier()
        ex.close()


def main():
    world = symm_mem.init_world()
    seed = shared_seed()  # every rank must build the same payloads
    rank, R = world.rank, world.world_size
    ok = check(rank, "init", (world.rank, world.world_size) == (rank, R),
               f"{R} ranks, libnvshmem {world.libnvshmem_version}, {world.init_seconds:.2f} s")
    wrong = run_exchange(world, 1 << 20, range(1, 101), seed)
    ok &= check(rank, "exchange", wrong == 0, f"100 epochs x 1M int32, {wrong} wrong")
    if R >= 2:
        trips = [pingpong_us(world, 10000, epoch0=1 + i * 10000) for i in range(3)]
        ok &= check(rank, "pingpong", True,
                    f"10000 round trips x 3: {statistics.median(trips):.2f} us median per trip")
    ok &= check(rank, "nvshmem_put_signal", *nvshmem_put_signal(world))
    ok &= check(rank, "timeout", *timeout_path(world))
    copy_gbps, triton_gbps = peer_bandwidth(world)
    ratio = triton_gbps / copy_gbps
    ok &= check(rank, "bandwidth", ratio >= BANDWIDTH_RATIO,
                f"copy_ {copy_gbps:.1f} GB/s, Triton {triton_gbps:.1f} GB/s ({ratio:.1%}; "
                f"need >= {BANDWIDTH_RATIO:.0%})")
    world.close()
    ok &= check(rank, "close", world.closed and not world.allocations)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
