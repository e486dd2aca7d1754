"""SymmetricTensor and the World base class shared by the NVSHMEM and emulated worlds.

A symmetric tensor exists once per rank, with the same shape and dtype everywhere. Kernels reach
rank r's copy through ``peer_base[r]`` (an int64 device table of base addresses), so one kernel
source runs in every world (DESIGN §3).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from symm_mem import device as dev
from symm_mem.errors import FlagNamer, raise_if_error

DEFAULT_TIMEOUT_S = 10.0  # long enough for a cold first call, short enough to see a hang as one


class SymmetricTensor:
    """One symmetric allocation.

    ``views[r]`` is rank r's copy as a torch tensor (in the NVSHMEM world a view mapped over
    NVLink; in the emulated world rank r's own buffer), ``local`` is ``views[world.rank]`` and
    ``peer_base`` the int64 device table ``[R]`` of every copy's base address.
    """

    def __init__(
        self,
        world: World,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        views: Sequence[torch.Tensor],
    ) -> None:
        self.world = world
        self.shape = shape
        self.dtype = dtype
        self._views: tuple[torch.Tensor, ...] | None = tuple(views)
        self.peer_base = torch.tensor(
            [v.data_ptr() for v in views], dtype=torch.int64, device=world.device
        )

    @property
    def freed(self) -> bool:
        return self._views is None

    @property
    def views(self) -> tuple[torch.Tensor, ...]:
        if self._views is None:
            raise RuntimeError(f"symmetric tensor {list(self.shape)} {self.dtype} was freed")
        self.world._check_open()
        return self._views

    @property
    def local(self) -> torch.Tensor:
        return self.views[self.world.rank]

    def peer(self, rank: int) -> torch.Tensor:
        """Rank ``rank``'s copy (addressable from this process)."""
        return self.views[rank]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __repr__(self) -> str:
        state = "freed" if self.freed else f"{self.nbytes} B per rank"
        return f"SymmetricTensor({list(self.shape)}, {self.dtype}, {state})"


def _check_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not dims:
        raise ValueError("alloc needs at least one dimension, got shape ()")
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool):
            raise ValueError(f"alloc shape {dims} has a non-integer dimension {d!r}")
        if d <= 0:
            raise ValueError(f"alloc shape {dims} has dimension {d}; every dimension must be >= 1")
    return dims


