"""The experts' TMA block descriptors the megakernel's GEMMs load their weights through.

Shape legend: H hidden, I expert FFN width, L local slots per rank; BN / BK and BN2 / BK2 the
GEMM1 and down-projection block sizes of ``KernelConfig``.

- GEMM1 (``KernelMeta.GEMM1_TMA``): ``w13 [L, 2I, H]`` as ``[L * 2I, H]`` in ``[BN, BK]`` boxes
  (a gate block, then an up block), or with ``PAIRS`` as ``[L, I, 2, H]`` in
  ``[1, BN, 2, BK]`` boxes (gate row j, then up row j); with ``TAIL_ROWS`` also the first kind
  for the tiles with a tail (``w13_tail_desc``), whose gate and up are two products.
- Down projection (``DOWN_TMA``): ``w2 [L, H, I]`` as ``[L * H, I]`` in ``[BN2, BK2]`` boxes
  (FP8: ``[128, 128]``, one weight scale block).

A descriptor not used by a launch's kernel is None (a constexpr to the kernel).
"""

from __future__ import annotations

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from megakernel.config import KernelConfig, KernelMeta
from megakernel.shapes import FP8_BLOCK, MoEShape

KEPT = 8  # weight pairs whose descriptors are kept (a layer passes the same weights every call)


class WeightDescriptors:
    """``(w13_desc, w13_tail_desc, w2_desc)`` of a launch, made once per (launch kind,
    weights)."""

    def __init__(self, shape: MoEShape, config: KernelConfig) -> None:
        self.shape, self.config = shape, config
        self._cache: dict[tuple, tuple] = {}

    def __call__(self, meta: KernelMeta, w13, w2) -> tuple:
        """The descriptors the launch's kernel reads, None for the others.

        NOTE: decided by the launch's meta, not by which weights the caller passed, so a call
        passes the argument types ``Megakernel.warmup`` compiled for its mode (a None descriptor
        and a tensor descriptor are different kernel variants)."""
        tma = (meta.GEMM1_TMA, meta.PAIRS, meta.TAIL_ROWS > 0, meta.DOWN_TMA)
        key = (*tma, _identity(w13), _identity(w2))
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= KEPT:
                self._cache.pop(next(iter(self._cache)))
            found = self._cache[key] = self._make(meta, w13, w2)
        return found

    def clear(self) -> None:
        self._cache.clear()

    def _make(self, meta: KernelMeta, w13, w2) -> tuple:
        cfg, H, I = self.config, self.shape.hidden, self.shape.ffn
        w13_desc = w13_tail_desc = w2_desc = None
        if meta.GEMM1_TMA:
            blocks = TensorDescriptor.from_tensor(w13.view(-1, H), [cfg.block_n, cfg.block_k])
            if meta.PAIRS:
                # w13 [L, 2I, H] as [L, I, 2, H]: a box holds gate row j, then up row j, ...
                L, box = w13.shape[0], [1, cfg.block_n, 2, cfg.block_k]
                w13_desc = TensorDescriptor(w13, [L, I, 2, H], [2 * I * H, H, I * H, 1], box)
            else:
                w13_desc = blocks
            if meta.TAIL_ROWS:
                w13_tail_desc = blocks
        if meta.DOWN_TMA:
            # (FP8: a down task of two scale blocks loads each as a product of its own)
            rows = min(cfg.down_block_n, FP8_BLOCK) if self.shape.fp8 else cfg.down_block_n
            block = [rows, cfg.down_block_k]
            w2_desc = TensorDescriptor.from_tensor(w2.view(-1, I), block)
        return w13_desc, w13_tail_desc, w2_desc


def _identity(t: torch.Tensor | None) -> tuple | None:
    """What a descriptor depends on: the tensor's address, shape and strides."""
    return None if t is None else (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
