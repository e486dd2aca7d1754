"""Inputs, fixtures and checks shared by the tests, the benchmarks and the multi-GPU workers.

Shape legend: T tokens per rank, H hidden, I expert FFN width, E experts, L local slots, K top-k,
R ranks, S rows a rank received.

Global view (pplx-kernels style): one seed builds every rank's tokens and every expert's weights,
so each rank can compute its own expected output without communication.
"""

from __future__ import annotations

from functools import partial

import torch

from megakernel.fp8 import (
    FP8_DENSE_ERROR,
    FP8_REF_ERROR,
    FP8_TOLERANCE,
    dequantize_weight_blocks,
    moe_fp8_ref_by_expert,
    quantize_weight_blocks,
)
from megakernel.handles import DispatchHandle
from megakernel.placement import Placement
from megakernel.plan import PlanConfig
from megakernel.reference import (
    dispatch_ref,
    expert_act_ref,
    expert_ffn_ref,
    moe_ref_by_expert,
    resolve_all_ref,
)
from megakernel.routing import Routing, edge_case
from megakernel.shapes import MoEShape

W2_SEED_OFFSET = 50_021  # w2 generators: seeds apart from every w13 one (E < 50_021)
B13_SEED_OFFSET = 2 * W2_SEED_OFFSET  # and the biases' (MoEShape.bias), apart from both
B2_SEED_OFFSET = 3 * W2_SEED_OFFSET
# b13's spread: gate and up near 0 +- 4 with x @ w of about 0 +- 1, so "swigluoai"'s clamps at
# +-7 act on some columns (a test that never reached them would not test them)
B13_SCALE = 4.0
# |got - want| <= atol + rtol * |want| for the GEMM outputs (DESIGN §8); fp32 runs through tf32
# on the GPU, hence its loose bound
TOLERANCE = {
    torch.float32: (2e-2, 2e-2),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (3e-2, 3e-2),
}


def make_tokens(shape: MoEShape, counts: list[int], seed: int, device: str | torch.device):
    """Every rank's ``x [T_r, H]``, from one seed."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, shape.hidden, generator=g).to(device, shape.dtype) for t in counts]


def expert_w13(shape: MoEShape, seed: int, expert: int, device: str | torch.device):
    """Expert ``expert``'s ``w13 [2I, H]``, scaled so activations stay O(1). Each expert has its
    own generator, so a rank can build just the experts it holds."""
    g = torch.Generator(device=device).manual_seed(seed * 100_003 + expert)
    w = torch.randn(2 * shape.ffn, shape.hidden, generator=g, device=device)
    return (w / shape.hidden**0.5).to(shape.dtype)


def make_w13(shape: MoEShape, seed: int, device: str | torch.device) -> torch.Tensor:
    """Every expert's ``w13 [E, 2I, H]``."""
    return torch.stack([expert_w13(shape, seed, e, device) for e in range(shape.num_experts)])


def expert_w2(shape: MoEShape, seed: int, expert: int, device: str | torch.device):
    """Expert ``expert``'s ``w2 [H, I]``, scaled like ``expert_w13``, from its own generator."""
    g = torch.Generator(device=device).manual_seed(seed * 100_003 + W2_SEED_OFFSET + expert)
    w = torch.randn(shape.hidden, shape.ffn, generator=g, device=device)
    return (w / shape.ffn**0.5).to(shape.dtype)


def make_w2(shape: MoEShape, seed: int, device: str | torch.device) -> torch.Tensor:
    """Every expert's ``w2 [E, H, I]``."""
    return torch.stack([expert_w2(shape, seed, e, device) for e in range(shape.num_experts)])


def expert_b13(shape: MoEShape, seed: int, expert: int, device: str | torch.device):
    """Expert ``expert``'s ``b13 [2I]`` (fp32; ``MoEShape.bias``), from its own generator."""
    g = torch.Generator(device=device).manual_seed(seed * 100_003 + B13_SEED_OFFSET + expert)
    return B13_SCALE * torch.randn(2 * shape.ffn, generator=g, device=device)


