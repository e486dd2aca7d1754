"""The megakernel compiles for sm_90 with no GPU (dsv3 / mixtral constants), in every mode."""

import os
import re
from dataclasses import replace

import pytest
import torch
from _aot import (
    PREDICATE,
    compile_sm90,
    mma_loop_spills,
    mma_loops,
    sass_ops,
    signature_of,
    wgmma_groups,
)
from triton.tools.tensor_descriptor import TensorDescriptor

from megakernel.config import KernelConfig, default_capacity, kernel_meta
from megakernel.kernel import (
    ExpertBiases,
    Fp8Scales,
    PlanBuffers,
    RankState,
    SymBuffers,
    moe_megakernel,
)
from megakernel.plan import PlanConfig
from megakernel.shapes import FP8_BLOCK, PRESETS

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles real kernels: run without TRITON_INTERPRET", allow_module_level=True)

INT64 = {
    "expert_ready", "round_free", "act_ready", "resolved", "err", "epoch", "trace", "routing_err",
    "alarm",
}  # fmt: skip
DATA = {"x_ptr", "out_ptr", "combine_y"}  # the shape's dtype
GEMM_DATA = {"w13_ptr", "w2_ptr", "act_ptr", "recv_x"}  # its gemm_dtype (e4m3 with FP8)
FLOAT32 = {"weights_ptr", "recv_scale", *Fp8Scales._fields, *ExpertBiases._fields}
SCALARS = {
    "rank": 1, "num_tokens": 4000, "rnd": 0, "task_begin": 0, "task_end": 100,
    "timeout_ns": 10**10,
}  # fmt: skip
GROUPS = {
    "scales": Fp8Scales, "biases": ExpertBiases, "plan": PlanBuffers, "peers": SymBuffers,
    "mine": SymBuffers, "state": RankState,
}  # fmt: skip


def descriptor_blocks(cfg: KernelConfig, meta: dict) -> dict[str, list[int]]:
    """The block shape of every tensor descriptor argument this launch passes (the others are
    None, a constexpr)."""
    blocks = {}
    if meta.GEMM1_TMA:
        # with PAIRS a [L, I, 2, H] view of w13: gate and up rows interleaved in a box
        pairs = meta.PAIRS
        blocks["w13_desc"] = (
            [1, cfg.block_n, 2, cfg.block_k] if pairs else [cfg.block_n, cfg.block_k]
        )
        if meta.TAIL_ROWS:  # the tiles with a tail: gate and up as two products
            blocks["w13_tail_desc"] = [cfg.block_n, cfg.block_k]
    if meta.DOWN_TMA:  # (FP8: one 128-row weight scale block a product)
        rows = min(cfg.down_block_n, FP8_BLOCK) if meta.FP8 else cfg.down_block_n
        blocks["w2_desc"] = [rows, cfg.down_block_k]
    return blocks


def example_tensor(name: str, shape, peers: bool = False) -> torch.Tensor:
    """A one-element tensor of the type the kernel's argument (or buffer field) ``name`` has."""
    if peers:
        return torch.empty(1, dtype=torch.int64)  # a table of base addresses
    if name in FLOAT32:
        return torch.empty(1, dtype=torch.float32)
    if name in DATA or name in GEMM_DATA:
        return torch.empty(1, dtype=shape.dtype if name in DATA else shape.gemm_dtype)
    return torch.empty(1, dtype=torch.int64 if name in INT64 else torch.int32)


def example_args(shape, blocks: dict[str, list[int]]):
    """Arguments of every type (``shape``'s dtypes); a descriptor for each name in ``blocks``."""
    dtype = shape.gemm_dtype
    args = {}
    for name in moe_megakernel.arg_names:
        if name.endswith("_desc"):
            if name in blocks:  # only the block shape and dtype reach the signature
                rank = len(blocks[name])
                strides = [16] * (rank - 1) + [1]
                base = torch.empty(16, dtype=dtype)
                args[name] = TensorDescriptor(base, [16] * rank, strides, blocks[name])
        elif name in SCALARS:
            args[name] = SCALARS[name]
        elif name in GROUPS:
            group = GROUPS[name]
            args[name] = group(*(example_tensor(f, shape, name == "peers") for f in group._fields))
        elif name.endswith("_ptr"):
            args[name] = example_tensor(name, shape)
    return args


def kernel_meta_of(cfg: KernelConfig, mode: str, shape=PRESETS["dsv3"], R: int = 2):
    L = shape.num_experts // R
    capacity = default_capacity(shape, R, L)
    plan_cfg = PlanConfig(
        R, L, shape.topk, shape.max_tokens_per_rank, capacity, cfg.block_m, cfg.chunk,
        tail_rows=cfg.tail_rows,
    )  # fmt: skip
    plan_cfg = replace(plan_cfg, rounds=plan_cfg.rounds_needed())  # as a layer's workspace has
    return kernel_meta(shape, plan_cfg, cfg, capacity, True, 132, mode)


