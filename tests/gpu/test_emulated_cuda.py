"""EmulatedWorld on one GPU: R ranks as R concurrent kernels on R streams."""

import random
import time

import pytest
import torch
import triton
import triton.language as tl

from symm_mem import EmulatedWorld, WaitTimeoutError
from symm_mem.check import Exchange, pingpong_kernel, run_exchange
from symm_mem.device import globaltimer, smid

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("R", [2, 4, 8])
def test_exchange_1000_epochs_concurrent_ranks(R):
    seed = random.randrange(1 << 20)
    with EmulatedWorld(R, "cuda") as world:
        start = time.perf_counter()
        wrong = run_exchange(world, 1 << 16, range(1, 1001), seed)
        elapsed = time.perf_counter() - start
    print(f"\nR={R}: 1000 epochs x {R}x{R} x 65536 int32 in {elapsed:.2f} s, {wrong} wrong")
    assert wrong == 0


def test_pingpong_between_concurrent_ranks():
    iters = 10000
    with EmulatedWorld(2, "cuda") as world:
        flags = world.alloc((1,), torch.int64)
        elapsed = torch.zeros(2, dtype=torch.int64, device=world.device)

        def launch(r, n=iters):
            pingpong_kernel[(1,)](
                flags.peer_base,
                flags.peer(r),
                world.error_record(r),
                elapsed[r:],
                r,
                1 - r,
                1,
                n,
                world.timeout_ns(),
                INITIATOR=r == 0,
            )

        for r in range(2):  # compile and load both before either spins
            pingpong_kernel.warmup(
                flags.peer_base,
                flags.peer(r),
                world.error_record(r),
                elapsed[r:],
                r,
                1 - r,
                1,
                iters,
                world.timeout_ns(),
                INITIATOR=r == 0,
                grid=(1,),
            )._init_handles()
        world.run_ranks(launch)
        world.check_errors()
        assert flags.peer(0).item() == iters and flags.peer(1).item() == iters
        print(f"\nemulated ping-pong: {elapsed[0].item() / iters / 1e3:.2f} us per round trip")


def test_never_set_flag_times_out_on_gpu():
    with EmulatedWorld(2, "cuda", timeout_s=0.5) as world:
        ex = Exchange(world, 4096, num_programs=4)
        src = torch.arange(4096, dtype=torch.int32, device=world.device)
        start = time.monotonic()
        ex.launch(0, src, 1, ex.phases[1])  # receives only
        with pytest.raises(WaitTimeoutError, match="rank 0 timed out .* to reach 1 "):
            world.check_errors()
        assert time.monotonic() - start < 0.5 + 5.0


@triton.jit
def _clock_kernel(out_ptr):
    t0 = globaltimer()
    s = smid()
    t1 = globaltimer()
    tl.store(out_ptr + tl.program_id(0) * 3, t0)
    tl.store(out_ptr + tl.program_id(0) * 3 + 1, t1)
    tl.store(out_ptr + tl.program_id(0) * 3 + 2, s.to(tl.int64))


def test_globaltimer_and_smid_compiled():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.zeros(sms, 3, dtype=torch.int64, device="cuda")
    _clock_kernel[(sms,)](out)
    t0, t1, sm = out[:, 0], out[:, 1], out[:, 2]
    assert bool((t1 >= t0).all()) and bool((t0 > 0).all())
    assert bool(((sm >= 0) & (sm < sms)).all()) and len(set(sm.tolist())) > 1
