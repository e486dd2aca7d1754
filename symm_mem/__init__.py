"""symm_mem: symmetric memory for Triton kernels, on NVSHMEM or emulated in one process.

Shape legend: R ranks (world size).

    world = symm_mem.init_world()            # inside torchrun: NVSHMEM, one GPU per rank
    world = symm_mem.EmulatedWorld(4, "cuda")  # or 4 ranks in this process ("cpu": interpreter)
    t = world.alloc((R, 1024), torch.int32)  # t.local, t.peer_base [R] int64, t.views[r]
    ...
    world.check_errors()                     # raises WaitTimeoutError if a device wait timed out
    world.close()                            # frees everything in allocation order

Device helpers (flags, timers, NVSHMEM calls) are in ``symm_mem.device``; the launcher is
``python -m symm_mem.launch``.
"""

from symm_mem.buffer import DEFAULT_TIMEOUT_S, SymmetricTensor, World
from symm_mem.emulated import EmulatedWorld
from symm_mem.errors import CapacityError, DeviceCallError, WaitTimeoutError
from symm_mem.runtime import NvshmemWorld, init_world

__all__ = [
    "CapacityError",
    "DeviceCallError",
    "DEFAULT_TIMEOUT_S",
    "EmulatedWorld",
    "NvshmemWorld",
    "SymmetricTensor",
    "WaitTimeoutError",
    "World",
    "init_world",
]