def expert_b2(shape: MoEShape, seed: int, expert: int, device: str | torch.device):
    """Expert ``expert``'s ``b2 [H]`` (fp32), from its own generator."""
    g = torch.Generator(device=device).manual_seed(seed * 100_003 + B2_SEED_OFFSET + expert)
    return torch.randn(shape.hidden, generator=g, device=device)


def _expert_biases(shape: MoEShape, seed: int, expert: int, device) -> tuple[torch.Tensor, ...]:
    """(``b13``, ``b2``) of one expert, or () where the shape's experts have no biases."""
    if not shape.bias:
        return ()
    return expert_b13(shape, seed, expert, device), expert_b2(shape, seed, expert, device)


def make_biases(shape: MoEShape, seed: int, device: str | torch.device) -> dict[str, torch.Tensor]:
    """Every expert's biases as ``from_dense`` takes them, ``{"b13": [E, 2I], "b2": [E, H]}``
    (fp32), or ``{}`` where the shape's experts have none."""
    if not shape.bias:
        return {}
    experts = range(shape.num_experts)
    return {
        "b13": torch.stack([expert_b13(shape, seed, e, device) for e in experts]),
        "b2": torch.stack([expert_b2(shape, seed, e, device) for e in experts]),
    }


def _local_experts(expert_fn, shape: MoEShape, placement: Placement, rank: int, seed: int, device):
    L = placement.slots_per_rank
    experts = placement.slot_expert()[rank * L : (rank + 1) * L]
    some = expert_fn(shape, seed, 0, device)
    out = torch.zeros(L, *some.shape, dtype=some.dtype, device=device)
    for local, e in enumerate(experts):
        if e >= 0:
            out[local] = expert_fn(shape, seed, e, device)
    return out


def local_w13(
    shape: MoEShape, placement: Placement, rank: int, seed: int, device: str | torch.device
) -> torch.Tensor:
    """Rank ``rank``'s ``w13 [L, 2I, H]`` (zeros for an unused slot); equals
    ``placement.local_weights(make_w13(...), rank)`` without building the other ranks' experts."""
    return _local_experts(expert_w13, shape, placement, rank, seed, device)


def local_w2(
    shape: MoEShape, placement: Placement, rank: int, seed: int, device: str | torch.device
) -> torch.Tensor:
    """Rank ``rank``'s ``w2 [L, H, I]``, like ``local_w13``."""
    return _local_experts(expert_w2, shape, placement, rank, seed, device)


def local_biases(
    shape: MoEShape, placement: Placement, rank: int, seed: int, device: str | torch.device
) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s biases as ``Megakernel.run`` takes them, ``{"b13": [L, 2I], "b2": [L, H]}``
    (zeros for an unused slot), or ``{}`` where the shape's experts have none."""
    if not shape.bias:
        return {}
    return {
        name: _local_experts(fn, shape, placement, rank, seed, device)
        for name, fn in (("b13", expert_b13), ("b2", expert_b2))
    }


def layer_inputs(
    shape: MoEShape, placement: Placement, rt: Routing, ranks: list[int], seed: int, device
) -> tuple[list[torch.Tensor], tuple]:
    """Every rank's tokens ``xs`` (global view, from ``seed``) and, for this process's ``ranks``,
    the inputs of a mode-"layer" call of ``Megakernel.run``: (x, topk_ids, topk_weights, w13,
    w2), each keyed by rank, the experts from ``seed`` too (``layer_ref`` rebuilds them)."""
    xs = make_tokens(shape, [ids.shape[0] for ids in rt.topk_ids], seed, device)
    inputs = (
        {r: xs[r] for r in ranks},
        {r: rt.topk_ids[r] for r in ranks},
        {r: rt.topk_weights[r] for r in ranks},
        {r: local_w13(shape, placement, r, seed, device) for r in ranks},
        {r: local_w2(shape, placement, r, seed, device) for r in ranks},
    )
    return xs, inputs


