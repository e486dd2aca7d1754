"""Interpreter fallbacks of the device helpers, and flag signalling semantics."""

import torch
import triton
import triton.language as tl

from symm_mem import EmulatedWorld
from symm_mem.device import (
    ERR_CLOCK,
    ERR_WORDS,
    deadline_in,
    globaltimer,
    peer_ptr,
    signal_flag,
    smid,
    wait_flag,
)


@triton.jit
def _clock_kernel(out_ptr):
    t0 = globaltimer()
    s = smid()
    t1 = globaltimer()
    tl.store(out_ptr, t0)
    tl.store(out_ptr + 1, t1)
    tl.store(out_ptr + 2, s.to(tl.int64))


def test_timer_and_smid_fallbacks():
    out = torch.zeros(3, dtype=torch.int64)
    _clock_kernel[(1,)](out)
    t0, t1, sm = out.tolist()
    assert 0 < t0 <= t1 and sm == 0


@triton.jit
def _signal_then_wait_kernel(flag_base, flag_ptr, err_ptr, ok_ptr, rank, peer, epoch, timeout_ns):
    signal_flag(peer_ptr(flag_base, peer, flag_ptr), epoch)
    deadline = deadline_in(timeout_ns, err_ptr)
    ok = wait_flag(flag_ptr + 0, epoch, deadline, err_ptr, rank, 7, 3)
    tl.store(ok_ptr, ok.to(tl.int32))


def test_signal_sets_epoch_on_peer_and_wait_sees_it():
    with EmulatedWorld(1) as world:
        flags = world.alloc((1,), torch.int64)
        ok = torch.zeros(1, dtype=torch.int32)
        err = world.error_record(0)
        for epoch in (1, 2, 5):
            _signal_then_wait_kernel[(1,)](
                flags.peer_base, flags.local, err, ok, 0, 0, epoch, world.timeout_ns()
            )
            assert flags.local.item() == epoch, "the flag holds the epoch itself"
            assert ok.item() == 1
        assert err.shape == (ERR_WORDS.value,) and not bool(err[: ERR_CLOCK.value].any())
        world.check_errors()