def compile_megakernel(shape, R: int, cfg: KernelConfig, mode: str):
    meta = kernel_meta_of(cfg, mode, shape, R)
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    blocks = descriptor_blocks(cfg, meta)
    args = example_args(shape, blocks)
    constexprs = {"M": meta}
    for name in moe_megakernel.arg_names:
        if name.endswith("_desc") and name not in blocks:
            constexprs[name] = None
    return compile_sm90(moe_megakernel, signature_of(args), constexprs, **options)


@pytest.mark.parametrize("mode", ["layer", "gemm", "dispatch"])
@pytest.mark.parametrize("preset,R", [("dsv3", 2), ("dsv3", 8), ("mixtral", 2)])
def test_megakernel_compiles(preset, R, mode):
    kernel = compile_megakernel(PRESETS[preset], R, KernelConfig(), mode)
    ptx = kernel.asm["ptx"]
    assert "globaltimer" in ptx, "the tile waits are bounded"
    assert "atom.global.sys.release.exch.b64" in ptx, "flags are published with a release"
    assert "atom.global.sys.acq_rel.add.u32" in ptx, "group arrivals are acq_rel"
    if mode != "dispatch":
        assert "wgmma" in ptx, "the GEMM should use Hopper's warpgroup MMA"
    if mode == "layer":
        assert "atom.global.sys.release.add.u32" in ptx, "combine pieces are added with a release"
    tma = "cp.async.bulk.tensor" in ptx
    assert tma == (mode != "dispatch"), "the GEMMs (only) load their weights by TMA"
    assert kernel.metadata.shared <= 227 * 1024


