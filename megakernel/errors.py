"""What the device reports about a workspace's calls, brought to the host without making a good
call synchronise.

Two kinds of failure:

- **a bad routing id** (``RoutingError``): found by the plan on one rank. The id is dropped, the
  call goes on everywhere (the peers never learn of it), and that rank's output is NaN, for this
  call and every later one until the error is raised. Raised once, then cleared.
- **a device failure** in the world's error record (``WaitTimeoutError``: a wait ran past its
  deadline, a peer never arrived; ``CapacityError``): every program of the rank leaves, and the
  device skips every later call of the rank (outputs NaN) until ``reset()``, which is collective
  and brings the ranks back in step. Until then every call raises.

Kernels that leave a record raise the rank's alarm, a host-mapped word (``World.alarmed``).
``CallErrors.after_call`` reads it after a call was launched (never before: a rank that raised
instead of launching would leave its peers waiting for it) and synchronises only when it is set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megakernel.validate import RoutingError
from symm_mem.buffer import World
from symm_mem.errors import DeviceCallError, record_error

RESET_HINT = (
    "every call is skipped on the device (output NaN) until reset() (collective: every rank "
    "calls it) brings the ranks back in step"
)


class CallErrors:
    """The error state of one workspace's calls on this process's ranks."""

    def __init__(
        self,
        world: World,
        routing_records: torch.Tensor,
        num_experts: int,
        flag_name: Callable[[int], str],
    ) -> None:
        self.world = world
        self.routing_records = routing_records  # [local ranks, ROUTING_ERR_WORDS] int64
        self.num_experts = num_experts
        self.flag_name = flag_name
        self.failure: DeviceCallError | None = None  # set until reset()

    def after_call(self, call: int) -> None:
        """Raise, once call ``call`` was launched, what the device has reported so far: with no
        synchronisation unless an alarm is up (or a failure is known: then the call was skipped)."""
        if self.failure is not None:
            raise DeviceCallError(
                f"call {call} was skipped: call {self.failure.call} failed ({self.failure}); "
                + RESET_HINT
            ) from self.failure
        if self.world.alarmed():
            self.check()

    def check(self) -> None:
        """Wait for the device, then raise the first failure of this process's ranks: a device
        failure (``DeviceCallError``, naming the calls skipped since), else a bad routing id
        (``RoutingError``, raised once)."""
        self.world.synchronize()
        self.world.quiet_alarms()
        ranks = self.world.local_ranks
        for rank, rec in zip(ranks, self.world.error_records(), strict=True):
            error = record_error(rank, rec, self.world.timeout_s, self.flag_name)
            if error is not None:
                error.args = (f"{error.args[0]}; {RESET_HINT}",)
                self.failure = self.failure or error
                raise error
        found = self.routing_records.tolist()
        for rank, (call, token, k, expert, poisoned, last) in zip(ranks, found, strict=True):
            if call:
                self.routing_records.zero_()
                later = range(last - poisoned + 1, last + 1)
                raise RoutingError(rank, call, token, k, expert, self.num_experts, later)

    def reset(self) -> None:
        """Forget every record (after the world's device work is done)."""
        self.world.clear_errors()
        self.routing_records.zero_()
        self.failure = None
