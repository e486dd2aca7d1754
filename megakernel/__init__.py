"""megakernel: a fused expert-parallel MoE layer for one NVLink node (Triton on NVSHMEM).

Shape legend: T tokens per rank, H hidden, I expert FFN width, E experts, L = E / R experts per
rank, K top-k, R ranks, S receive slots on a rank. ``FusedEPMoE`` is the layer; ``Megakernel``
its workspace and kernel, which also runs dispatch + GEMM1 alone (``dispatch_gemm``).

The package, by concern: ``config`` (KernelConfig, KernelMeta), ``tasks`` (the task graph),
``plan`` (the per-call plan kernels), ``ops`` (each stage's device code), ``kernel`` (the
persistent scheduler), ``workspace`` (Megakernel: buffers and launches), ``layer`` (FusedEPMoE),
``reference`` (pure-torch oracles), ``testing`` (inputs and checks), ``profiler`` (traces).
"""

from megakernel.config import KernelConfig
from megakernel.handles import DispatchHandle
from megakernel.layer import FusedEPMoE, TopKRouter
from megakernel.workspace import Megakernel, dispatch_gemm

__all__ = [
    "DispatchHandle",
    "FusedEPMoE",
    "KernelConfig",
    "Megakernel",
    "TopKRouter",
    "dispatch_gemm",
]
__version__ = "0.1.0"
