"""The megakernel compiles for sm_90 with no GPU (dsv3 / mixtral constants), in every mode."""

import os

import pytest
import torch
from _aot import compile_sm90, signature_of
from triton.tools.tensor_descriptor import TensorDescriptor

from megakernel.kernel import KernelConfig, default_capacity, kernel_meta, moe_megakernel
from megakernel.plan import PlanConfig
from megakernel.shapes import PRESETS

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles real kernels: run without TRITON_INTERPRET", allow_module_level=True)

INT64_PTRS = {"ready_ptr", "act_ready_ptr", "resolved_ptr", "err_ptr", "epoch_ptr", "trace_ptr"}
DATA_PTRS = {"x_ptr", "w13_ptr", "w2_ptr", "act_ptr", "out_ptr", "recv_x_ptr", "combine_ptr"}
SCALARS = {"rank": 1, "num_tokens": 4000, "task_begin": 0, "task_end": 100, "timeout_ns": 10**10}


def example_args(dtype, cfg: KernelConfig | None = None):
    """Arguments of every type; with ``cfg`` (``gemm1_tma``) GEMM1's weight descriptor, else
    None for it (a constexpr)."""
    args = {}
    for name in moe_megakernel.arg_names:
        if name == "w13_desc":
            if cfg is not None:
                rows = torch.empty(256, 256, dtype=dtype)
                args[name] = TensorDescriptor.from_tensor(rows, [cfg.block_n, cfg.block_k])
        elif name in SCALARS:
            args[name] = SCALARS[name]
        elif name.endswith(("_ptr", "_base")):
            int64 = name in INT64_PTRS or name.endswith("_base")
            t = dtype if name in DATA_PTRS else torch.int64 if int64 else torch.int32
            t = torch.float32 if name == "weights_ptr" else t
            args[name] = torch.empty(1, dtype=t)
    return args


def compile_megakernel(shape, R: int, cfg: KernelConfig, mode: str):
    L = shape.num_experts // R
    capacity = default_capacity(shape, R, L)
    plan_cfg = PlanConfig(
        R, L, shape.topk, shape.max_tokens_per_rank, capacity, cfg.block_m, cfg.chunk
    )
    meta = kernel_meta(shape, plan_cfg, cfg, capacity, True, 132, mode)
    options = {k: meta.pop(k) for k in ("num_warps", "num_stages")}
    args = example_args(shape.dtype, cfg if meta["GEMM1_TMA"] else None)
    if "w13_desc" not in args:
        meta["w13_desc"] = None
    return compile_sm90(moe_megakernel, signature_of(args), meta, **options)


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
    assert tma == (mode != "dispatch"), "GEMM1 (only) loads its weights by TMA"
    assert kernel.metadata.shared <= 227 * 1024


@pytest.mark.parametrize("trace", [False, True])
def test_trace_switch_compiles_to_nothing_when_off(trace):
    kernel = compile_megakernel(PRESETS["dsv3"], 2, KernelConfig(trace=trace), "layer")
    ptx = kernel.asm["ptx"]
    # the trace buffer is PTX parameter number `index`; PTX loads a parameter only if used. The
    # 2-D tensor descriptor before it is 5 PTX parameters: the TMA descriptor, 2 sizes, 2 strides.
    index = moe_megakernel.arg_names.index("trace_ptr") + 4
    loads_trace = f"moe_megakernel_param_{index}]" in ptx
    assert loads_trace == trace, "TRACE off must not touch the trace buffer; on, it must"
    assert ("%smid" in ptx) == trace, "the SM id is read only for the trace header"


def test_gemm1_tma_switch():
    """gemm1_tma=False loads w13 by pointers: no TMA copy, and the descriptor argument is gone."""
    ptx = compile_megakernel(PRESETS["dsv3"], 2, KernelConfig(gemm1_tma=False), "gemm").asm["ptx"]
    assert "cp.async.bulk.tensor" not in ptx and "wgmma" in ptx


def test_pack_scan_resolves_then_reads_rows_in_place():
    """pack="scan" adds the resolve copy and its flag, and GEMM1 no longer loads recv_src."""
    ptx = {
        pack: compile_megakernel(PRESETS["dsv3"], 2, KernelConfig(pack=pack), "gemm").asm["ptx"]
        for pack in ("gather", "scan")
    }
    release = "atom.global.gpu.release.exch.b64"  # resolved[tile] = epoch
    assert release not in ptx["gather"] and release in ptx["scan"]
    assert "wgmma" in ptx["scan"]
