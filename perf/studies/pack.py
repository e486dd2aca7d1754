"""Local token packing: group token rows by expert before the expert GEMM. A study, kept out of
the runtime: the layer keeps its answer, "gather", as the rule of ``KernelConfig.gather_a``.

Input: ``x [T, H]`` token rows and ``topk_ids [T, K]`` (expert ids in [0, E), -1 dropped).
Output, the same for every strategy (``Packed``): rows in **expert-major, then token order**
(DESIGN §4.2's receive order with one source rank):
  - ``expert_start [E + 1]``: expert e owns rows ``[expert_start[e], expert_start[e + 1])``;
  - ``pos [T, K]``: the row of each (token, k), -1 where dropped;
  - ``src [T * K]``: the token of each row, -1 past the last row;
  - ``rows [T * K, H]``: ``x[src]``, or None where the strategy leaves the rows in place.

Strategies, each a point between synchronisation cost and GEMM efficiency:
  - ``sort``: a global stable sort of the (expert, token) keys (torch's radix sort: several
    passes, no write conflicts), then one gather copy of the rows;
  - ``atomic``: one histogram pass of atomic adds, then one scatter pass in which every (token, k)
    takes its row from an atomic cursor of its expert and copies its row there. Under skew, many
    programs hit the same cursor. On the GPU the order *within* an expert follows the atomics,
    not the tokens (the interpreter runs programs in order, so it matches exactly there);
  - ``scan``: block-cooperative: a histogram per chunk of 64 (token, k) pairs, a prefix sum over
    the chunks, then conflict-free writes in token order (the plan's scheme, DESIGN §4);
  - ``gather``: no packing. The scan's index tables only; the GEMM's A load gathers rows by
    ``src`` (``tile_expert_gemm`` reads ``rows[src[row]]`` in every mode).

``grouped_gemm1`` runs the expert GEMM + SwiGLU on either form; ``pack_ref`` is the sequential
reference (one write pointer per expert).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megakernel.config import pow2
from megakernel.ops.dispatch import copy_rows
from megakernel.ops.gemm import tile_expert_gemm
from megakernel.plan.layout import chunk_ranks, count_at_most
from megakernel.validate import check_routing

STRATEGIES = ("sort", "atomic", "scan", "gather")
CHUNK_ELEMS = 64  # (token, k) pairs per chunk of the scan strategy
COPY_BLOCK_H = 256  # row columns per step of the row copies


@dataclass
class Packed:
    expert_start: torch.Tensor  # [E + 1] int32
    pos: torch.Tensor  # [T, K] int32, -1 dropped
    src: torch.Tensor  # [T * K] int32, -1 past the last row
    rows: torch.Tensor | None  # [T * K, H] x[src] (rows past the last are unspecified)

    @property
    def num_rows(self) -> int:
        return int(self.expert_start[-1])


def _check(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> None:
    """x [T, H] beside topk_ids [T, K]; the ids themselves as every entry point checks them."""
    if x.dim() != 2 or topk_ids.dim() != 2 or x.shape[0] != topk_ids.shape[0]:
        raise ValueError(
            f"x must be [T, H] and topk_ids [T, K]; got {list(x.shape)} and {list(topk_ids.shape)}"
        )
    check_routing(
        topk_ids,
        None,
        num_experts=num_experts,
        topk=topk_ids.shape[1],
        max_tokens=x.shape[0],
        device=x.device,
    )


def pack_ref(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> Packed:
    """Sequential reference on the CPU: walk the (token, k) pairs in order, one write pointer
    per expert (after a counting pass)."""
    _check(x, topk_ids, num_experts)
    x, ids = x.cpu(), topk_ids.cpu().long()
    T, K = ids.shape
    counts = torch.bincount(ids[ids >= 0], minlength=num_experts)
    start = torch.zeros(num_experts + 1, dtype=torch.int64)
    start[1:] = torch.cumsum(counts, 0)
    cursor = start[:-1].clone()
    pos = torch.full((T, K), -1, dtype=torch.int64)
    src = torch.full((T * K,), -1, dtype=torch.int64)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            if e >= 0:
                pos[t, k] = cursor[e]
                src[cursor[e]] = t
                cursor[e] += 1
    rows = torch.zeros(T * K, x.shape[1], dtype=x.dtype)
    n = int(start[-1])
    rows[:n] = x[src[:n]]
    i32 = torch.int32
    return Packed(start.to(i32), pos.to(i32), src.to(i32), rows)


# ----------------------------------------------------------------------------- row copies


@triton.jit
def _copy_rows(x_ptr, out_ptr, src_row, dst_row, live, H: tl.constexpr, BH: tl.constexpr):
    """``out[dst_row[i]] = x[src_row[i]]`` where ``live[i]``, BH columns at a time."""
    src = x_ptr + src_row.to(tl.int64)[:, None] * H
    copy_rows(src, out_ptr + dst_row.to(tl.int64)[:, None] * H, live[:, None], H, BH)


@triton.jit
def _gather_kernel(x_ptr, src_ptr, out_ptr, n, H: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr):
    """``out[i] = x[src[i]]`` for rows i < n with ``src[i] >= 0``."""
    i = tl.program_id(0) * BR + tl.arange(0, BR)
    s = tl.load(src_ptr + i, mask=i < n, other=-1)
    _copy_rows(x_ptr, out_ptr, s, i, s >= 0, H, BH)


# ----------------------------------------------------------------------------- atomic


@triton.jit
def _atomic_count_kernel(ids_ptr, counts_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + i, mask=i < n, other=-1)
    tl.atomic_add(counts_ptr + tl.where(e >= 0, e, 0), 1, mask=e >= 0, sem="relaxed")


@triton.jit
def _atomic_scatter_kernel(
    x_ptr,
    ids_ptr,
    cursor_ptr,
    pos_ptr,
    src_ptr,
    out_ptr,
    T,
    K: tl.constexpr,
    KP: tl.constexpr,
    H: tl.constexpr,
    BT: tl.constexpr,
    BH: tl.constexpr,
):
    """Each (token, k) takes the next row of its expert from an atomic cursor and copies the
    token's row there."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)[:, None]
    k = tl.arange(0, KP)[None, :]
    inside = (t < T) & (k < K)
    e = tl.load(ids_ptr + t * K + k, mask=inside, other=-1)
    live = e >= 0
    row = tl.atomic_add(cursor_ptr + tl.where(live, e, 0), 1, mask=live, sem="relaxed")
    tl.store(pos_ptr + t * K + k, tl.where(live, row, -1), mask=inside)
    tl.store(src_ptr + row, tl.broadcast_to(t, (BT, KP)), mask=live)
    token = tl.reshape(tl.broadcast_to(t, (BT, KP)), [BT * KP])
    _copy_rows(
        x_ptr, out_ptr, token, tl.reshape(row, [BT * KP]), tl.reshape(live, [BT * KP]), H, BH
    )


