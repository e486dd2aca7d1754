"""megakernel: a fused expert-parallel MoE layer for one NVLink node (Triton on NVSHMEM).

Shape legend: T tokens per rank, H hidden, I expert FFN width, E experts, L = E / R experts per
rank, K top-k, R ranks, S receive slots on a rank. ``FusedEPMoE`` is the layer; ``Megakernel``
its workspace and kernel, which also runs dispatch + GEMM1 alone (``dispatch_gemm``).
"""

from megakernel.kernel import DispatchHandle, KernelConfig, Megakernel, dispatch_gemm
from megakernel.layer import FusedEPMoE, TopKRouter

__all__ = [
    "DispatchHandle",
    "FusedEPMoE",
    "KernelConfig",
    "Megakernel",
    "TopKRouter",
    "dispatch_gemm",
]
__version__ = "0.1.0"
