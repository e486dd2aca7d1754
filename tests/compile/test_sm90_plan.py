"""The plan kernels compile for sm_90 with no GPU (dsv3-sized constants, 8 ranks)."""

import os

import pytest
import torch
from _aot import compile_sm90, signature_of

from megakernel.plan import (
    LayoutOut,
    PlacementTables,
    PlanConfig,
    plan_count_kernel,
    plan_layout_kernel,
    plan_scan_kernel,
)

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles real kernels: run without TRITON_INTERPRET", allow_module_level=True)


def i32():
    return torch.empty(1, dtype=torch.int32)


def i64():
    return torch.empty(1, dtype=torch.int64)


@pytest.mark.parametrize("token_saving", [True, False])
@pytest.mark.parametrize("R,L,K", [(8, 32, 8), (2, 4, 2), (4, 1, 1), (1, 16, 4)])
def test_plan_kernels_compile(R, L, K, token_saving):
    cfg = PlanConfig(R, L, K, max_tokens=4096, capacity=8192 * K, token_saving=token_saving)
    meta = {"M": cfg.meta(num_experts=R * L)}
    count_args = dict(
        ids_ptr=i32(),
        placement=PlacementTables(i32(), i32(), i32()),
        phys_ptr=i32(),
        chunk_rows_ptr=i32(),
        routing_err_ptr=i64(),
        pairs_ptr=i64(),
        epoch_ptr=i64(),
        T=4096,
    )
    compile_sm90(plan_count_kernel, signature_of(count_args), meta)
    scan_args = dict(
        chunk_rows_ptr=i32(),
        totals_ptr=i32(),
        arrive_ptr=i32(),
        counts_base=i64(),
        ready_base=i64(),
        epoch_ptr=i64(),
        load_ptr=i64(),
        rank=3,
        T=4096,
    )
    ptx = compile_sm90(plan_scan_kernel, signature_of(scan_args), meta).asm["ptx"]
    assert "atom" in ptx
    layout_args = dict(
        phys_ptr=i32(),
        chunk_rows_ptr=i32(),
        totals_ptr=i32(),
        counts_ptr=i32(),
        ready_ptr=i64(),
        out=LayoutOut(*(i64() if f == "round_calls" else i32() for f in LayoutOut._fields)),
        err_ptr=i64(),
        epoch_ptr=i64(),
        rank=3,
        T=4096,
        capacity=65536,
        max_rounds=4,
        timeout_ns=10**10,
        max_units=cfg.max_units,
        max_dispatch=cfg.max_dispatch_tasks,
        max_tiles=cfg.max_tiles,
    )
    kernel = compile_sm90(plan_layout_kernel, signature_of(layout_args), meta)
    assert "globaltimer" in kernel.asm["ptx"]
    assert kernel.metadata.shared <= 228 * 1024