@pytest.mark.parametrize("R,tma", [(2, True), (8, True), (2, False)])
def test_fp8_megakernel_makes_e4m3_products(R, tma):
    """``MoEShape(fp8=True)`` (dsv3): both GEMMs are e4m3 warpgroup MMAs with fp32 accumulators,
    the dispatch and the SwiGLU epilogue round to e4m3, and the weights come by TMA (or by
    pointers)."""
    shape = replace(PRESETS["dsv3"], fp8=True)
    cfg = KernelConfig(gemm1_tma=tma, down_tma=tma).for_fp8()
    kernel = compile_megakernel(shape, R, cfg, "layer")
    ptx = kernel.asm["ptx"]
    mma = [line for line in ptx.splitlines() if "wgmma.mma_async" in line]
    assert mma and all(".f32.e4m3.e4m3" in line for line in mma)
    # fp8_promote_k = 128: every chain of 4 k32 MMAs starts a fresh partial (scale-d 0), which
    # is then added to the accumulator in fp32
    fresh = [line for line in mma if re.search(r"\}, %rd\d+, %rd\d+, 0, 1, 1;", line)]
    assert len(fresh) * (FP8_BLOCK // 32) == len(mma), f"{len(fresh)} of {len(mma)} start at 0"
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert ("cp.async.bulk.tensor" in ptx) == tma
    # ptxas keeps each chain of four in flight together: with any instruction reading an MMA's
    # accumulator before its group is committed, it makes every MMA of the kernel wait for the
    # one before (C7514; ``_scaled_mma``'s WAIT note)
    ops = sass_ops(kernel)
    chains = [sum("GMMA" in op for op in group) for _, group in wgmma_groups(ops)]
    assert chains and set(chains) == {FP8_BLOCK // 32}, f"MMAs per committed group: {chains}"
    # running-scale products: one accumulator each, plus the 128-k partial being made. With TMA
    # that fits; with pointer loads (their addresses in registers too) ptxas spills in the k
    # loops (170 instructions, dsv3 R = 2): the pointer path is the fallback, not the default
    spills = mma_loop_spills(ops)
    if tma:
        assert spills == [], f"{len(spills)} local-memory (spill) instructions in the MMA loops"
        # the k step's serial part, between one product's MMAs and the next (``_scaled_mma``'s
        # STEP note): the unit change is a fast reciprocal, not fp32 division's full-range
        # path (whose range test compares with 2^126), and the partial's add leaves the
        # accumulator where it was (the fma with the partial as its addend copied up's
        # accumulator back: 47 moves a GEMM1 step, 37 a down step; 16-24 are the rest, the
        # scales carried over and masked loads' defaults)
        for body in mma_loops(ops):
            assert not [o for o in body if "8.50705917302346158658e+37" in o], "full-range division"
            moves = [o for o in body if re.match(PREDICATE + r"(IMAD\.)?MOV\b", o)]
            assert len(moves) <= 32, f"{len(moves)} register moves in an MMA k loop"
    assert "globaltimer" in ptx and "atom.global.sys.release.add.u32" in ptx
    assert kernel.metadata.shared <= 227 * 1024


@pytest.mark.parametrize("trace", [False, True])
def test_trace_switch_compiles_to_nothing_when_off(trace):
    cfg = KernelConfig(trace=trace)
    kernel = compile_megakernel(PRESETS["dsv3"], 2, cfg, "layer")
    ptx = kernel.asm["ptx"]
    # the trace buffer is PTX parameter number `index`; PTX loads a parameter only if used. A
    # None descriptor (a constexpr) is no PTX parameter, an N-D tensor descriptor is 1 + 2N: the
    # TMA descriptor, N sizes and N strides; a tuple argument is one parameter per item.
    names = moe_megakernel.arg_names[: moe_megakernel.arg_names.index("state")]
    passed = descriptor_blocks(cfg, kernel_meta_of(cfg, "layer"))

    def params(n: str) -> int:
        if n.endswith("_desc"):
            return 1 + 2 * len(passed[n]) if n in passed else 0
        return len(GROUPS[n]._fields) if n in GROUPS else 1

    index = sum(params(n) for n in names) + RankState._fields.index("trace")
    loads_trace = f"moe_megakernel_param_{index}]" in ptx
    assert loads_trace == trace, "TRACE off must not touch the trace buffer; on, it must"
    assert ("%smid" in ptx) == trace, "the SM id is read only for the trace header"


def test_gemm1_tma_switch():
    """gemm1_tma=False loads w13 by pointers: no TMA copy, and the descriptor argument is gone."""
    ptx = compile_megakernel(PRESETS["dsv3"], 2, KernelConfig(gemm1_tma=False), "gemm").asm["ptx"]
    assert "cp.async.bulk.tensor" not in ptx and "wgmma" in ptx


def test_gemm1_pairs_makes_one_wide_product():
    """gemm1_pairs (the default): one m64n256 MMA per k step for gate and up together, where
    gemm1_pairs=False makes two m64n128 ones; the split for SwiGLU and the reshape of the TMA box
    ([1, BN, 2, BK] -> [2 BN, BK]) add no shared-memory round trip. (Full-height tiles only:
    ``half_tiles`` adds a 64-row product, which spreads its columns over the warpgroups.)"""
    ptx = {
        pairs: compile_megakernel(
            PRESETS["dsv3"], 2, KernelConfig(gemm1_pairs=pairs, half_tiles=False), "gemm"
        ).asm["ptx"]
        for pairs in (False, True)
    }
    shapes = {p: set(re.findall(r"wgmma\.mma_async\S*\.m64n(\d+)k16", ptx[p])) for p in ptx}
    assert shapes == {False: {"128"}, True: {"256"}}
    assert ptx[True].count("st.shared") <= ptx[False].count("st.shared")


def test_pack_scan_resolves_then_reads_rows_in_place():
    """pack="scan" adds the resolve copy and its flag, and GEMM1 no longer loads recv_src."""
    ptx = {
        pack: compile_megakernel(PRESETS["dsv3"], 2, KernelConfig(pack=pack), "gemm").asm["ptx"]
        for pack in ("gather", "scan")
    }
    release = "atom.global.gpu.release.exch.b64"  # resolved[tile] = epoch
    assert release not in ptx["gather"] and release in ptx["scan"]
    assert "wgmma" in ptx["scan"]


@pytest.mark.parametrize(
    "preset,R,mode,knobs",
    [
        ("dsv3", 2, "layer", {}),
        ("qwen3_235b", 2, "layer", {}),
        # few slots a rank: a tile's flag wait once took under 64 lanes here, and ptxas moved the
        # paired GEMM1's descriptors through R2UR (ops.gemm._wait_tile_rows)
        ("mixtral", 2, "layer", {}),
        ("mixtral", 1, "layer", {}),
        ("gpt_oss", 1, "layer", {}),
        ("mixtral", 2, "layer", {"gemm1_pairs": False}),
        ("dsv3", 2, "gemm", {}),
        ("dsv3", 2, "layer", {"gemm1_pairs": False}),
        ("dsv3", 2, "layer", {"half_tiles": False}),
    ],
)
def test_gemm_k_loops_keep_their_mma_descriptors_in_uniform_registers(preset, R, mode, knobs):
    """Between the HGMMAs of one k step there is no ``R2UR``: ptxas built the shared-memory
    descriptors on the uniform datapath, not in plain registers moved over one per MMA. The
    same loops hold no spills (local-memory loads or stores).

    NOTE: a tripwire, not a rule of Hopper. Twice a change outside the GEMMs (taking the next
    task in another atomic) made ptxas move these descriptors through ``R2UR`` in GEMM1's or the
    down projection's k loop, about 150 instructions per k step where there had been 100, and the
    layer got 3-5% slower on an H200 (perf/NOTES.md, "The task claim's round trip"). If this
    fails, time the layer for dsv3 and qwen3_235b against the previous commit before keeping it.
    """
    cfg = KernelConfig(**knobs)
    ops = sass_ops(compile_megakernel(PRESETS[preset], R, cfg, mode))
    groups = wgmma_groups(ops)
    # GEMM1: gate and up as one product, or as two; the layer adds the down projection; each
    # at full height and, with ``half_tiles`` (the default), at half height too
    paired = cfg.paired_gemm1(swiglu=True)
    names = (["gemm1"] if paired else ["gate", "up"]) + (["down"] if mode == "layer" else [])
    assert len(groups) == len(names) * (2 if cfg.half_tiles else 1), f"{names}: {len(groups)}"
    moves = [sum(op.startswith("R2UR") for op in group) for _, group in groups]
    assert not any(moves), f"R2UR per wgmma group ({'/'.join(names)}, both heights): {moves}"
    spills = mma_loop_spills(ops)  # none at any preset, R = 1 or 2, either height (2026-12-07)
    assert spills == [], f"{len(spills)} local-memory (spill) instructions in the MMA loops"


@pytest.mark.parametrize("pairs", [True, False])
def test_tail_rows_keep_the_k_loops_pipelined(pairs):
    """``tail_rows=32``: GEMM1 and the down projection gain a tail variant whose k loop adds
    m64n32 MMAs (the swapped tail products) with both operands from shared memory, the weight
    block the tile's product loaded as A. A tile with a tail makes gate and up as two products
    (``w13_tail_desc``), the others stay paired (m64n256): with the paired box as the swapped
    product's A, Triton 3.6 loads it into registers, and ptxas serialises every MMA of the
    kernel for want of registers (C7511: each HGMMA then waited to 0, the default tiles' loops
    too). Held here: no k loop waits an MMA group to 0, no ``R2UR`` between the MMAs, no spill
    in the loops."""
    cfg = KernelConfig(tail_rows=32, gemm1_pairs=pairs)
    kernel = compile_megakernel(PRESETS["dsv3"], 2, cfg, "layer")
    ptx = kernel.asm["ptx"]
    tail_mmas = re.findall(r"wgmma\.mma_async\S*\.m64n32k16\S* \{[^}]*\}, (\S+)", ptx)
    assert tail_mmas and all(a.startswith("%rd") for a in tail_mmas), "A from shared memory"
    ops = sass_ops(kernel)
    serial = [o for body in mma_loops(ops) for o in body if "WARPGROUP.DEPBAR.LE gsb0, 0x0" in o]
    assert serial == [], f"{len(serial)} MMA groups waited to 0 inside the k loops"
    groups = wgmma_groups(ops)
    assert not any(sum(o.startswith("R2UR") for o in g) for _, g in groups)
    assert mma_loop_spills(ops) == []


@pytest.mark.parametrize("preset,fp8", [("gpt_oss", False), ("qwen3_235b", True)])
def test_clamped_activation_keeps_nan_and_the_k_loops_clean(preset, fp8):
    """gpt-oss's experts (``activation="swigluoai"``, ``bias=True``): the clamps compile to the
    NaN-keeping ``min.NaN`` / ``max.NaN`` (plain ``min.f32`` returns the other operand, so a NaN
    token would come out as the clamp's bound times a finite number: plausible, wrong), and the
    biases' loads after the k loops leave those loops as they were: no spills, and (bf16) no
    ``R2UR`` between the MMAs of a k step."""
    shape = replace(PRESETS[preset], activation="swigluoai", bias=True, fp8=fp8)
    cfg = KernelConfig().for_fp8() if fp8 else KernelConfig()
    kernel = compile_megakernel(shape, 1, cfg, "layer")
    ptx = kernel.asm["ptx"]
    assert re.search(r"\bmin\.NaN\.f32\b", ptx) and re.search(r"\bmax\.NaN\.f32\b", ptx)
    ops = sass_ops(kernel)
    spills = mma_loop_spills(ops)
    assert spills == [], f"{len(spills)} local-memory (spill) instructions in the MMA loops"
    if not fp8:
        moves = [sum(op.startswith("R2UR") for op in group) for _, group in wgmma_groups(ops)]
        assert not any(moves), f"R2UR per wgmma group: {moves}"
