"""Peer stores through peer_base and epoch flags, in the emulated CPU world (interpreter)."""

import random
import time

import pytest
import torch

from symm_mem import EmulatedWorld, WaitTimeoutError
from symm_mem.check import Exchange, payload, run_exchange


@pytest.mark.parametrize("R", [2, 4])
def test_exchange_three_epochs_without_reset(R):
    seed = random.randrange(1 << 20)
    with EmulatedWorld(R) as world:
        # 2500 elements: not a multiple of the 1024-element task block
        assert run_exchange(world, 2500, range(1, 4), seed) == 0
        flags = None  # the flags were freed with the exchange; the world stays usable
        assert world.allocations == []
        assert flags is None


def test_exchange_detects_stale_data():
    """The check must be able to fail: skip rank 1's puts in epoch 2 and it times out."""
    with EmulatedWorld(2, timeout_s=0.2) as world:
        ex = Exchange(world, 100)
        for epoch in (1, 2):
            srcs = {r: payload(100, r, epoch, 0, world.device) for r in range(2)}
            puts, recvs = ex.phases
            for r in range(2):
                if not (epoch == 2 and r == 1):
                    ex.launch(r, srcs[r], epoch, puts)
            for r in range(2):
                ex.launch(r, srcs[r], epoch, recvs)
            if epoch == 1:
                world.check_errors()
                assert torch.equal(ex.out[0], ex.expected(1, 0))
        with pytest.raises(WaitTimeoutError) as info:
            world.check_errors()
        err = info.value
        assert (err.rank, err.flag, err.epoch, err.seen) == (0, 1, 2, 1)
        # rank 0 never received rank 1's epoch-2 row: it stays poisoned
        assert bool((ex.out[0][1] == -1).all())
        assert torch.equal(ex.out[0][0], payload(100, 0, 2, 0, world.device))


def test_never_set_flag_times_out_within_deadline():
    timeout = 0.3
    with EmulatedWorld(2, timeout_s=timeout) as world:
        ex = Exchange(world, 64)
        src = payload(64, 1, 1, 0, world.device)
        start = time.monotonic()
        ex.launch(1, src, 1, ex.phases[1])  # receives only: nobody ever puts
        with pytest.raises(
            WaitTimeoutError, match=r"rank 1 timed out after 0.3 s .* to reach 1 "
        ) as e:
            world.check_errors(lambda flag: f"data_ready[{flag}]")
        elapsed = time.monotonic() - start
        assert "data_ready[0]" in str(e.value)
        assert timeout <= elapsed < timeout + 5.0, elapsed
        world.check_errors()  # the record was cleared: the world is usable again
