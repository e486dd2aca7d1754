"""The NVSHMEM world: one process per GPU under torchrun, symmetric heap from NVSHMEM.

``init_world()`` checks the torchrun environment, sets NVSHMEM's environment (NVLink multicast
off, symmetric heap size) before the library loads, checks versions, bootstraps NVSHMEM from a
unique id broadcast over torch.distributed and installs the post-compile hook that initialises
the NVSHMEM device state of every module whose kernels call NVSHMEM (``uses_nvshmem``).

Kernels that only store through ``peer_base`` need none of the hook: it matters only for the
NVSHMEM device calls in ``symm_mem.device`` (``putmem_signal_nbi_block`` and friends), which fault
silently in a module that was not initialised. ``launch`` refuses to start such a kernel.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

from symm_mem.buffer import DEFAULT_TIMEOUT_S, World

# NVLink multicast (NVLS) stays off: on shared hosts it can take the GPUs out of service.
MULTICAST_OFF_ENV = {
    "NVSHMEM_DISABLE_NVLS": "1",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
}
DEFAULT_SYMMETRIC_SIZE = "1G"
MIN_NVSHMEM4PY = (0, 4)
MIN_LIBNVSHMEM = (3, 4)
NVSHMEM4PY_PIN = "nvshmem4py-cu13==0.4.1"


def nvshmem_env(symmetric_size: int | str | None = None) -> dict[str, str]:
    """The environment NVSHMEM must see before it loads (also used by the launcher)."""
    env = dict(MULTICAST_OFF_ENV)
    if symmetric_size is not None:
        env["NVSHMEM_SYMMETRIC_SIZE"] = str(symmetric_size)
    else:
        env["NVSHMEM_SYMMETRIC_SIZE"] = os.environ.get(
            "NVSHMEM_SYMMETRIC_SIZE", DEFAULT_SYMMETRIC_SIZE
        )
    return env


def version_tuple(text: str) -> tuple[int, ...]:
    """Leading numeric components: "3.4.5" -> (3, 4, 5), "0.4.1rc2" -> (0, 4, 1)."""
    return tuple(int(m) for m in re.findall(r"(?:^|\.)(\d+)", text.split("+")[0]))


def _torchrun_env(world_size: int | None) -> tuple[int, int, int]:
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"init_world() runs inside torchrun, but {', '.join(missing)} is not set; start the "
            "script with `python -m symm_mem.launch script.py`"
        )
    rank, size, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if world_size is not None and world_size != size:
        raise ValueError(
            f"init_world(world_size={world_size}) but torchrun started {size} ranks "
            f"(WORLD_SIZE={size})"
        )
    if dist.is_initialized() and dist.get_world_size() != size:
        raise ValueError(
            f"torch.distributed has {dist.get_world_size()} ranks but WORLD_SIZE is {size}"
        )
    return rank, size, local


def import_nvshmem() -> Any:
    """The nvshmem4py modules the NVSHMEM world uses, or a RuntimeError that says how to install
    it."""
    try:
        import nvshmem
        import nvshmem.bindings
        import nvshmem.core
        import nvshmem.core.interop.torch
    except ImportError as e:
        raise RuntimeError(
            f"the NVSHMEM world needs nvshmem4py ({e}); install it with "
            f"`pip install --no-deps {NVSHMEM4PY_PIN}` (keeps the libnvshmem that torch pins) "
            "or use symm_mem.EmulatedWorld"
        ) from e
    return nvshmem


def check_versions(nvshmem: Any) -> str:
    """The libnvshmem version, after checking that nvshmem4py and libnvshmem are new enough and
    that nvshmem4py loaded the libnvshmem torch pins."""
    v = nvshmem.core.get_version()
    py, lib = version_tuple(v.nvshmem4py_version), version_tuple(v.libnvshmem_version)
    if py[:2] < MIN_NVSHMEM4PY:
        raise RuntimeError(f"nvshmem4py {v.nvshmem4py_version} is too old; need {NVSHMEM4PY_PIN}")
    if lib[:2] < MIN_LIBNVSHMEM:
        raise RuntimeError(
            f"libnvshmem {v.libnvshmem_version} is too old; need >= "
            f"{'.'.join(map(str, MIN_LIBNVSHMEM))}"
        )
    try:
        pinned = importlib.metadata.version("nvidia-nvshmem-cu13")
    except importlib.metadata.PackageNotFoundError:
        pinned = None
    if pinned is not None and version_tuple(pinned)[:2] != lib[:2]:
        raise RuntimeError(
            f"nvshmem4py loaded libnvshmem {v.libnvshmem_version} but the installed "
            f"nvidia-nvshmem-cu13 is {pinned}: reinstall nvshmem4py with --no-deps so both use "
            "the one torch pins"
        )
    return v.libnvshmem_version


# ----------------------------------------------------------------------------- module init

_INITIALISED_MODULES: set[int] = set()
_PREVIOUS_HOOK: Any = None
_HOOK_INSTALLED = False
device_bitcode: str | None = None  # libnvshmem_device.bc, found by init_world


def uses_nvshmem(fn: Any) -> Any:
    """Mark a ``@triton.jit`` kernel as calling NVSHMEM device functions (launch it with
    ``symm_mem.runtime.launch``)."""
    fn._symm_mem_nvshmem = True
    return fn


def _post_compile_hook(**kwargs: Any) -> Any:
    jit_fn = kwargs["fn"].jit_function
    if getattr(jit_fn, "_symm_mem_nvshmem", False):
        import nvshmem.bindings

        device = kwargs["compile"]["device"]
        kernel = jit_fn.device_caches[device][0][kwargs["key"]]
        if hasattr(kernel, "result"):
            kernel = kernel.result()
        kernel._init_handles()
        status = nvshmem.bindings.cumodule_init(int(kernel.module))
        if status not in (None, 0):
            raise RuntimeError(f"nvshmemx_cumodule_init failed for {jit_fn.__name__}: {status}")
        _INITIALISED_MODULES.add(int(kernel.module))
    if _PREVIOUS_HOOK is not None:
        return _PREVIOUS_HOOK(**kwargs)
    return None


def _install_hook() -> None:
    global _PREVIOUS_HOOK, _HOOK_INSTALLED
    import triton

    if _HOOK_INSTALLED:
        return
    _PREVIOUS_HOOK = triton.knobs.runtime.jit_post_compile_hook
    triton.knobs.runtime.jit_post_compile_hook = _post_compile_hook
    _HOOK_INSTALLED = True


def extern_libs() -> dict[str, str]:
    """The ``extern_libs`` that a kernel calling NVSHMEM device functions compiles with."""
    if device_bitcode is None:
        raise RuntimeError("NVSHMEM device calls need init_world() first (no device library yet)")
    return {"libnvshmem_device": device_bitcode}


def launch(fn: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> Any:
    """Launch a Triton kernel; for a ``uses_nvshmem`` kernel, compile with the NVSHMEM device
    library and refuse to run a module whose NVSHMEM state was not initialised.

    NOTE: compiling also loads the module, and a module load waits behind running kernels (a
    deadlock if those spin on this one). Launch every kernel once, or ``warmup`` it, before any
    kernel that spins.
    """
    if not getattr(fn, "_symm_mem_nvshmem", False):
        return fn[grid](*args, **kwargs)
    kwargs = {**kwargs, "extern_libs": extern_libs()}
    kernel = fn.warmup(*args, grid=grid, **kwargs)
    if hasattr(kernel, "result"):
        kernel = kernel.result()
    kernel._init_handles()
    if int(kernel.module) not in _INITIALISED_MODULES:
        raise RuntimeError(
            f"kernel {fn.__name__} calls NVSHMEM device functions but its module was not "
            "initialised (nvshmemx_cumodule_init never ran for it): it was compiled before "
            "init_world() installed the post-compile hook, or another library replaced "
            "triton.knobs.runtime.jit_post_compile_hook"
        )
    return fn[grid](*args, **kwargs)


# ----------------------------------------------------------------------------- the world


class NvshmemWorld(World):
    """This process's rank of an NVSHMEM job. Create it with ``init_world()``."""

    def __init__(
        self, rank: int, world_size: int, local_rank: int, owns_pg: bool, timeout_s: float
    ):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = torch.device("cuda", local_rank)
        self.sms_per_rank = torch.cuda.get_device_properties(self.device).multi_processor_count
        super().__init__([rank], timeout_s)
        self._owns_pg = owns_pg
        import nvshmem.core.interop.torch as nvt

        self._nvt = nvt
        self.libnvshmem_version = ""
        self.init_seconds = 0.0

    def barrier(self) -> None:
        torch.cuda.synchronize(self.device)
        dist.barrier(device_ids=[self.local_rank])

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def all_max(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def _alloc_views(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
        local = self._nvt.tensor(shape, dtype=dtype)
        return [
            local if r == self.rank else self._nvt.get_peer_tensor(local, r)
            for r in range(self.world_size)
        ]

    def _free_views(self, views: tuple[torch.Tensor, ...]) -> None:
        self._nvt.free_tensor(views[self.rank])

    def _finalize(self) -> None:
        import nvshmem.core

        self.barrier()
        nvshmem.core.finalize()
        if self._owns_pg:
            dist.destroy_process_group()

    def __repr__(self) -> str:
        return f"NvshmemWorld(rank={self.rank}, world_size={self.world_size})"


def init_world(
    symmetric_size: int | str | None = None,
    *,
    world_size: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> NvshmemWorld:
    """Start NVSHMEM in this torchrun process and return its world.

    ``symmetric_size`` (bytes, or NVSHMEM's "1G" form) sets ``NVSHMEM_SYMMETRIC_SIZE``; by default
    the environment's value or 1 GiB. ``world_size``, if given, must match torchrun's.
    """
    global device_bitcode
    rank, size, local = _torchrun_env(world_size)
    for key, value in nvshmem_env(symmetric_size).items():
        if key in MULTICAST_OFF_ENV and os.environ.get(key, value) != value:
            warnings.warn(
                f"{key}={os.environ[key]} overridden to {value}: multicast stays off", stacklevel=2
            )
        os.environ[key] = value
    if not torch.cuda.is_available() or torch.cuda.device_count() <= local:
        raise RuntimeError(
            f"rank {rank} (local rank {local}) needs a GPU, but {torch.cuda.device_count()} are "
            "visible"
        )
    nvshmem = import_nvshmem()
    lib_version = check_versions(nvshmem)
    import numpy as np
    from cuda.core import Device

    torch.cuda.set_device(local)
    owns_pg = not dist.is_initialized()
    if owns_pg:
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    t0 = time.perf_counter()
    cu_device = Device(local)
    cu_device.set_current()
    uid = nvshmem.core.get_unique_id(empty=(rank != 0))
    payload = [uid._data.tobytes() if rank == 0 else None]
    dist.broadcast_object_list(payload, src=0)
    if rank != 0:
        uid._data.view(np.uint8)[:] = np.frombuffer(payload[0], dtype=np.uint8)
    nvshmem.core.init(device=cu_device, uid=uid, rank=rank, nranks=size, initializer_method="uid")
    if nvshmem.core.my_pe() != rank or nvshmem.core.n_pes() != size:
        raise RuntimeError(
            f"NVSHMEM gave pe {nvshmem.core.my_pe()} of {nvshmem.core.n_pes()}, "
            f"torchrun rank {rank} of {size}"
        )
    device_bitcode = nvshmem.core.find_device_bitcode_library()
    _install_hook()
    world = NvshmemWorld(rank, size, local, owns_pg, timeout_s)
    world.libnvshmem_version = lib_version
    world.init_seconds = time.perf_counter() - t0
    world.barrier()
    return world