# ----------------------------------------------------------------------------- scan


@triton.jit
def _chunk_hist_kernel(ids_ptr, hist_ptr, n, EP: tl.constexpr, CE: tl.constexpr):
    """Experts per chunk of CE (token, k) pairs: ``hist [EP, chunks]`` (expert-major, so the
    prefix over chunks runs along contiguous rows)."""
    c = tl.program_id(0)
    i = c * CE + tl.arange(0, CE)
    e = tl.load(ids_ptr + i, mask=i < n, other=-1)
    h = tl.histogram(tl.where(e >= 0, e, 0), EP, mask=e >= 0)
    tl.store(hist_ptr + tl.arange(0, EP) * tl.num_programs(0) + c, h)


@triton.jit
def _scan_write_kernel(
    x_ptr,
    ids_ptr,
    before_ptr,
    pos_ptr,
    src_ptr,
    out_ptr,
    n,
    K: tl.constexpr,
    EP: tl.constexpr,
    H: tl.constexpr,
    CE: tl.constexpr,
    BH: tl.constexpr,
    COPY: tl.constexpr,
):
    """Chunk c's rows: ``before[e, c]`` (expert start + rows of e in earlier chunks) plus the
    rank within the chunk; conflict-free writes, in token order."""
    c = tl.program_id(0)
    i = c * CE + tl.arange(0, CE)
    e = tl.load(ids_ptr + i, mask=i < n, other=-1)
    live = e >= 0
    base = tl.load(before_ptr + tl.arange(0, EP) * tl.num_programs(0) + c)
    row = chunk_ranks(e, live, base, CE)
    tl.store(pos_ptr + i, tl.where(live, row, -1), mask=i < n)
    tl.store(src_ptr + row, i // K, mask=live)
    if COPY:
        _copy_rows(x_ptr, out_ptr, i // K, row, live, H, BH)


# ----------------------------------------------------------------------------- host side


ATOMIC_MAX_PAIRS = 16384  # atomic packs fastest below this many (token, k) pairs ...
ATOMIC_MAX_PAIRS_PER_EXPERT = 256  # ... or below this many per expert (little contention)


def choose_strategy(
    num_tokens: int, topk: int, num_experts: int = 1, materialize: bool = False
) -> str:
    """The strategy the sweep found fastest (``perf/sweep_pack.py``, 480 points on an H100,
    perf/results/pack_sweep_H*_nvidia_h100_80gb_hbm3.json, scored by ``perf.pack_report``):

    - pack + grouped GEMM: ``gather`` was fastest at every point (E 8..256, T 1k..32k, K 1..8,
      H 2048 / 7168, uniform and Zipf 0.5..1.5): the GEMM's A load gathers rows as cheaply as
      it reads packed ones, and the rows are never moved;
    - packed rows wanted (``materialize``): ``atomic`` for few pairs, or few per expert (its
      cursors see little contention), else ``scan``; ``sort`` is 1.5-2.5x slower everywhere.
      The rule is within 5% of the best at 474 of 480 points, 9.5% off at worst: atomic's
      contention grows with the skew, which the rule does not see.
    """
    if not materialize:
        return "gather"
    pairs = num_tokens * topk
    few = pairs < ATOMIC_MAX_PAIRS or pairs < ATOMIC_MAX_PAIRS_PER_EXPERT * num_experts
    return "atomic" if few else "scan"


def pack(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    strategy: str | None = None,
    validate: bool = True,
) -> Packed:
    """Pack on the device with ``strategy`` (one of ``STRATEGIES``; None: ``choose_strategy``'s
    pick for pack + GEMM). ``validate`` checks the inputs first (one host sync); without it they
    must be valid. No other host sync, so the call can be captured in a CUDA graph."""
    if strategy is None:
        strategy = choose_strategy(*topk_ids.shape, num_experts)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if validate:
        _check(x, topk_ids, num_experts)
    x = x.contiguous()
    ids = topk_ids.to(torch.int32).contiguous()
    H, E, n, dev = x.shape[1], num_experts, ids.numel(), x.device
    if n == 0:
        empty = torch.empty(0, dtype=torch.int32, device=dev)
        rows = None if strategy == "gather" else x.new_empty(0, H)
        return Packed(torch.zeros(E + 1, dtype=torch.int32, device=dev), ids.clone(), empty, rows)
    start = torch.zeros(E + 1, dtype=torch.int32, device=dev)
    src = torch.full((max(n, 1),), -1, dtype=torch.int32, device=dev)
    rows = None if strategy == "gather" else torch.empty(max(n, 1), H, dtype=x.dtype, device=dev)
    pack_fn = {"sort": _pack_sort, "atomic": _pack_atomic}.get(strategy, _pack_scan)
    return pack_fn(x, ids, E, start, src, rows)


def _pack_sort(x, ids, E: int, start, src, rows) -> Packed:
    """A stable sort of the (expert, token) keys, then one gather copy of the rows."""
    (T, K), n, dev = ids.shape, ids.numel(), x.device
    flat = ids.view(-1).long()
    key = torch.where(flat >= 0, flat, E)  # dropped pairs sort last
    order = torch.sort(key, stable=True).indices
    counts = torch.zeros(E + 1, dtype=torch.int32, device=dev)  # bincount syncs on cuda
    counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    start[1:] = torch.cumsum(counts[:E], 0)
    pos = torch.empty(n, dtype=torch.int32, device=dev)
    pos[order] = torch.arange(n, dtype=torch.int32, device=dev)
    pos = torch.where(flat >= 0, pos, -1).view(T, K)
    src[:n] = torch.where(key[order] < E, order // K, -1).to(torch.int32)
    BR, H = 16, x.shape[1]
    BH = min(COPY_BLOCK_H, pow2(H))
    _gather_kernel[(triton.cdiv(n, BR),)](x, src, rows, n, H=H, BR=BR, BH=BH)
    return Packed(start, pos, src, rows)


def _pack_atomic(x, ids, E: int, start, src, rows) -> Packed:
    """A histogram of atomic adds, then a scatter in which every pair takes its row from an
    atomic cursor of its expert."""
    (T, K), n, dev, H = ids.shape, ids.numel(), x.device, x.shape[1]
    pos = torch.empty(T, K, dtype=torch.int32, device=dev)
    counts = torch.zeros(E, dtype=torch.int32, device=dev)
    _atomic_count_kernel[(triton.cdiv(n, 1024),)](ids, counts, n, BLOCK=1024)
    start[1:] = torch.cumsum(counts, 0)
    cursor = start[:-1].clone()
    BT = max(1, CHUNK_ELEMS // pow2(K))  # a chunk's worth of pairs per program
    BH = min(COPY_BLOCK_H, pow2(H))
    _atomic_scatter_kernel[(triton.cdiv(T, BT),)](
        x, ids, cursor, pos, src, rows, T, K=K, KP=pow2(K), H=H, BT=BT, BH=BH
    )
    return Packed(start, pos, src, rows)


def _pack_scan(x, ids, E: int, start, src, rows) -> Packed:
    """A histogram per chunk of pairs, a prefix over the chunks, then conflict-free writes in
    token order (rows copied for "scan", left in place for "gather")."""
    (T, K), n, dev, H = ids.shape, ids.numel(), x.device, x.shape[1]
    pos = torch.empty(T, K, dtype=torch.int32, device=dev)
    EP, chunks = pow2(E), triton.cdiv(n, CHUNK_ELEMS)
    hist = torch.empty(EP, chunks, dtype=torch.int32, device=dev)
    _chunk_hist_kernel[(chunks,)](ids, hist, n, EP=EP, CE=CHUNK_ELEMS)
    before = torch.cumsum(hist, 1, dtype=torch.int32)
    start[1:] = torch.cumsum(before[:E, -1], 0)
    before -= hist
    before += torch.nn.functional.pad(start[:E], (0, EP - E)).unsqueeze(1)
    copy = rows is not None
    _scan_write_kernel[(chunks,)](
        x, ids, before, pos, src, rows if copy else x, n,
        K=K, EP=EP, H=H, CE=CHUNK_ELEMS, BH=min(COPY_BLOCK_H, pow2(H)), COPY=copy,
    )  # fmt: skip
    return Packed(start, pos, src, rows)


def same_layout(got: Packed, want: Packed, exact_order: bool = True) -> list[str]:
    """Fields of ``got`` that differ from ``want`` (bit for bit). ``exact_order=False`` compares
    each expert's rows as a set of (token, k), for the atomic strategy on the GPU. Either may
    live on any device (compared on the CPU)."""
    got, want = (
        Packed(
            *(t.cpu() if t is not None else None for t in (p.expert_start, p.pos, p.src, p.rows))
        )
        for p in (got, want)
    )
    n = want.num_rows
    wrong = [] if torch.equal(got.expert_start, want.expert_start) else ["expert_start"]
    if wrong:
        return wrong
    if exact_order:
        for name in ("pos", "src"):
            if not torch.equal(getattr(got, name), getattr(want, name)):
                wrong.append(name)
        if got.rows is not None and not torch.equal(got.rows[:n], want.rows[:n]):
            wrong.append("rows")
        return wrong
    # every (token, k) in its expert's range, each row used once, src and rows consistent
    T, K = want.pos.shape
    e_of_row = torch.bucketize(
        got.pos.clamp(min=0).long(), want.expert_start[1:].long(), right=True
    )
    e_want = torch.bucketize(want.pos.clamp(min=0).long(), want.expert_start[1:].long(), right=True)
    live = want.pos >= 0
    if not torch.equal(got.pos < 0, ~live) or not torch.equal(e_of_row[live], e_want[live]):
        wrong.append("pos")
    elif torch.unique(got.pos[live]).numel() != n:
        wrong.append("pos")
    else:
        token = torch.arange(T).unsqueeze(1).expand(T, K)
        if not torch.equal(got.src[got.pos[live].long()], token[live].to(torch.int32)):
            wrong.append("src")
    if "src" not in wrong and got.rows is not None:
        x_rows = want.rows[want.pos[live].long()]  # each (t, k)'s row, as the reference packs it
        if not torch.equal(got.rows[got.pos[live].long()], x_rows):
            wrong.append("rows")
    return wrong


# ----------------------------------------------------------------------------- the GEMM


@triton.jit
def _grouped_gemm1_kernel(
    a_ptr,
    src_ptr,
    w13_ptr,
    out_ptr,
    tile_end_ptr,
    start_ptr,
    E: tl.constexpr,
    EP: tl.constexpr,
    H: tl.constexpr,
    I: tl.constexpr,  # noqa: E741 (the shape legend's I)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Tile m (experts in order, BLOCK_M rows each), column block n: SwiGLU(a[src] @ w13^T)."""
    m = tl.program_id(0)
    ends = tl.load(tile_end_ptr + tl.arange(0, EP), mask=tl.arange(0, EP) < E, other=2**31 - 1)
    e = tl.minimum(count_at_most(ends, tl.full([1], m, tl.int32), EP), E - 1)
    e = tl.sum(e, 0)
    first = tl.load(tile_end_ptr + e - 1, mask=e > 0, other=0)
    row0 = tl.load(start_ptr + e) + (m - first) * BLOCK_M
    rows = tl.minimum(BLOCK_M, tl.load(start_ptr + e + 1) - row0)
    if m < tl.load(tile_end_ptr + E - 1):
        tile_expert_gemm(
            a_ptr,
            src_ptr,
            w13_ptr,
            None,  # the study's GEMM loads w13 by pointers (B_TMA off)
            out_ptr,
            e,
            row0,
            rows,
            tl.program_id(1),
            H,
            I,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            True,
        )


def gemm_rows(packed: Packed) -> torch.Tensor:
    """The index the GEMM's A load goes through: the identity for packed rows, else ``src``."""
    if packed.rows is None:
        return packed.src
    return torch.arange(packed.src.numel(), dtype=torch.int32, device=packed.src.device)


def grouped_gemm1(
    x: torch.Tensor,
    packed: Packed,
    w13: torch.Tensor,
    out: torch.Tensor,
    block_m: int = 128,
    block_n: int = 128,
    block_k: int = 64,
    identity: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[row] = SwiGLU(A[row] @ w13[e]^T)`` for every packed row of expert e, with
    ``A = packed.rows`` or, for ``gather``, ``x[packed.src]`` (gathered in the A load).
    ``w13 [E, 2I, H]``, ``out [T * K, I]``. Grid: the most tiles any routing can need."""
    E, two_i, H = w13.shape
    n = packed.src.numel()
    if H % block_k:
        raise ValueError(f"H = {H} must be a multiple of block_k = {block_k}")
    rows_e = packed.expert_start[1:] - packed.expert_start[:-1]
    tile_end = torch.cumsum((rows_e + block_m - 1) // block_m, 0, dtype=torch.int32)
    a = x if packed.rows is None else packed.rows
    index = (
        packed.src
        if packed.rows is None
        else (identity if identity is not None else gemm_rows(packed))
    )
    grid = (triton.cdiv(n, block_m) + E, triton.cdiv(two_i // 2, block_n))
    _grouped_gemm1_kernel[grid](
        a,
        index,
        w13,
        out,
        tile_end,
        packed.expert_start,
        E=E,
        EP=pow2(E),
        H=H,
        I=two_i // 2,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=8,
        num_stages=3,
    )
    return out


def gemm1_ref(x: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    """fp32 reference: ``[T, K, I]`` SwiGLU(x[t] @ w13[e]^T) per (token, k), 0 where dropped."""
    T, K = topk_ids.shape
    I = w13.shape[1] // 2  # noqa: E741
    out = torch.zeros(T, K, I, dtype=torch.float32, device=x.device)
    for e in torch.unique(topk_ids[topk_ids >= 0]).tolist():
        t, k = (topk_ids == e).nonzero(as_tuple=True)
        h = x[t].float() @ w13[e].float().t()
        out[t, k] = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
    return out
