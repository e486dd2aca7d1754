"""Waits that time out leave every thread of every program together (``symm_mem.device``).

A spin loop whose exit differs between the threads of one program puts the program's barriers
out of step for good: an H100 hung after a timeout that way (the threads compared their own
``%globaltimer`` readings with their own deadlines). Here many full programs of 8 warps time out
again and again at short deadlines, in a child process with a bound, so a hang fails the test
instead of holding the suite.
"""

import pytest
import torch
import triton
import triton.language as tl
from _bounded import run_bounded

from symm_mem.device import deadline_in, wait_flag, wait_flags

LAUNCHES = 300
PROGRAMS = 264  # two per SM of an H100 or H200


@triton.jit
def _time_out_kernel(flags_ptr, err_ptr, done_ptr, timeout_ns, VECTOR: tl.constexpr):
    """Every program waits for a flag nobody raises; the first to time out records it, the others
    see the record and leave. Each program then counts itself out."""
    deadline = deadline_in(timeout_ns, err_ptr)
    if VECTOR:
        i = tl.arange(0, 64)
        wait_flags(flags_ptr + i, i < 48, 1, deadline, err_ptr, 0, 7, tl.program_id(0))
    else:
        wait_flag(flags_ptr, 1, deadline, err_ptr, 0, 7, tl.program_id(0))
    tl.atomic_add(done_ptr, 1)


def _launch_many(vector: bool) -> None:
    flags = torch.zeros(64, dtype=torch.int64, device="cuda")
    done = torch.zeros(1, dtype=torch.int32, device="cuda")
    for i in range(LAUNCHES):
        err = torch.zeros(10, dtype=torch.int64, device="cuda")
        timeout = 20_000 + 977 * (i % 50)  # 20-68 us: deadlines at every phase of a spin step
        _time_out_kernel[(PROGRAMS,)](flags, err, done, timeout, VECTOR=vector, num_warps=8)
    torch.cuda.synchronize()
    assert int(done) == LAUNCHES * PROGRAMS, "every program of every launch left"
    assert int(err[0]) == 1 and int(err[2]) == 7, "the last launch recorded its timeout"


@pytest.mark.parametrize("vector", [False, True])
def test_timed_out_waits_never_hang_a_program(vector):
    run_bounded(_launch_many, (vector,), seconds=120, what="300 launches of timing-out waits")
