"""Launching compiled kernels without binding their arguments again on every call.

Triton's ``kernel[grid](**args)`` binds every argument, computes its specialisation (type,
alignment, small ints) and looks the compiled kernel up on each launch: tens of microseconds of
host time for the megakernel's ~60 arguments, on every one of a call's four launches. A
``Launcher`` compiles a kernel once per key (``compile``, which also loads it: nothing may load
a module while a peer's kernel spins) and from then on calls the compiled kernel's launcher
directly, with the arguments in signature order.

NOTE: a direct launch skips the specialisation, so an argument must never change kind between
the compile and a launch: pointers stay 16-byte aligned (the workspace clones misaligned inputs
and refuses a misaligned ``out``), ints that change per call are in the kernel's
``do_not_specialize`` list, descriptors keep their block shape, and constexprs come from the key.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from triton import knobs
from triton.knobs import HookChain


class Launcher:
    """One ``@triton.jit`` kernel's compiled variants, by key, and their direct launches."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.names = fn.arg_names  # the signature order the compiled launcher takes
        self.compiled: dict[Hashable, object] = {}

    def compile(self, key: Hashable, args: dict[str, object], **options: object) -> None:
        """Compile and load the variant ``args`` select (once per ``key``; CUDA only)."""
        if key not in self.compiled:
            kernel = self.fn.warmup(**args, **options, grid=(1,))
            kernel._init_handles()
            self.compiled[key] = kernel

    def __call__(
        self, key: Hashable, grid: tuple[int], args: dict[str, object], **options: object
    ) -> None:
        """Launch ``grid`` programs of the variant compiled for ``key`` on the current stream
        (Triton's own launch path where none was compiled: the interpreter)."""
        kernel = self.compiled.get(key)
        if kernel is None:
            self.fn[grid](**args, **options)
            return
        stream = torch.cuda.current_stream().cuda_stream
        values = [args[name] for name in self.names]
        enter, leave, meta = _hooks()
        if enter is not None:  # what Triton gives its launch hooks (a profiler's, say)
            meta = kernel.launch_metadata(grid, stream, *values)
        kernel.run(
            grid[0], 1, 1, stream, kernel.function, kernel.packed_metadata, meta, enter, leave,
            *values,
        )  # fmt: skip


def _hooks() -> tuple:
    """Triton's launch hooks, (None, None, None) where none is installed (an empty chain)."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if isinstance(enter, HookChain) and not enter.calls:
        enter = None
    if isinstance(leave, HookChain) and not leave.calls:
        leave = None
    return enter, leave, None


def aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` contiguous and 16-byte aligned, as the compiled kernels assume (a copy if not)."""
    if t is None or (t.is_contiguous() and t.data_ptr() % 16 == 0):
        return t
    return t.clone(memory_format=torch.contiguous_format)
