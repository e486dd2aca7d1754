"""Compile a @triton.jit kernel for sm_90 with no GPU present (Triton ships ptxas)."""

import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)
# NVSHMEM kernels link libnvshmem_device.bc (from the nvidia-nvshmem-cu13 wheel); set this to
# compile them too.
NVSHMEM_BITCODE = os.environ.get("NVSHMEM_DEVICE_BC")


def compile_sm90(
    fn, signature: dict[str, str], constexprs: dict[str, object], divisible=(), **options
):
    """``signature`` maps runtime args to Triton types ("*i32", "i64"), ``constexprs`` the rest.

    Pointers are taken as 16-byte aligned (as torch allocations are) and the ints named in
    ``divisible`` as multiples of 16, as Triton specialises them at launch.
    """
    names = fn.arg_names
    missing = set(names) - set(signature) - set(constexprs)
    assert not missing, f"no type for {sorted(missing)}"
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    aligned = [k for k, t in signature.items() if t.startswith("*")] + list(divisible)
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs={(names.index(k),): [["tt.divisibility", 16]] for k in aligned},
    )
    if getattr(fn, "_symm_mem_nvshmem", False):
        options["extern_libs"] = (("libnvshmem_device", NVSHMEM_BITCODE),)
    return triton.compile(src, target=HOPPER, options=options)
