"""Compile a @triton.jit kernel for sm_90 with no GPU present (Triton ships ptxas)."""

import os
import re
import subprocess
import tempfile

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
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
    "torch.float8_e4m3fn": "fp8e4nv",
}


def type_of(name: str, value: object):
    """The Triton type of one example argument: tensors -> pointers, tensor descriptors ->
    ``tensordesc<dtype[block]>`` (Gluon's: ``tensordesc<dtype[block],layout>``), ints -> i32 /
    i64, a (named) tuple -> a tuple of its items'."""
    if isinstance(value, GluonDescriptor):
        block = ",".join(str(n) for n in value.block_shape)
        return f"tensordesc<{_TORCH_TYPES[str(value.base.dtype)]}[{block}],{value.layout!r}>"
    if isinstance(value, TensorDescriptor):
        block = ",".join(str(n) for n in value.block_shape)
        return f"tensordesc<{_TORCH_TYPES[str(value.base.dtype)]}[{block}]>"
    if hasattr(value, "dtype") and hasattr(value, "data_ptr"):
        return "*" + _TORCH_TYPES[str(value.dtype)]
    if isinstance(value, tuple):
        return type(value)(*(type_of(f"{name}[{i}]", v) for i, v in enumerate(value)))
    if isinstance(value, bool):
        raise TypeError(f"{name}: pass bools as constexprs")
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    raise TypeError(f"{name}: no Triton type for {type(value).__name__}")


def signature_of(args: dict[str, object]) -> dict[str, object]:
    """Triton types of example arguments, by name (``type_of``)."""
    return {name: type_of(name, value) for name, value in args.items()}


def _pointer_paths(index: tuple[int, ...], ty) -> list[tuple[int, ...]]:
    """The argument paths of every pointer in a signature entry (tuples flattened)."""
    if isinstance(ty, tuple):
        return [p for i, t in enumerate(ty) for p in _pointer_paths((*index, i), t)]
    return [index] if ty.startswith("*") else []


def compile_sm90(
    fn, signature: dict[str, str], constexprs: dict[str, object], divisible=(), **options
):
    """``signature`` maps runtime args to Triton types ("*i32", "i64", or a tuple of them for a
    tuple argument), ``constexprs`` the rest.

    Pointers are taken as 16-byte aligned (as torch allocations are) and the ints named in
    ``divisible`` as multiples of 16, as Triton specialises them at launch.
    """
    names = fn.arg_names
    missing = set(names) - set(signature) - set(constexprs)
    assert not missing, f"no type for {sorted(missing)}"
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    aligned = [p for k, t in signature.items() for p in _pointer_paths((names.index(k),), t)]
    aligned += [(names.index(k),) for k in divisible]
    source = GluonASTSource if fn.is_gluon() else ASTSource
    src = source(
        fn,
        sig,
        {(names.index(k),): v for k, v in constexprs.items()},
        {path: [["tt.divisibility", 16]] for path in aligned},
    )
    if getattr(fn, "_symm_mem_nvshmem", False):
        options["extern_libs"] = (("libnvshmem_device", NVSHMEM_BITCODE),)
    return triton.compile(src, target=HOPPER, options=options)


def sass_ops(kernel) -> list[str]:
    """The compiled kernel's SASS, one instruction per item (predicate and operands kept,
    addresses and encodings dropped; instruction i is at byte 16 i), from the ``cuobjdump``
    Triton ships beside ptxas."""
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
    """Each warpgroup MMA group (the MMAs up to the one that commits, ``gsb0``; HGMMA for 16-bit
    operands, QGMMA for 8-bit) as (its shape, the instructions from its first MMA to its
    last)."""
    groups, first = [], None
    for i, op in enumerate(ops):
        if GMMA.search(op):
            first = i if first is None else first
            if "gsb0" in op:
                shape = GMMA.search(ops[first]).group(1)
                groups.append((shape, ops[first : i + 1]))
                first = None
    return groups


GMMA = re.compile(r"\b[HQ]GMMA\.(\d+x\d+)")
# an instruction's optional guard predicate (``@P0``, ``@!UP1``), before its opcode
PREDICATE = r"(@!?U?P\w+ +)?"
SPILL = re.compile(PREDICATE + r"(STL|LDL)\b")


def mma_loops(ops: list[str]) -> list[list[str]]:
    """The innermost loops that make warpgroup MMAs (the GEMMs' k loops), each as its
    instructions: a loop is a backward branch (``BRA 0x<target>``, sm_90 instructions being 16
    bytes) and the instructions from its target to it; innermost, no other loop lies within it.
    """
    loops = []
    for end, op in enumerate(ops):
        branch = re.search(r"\bBRA\S* +(?:`\()?0x([0-9a-f]+)", op)
        if branch and int(branch.group(1), 16) // 16 < end:
            loops.append((int(branch.group(1), 16) // 16, end))
    return [
        ops[a : b + 1]
        for a, b in loops
        if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)
        and any("GMMA" in o for o in ops[a : b + 1])
    ]


def mma_loop_spills(ops: list[str]) -> list[str]:
    """The spill instructions (``STL`` / ``LDL``) inside the MMA k loops (``mma_loops``). (The
    persistent task loop around them may spill its long-lived scalars.)"""
    return [o for body in mma_loops(ops) for o in body if SPILL.match(o)]
