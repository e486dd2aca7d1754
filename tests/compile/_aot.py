"""Compile a @triton.jit kernel for sm_90 with no GPU present (Triton ships ptxas)."""

import os
import re
import subprocess
import tempfile

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.tools.tensor_descriptor import TensorDescriptor

HOPPER = GPUTarget("cuda", 90, 32)
# NVSHMEM kernels link libnvshmem_device.bc (from the nvidia-nvshmem-cu13 wheel); set this to
# compile them too.
NVSHMEM_BITCODE = os.environ.get("NVSHMEM_DEVICE_BC")


_TORCH_TYPES = {
    "torch.int32": "i32",
    "torch.int64": "i64",
    "torch.float32": "fp32",
    "torch.float16": "fp16",
    "torch.bfloat16": "bf16",
    "torch.uint8": "u8",
}


def signature_of(args: dict[str, object]) -> dict[str, str]:
    """Triton types of example arguments: tensors -> pointers, tensor descriptors ->
    ``tensordesc<dtype[block]>``, ints -> i32 / i64."""
    sig = {}
    for name, value in args.items():
        if isinstance(value, TensorDescriptor):
            block = ",".join(str(n) for n in value.block_shape)
            sig[name] = f"tensordesc<{_TORCH_TYPES[str(value.base.dtype)]}[{block}]>"
        elif hasattr(value, "dtype") and hasattr(value, "data_ptr"):
            sig[name] = "*" + _TORCH_TYPES[str(value.dtype)]
        elif isinstance(value, bool):
            raise TypeError(f"{name}: pass bools as constexprs")
        elif isinstance(value, int):
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            raise TypeError(f"{name}: no Triton type for {type(value).__name__}")
    return sig


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


def sass_ops(kernel) -> list[str]:
    """The compiled kernel's SASS, one instruction per item (predicate and operands kept,
    addresses and encodings dropped), from the ``cuobjdump`` Triton ships beside ptxas."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip(f"no {tool}: this Triton build ships no cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True)
    found = (
        re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line) for line in text.stdout.splitlines()
    )
    return [m.group(1) for m in found if m]


def wgmma_groups(ops: list[str]) -> list[tuple[str, list[str]]]:
    """Each warpgroup MMA group (the HGMMAs up to the one that commits, ``gsb0``) as (its shape,
    the instructions from its first HGMMA to its last)."""
    groups, first = [], None
    for i, op in enumerate(ops):
        if "HGMMA" in op:
            first = i if first is None else first
            if "gsb0" in op:
                shape = re.search(r"HGMMA\.(\d+x\d+)", ops[first]).group(1)
                groups.append((shape, ops[first : i + 1]))
                first = None
    return groups