def layer_ref(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    shape: MoEShape,
    seed: int,
) -> torch.Tensor:
    """``moe_ref`` (fp32, ``[T, H]``, on x's device) on experts rebuilt from ``seed`` one at a
    time: a rank checks its output without holding every expert. The shape's activation, and its
    biases where it has them."""
    dev = x.device

    def expert(e: int) -> tuple[torch.Tensor, ...]:
        w13, w2 = expert_w13(shape, seed, e, dev), expert_w2(shape, seed, e, dev)
        return w13, w2, *_expert_biases(shape, seed, e, dev)

    ffn = partial(expert_ffn_ref, activation=shape.activation)
    return moe_ref_by_expert(x, topk_ids, topk_weights, expert, ffn)


def fp8_layer_ref(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, shape: MoEShape, seed: int
) -> torch.Tensor:
    """``moe_fp8_ref`` (fp32) of one rank's tokens through the experts of ``seed``, quantised as
    ``FusedEPMoE.from_dense`` quantises them, one expert at a time, where ``x`` lives."""
    dev = x.device

    def dequantized(e: int) -> tuple[torch.Tensor, ...]:
        w13 = quantize_weight_blocks(expert_w13(shape, seed, e, dev))
        w2 = quantize_weight_blocks(expert_w2(shape, seed, e, dev))
        w13, w2 = dequantize_weight_blocks(*w13), dequantize_weight_blocks(*w2)
        return w13, w2, *_expert_biases(shape, seed, e, dev)

    return moe_fp8_ref_by_expert(x, topk_ids, topk_weights, dequantized, shape.activation)


def _fp8_problems(
    out: torch.Tensor,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    shape: MoEShape,
    seed: int,
    rank: int,
) -> list[str]:
    """``check_layer_output`` of an FP8 layer built from the experts of ``seed`` (quantised by
    ``FusedEPMoE.from_dense``): against ``moe_fp8_ref`` within ``FP8_TOLERANCE`` and
    ``FP8_REF_ERROR`` (norm-relative), and against ``layer_ref`` (the dense experts) within
    ``FP8_DENSE_ERROR`` (norm-relative)."""
    want = fp8_layer_ref(x, topk_ids, topk_weights, shape, seed)
    problems = compare_layer_output(out, want, FP8_TOLERANCE, rank, "moe_fp8_ref")
    ref = layer_ref(x, topk_ids, topk_weights, shape, seed)
    for name, good, bound in (
        ("moe_fp8_ref", want, FP8_REF_ERROR),
        ("moe_ref", ref, FP8_DENSE_ERROR),
    ):
        error = ((out.float() - good).norm() / good.norm().clamp_min(1e-30)).item()
        if not error <= bound:
            problems.append(
                f"rank {rank}: FP8 output is {error:.3g} from {name} (norm-relative), more than "
                f"{bound}"
            )
    return problems


def compare_layer_output(
    out: torch.Tensor,
    want: torch.Tensor,
    tolerance: torch.dtype | tuple[float, float],
    rank: int,
    against: str = "moe_ref",
) -> list[str]:
    """What is wrong with one rank's layer output ``out [T, H]`` against ``want`` (``layer_ref``,
    or the reference ``against`` names) within ``tolerance``: (rtol, atol), or a dtype's
    ``TOLERANCE`` (empty: nothing).

    ``atol`` is for outputs of unit scale: where ``want``'s rms is larger it scales with it, as
    the roundings of the intermediate rows do (gpt-oss's clamped activations reach 50, and a
    token's output can cancel to near 0 from terms that large)."""
    got = out.float()
    if got.shape != want.shape:
        return [f"rank {rank}: output has shape {tuple(got.shape)}, expected {tuple(want.shape)}"]
    rtol, atol = tolerance if isinstance(tolerance, tuple) else TOLERANCE[tolerance]
    finite = want[want.isfinite()]
    if finite.numel():
        atol *= max(1.0, finite.pow(2).mean().sqrt().item())
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        err = (got - want).abs().nan_to_num(float("inf"))
        bad = (err > atol + rtol * want.abs()).any(1).nonzero().squeeze(1).cpu()
        return [
            f"rank {rank}: output differs from {against} in {bad.numel()} of {got.shape[0]} "
            f"tokens (first {bad[:5].tolist()}), max abs error {err.max().item():.3g}"
        ]
    return []


