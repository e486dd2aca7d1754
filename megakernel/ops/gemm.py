"""The experts' GEMMs: GEMM1 with its SwiGLU epilogue, and the down projection (DESIGN §5).

Shape legend: H hidden, I expert FFN width, L local slots per rank, C receive rows per rank (the
capacity), BM / BN / BK GEMM block sizes.

- ``tile_expert_gemm``: one ``[BM, BN]`` block of an expert's first GEMM, A rows gathered
  through ``recv_src`` (so no resolve copy is needed), the weights loaded by TMA or by pointers,
  bf16/fp16 in, fp32 accumulate, with the gated epilogue (``silu(x @ w_gate^T) * (x @ w_up^T)``,
  or ``MoEShape.activation``'s other, with the biases where the experts have them) or the raw
  ``x @ w13^T``.
- ``tile_down_gemm``: one fp32 ``[BM, BN]`` block of ``act @ w2^T``, for the combine put.
- ``gemm1_task`` / ``down_task``: the scheduler's task bodies: wait for the tile's inputs
  (bounded), run the tile, publish what later tasks wait on. With FP8 (``MoEShape.fp8``) they
  run ``megakernel.ops.fp8``'s block-scaled tiles instead.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megakernel.ops.activation import ACT_SILU, bias_row, glu
from megakernel.ops.combine import tile_combine_put
from megakernel.ops.dispatch import tile_resolve_rows
from megakernel.ops.fp8 import FP8_BLOCK, tile_down_fp8, tile_gemm1_fp8
from megakernel.tasks import (
    FLAG_ACT_READY,
    FLAG_EXPERT_READY,
    FLAG_ROWS_RESOLVED,
    PROBE_COMM,
    PROBE_COMPUTE,
)
from symm_mem.device import INTERPRET, globaltimer, wait_flag, wait_flags

# NOTE: the interpreter's bf16 tl.dot returns garbage (fp16 and fp32 are right): there, and only
# there, the products take fp32 inputs (compiled kernels feed wgmma the bf16 tiles as they are)
DOT_UPCAST = tl.constexpr(INTERPRET)

# columns of the plan's tile table: (local slot, first row, rows, first source rank, last source
# rank, the tile's index among its slot's tiles, its slot's tiles), all within the round; local
# slot -1: no tile
TILE_COLS = tl.constexpr(7)


@triton.jit
def mma(a, b, acc):
    """``acc + a @ b``, fp32 accumulation (fp32 inputs under the interpreter: ``DOT_UPCAST``)."""
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit
def tile_expert_gemm(
    recv_x_ptr,  # [C, H] this rank's receive rows (this call's parity)
    recv_src_ptr,  # [C] row holding each row's data
    w13_ptr,  # [L, 2I, H] gate rows, then up rows, of every local slot
    w13_desc,  # B_TMA: [BN, BK] blocks of w13 as [L * 2I, H]; PAIRS: [1, BN, 2, BK] of [L, I, 2, H]
    out_ptr,  # [C, I] with SWIGLU, else [C, 2I]
    local,
    row0,
    rows,
    n_block,
    H: tl.constexpr,
    I: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWIGLU: tl.constexpr,
    GATHER: tl.constexpr = True,
    B_TMA: tl.constexpr = False,
    PAIRS: tl.constexpr = False,
    b13_ptr=None,  # BIAS: [L, 2I] fp32 gate biases, then up biases
    ACT: tl.constexpr = ACT_SILU,
    BIAS: tl.constexpr = False,
    TAIL: tl.constexpr = 0,
):
    """Output columns ``[n_block * BLOCK_N, +BLOCK_N)`` of rows ``[row0, row0 + rows)``.
    ``GATHER``: A row ``r`` is ``recv_x[recv_src[r]]``; off: ``recv_x[r]`` (rows resolved first).
    ``B_TMA``: the weight blocks come by TMA through ``w13_desc`` (A rows, gathered, cannot),
    which frees the registers and issue slots the [BK, BN] pointer tiles took (perf/NOTES.md,
    "GEMM1 loads its weights by TMA").

    ``PAIRS`` (with ``B_TMA`` and ``SWIGLU``): the descriptor's box brings w13's rows in pairs
    (gate j, up j), so one [BM, 2 BN] product per k step gives both halves, split in registers
    (``KernelConfig.gemm1_pairs``; perf/NOTES.md).

    ``BIAS``: ``b13`` is added to the products (gate and up, or the raw columns); ``ACT``: the
    gated activation (``megakernel.ops.activation.glu``).

    ``TAIL`` (``KernelConfig.tail_rows``): the tile holds up to TAIL rows past BLOCK_M, an
    expert's tail, computed as a second product with the operands swapped, ``w_block @
    tail_rows^T`` (the [BN, BK] weight block as the MMA's A; the tail rows as its [BK, TAIL] B),
    from the weight block the tile's product loaded, so the tail streams no weights of its own;
    its [BN, TAIL] accumulators are transposed for the epilogue. Not with ``PAIRS``: a tile
    with a tail makes gate and up as two products (``_gemm1_tile``), the other tiles stay
    paired.

    NOTE: H must be a multiple of BLOCK_K (checked on the host); rows past ``rows`` read row 0's
    source harmlessly (masked to 0) and are not stored.
    """
    r = tl.arange(0, BLOCK_M)
    live = r < rows
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = _row_pointers(recv_x_ptr, recv_src_ptr, row0, r, live, H, kk, GATHER)
    if TAIL:
        rt = BLOCK_M + tl.arange(0, TAIL)
        live_t = rt < rows
        t_ptrs = _row_pointers(recv_x_ptr, recv_src_ptr, row0, rt, live_t, H, kk, GATHER)
    WIDTH: tl.constexpr = I if SWIGLU else 2 * I
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = (n < WIDTH)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if TAIL:  # the tail's products, transposed: [BN, TAIL] (gate / raw columns, and up)
        acc_t = tl.zeros([BLOCK_N, TAIL], dtype=tl.float32)
        acc_tu = tl.zeros([BLOCK_N, TAIL], dtype=tl.float32)
    if PAIRS:
        # the descriptor views w13 as [L, I, 2, H]: its [1, BN, 2, BK] box holds the rows
        # interleaved (gate j, up j), so one [BM, 2 BN] product per k step, split in registers
        # NOTE: no tail here: as the swapped product's A, the reshaped box goes to registers
        # and ptxas serialises every MMA of the kernel (perf/NOTES.md, "An expert's tail rows")
        tl.static_assert(TAIL == 0, "a paired GEMM1 takes no tail product")
        slot = tl.cast(local, tl.int32)
        n0 = n_block * BLOCK_N
        acc2 = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
        for k in tl.range(0, H // BLOCK_K):
            a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
            b = w13_desc.load([slot, n0, 0, k * BLOCK_K]).reshape([2 * BLOCK_N, BLOCK_K])
            acc2 = mma(a, b.T, acc2)
            a_ptrs += BLOCK_K
        acc, acc_up = tl.split(tl.reshape(acc2, [BLOCK_M, BLOCK_N, 2]))
    elif B_TMA:
        # columns past WIDTH read the next rows (or TMA's zero fill) and are never stored
        n0 = tl.cast(local, tl.int32) * (2 * I) + n_block * BLOCK_N
        for k in tl.range(0, H // BLOCK_K):
            a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
            g = w13_desc.load([n0, k * BLOCK_K])
            acc = mma(a, g.T, acc)
            if TAIL:
                at = tl.load(t_ptrs, mask=live_t[:, None], other=0.0).T
                acc_t = mma(g, at, acc_t)
                t_ptrs += BLOCK_K
            if SWIGLU:
                u = w13_desc.load([n0 + I, k * BLOCK_K])
                acc_up = mma(a, u.T, acc_up)
                if TAIL:
                    acc_tu = mma(u, at, acc_tu)
            a_ptrs += BLOCK_K
    else:
        # B = w^T as a [BLOCK_K, BLOCK_N] view of the [2I, H] weight (H contiguous)
        w = w13_ptr + tl.cast(local, tl.int64) * (2 * I * H)
        gate_ptrs = w + n.to(tl.int64)[None, :] * H + kk[:, None]
        up_ptrs = gate_ptrs + I * H
        for _ in tl.range(0, H // BLOCK_K):
            a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
            g = tl.load(gate_ptrs, mask=n_ok, other=0.0)
            acc = mma(a, g, acc)
            if TAIL:
                at = tl.load(t_ptrs, mask=live_t[:, None], other=0.0).T
                acc_t = mma(g.T, at, acc_t)
                t_ptrs += BLOCK_K
            if SWIGLU:
                u = tl.load(up_ptrs, mask=n_ok, other=0.0)
                acc_up = mma(a, u, acc_up)
                if TAIL:
                    acc_tu = mma(u.T, at, acc_tu)
                up_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
            gate_ptrs += BLOCK_K
    _gemm1_epilogue(
        acc, acc_up, out_ptr, b13_ptr, local, row0, r, live, n, n_ok, I, WIDTH, SWIGLU, ACT, BIAS
    )
    if TAIL:
        _gemm1_epilogue(
            acc_t.T, acc_tu.T, out_ptr, b13_ptr, local, row0, rt, live_t, n, n_ok, I, WIDTH,
            SWIGLU, ACT, BIAS,
        )  # fmt: skip


@triton.jit
def _row_pointers(recv_x_ptr, recv_src_ptr, row0, r, live, H: tl.constexpr, kk, GATHER):
    """``[len(r), BK]`` pointers to the first k step of rows ``row0 + r`` (``GATHER``: the rows
    holding their data, through ``recv_src``; rows not ``live`` read row 0's, harmlessly)."""
    if GATHER:
        src = tl.load(recv_src_ptr + row0 + r, mask=live, other=0).to(tl.int64)
    else:
        src = (row0 + r).to(tl.int64)
    return recv_x_ptr + src[:, None] * H + kk[None, :]


@triton.jit
def _gemm1_epilogue(
    acc, acc_up, out_ptr, b13_ptr, local, row0, r, live, n, n_ok, I: tl.constexpr,
    WIDTH: tl.constexpr, SWIGLU: tl.constexpr, ACT: tl.constexpr, BIAS: tl.constexpr,
):  # fmt: skip
    """Columns ``n`` (``n_ok``: ``[1, BN]``, those under WIDTH) of GEMM1's rows ``row0 + r``
    (``live``) out: the biases added (gate columns n, or the raw columns n of 2I; up columns
    I + n), the gated activation, stored in ``out``'s dtype."""
    if BIAS:
        acc += bias_row(b13_ptr, local, n, 2 * I)
        if SWIGLU:
            acc_up += bias_row(b13_ptr, local, I + n, 2 * I)
    if SWIGLU:
        acc = glu(acc, acc_up, ACT)
    out = out_ptr + (row0 + r).to(tl.int64)[:, None] * WIDTH + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=live[:, None] & n_ok)


@triton.jit
def tile_down_gemm(
    act_ptr,  # [C, I] expert activations in the receive order
    w2_ptr,  # [L, H, I] down projections of every local slot
    w2_desc,  # with B_TMA: a [BLOCK_N, BLOCK_K] block descriptor of w2 as [L * H, I]
    local,
    row0,
    rows,
    n_block,
    H: tl.constexpr,
    I: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    B_TMA: tl.constexpr = False,
    TAIL: tl.constexpr = 0,
):
    """The fp32 ``[BM, BN]`` block ``act[row0 : row0 + rows] @ w2[local, n_block * BN : +BN]^T``
    (rows past ``rows`` are 0). ``B_TMA``: the w2 blocks come by TMA through ``w2_desc``, and
    columns past H hold the next rows' products, which the caller never stores (perf/NOTES.md,
    "The down projection loads w2 by TMA"). NOTE: I must be a multiple of BLOCK_K (checked on
    the host).

    ``TAIL``: returns ``(block, tail)``, the tail the ``[TAIL, BN]`` block of the rows past
    BLOCK_M, computed as ``tile_expert_gemm`` computes its tail (swapped, from the same w2
    block)."""
    r = tl.arange(0, BLOCK_M)
    live = r < rows
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + (row0 + r).to(tl.int64)[:, None] * I + kk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if TAIL:
        rt = BLOCK_M + tl.arange(0, TAIL)
        live_t = rt < rows
        t_ptrs = act_ptr + (row0 + rt).to(tl.int64)[:, None] * I + kk[None, :]
        acc_t = tl.zeros([BLOCK_N, TAIL], dtype=tl.float32)  # transposed
    if B_TMA:
        n0 = tl.cast(local, tl.int32) * H + n_block * BLOCK_N
        for k in tl.range(0, I // BLOCK_K):
            a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
            b = w2_desc.load([n0, k * BLOCK_K])
            acc = mma(a, b.T, acc)
            if TAIL:
                acc_t = mma(b, tl.load(t_ptrs, mask=live_t[:, None], other=0.0).T, acc_t)
                t_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
    else:
        n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = (n < H)[None, :]
        # B = w2^T as a [BLOCK_K, BLOCK_N] view of the [H, I] weight (I contiguous)
        w2 = w2_ptr + tl.cast(local, tl.int64) * (H * I)
        b_ptrs = w2 + n.to(tl.int64)[None, :] * I + kk[:, None]
        for _ in tl.range(0, I // BLOCK_K):
            a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok, other=0.0)
            acc = mma(a, b, acc)
            if TAIL:
                acc_t = mma(b.T, tl.load(t_ptrs, mask=live_t[:, None], other=0.0).T, acc_t)
                t_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    if TAIL:
        return acc, acc_t.T
    else:
        return acc


@triton.jit
def _wait_tile_rows(j, tile, local, plan, mine, state, rank, epoch, deadline, M: tl.constexpr):
    """Wait (bounded) until every row of ``tile`` (of local slot ``local``) has arrived: the
    ``expert_ready`` flags of the sources its rows come from (every source of its expert without
    ``PER_TILE``), and with token saving of every earlier local slot too, since a row may take
    its data from the token's first slot. Returns whether they all arrived."""
    row = plan.tiles + tile * TILE_COLS
    # NOTE: at least 64 flags, masked beyond L: with fewer (L_P R_P < 64: gpt_oss and mixtral at
    # R = 1, mixtral at R = 2) ptxas built GEMM1's MMA descriptors in plain registers and moved
    # them over (R2UR) before every MMA of the k loop; the compile tests hold it to none
    LANES: tl.constexpr = max(M.L_P, 64 // M.R_P)
    lo = tl.arange(0, LANES)[:, None]
    s = tl.arange(0, M.R_P)[None, :]
    if M.TOKEN_SAVING:
        want = (lo <= local) & (s < M.R)  # a row's data may sit in the token's first slot
    else:
        want = (lo == local) & (s < M.R)
    if M.PER_TILE:
        want = want & (s >= tl.load(row + 3))
        want = want & (s <= tl.load(row + 4))
    flags = tl.reshape(mine.expert_ready + lo * M.R + s, [LANES * M.R_P])
    mask = tl.reshape(want, [LANES * M.R_P])
    task = M.MAX_DISPATCH + j
    return wait_flags(flags, mask, epoch, deadline, state.err, rank, FLAG_EXPERT_READY, task)


@triton.jit
def gemm1_coords(j, tiles_ptr, GROUP: tl.constexpr, NB: tl.constexpr):
    """GEMM1 task ``j`` -> (tile, column block), ``NB`` column blocks a tile.

    ``GROUP`` 1: tile-major, a tile's blocks in a row. Else each slot's tiles go in chunks of at
    most ``GROUP`` (its first ``GROUP`` tiles, the next ``GROUP``, ...) and a chunk's tasks run
    column block major: block 0 of each of its tiles, then block 1, ... So the tiles of one
    expert read each weight block within a few ids of each other and all but the first find it
    in L2, where tile-major they read it ``NB`` ids apart (``KernelConfig.gemm1_group``). A chunk
    takes the ids its tiles take tile-major, so the tile table's row ``j // NB`` names the chunk
    (its columns 5 and 6); a tile's block 0 still precedes its other blocks."""
    u = j // NB
    if GROUP == 1:
        return u, j - u * NB
    row = tiles_ptr + u * TILE_COLS
    m = tl.load(row + 5)  # u's index among its slot's tiles
    first_m = m // GROUP * GROUP  # the chunk's first, by the same index
    first = u - (m - first_m)
    size = tl.minimum(GROUP, tl.load(row + 6) - first_m)
    w = j - first * NB
    return first + w % size, w // size


@triton.jit
def gemm1_task(
    j, w13_ptr, w13_desc, w13_tail_desc, act_ptr, scales, biases, plan, mine, state, rank, epoch,
    deadline, M: tl.constexpr,
):  # fmt: skip
    """GEMM1 task ``j``: wait for its tile's rows, then GEMM its column block (``gemm1_coords``
    name both; or, in mode "dispatch", resolve the tile's rows). In the layer, the tile's last
    column block out publishes ``act_ready[tile] = epoch``. Without ``GATHER_A`` (and with token
    saving) column block 0 first resolves the tile's rows in place and publishes
    ``resolved[tile] = epoch``, which the tile's other blocks (higher ids on this rank) wait
    for. Returns the nanoseconds it waited (with TRACE; else 0)."""
    tile, n_block = gemm1_coords(j, plan.tiles, M.GEMM1_GROUP, M.GEMM1_BLOCKS)
    MOST: tl.constexpr = M.BLOCK_M + M.TAIL_ROWS  # rows a tile may hold
    row = plan.tiles + tile * TILE_COLS
    local = tl.load(row)
    row0 = tl.load(row + 1)
    rows = tl.load(row + 2)
    waited = tl.zeros((), tl.int64)
    if M.TRACE:
        waited = globaltimer()
    arrived = _wait_tile_rows(j, tile, local, plan, mine, state, rank, epoch, deadline, M)
    if M.TRACE:
        waited = globaltimer() - waited
    parity = epoch % 2
    recv_x = mine.recv_x + parity * (M.C * M.H)
    recv_src = mine.recv_src + parity * M.C
    if arrived:
        if M.GEMM and M.TOKEN_SAVING and not M.GATHER_A:
            # rows that take their data from the token's first slot get a copy of it first
            if n_block == 0:
                tile_resolve_rows(recv_x, recv_src, row0, rows, M.H, M.CHUNK, M.BLOCK_H, MOST)
                tl.debug_barrier()  # every thread's copies before the release
                value = tl.cast(epoch, tl.int64)
                tl.atomic_xchg(state.resolved + tile, value, sem="release", scope="gpu")
            else:
                if M.TRACE:
                    waited -= globaltimer()
                flag = FLAG_ROWS_RESOLVED + tile
                task = M.MAX_DISPATCH + j
                arrived = wait_flag(
                    state.resolved + tile, epoch, deadline, state.err, rank, flag, task
                )
                if M.TRACE:
                    waited += globaltimer()
    if arrived:
        if M.GEMM:
            if M.PROBE != PROBE_COMM:
                if M.TAIL_ROWS and rows > M.BLOCK_M:
                    # gate and up as two products (w13_tail_desc): see tile_expert_gemm's TAIL
                    _gemm1_tile(
                        n_block, w13_ptr, w13_tail_desc, act_ptr, scales, biases, mine, recv_x,
                        recv_src, local, row0, rows, parity, M, M.BLOCK_M, M.TAIL_ROWS,
                    )  # fmt: skip
                elif M.HALF_TILES and rows <= M.BLOCK_M // 2:
                    _gemm1_tile(
                        n_block, w13_ptr, w13_desc, act_ptr, scales, biases, mine, recv_x,
                        recv_src, local, row0, rows, parity, M, M.BLOCK_M // 2,
                    )  # fmt: skip
                else:
                    _gemm1_tile(
                        n_block, w13_ptr, w13_desc, act_ptr, scales, biases, mine, recv_x,
                        recv_src, local, row0, rows, parity, M, M.BLOCK_M,
                    )  # fmt: skip
            if M.LAYER:
                _publish_activations(tile, state, epoch, M)
        else:
            tile_resolve_rows(recv_x, recv_src, row0, rows, M.H, M.CHUNK, M.BLOCK_H, MOST)
    return waited


@triton.jit
def _gemm1_tile(
    n_block, w13_ptr, w13_desc, act_ptr, scales, biases, mine, recv_x, recv_src, local, row0,
    rows, parity, M: tl.constexpr, BLOCK_M: tl.constexpr, TAIL: tl.constexpr = 0,
):  # fmt: skip
    """GEMM1 column block ``n_block`` of a tile, ``BLOCK_M`` rows high (``rows`` of them
    live; with ``TAIL``, up to TAIL rows past them too, and gate and up as two products, from
    ``[BN, BK]`` boxes of ``w13_desc``)."""
    if M.FP8:
        x_scale = mine.recv_scale + parity * (M.C * M.H // FP8_BLOCK)
        tile_gemm1_fp8(
            recv_x, x_scale, recv_src, w13_ptr, scales.w13, act_ptr, scales.act, local, row0,
            rows, n_block, M.H, M.I, BLOCK_M, w13_desc, M.GEMM1_TMA, M.FP8_PROMOTE_K,
            biases.b13, M.ACT, M.BIAS,
        )  # fmt: skip
    else:
        tile_expert_gemm(
            recv_x, recv_src, w13_ptr, w13_desc, act_ptr, local, row0, rows, n_block, M.H, M.I,
            BLOCK_M, M.BLOCK_N, M.BLOCK_K, M.SWIGLU, M.GATHER_A, M.GEMM1_TMA,
            M.PAIRS and not TAIL, biases.b13, M.ACT, M.BIAS, TAIL,
        )  # fmt: skip


@triton.jit
def _publish_activations(tile, state, epoch, M: tl.constexpr):
    """Count this GEMM1 task's arrival on its tile; the last one publishes ``act_ready[tile]``."""
    tl.debug_barrier()  # every thread's activations before the arrival
    if tl.atomic_add(state.act_done + tile, 1, sem="acq_rel", scope="gpu") == M.GEMM1_BLOCKS - 1:
        tl.store(state.act_done + tile, 0)  # nobody else touches it again this call
        # a local flag: release at GPU scope is enough (and cheaper than system)
        value = tl.cast(epoch, tl.int64)
        tl.atomic_xchg(state.act_ready + tile, value, sem="release", scope="gpu")


@triton.jit
def down_task(
    tile, n_block, task, w2_ptr, w2_desc, act_ptr, scales, biases, pending_row, plan, peers,
    mine, state, rank, epoch, deadline, M: tl.constexpr,
):  # fmt: skip
    """Down-projection task ``task`` (``tile``, column block ``n_block`` of H): wait for the
    tile's activations (GEMM1 tasks of this rank with lower ids), GEMM and put the rows to their
    source ranks (``pending_row``: this program's uncounted combine pieces)."""
    waited = tl.zeros((), tl.int64)
    if M.TRACE:
        waited = globaltimer()
    flag = FLAG_ACT_READY + tile
    ready = wait_flag(state.act_ready + tile, epoch, deadline, state.err, rank, flag, task)
    if M.TRACE:
        waited = globaltimer() - waited
    if ready:
        row = plan.tiles + tile * TILE_COLS
        local = tl.load(row)
        row0 = tl.load(row + 1)
        rows = tl.load(row + 2)
        recv_tag = mine.recv_tag + (epoch % 2) * M.C
        if M.TAIL_ROWS and rows > M.BLOCK_M:
            _down_tile(
                local, row0, rows, n_block, w2_ptr, w2_desc, act_ptr, scales, biases, recv_tag,
                pending_row, peers, mine, M, M.BLOCK_M, M.TAIL_ROWS,
            )  # fmt: skip
        elif M.HALF_TILES and rows <= M.BLOCK_M // 2:
            _down_tile(
                local, row0, rows, n_block, w2_ptr, w2_desc, act_ptr, scales, biases, recv_tag,
                pending_row, peers, mine, M, M.BLOCK_M // 2,
            )  # fmt: skip
        else:
            _down_tile(
                local, row0, rows, n_block, w2_ptr, w2_desc, act_ptr, scales, biases, recv_tag,
                pending_row, peers, mine, M, M.BLOCK_M,
            )  # fmt: skip
    return waited


@triton.jit
def _down_tile(
    local, row0, rows, n_block, w2_ptr, w2_desc, act_ptr, scales, biases, recv_tag, pending_row,
    peers, mine, M: tl.constexpr, BLOCK_M: tl.constexpr, TAIL: tl.constexpr = 0,
):  # fmt: skip
    """Column block ``n_block`` of a tile's down projection, ``BLOCK_M`` rows high (``rows`` of
    them live; with ``TAIL``, up to TAIL rows past them too), with the slot's ``b2`` added
    where the experts have biases, put to the rows' source ranks (whose top-k reduce weights
    it)."""
    if M.PROBE == PROBE_COMM:
        acc = tl.full([BLOCK_M, M.DOWN_BLOCK_N], 0.0, tl.float32)
        if TAIL:
            acc_t = tl.full([TAIL, M.DOWN_BLOCK_N], 0.0, tl.float32)
    elif M.FP8:
        acc = tile_down_fp8(
            act_ptr, scales.act, w2_ptr, scales.w2, local, row0, rows, n_block, M.H, M.I,
            BLOCK_M, M.DOWN_BLOCK_N, w2_desc, M.DOWN_TMA, M.FP8_PROMOTE_K,
        )  # fmt: skip
    elif TAIL:
        acc, acc_t = tile_down_gemm(
            act_ptr, w2_ptr, w2_desc, local, row0, rows, n_block, M.H, M.I, BLOCK_M,
            M.DOWN_BLOCK_N, M.DOWN_BLOCK_K, M.DOWN_TMA, TAIL,
        )  # fmt: skip
    else:
        acc = tile_down_gemm(
            act_ptr, w2_ptr, w2_desc, local, row0, rows, n_block, M.H, M.I, BLOCK_M,
            M.DOWN_BLOCK_N, M.DOWN_BLOCK_K, M.DOWN_TMA,
        )  # fmt: skip
    # with a tail, a run of one token block's rows may cross into it: the block's run ends at
    # its last row, BLOCK_M - 1, and the tail's starts again
    head = BLOCK_M if TAIL else rows
    _down_put(acc, local, row0, head, n_block, biases, recv_tag, pending_row, peers, mine, M)
    if TAIL:
        _down_put(
            acc_t, local, row0 + BLOCK_M, rows - BLOCK_M, n_block, biases, recv_tag, pending_row,
            peers, mine, M,
        )  # fmt: skip


@triton.jit
def _down_put(
    acc, local, row0, rows, n_block, biases, recv_tag, pending_row, peers, mine, M: tl.constexpr
):  # fmt: skip
    """A down block's rows ``[row0, row0 + rows)`` (``acc``: as many rows high as it has) out:
    the slot's ``b2`` added where the experts have biases, put to their source ranks."""
    if M.BIAS:
        if M.PROBE != PROBE_COMM:
            cols = n_block * M.DOWN_BLOCK_N + tl.arange(0, M.DOWN_BLOCK_N)
            acc += bias_row(biases.b2, local, cols, M.H)
    tile_combine_put(
        acc, recv_tag, peers.combine_y, pending_row, mine.combine_y, row0, rows, n_block, M.H,
        M.K, M.TK, M.COMBINE_BLOCK, M.TOKEN_BLOCKS, acc.shape[0], M.DOWN_BLOCK_N,
        M.PROBE != PROBE_COMPUTE,
    )  # fmt: skip
