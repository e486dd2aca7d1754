"""megakernel: a fused expert-parallel MoE layer for one NVLink node (Triton on NVSHMEM).

Shape legend: T tokens per rank, H hidden, I expert FFN width, E experts, L = E / R experts per
rank, K top-k, R ranks, S receive slots on a rank. The layer is being built on top of the
``symm_mem`` foundation; see ../README.md for what exists today.
"""

from megakernel.kernel import DispatchGemm, DispatchHandle, KernelConfig, dispatch_gemm

__all__ = ["DispatchGemm", "DispatchHandle", "KernelConfig", "dispatch_gemm"]
__version__ = "0.1.0"
