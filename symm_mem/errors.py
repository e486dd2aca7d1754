"""Device error records -> host exceptions.

A kernel whose bounded wait runs out writes one record (``symm_mem.device`` defines the layout)
and leaves. After the launch the host reads the records of every rank it owns and raises
``WaitTimeoutError`` naming the rank, the flag, the value it waited for (an epoch, or for a
counter the count) and what it saw. Kernels that find a record already there skip their call and
count it in the record: the exception lists those calls too (``skipped``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from symm_mem import device as dev

FlagNamer = Callable[[int], str]


class DeviceCallError(RuntimeError):
    """A call that failed on the device. ``call``: its epoch (0 where unknown); ``skipped``: the
    epochs of the later calls the device skipped because of it (their outputs are NaN)."""

    call: int = 0
    skipped: range = range(0)

    def annotate(self, call: int, skipped: int, last: int) -> None:
        """Name the failed call and the ``skipped`` later calls, the last one ``last``."""
        message = self.args[0]
        if call and not message.startswith("call "):
            self.call, message = call, f"call {call}: {message}"
        if skipped:
            self.skipped = range(last - skipped + 1, last + 1)
            first = self.skipped[0]
            calls = f"call {first} was" if skipped == 1 else f"calls {first}-{last} were"
            message += f"; {calls} skipped because of it (outputs NaN)"
        self.args = (message,)


class WaitTimeoutError(DeviceCallError):
    """A device-side wait passed its deadline: a peer never raised the flag it waited on."""

    def __init__(
        self,
        rank: int,
        flag: int,
        epoch: int,
        seen: int,
        task: int,
        flag_name: str,
        timeout_s: float,
    ) -> None:
        self.rank, self.flag, self.epoch, self.seen, self.task = rank, flag, epoch, seen, task
        super().__init__(
            f"rank {rank} timed out after {timeout_s:g} s waiting for {flag_name} to reach {epoch} "
            f"(task {task}); it held {seen}: a peer did not arrive, or arrived for an older call"
        )


class CapacityError(DeviceCallError):
    """A call would receive more rows on some rank than its receive buffer holds."""

    def __init__(self, rank: int, dst_rank: int, rows: int, capacity: int, epoch: int) -> None:
        self.rank, self.dst_rank, self.rows, self.capacity = rank, dst_rank, rows, capacity
        self.call = epoch
        super().__init__(
            f"call {epoch}: rank {dst_rank} would receive {rows} rows from all ranks (found by "
            f"rank {rank}), but its receive buffer holds {capacity}; nothing was dispatched. "
            "Pass a larger capacity= (rows per rank) to FusedEPMoE or Megakernel, or route more "
            "evenly"
        )


def raise_if_error(
    records: torch.Tensor, ranks: list[int], timeout_s: float, flag_name: FlagNamer | None = None
) -> None:
    """Raise for the first record (of ``records [len(ranks), ERR_WORDS]``) that holds an error.

    The records are cleared first, so the world stays usable after the caller handles the error.
    """
    host = records.tolist()  # a copy: on cpu, .cpu() would alias the records zeroed below
    records.zero_()
    for rank, rec in zip(ranks, host, strict=True):
        error = record_error(rank, rec, timeout_s, flag_name)
        if error is not None:
            raise error


def record_error(
    rank: int, rec: list[int], timeout_s: float, flag_name: FlagNamer | None = None
) -> DeviceCallError | None:
    """The exception one rank's record ``rec`` (a list of ``ERR_WORDS`` ints) holds, or None."""
    if rec[dev.ERR_CODE.value] == 0:
        return None
    error = _record_error(rank, rec, timeout_s, flag_name)
    error.annotate(rec[dev.ERR_CALL.value], rec[dev.ERR_SKIPPED.value], rec[dev.ERR_LAST.value])
    return error


def _record_error(rank, rec, timeout_s, flag_name) -> DeviceCallError:
    code = rec[dev.ERR_CODE.value]
    if code == dev.ERR_OVERFLOW.value:
        return CapacityError(
            rank=rec[dev.ERR_RANK.value],
            dst_rank=rec[dev.ERR_FLAG.value],
            rows=rec[dev.ERR_SEEN.value],
            capacity=rec[dev.ERR_TASK.value],
            epoch=rec[dev.ERR_EPOCH.value],
        )
    if code != dev.ERR_TIMEOUT.value:
        return DeviceCallError(f"rank {rank}: unknown device error record {rec}")
    flag = rec[dev.ERR_FLAG.value]
    return WaitTimeoutError(
        rank=rec[dev.ERR_RANK.value],
        flag=flag,
        epoch=rec[dev.ERR_EPOCH.value],
        seen=rec[dev.ERR_SEEN.value],
        task=rec[dev.ERR_TASK.value],
        flag_name=flag_name(flag) if flag_name else f"flag {flag}",
        timeout_s=timeout_s,
    )