class World(ABC):
    """R ranks sharing symmetric buffers. Subclasses supply allocation, barrier and teardown.

    Owns one error record per rank that it runs (``error_record(rank)``); kernels write into it
    when a bounded wait times out, and ``check_errors()`` raises on the host. Beside each record,
    an alarm word in host-mapped memory (``alarm_word(rank)``): a kernel that leaves an error
    behind sets it, and ``alarmed()`` reads it with no synchronisation.
    """

    rank: int
    world_size: int
    device: torch.device
    sms_per_rank: int  # programs a persistent kernel of one rank should launch

    def __init__(self, local_ranks: Sequence[int], timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self._local_ranks = list(local_ranks)
        self._allocs: list[SymmetricTensor] = []
        self._closed = False
        self._errors = torch.zeros(
            len(self._local_ranks), dev.ERR_WORDS.value, dtype=torch.int64, device=self.device
        )
        # pinned memory is mapped into the device's address space (UVA): kernels store into it
        pinned = self.device.type == "cuda"
        # two words a rank, of which the first is the alarm: each rank's stays 16-byte aligned
        self._alarm = torch.zeros(len(self._local_ranks), 2, dtype=torch.int64, pin_memory=pinned)
        self._alarm_host = self._alarm.numpy()  # read without going through torch

    # -- allocation -------------------------------------------------------------------------

    def alloc(
        self, shape: int | Sequence[int], dtype: torch.dtype = torch.float32
    ) -> SymmetricTensor:
        """Allocate a zero-filled symmetric tensor (collective: every rank calls it, in order)."""
        self._check_open()
        dims = _check_shape(shape)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"alloc dtype must be a torch.dtype, got {dtype!r}")
        views = self._alloc_views(dims, dtype)
        for v in views:
            v.zero_()
        t = SymmetricTensor(self, dims, dtype, views)
        self._allocs.append(t)
        self.barrier()
        return t

    def free(self, t: SymmetricTensor) -> None:
        """Free one symmetric tensor (collective, same order on every rank)."""
        self._check_open()
        if t.world is not self:
            raise ValueError(f"{t!r} belongs to another world")
        if t.freed:
            raise RuntimeError(f"{t!r} was already freed: free each symmetric tensor once")
        self.barrier()  # no rank may still be writing into a peer's copy
        views = t._views
        t._views = None
        self._allocs.remove(t)
        self._free_views(views)

    @property
    def local_ranks(self) -> list[int]:
        """The ranks this process runs: ``[rank]`` under NVSHMEM, all of them when emulated."""
        return list(self._local_ranks)

    @property
    def allocations(self) -> list[SymmetricTensor]:
        """Live symmetric tensors, in allocation order."""
        return list(self._allocs)

    # -- running ranks ----------------------------------------------------------------------

    @property
    def concurrent(self) -> bool:
        """True when every rank's kernels run at the same time (False: the CPU interpreter, where
        callers run one phase of every rank after another)."""
        return True

    def run_ranks(self, launch: Callable[[int], object]) -> None:
        """Call ``launch(rank)`` for every rank this process runs."""
        self._check_open()
        for r in self._local_ranks:
            launch(r)

    def all_max(self, value: int) -> int:
        """The largest of every process's ``value`` (collective). One process runs every rank
        here, so the caller's value is the answer; worlds of several processes reduce."""
        return value

    # -- errors -----------------------------------------------------------------------------

    def error_record(self, rank: int | None = None) -> torch.Tensor:
        """The int64 error record ``[ERR_WORDS]`` that rank ``rank``'s kernels report into."""
        rank = self.rank if rank is None else rank
        return self._errors[self._local_ranks.index(rank)]

    def alarm_word(self, rank: int | None = None) -> torch.Tensor:
        """Rank ``rank``'s int64 alarm word ``[1]``, host-mapped (``device.raise_alarm``)."""
        rank = self.rank if rank is None else rank
        return self._alarm[self._local_ranks.index(rank), :1]

    def alarmed(self) -> bool:
        """Whether a kernel of this process has raised an alarm since ``clear_errors`` (a host
        memory read: no synchronisation; a kernel still running may raise it later)."""
        return bool(self._alarm_host.any())

    def quiet_alarms(self) -> None:
        """Lower the alarms, leaving the records (after this process's device work is done)."""
        self._alarm.zero_()

    def error_records(self) -> list[list[int]]:
        """Every local rank's error record, as read now (after the device work is done)."""
        return self._errors.tolist()

    def clear_errors(self) -> None:
        """Clear every error record and alarm of this process (after its device work is done)."""
        self._errors.zero_()
        self._alarm.zero_()

    def timeout_ns(self) -> int:
        return int(self.timeout_s * 1e9)

    def check_errors(self, flag_name: FlagNamer | None = None) -> None:
        """Wait for this world's kernels, then raise ``WaitTimeoutError`` if any wait timed out."""
        self.synchronize()
        self._alarm.zero_()
        raise_if_error(self._errors, self._local_ranks, self.timeout_s, flag_name)

    # -- lifetime ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Free every symmetric tensor in allocation order, then tear the world down."""
        if self._closed:
            return
        self.synchronize()
        for t in list(self._allocs):
            self.free(t)
        self._finalize()
        self._closed = True

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} was closed; create a new world to go on")

    # -- per-world ----------------------------------------------------------------------------

    @abstractmethod
    def barrier(self) -> None:
        """All ranks' queued device work is done and every rank reached this point."""

    @abstractmethod
    def synchronize(self) -> None:
        """This process's device work is done."""

    @abstractmethod
    def _alloc_views(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
        """One tensor per rank (rank order), each addressable from this process."""

    @abstractmethod
    def _free_views(self, views: tuple[torch.Tensor, ...]) -> None: ...

    @abstractmethod
    def _finalize(self) -> None: ...
