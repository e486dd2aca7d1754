"""Dispatch: token rows into the destinations' receive buffers (DESIGN §4).

Shape legend: T tokens on this rank, H hidden, K top-k, L local slots per rank, C receive rows
per rank (the capacity).

Receive side of one call (one parity of the double-buffered symmetric buffers):
  ``recv_x [C, H]``   rows in the receive order of DESIGN §4 (local slot, source rank, token);
  ``recv_src [C]``    for every row, the row that holds its data: itself, or with token saving
                      the token's first slot on this rank (an earlier or equal local slot);
  ``recv_scale [C, H / 128]``  FP8 only: the fp32 scales of each data row's e4m3 ``recv_x``.

- ``tile_dispatch_put``: a chunk of one send group's units. Each unit's token row is stored once
  into the destination's ``recv_x`` (a peer address; FP8: quantised on the way, its scales into
  ``recv_scale``), and every slot it feeds there gets its ``recv_src`` entry.
- ``tile_resolve_rows``: copies the indirect rows of one GEMM tile in place, so ``recv_x`` holds
  every row (mode "dispatch", and GEMM1 with ``KernelConfig(pack="scan")``).
- ``dispatch_task``: one task of the plan's dispatch table: ``tile_dispatch_put``, then the send
  group's last task publishes the group on the destination (``expert_ready``). In a round after
  the first, it first waits until the destination has finished the round before
  (``round_free``): the round's rows reuse its receive rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megakernel.ops.fp8 import FP8_BLOCK, quantize_copy_rows
from megakernel.tasks import FLAG_ROUND_FREE
from symm_mem.device import peer_ptr, wait_flag

# columns of the plan's dispatch task table: (send group, first unit, units, tasks of the group
# in the round)
DISPATCH_TASK_COLS = tl.constexpr(4)


@triton.jit
def tile_dispatch_put(
    x_ptr,  # [T, H] this rank's tokens
    send_units_ptr,  # [U_max] token * K + k in send order
    phys_ptr,  # [T, K] physical slot of every (token, k), -1 dropped
    slot_pos_ptr,  # [T, K] row of every (token, k) at its destination
    data_pos_ptr,  # [T, K] row that carries the token's data there
    recv_x_dst,  # destination's recv_x [C, H] (peer address, this call's parity)
    recv_src_dst,  # destination's recv_src [C] (peer address, this call's parity)
    recv_tag_dst,  # destination's recv_tag [C] (peer address, this call's parity), if TAG
    recv_scale_dst,  # FP8: destination's recv_scale [C, H / 128] (peer address, call's parity)
    tag_base,  # this rank * T_max * K: tags name (source rank, token * K + k)
    start,
    count,
    dst,
    saving,  # token saving this call (with TOKEN_SAVING: a call of one round)
    K: tl.constexpr,
    KP: tl.constexpr,
    L: tl.constexpr,
    H: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TOKEN_SAVING: tl.constexpr,
    TAG: tl.constexpr,
    COPY_STAGES: tl.constexpr = 1,
    FP8: tl.constexpr = False,
):
    """Put units ``send_units[start : start + count]`` (all bound for rank ``dst``). With ``TAG``
    every slot fed also gets its tag, which tells the combine where the slot's output goes. A
    unit feeds every slot of its token at ``dst`` with token saving (``saving``), else its own."""
    i = tl.arange(0, CHUNK)
    live = i < count
    unit = tl.load(send_units_ptr + start + i, mask=live, other=0)
    token = unit // K
    row = tl.load(data_pos_ptr + unit, mask=live, other=0)
    # the slots this unit feeds at dst: itself, and with token saving every slot of the token there
    k = tl.arange(0, KP)[None, :]
    pair = token[:, None] * K + k
    in_k = live[:, None] & (k < K)
    if TOKEN_SAVING:
        phys = tl.load(phys_ptr + pair, mask=in_k, other=-1)
        feeds = in_k & tl.where(saving, (phys >= 0) & (phys // L == dst), pair == unit[:, None])
    else:
        feeds = in_k & (pair == unit[:, None])
    slot_row = tl.load(slot_pos_ptr + pair, mask=feeds, other=0)
    tl.store(recv_src_dst + slot_row, tl.broadcast_to(row[:, None], (CHUNK, KP)), mask=feeds)
    if TAG:
        tl.store(recv_tag_dst + slot_row, tag_base + pair, mask=feeds)
    src = x_ptr + token.to(tl.int64)[:, None] * H
    out = recv_x_dst + row.to(tl.int64)[:, None] * H
    if FP8:
        scales = recv_scale_dst + row.to(tl.int64)[:, None] * (H // FP8_BLOCK)
        # at least one scale group a step (BLOCK_H is a power of two)
        STEP: tl.constexpr = BLOCK_H if BLOCK_H > FP8_BLOCK else FP8_BLOCK
        quantize_copy_rows(src, out, scales, live[:, None], H, CHUNK, STEP)
    else:
        copy_rows(src, out, live[:, None], H, BLOCK_H, COPY_STAGES)


@triton.jit
def copy_rows(
    src_rows, out_rows, live, H: tl.constexpr, BLOCK_H: tl.constexpr, STAGES: tl.constexpr = 1
):
    """``out_rows[i, :H] = src_rows[i, :H]`` where ``live[i]``, BLOCK_H columns at a time
    (``src_rows`` / ``out_rows``: [N, 1] row pointers, ``live``: [N, 1]). ``STAGES`` > 1 loads
    that many column steps ahead (through shared memory)."""
    for h0 in tl.range(0, H, BLOCK_H, num_stages=STAGES):
        h = h0 + tl.arange(0, BLOCK_H)[None, :]
        m = live & (h < H)
        tl.store(out_rows + h, tl.load(src_rows + h, mask=m), mask=m)


@triton.jit
def tile_resolve_rows(
    recv_x_ptr,  # [C, H] this rank's receive rows (this call's parity)
    recv_src_ptr,  # [C]
    row0,
    rows,
    H: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Copy rows ``[row0, row0 + rows)`` that point elsewhere from the row holding their data.

    NOTE: a data row never points elsewhere, so tiles resolving at the same time never write a
    row another one reads.
    """
    for m0 in tl.range(0, BLOCK_M, CHUNK):
        r = m0 + tl.arange(0, CHUNK)
        live = r < rows
        src = tl.load(recv_src_ptr + row0 + r, mask=live, other=0)
        moved = (live & (src != row0 + r))[:, None]
        src_rows = recv_x_ptr + src.to(tl.int64)[:, None] * H
        out_rows = recv_x_ptr + (row0 + r).to(tl.int64)[:, None] * H
        copy_rows(src_rows, out_rows, moved, H, BLOCK_H)