def check_layer_output(
    out: torch.Tensor,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    shape: MoEShape,
    seed: int,
    rank: int,
) -> list[str]:
    """``compare_layer_output`` against ``layer_ref`` computed where ``out`` lives; for an FP8
    shape, against ``moe_fp8_ref`` and ``layer_ref`` with the FP8 bounds (``_fp8_problems``)."""
    if shape.fp8:
        return _fp8_problems(out, x.to(out.device), topk_ids, topk_weights, shape, seed, rank)
    want = layer_ref(x.to(out.device), topk_ids, topk_weights, shape, seed)
    return compare_layer_output(out, want, shape.dtype, rank)


def poison(ws, rank: int) -> None:
    """Fill the outputs of ``rank`` with values no correct call leaves behind."""
    bad = float("nan") if ws.shape.dtype.is_floating_point else -1
    ws.sym["recv_x"].peer(rank).fill_(bad)
    ws.sym["recv_src"].peer(rank).fill_(-1)
    ws.act[rank].fill_(bad)
    if ws.combine:
        ws.sym["combine_y"].peer(rank).fill_(bad)


def check_call(
    handle: DispatchHandle,
    xs: list[torch.Tensor],
    topk_ids: list[torch.Tensor],
    w13_local: torch.Tensor,
    placement: Placement,
    mode: str,
    swiglu: bool = True,
    b13_local: torch.Tensor | None = None,
    activation: str = "silu",
) -> list[str]:
    """What is wrong with one rank's call (empty: nothing). Dispatch must be bit-exact; the GEMM
    output within ``TOLERANCE``. ``xs``, ``topk_ids``: every rank's inputs; ``w13_local
    [L, 2I, H]`` (``b13_local [L, 2I]``): the weights (biases) of the handle's rank;
    ``activation``: the shape's."""
    d = handle.rank
    phys = resolve_all_ref([ids.cpu() for ids in topk_ids], placement)
    dev = handle.recv_x.device  # the references run where the data is (fp32 GEMMs on the GPU)
    recv_want, layout = dispatch_ref([x.to(dev) for x in xs], phys, placement)[d]
    n = handle.num_recv()
    if n != layout.num_rows:
        return [f"rank {d}: received {n} rows, expected {layout.num_rows}"]
    problems = []
    recv_got = handle.recv_x[:n] if mode == "dispatch" else handle.resolved()  # "gemm", "layer"
    if not torch.equal(recv_got.view(torch.uint8), recv_want.view(torch.uint8)):
        bad = (recv_got != recv_want).any(1).nonzero().squeeze(1).cpu()
        problems.append(f"rank {d}: {bad.numel()} of {n} received rows differ (first {bad[:5]})")
    if mode != "dispatch":
        b13 = None if b13_local is None else b13_local.to(dev)
        want = expert_act_ref(recv_want, layout, w13_local.to(dev), swiglu, b13, activation)
        got = handle.act[:n].float()
        rtol, atol = TOLERANCE[xs[0].dtype]
        if not torch.allclose(got, want, rtol=rtol, atol=atol):
            err = (got - want).abs().nan_to_num(float("inf")).max().item()
            problems.append(f"rank {d}: act differs from expert_act_ref, max abs error {err:.3g}")
    return problems


