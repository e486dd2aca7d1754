"""EmulatedWorld: R ranks in one process on one device (DESIGN §3).

Each symmetric allocation is R ordinary tensors, one per rank; ``peer_base`` holds their
addresses, so a kernel written for the NVSHMEM world runs unchanged with ``rank`` as an argument.

- ``device="cuda"``: the R ranks' kernels run concurrently, one stream per rank, each with a slice
  of the SMs (``sms_per_rank``), so flags set by one rank release waits in another.
  NOTE: launch phase by phase across ranks where a kernel spins on peers: with 8 ranks on one
  GPU, grids launched while five ranks' kernels spun were never scheduled (perf/NOTES.md).
- ``device="cpu"`` with ``TRITON_INTERPRET=1``: the interpreter runs programs one after another,
  so a wait on work not yet run would only time out. Kernels take a task range and callers run
  every rank's first phase, then every rank's second (``run_ranks`` per phase).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from symm_mem.buffer import DEFAULT_TIMEOUT_S, World


class EmulatedWorld(World):
    """R emulated ranks on one device. ``rank`` is 0; per-rank code uses ``t.views[r]``."""

    def __init__(
        self,
        world_size: int,
        device: str | torch.device = "cpu",
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ValueError(f"EmulatedWorld needs world_size >= 1, got {world_size!r}")
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"EmulatedWorld runs on 'cpu' or 'cuda', got {device!r}")
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("EmulatedWorld(device='cuda') needs a GPU; none is visible")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        self.rank = 0
        self.world_size = world_size
        super().__init__(range(world_size), timeout_s)
        self.streams: list[torch.cuda.Stream] = []
        self.sms_per_rank = 3  # cpu: an odd program count, so task striding is exercised
        if self.device.type == "cuda":
            self.streams = [torch.cuda.Stream(self.device) for _ in range(world_size)]
            num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            self.sms_per_rank = max(1, num_sms // world_size)

    @property
    def concurrent(self) -> bool:
        return self.device.type == "cuda"

    def run_ranks(self, launch: Callable[[int], object]) -> None:
        """Call ``launch(rank)`` for every rank: concurrently on the rank streams (cuda), in rank
        order (cpu). The current stream waits for all of them before it goes on.
        """
        self._check_open()
        if not self.streams:
            for r in range(self.world_size):
                launch(r)
            return
        current = torch.cuda.current_stream(self.device)
        for r, stream in enumerate(self.streams):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                launch(r)
        for stream in self.streams:
            current.wait_stream(stream)

    def barrier(self) -> None:
        self.synchronize()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _alloc_views(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
        return [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(self.world_size)]

    def _free_views(self, views: tuple[torch.Tensor, ...]) -> None:
        pass  # the caching allocator takes the memory back once the views are dropped

    def _finalize(self) -> None:
        self.streams = []

    def __repr__(self) -> str:
        return f"EmulatedWorld(world_size={self.world_size}, device={str(self.device)!r})"