@triton.jit
def dispatch_task(
    d, x_ptr, plan, peers, mine, state, rank, epoch, rnd, deadline, M: tl.constexpr
):  # fmt: skip
    """Run dispatch task ``d`` (a row of ``plan.dispatch_tasks``, the tables of round ``rnd``);
    the send group's last task of the round raises its flag(s) on the destination. ``plan`` /
    ``peers`` / ``mine`` / ``state``: the kernel's buffer groups (``megakernel.kernel``), ``M``
    its ``KernelMeta``."""
    row = plan.dispatch_tasks + d * DISPATCH_TASK_COLS
    g = tl.load(row)
    start = tl.load(row + 1)
    count = tl.load(row + 2)
    if M.SORTED:
        dst = g % M.R
    else:
        dst = g
    if M.ROUNDS > 1:
        if rnd > 0:  # the destination's previous round has read its receive rows
            free = peer_ptr(peers.round_free, dst, mine.round_free) + rnd - 1
            if not wait_flag(free, epoch, deadline, state.err, rank, FLAG_ROUND_FREE + dst, d):
                return
    parity = epoch % 2
    tile_dispatch_put(
        x_ptr,
        plan.send_units,
        plan.phys,
        plan.slot_pos,
        plan.data_pos,
        peer_ptr(peers.recv_x, dst, mine.recv_x) + parity * (M.C * M.H),
        peer_ptr(peers.recv_src, dst, mine.recv_src) + parity * M.C,
        peer_ptr(peers.recv_tag, dst, mine.recv_tag) + parity * M.C,
        peer_ptr(peers.recv_scale, dst, mine.recv_scale) + parity * (M.C * M.H // FP8_BLOCK),
        rank * M.TK,
        start,
        count,
        dst,
        tl.load(plan.stats + 4) == 1,
        M.K,
        M.K_P,
        M.L,
        M.H,
        M.CHUNK,
        M.BLOCK_H,
        M.TOKEN_SAVING,
        M.LAYER,
        M.COPY_STAGES,
        M.FP8,
    )
    tl.debug_barrier()  # every thread's puts before the arrival below
    _publish_group(g, dst, tl.load(row + 3), peers, mine, state, rank, epoch, M)


@triton.jit
def _publish_group(g, dst, num_chunks, peers, mine, state, rank, epoch, M: tl.constexpr):
    """Count this task's arrival in send group ``g`` (``num_chunks`` tasks this round); the last
    one raises ``expert_ready[local, rank] = epoch`` on ``dst`` (the group's local slot, or
    every slot when unsorted: the round's flags)."""
    # NOTE: acq_rel at system scope: the last arrival's release below then covers the puts of
    # every earlier task of the group (they released into this counter)
    if tl.atomic_add(state.group_done + g, 1, sem="acq_rel", scope="sys") == num_chunks - 1:
        tl.store(state.group_done + g, 0)  # nobody else touches it again this call
        local = tl.arange(0, M.L_P)
        if M.SORTED:
            mine_slots = local == g // M.R
        else:
            mine_slots = local < M.L
        flags = peer_ptr(peers.expert_ready, dst, mine.expert_ready) + local * M.R + rank
        value = tl.full([M.L_P], 0, tl.int64) + tl.cast(epoch, tl.int64)
        tl.atomic_xchg(flags, value, mask=mine_slots, sem="release", scope="sys")