def run_poisoned(
    ws,
    xs: list[torch.Tensor],
    topk_ids: list[torch.Tensor],
    w13_local: dict[int, torch.Tensor],
    mode: str = "gemm",
    topk_weights: list[torch.Tensor] | None = None,
    **run_kw,
) -> dict[int, DispatchHandle]:
    """One ``ws.run`` on this process's ranks, their outputs poisoned first, errors raised.
    ``xs``, ``topk_ids`` (``topk_weights``): every rank's inputs (global view); ``w13_local``: by
    local rank."""
    ranks = ws.world.local_ranks
    for r in ranks:
        poison(ws, r)
    if mode == "layer":
        H, dtype = ws.shape.hidden, ws.shape.dtype
        run_kw.setdefault(
            "out",
            {
                r: torch.full(
                    (xs[r].shape[0], H), float("nan"), dtype=dtype, device=ws.world.device
                )
                for r in ranks
            },
        )
    handles = ws.run(
        {r: xs[r] for r in ranks},
        {r: topk_ids[r] for r in ranks},
        {r: topk_weights[r] for r in ranks} if topk_weights else None,
        {r: w13_local[r] for r in ranks},
        mode=mode,
        **run_kw,
    )
    ws.check_errors()
    return handles


def check_calls(
    handles: dict[int, DispatchHandle],
    xs: list[torch.Tensor],
    topk_ids: list[torch.Tensor],
    w13_local: dict[int, torch.Tensor],
    placement: Placement,
    mode: str,
    swiglu: bool = True,
    b13_local: dict[int, torch.Tensor] | None = None,
    activation: str = "silu",
) -> list[str]:
    """``check_call`` for every handle (keyed by rank; ``b13_local`` too)."""
    problems = []
    for r, h in handles.items():
        b13 = (b13_local or {}).get(r)
        problems += check_call(h, xs, topk_ids, w13_local[r], placement, mode, swiglu, b13,
                               activation)  # fmt: skip
    return problems


def run_layer_checked(
    ws, rt_global, placement: Placement, seed: int, shape: MoEShape, device, **run_kw
):
    """One poisoned mode-"layer" call of ``ws`` on every local rank, with tokens and experts
    from ``seed`` and ``rt_global`` (global view), checked three ways: dispatch bit for bit, GEMM1
    and the layer output. Returns (handles, problems)."""
    xs = make_tokens(shape, [ids.shape[0] for ids in rt_global.topk_ids], seed, device)
    w13, w2 = make_w13(shape, seed, device), make_w2(shape, seed, device)
    rt = rt_global.to(device)
    ranks = ws.world.local_ranks
    w13_local = {r: placement.local_weights(w13, r) for r in ranks}
    w2_local = {r: placement.local_weights(w2, r) for r in ranks}
    biases = {
        name: {r: placement.local_weights(t, r) for r in ranks}
        for name, t in make_biases(shape, seed, device).items()
    }
    handles = run_poisoned(
        ws, xs, rt.topk_ids, w13_local, "layer", rt.topk_weights, w2=w2_local, **biases, **run_kw
    )
    problems = check_calls(
        handles, xs, rt.topk_ids, w13_local, placement, "layer",
        b13_local=biases.get("b13"), activation=shape.activation,
    )  # fmt: skip
    for r, h in handles.items():
        problems += check_layer_output(
            h.out, xs[r], rt.topk_ids[r], rt.topk_weights[r], shape, seed, r
        )
    return handles, problems


def small_case(
    case: str, world_size: int, token_saving: bool
) -> tuple[Routing, Placement, PlanConfig]:
    """A named edge case (``megakernel.routing.EDGE_CASES``) at test size: T = 37 (not a multiple
    of block, chunk or tile), K = 4, E = max(16, 4 R) so every rank holds at least K experts."""
    R, K, T = world_size, 4, 37
    E = max(16, 4 * R)
    rt, placement = edge_case(case, R, T, E, K, seed=R * 100 + len(case))
    placement = placement or Placement.contiguous(E, R)
    cfg = PlanConfig(
        R,
        placement.slots_per_rank,
        K,
        max_tokens=40,
        capacity=40 * K * R,
        block_m=8,
        chunk=3,
        token_saving=token_saving,
    )
    return rt, placement, cfg
