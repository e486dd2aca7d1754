"""``Megakernel``: the workspace of the megakernel (every buffer it reads and writes) and its
launches; each call returns a ``DispatchHandle`` per rank (``megakernel.handles``).

Shape legend: T tokens on this rank (at most T_max), H hidden, I expert FFN width, E experts, K
top-k, R ranks, L local slots per rank, P = R * L, C receive rows per rank (the capacity).

A call on every local rank: the plan's kernels (``megakernel.plan``), then ``moe_megakernel``
(``megakernel.kernel``) over the call's task ranges. Its arguments are built in one place,
``Megakernel.kernel_args``, by name.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch

from megakernel.config import (
    DISPATCH_ONLY_PROGRAMS_PER_SM,
    KernelConfig,
    KernelMeta,
    check_tma_rows,
    default_capacity,
    kernel_meta,
    pow2,
)
from megakernel.descriptors import WeightDescriptors
from megakernel.errors import CallErrors
from megakernel.handles import CallInputs, DispatchHandle
from megakernel.kernel import (
    ExpertBiases,
    Fp8Scales,
    PlanBuffers,
    RankState,
    SymBuffers,
    moe_megakernel,
)
from megakernel.launch import Launcher, aligned
from megakernel.placement import Placement
from megakernel.plan import MAX_ROUNDS, STATS, PlanConfig, PlanWorkspace
from megakernel.shapes import FP8_BLOCK, MoEShape
from megakernel.tasks import (
    MODES,
    PROBE_COMM,
    PROBE_COMPUTE,
    PROBE_OFF,
    STAGES,
    flag_name,
    task_regions,
)
from megakernel.validate import check_biases_given, check_call_inputs, validate_mode
from symm_mem.buffer import World


class Megakernel:
    """Workspace of the megakernel for every rank this process runs.

    Owns the plan workspace and the symmetric buffers (``sizes()`` lists them):
      ``recv_x [2, C, H]``      receive rows, double-buffered by epoch parity;
      ``recv_src [2, C]``       int32, the row holding each row's data;
      ``expert_ready [rounds, L, R]``  int64 flags: (round, local slot, source rank) -> epoch;
      ``round_free [rounds]``   int64 flags: round -> epoch whose launch of it ended here;
    with ``MoEShape.fp8`` (``recv_x`` then e4m3) also
      ``recv_scale [2, C, H/128]``  fp32 scales of the received rows per 128 columns;
    with ``combine`` (what mode "layer" needs) also
      ``recv_tag [2, C]``       int32, each row's (source rank, token, k): where its output goes;
      ``combine_y [T * K, H]``  the expert outputs of this rank's tokens, one row per (token, k);
      ``combine_count [groups, token blocks]``  int32 pieces arrived per (column group of H,
                                block of ``combine_block`` tokens);
    and per rank ``act [C, I]`` (FP8: e4m3, and its scales ``act_scale [C, I/128]``) and the
    flags and counters of ``RankState``.

    ``combine_y`` needs no second buffer: a peer puts call n + 1's rows only after this rank
    dispatched call n + 1, which its stream orders after call n's top-k reduce.
    """

    def __init__(
        self,
        world: World,
        shape: MoEShape,
        *,
        placement: Placement | None = None,
        config: KernelConfig | None = None,
        capacity: int | None = None,
        swiglu: bool = True,
        combine: bool = True,
    ) -> None:
        self.world, self.shape = world, shape
        self.placement = placement or Placement.contiguous(shape.num_experts, world.world_size)
        self.config = config or KernelConfig()
        if shape.fp8:
            self.config = self.config.for_fp8()
        self.swiglu, self.combine = swiglu, combine
        self._check_config()
        L, K = self.placement.slots_per_rank, shape.topk
        if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be a positive number of rows, got {capacity!r}")
        C = self.capacity = capacity or default_capacity(shape, world.world_size, L)
        self.closed = False
        cfg = self.config
        self.plan_cfg = PlanConfig(
            world.world_size,
            L,
            K,
            max_tokens=shape.max_tokens_per_rank,
            capacity=C,
            block_m=cfg.block_m,
            tail_rows=cfg.tail_rows,
            chunk=cfg.chunk,
            token_saving=cfg.token_saving,
            sorted_dispatch=cfg.sorted_dispatch,
        )
        if combine:  # mode "layer" computes any routing, in rounds where it must
            self.plan_cfg = replace(self.plan_cfg, rounds=self._rounds_needed())
        self.plan_ws = PlanWorkspace(world, self.plan_cfg, self.placement)
        self.sym = self._alloc_symmetric()
        self.num_ctas = cfg.num_ctas or world.sms_per_rank
        own_gpu = world.device.type == "cuda" and not self._ranks_share_a_gpu()
        self.dispatch_only_ctas = cfg.num_ctas or world.sms_per_rank * (
            DISPATCH_ONLY_PROGRAMS_PER_SM if own_gpu else 1
        )
        self._alloc_local()
        self._groups = {r: self._buffer_groups(r) for r in world.local_ranks}
        self._recv_views = {  # by rank, then parity: (recv_x [C, H], recv_src [C])
            r: [(self.sym["recv_x"].peer(r)[p], self.sym["recv_src"].peer(r)[p]) for p in (0, 1)]
            for r in world.local_ranks
        }
        self._kernel = Launcher(moe_megakernel)
        self._options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        self._meta_cache: dict[tuple[str, int], KernelMeta] = {}
        self._descriptors = WeightDescriptors(shape, self.config)
        self.epoch = {r: 0 for r in world.local_ranks}  # host mirror of the plan's device epoch
        # a timeout's flag is named from numbers, not through this workspace: a bound method
        # here would make a reference cycle, which only the cyclic collector frees (the layer's
        # GPU memory with it)
        token_blocks = self.config.token_blocks(shape.max_tokens_per_rank)
        self.errors = CallErrors(
            world, self.plan_ws.routing_err, self.placement.num_experts,
            partial(flag_name, token_blocks=token_blocks, world_size=world.world_size),
        )  # fmt: skip

    def _check_config(self) -> None:
        """The shape and config fit the kernel's tiles and the world's SMs."""
        cfg, shape, world = self.config, self.shape, self.world
        H, I = shape.hidden, shape.ffn
        if H % cfg.block_k:
            raise ValueError(f"hidden size {H} is not a multiple of block_k {cfg.block_k}")
        if cfg.gemm1_tma:
            check_tma_rows("gemm1_tma", "w13", "block_k", cfg.block_k, shape.gemm_dtype)
        if self.combine and not self.swiglu:
            raise ValueError("the combine (mode 'layer') runs on SwiGLU activations: swiglu=True")
        if self.combine and I % cfg.down_block_k:
            raise ValueError(f"ffn size {I} is not a multiple of down_block_k {cfg.down_block_k}")
        if self.combine and cfg.down_tma:
            check_tma_rows("down_tma", "w2", "down_block_k", cfg.down_block_k, shape.gemm_dtype)
        if cfg.tail_rows and cfg.tail_rows < 16 and world.device.type == "cuda":
            raise ValueError(
                f"KernelConfig.tail_rows = {cfg.tail_rows}: a compiled tail product is tail_rows "
                "wide, and Triton's dot takes at least 16 (tail_rows=16, or 0)"
            )
        if self._ranks_share_a_gpu() and cfg.num_ctas > world.sms_per_rank:
            # NOTE: with a GPU per rank, extra programs only queue for an SM: a task waits on
            # tasks claimed before it, by programs that run. Ranks sharing a GPU share its SMs too
            raise ValueError(
                f"KernelConfig.num_ctas = {cfg.num_ctas} is more than the {world.sms_per_rank} "
                f"SMs per rank of a world whose {len(world.local_ranks)} ranks share one GPU: one "
                "rank's programs could hold the SMs its peers need while waiting on those peers"
            )

    def _rounds_needed(self) -> int:
        """Rounds the worst routing takes at this capacity (every rank sends all its tokens to
        one rank); a capacity that would need more than ``MAX_ROUNDS`` is refused."""
        rounds, cfg = self.plan_cfg.rounds_needed(), self.plan_cfg
        if rounds > MAX_ROUNDS:
            slots, worst = min(cfg.topk, cfg.slots_per_rank), cfg.worst_rows
            least = -(-worst // MAX_ROUNDS)
            raise ValueError(
                f"capacity {cfg.capacity} rows: the worst routing sends {worst} rows to one rank "
                f"({cfg.world_size} ranks x {cfg.max_tokens} tokens x {slots} slots), which "
                f"would take {rounds} rounds; at most {MAX_ROUNDS} are allowed, so "
                f"pass capacity >= {least} (or None for the default)"
            )
        return rounds

    def _ranks_share_a_gpu(self) -> bool:
        """Several of this process's ranks run at once on one device (the emulated CUDA world)."""
        return self.world.concurrent and len(self.world.local_ranks) > 1

    def _alloc_symmetric(self) -> dict[str, object]:
        """The symmetric buffers, by ``SymBuffers`` field (collective: the same order on every
        rank). Without ``combine`` the kernel never touches the combine's (LAYER is off)."""
        world, shape, cfg = self.world, self.shape, self.config
        C, H, R, L = self.capacity, shape.hidden, world.world_size, self.plan_cfg.slots_per_rank
        rounds = self.plan_cfg.rounds
        sym = {
            "recv_x": world.alloc((2, C, H), shape.gemm_dtype),
            "recv_src": world.alloc((2, C), torch.int32),
            # a round's flags start 16-byte aligned (the kernels are compiled for that)
            "expert_ready": world.alloc((rounds, _even(L * R)), torch.int64),
            "round_free": world.alloc((max(2, rounds),), torch.int64),
        }
        if shape.fp8:
            sym["recv_scale"] = world.alloc((2, C, H // FP8_BLOCK), torch.float32)
        if self.combine:
            T, K = shape.max_tokens_per_rank, shape.topk
            sym["recv_tag"] = world.alloc((2, C), torch.int32)
            sym["combine_y"] = world.alloc((T * K, H), shape.dtype)
            groups, token_blocks = cfg.reduce_groups(H)[1], cfg.token_blocks(T)
            sym["combine_count"] = world.alloc((groups, token_blocks), torch.int32)
        return sym

    def _alloc_local(self) -> None:
        """This process's per-rank buffers: ``act`` and every ``RankState`` field but ``err``,
        ``alarm``, ``epoch`` and ``routing_err`` (the world's and the plan's)."""
        world, shape, cfg = self.world, self.shape, self.config
        R, L, MT = world.world_size, self.plan_cfg.slots_per_rank, self.plan_cfg.max_tiles
        width = shape.ffn if self.swiglu else 2 * shape.ffn
        token_blocks = cfg.token_blocks(shape.max_tokens_per_rank)

        def per_rank(*size: int, dtype: torch.dtype = torch.int32) -> dict[int, torch.Tensor]:
            return {
                r: torch.zeros(size, dtype=dtype, device=world.device) for r in world.local_ranks
            }

        self.act = per_rank(self.plan_cfg.capacity, width, dtype=shape.gemm_dtype)
        # the FP8 scales' stand-in without FP8 (the kernel never reads it)
        self._no_scales = torch.zeros(4, dtype=torch.float32, device=world.device)
        if shape.fp8:
            C = self.plan_cfg.capacity
            self.act_scale = per_rank(C, width // FP8_BLOCK, dtype=torch.float32)
        else:
            self.act_scale = {r: self._no_scales for r in world.local_ranks}
        # [programs, 1 + events, 4] int64: a header, then (kind << 32 | task, start, end, waited)
        programs = max(self.num_ctas, self.dispatch_only_ctas)
        trace_shape = (programs, cfg.trace_events + 1, 4) if cfg.trace else (4,)
        rounds = self.plan_cfg.rounds  # (MT is a multiple of 4: each round's rows are aligned)
        self.state = {
            "group_done": per_rank(pow2(R * L)),
            "act_done": per_rank(rounds, MT),
            "act_ready": per_rank(rounds, MT, dtype=torch.int64),
            "resolved": per_rank(rounds, MT, dtype=torch.int64),
            "pending": per_rank(self.num_ctas, pow2(R * token_blocks)),
            "counters": per_rank(3),
            "trace": per_rank(*trace_shape, dtype=torch.int64),
        }

    # -- sizes ----------------------------------------------------------------------------

    def sizes(self) -> dict[str, int]:
        """Bytes per rank of each buffer this workspace owns."""
        sym = {f"{name} (sym)": t.nbytes for name, t in self.sym.items()}
        r = self.world.local_ranks[0]
        local = {"act": self.act[r].nbytes}
        if self.shape.fp8:
            local["act_scale"] = self.act_scale[r].nbytes
        flags = {name: t[r].nbytes for name, t in self.state.items() if name != "trace"}
        local["flags, counters"] = sum(flags.values())
        if self.config.trace:
            local["trace"] = self.state["trace"][r].nbytes
        return {**sym, **local, "plan": self.plan_ws.nbytes()}

    def describe(self) -> str:
        rows = [f"  {name:<20} {size / 2**20:10.2f} MiB" for name, size in self.sizes().items()]
        total = sum(self.sizes().values()) / 2**20
        return "\n".join(
            [f"Megakernel workspace per rank (capacity {self.capacity} rows):", *rows]
            + [f"  {'total':<20} {total:10.2f} MiB"]
        )

    # -- launching ------------------------------------------------------------------------

    def programs(self, mode: str) -> int:
        """Programs per rank a launch of ``mode`` runs (``KernelConfig.num_ctas``, else one per
        SM; mode "dispatch" several per SM where each rank has its own GPU)."""
        return self.dispatch_only_ctas if mode == "dispatch" else self.num_ctas

    def meta(self, mode: str, probe: int = 0) -> KernelMeta:
        """The kernel's constants for ``mode`` and a timing probe (``megakernel.tasks``)."""
        meta = self._meta_cache.get((mode, probe))
        if meta is None:
            meta = self._meta_cache[(mode, probe)] = kernel_meta(
                self.shape,
                self.plan_cfg,
                self.config,
                self.capacity,
                self.swiglu,
                self.programs(mode),
                mode,
                probe,
            )
        return meta

    def task_regions(self, mode: str) -> dict[str, tuple[int, int]]:
        """The task id range ``[begin, end)`` of each task kind of one call, in id order."""
        return task_regions(self.meta(mode))

    def kernel_args(
        self, rank: int, inputs: CallInputs, meta: KernelMeta, begin: int, end: int, rnd: int = 0
    ) -> dict[str, object]:
        """Every argument of one ``moe_megakernel`` launch (of round ``rnd``), by name. Tensors a
        mode does not read are stood in for by others of the right kind (their kernels never
        touch them)."""
        x, weights, w13, w2, out = inputs.x, inputs.topk_weights, inputs.w13, inputs.w2, inputs.out
        w13_desc, w13_tail_desc, w2_desc = self._descriptors(meta, w13, w2)
        return dict(
            x_ptr=x,
            w13_ptr=w13,
            w13_desc=w13_desc,
            w13_tail_desc=w13_tail_desc,
            w2_ptr=w13 if w2 is None else w2,
            w2_desc=w2_desc,
            weights_ptr=x if weights is None else weights,
            act_ptr=self.act[rank],
            out_ptr=x if out is None else out,
            scales=Fp8Scales(
                w13=self._no_scales if inputs.w13_scale is None else inputs.w13_scale,
                w2=self._no_scales if inputs.w2_scale is None else inputs.w2_scale,
                act=self.act_scale[rank],
            ),
            biases=ExpertBiases(
                b13=self._no_scales if inputs.b13 is None else inputs.b13,
                b2=self._no_scales if inputs.b2 is None else inputs.b2,
            ),
            **self._groups[rank][rnd],
            rank=rank,
            num_tokens=x.shape[0],
            rnd=rnd,
            task_begin=begin,
            task_end=end,
            timeout_ns=self.world.timeout_ns(),
            M=meta,
        )

    def _buffer_groups(self, rank: int) -> list[dict[str, tuple]]:
        """The kernel's buffer groups of ``rank`` (``plan``, ``peers``, ``mine``, ``state``), one
        set per round (each round's tables and flags are views of its own rows): the same
        tensors every call, built once. Without the combine buffers the kernel never touches
        theirs (LAYER is off), nor ``recv_scale`` without FP8: others stand in."""
        plan = self.plan_ws.bufs[rank]
        stand_in = {"recv_tag": "recv_src", "combine_y": "recv_x", "combine_count": "recv_src"}
        stand_in["recv_scale"] = "recv_src"
        sym = {
            name: self.sym[name if name in self.sym else stand_in[name]]
            for name in SymBuffers._fields
        }
        by_round = {"tiles", "dispatch_tasks", "stats", "act_done", "act_ready", "resolved"}
        flags = sym["expert_ready"]
        L, R = self.plan_cfg.slots_per_rank, self.world.world_size

        def groups(rnd: int) -> dict[str, tuple]:
            def pick(name: str, t: torch.Tensor) -> torch.Tensor:
                return t[rnd] if name in by_round else t

            peers = {name: t.peer_base for name, t in sym.items()}
            peers["expert_ready"] = flags.peer_base + rnd * flags.peer(rank)[0].nbytes
            mine = {name: t.peer(rank) for name, t in sym.items()}
            mine["expert_ready"] = flags.peer(rank)[rnd, : L * R]
            return dict(
                plan=PlanBuffers(**{name: pick(name, plan[name]) for name in PlanBuffers._fields}),
                peers=SymBuffers(**peers),
                mine=SymBuffers(**mine),
                state=RankState(
                    **{name: pick(name, t[rank]) for name, t in self.state.items()},
                    err=self.world.error_record(rank),
                    epoch=self.plan_ws.epoch[rank],
                    routing_err=plan["routing_err"],
                    alarm=self.world.alarm_word(rank),
                ),
            )

        return [groups(rnd) for rnd in range(self.plan_cfg.rounds)]

    def _dummy_inputs(self) -> CallInputs:
        """Stand-ins for ``warmup``: a variant depends on types, alignments and descriptor
        boxes, not sizes, so each expert weight is one row viewed at full size (stride 0)."""
        dev, shape, L = self.world.device, self.shape, self.plan_cfg.slots_per_rank
        H, I, K = shape.hidden, shape.ffn, shape.topk
        x = torch.zeros(2, H, dtype=shape.dtype, device=dev)
        scales = [torch.ones(s, device=dev) for s in shape.weight_scale_shapes(L)]
        return CallInputs(
            x=x,
            topk_ids=torch.zeros(2, K, dtype=torch.int32, device=dev),
            topk_weights=torch.zeros(2, K, dtype=torch.float32, device=dev),
            w13=torch.zeros(H, dtype=shape.gemm_dtype, device=dev).expand(L, 2 * I, H),
            w2=torch.zeros(I, dtype=shape.gemm_dtype, device=dev).expand(L, H, I),
            out=torch.zeros_like(x),
            w13_scale=scales[0] if shape.fp8 else None,
            w2_scale=scales[1] if shape.fp8 else None,
            b13=torch.zeros(shape.bias_shapes(L)[0], device=dev) if shape.bias else None,
            b2=torch.zeros(shape.bias_shapes(L)[1], device=dev) if shape.bias else None,
        )

    def warmup(self, mode: str = "gemm", probe: int = 0, inputs: CallInputs | None = None) -> None:
        """Compile and load the plan kernels and the megakernel before anything spins, for
        ``inputs`` (the first local rank's, as a call passes them), else for ``_dummy_inputs``.

        NOTE: a call compiles with its own inputs: even small stand-ins, allocated while the
        caller captures a CUDA graph, would stay in the graph's memory pool."""
        if (mode, probe) in self._kernel.compiled or self.world.device.type != "cuda":
            return
        self.plan_ws.warmup()
        r = self.world.local_ranks[0]
        dummy = inputs is None
        args = self.kernel_args(r, self._dummy_inputs() if dummy else inputs,
                                self.meta(mode, probe), 0, 0)  # fmt: skip
        self._kernel.compile((mode, probe), args, **self._options)
        if dummy:
            self._descriptors.clear()  # only the dummy weights' are there

    # -- a call ---------------------------------------------------------------------------

    def check_inputs(
        self, rank: int, given: CallInputs, layer: bool, values: bool, weights: bool = True
    ) -> None:
        """Host checks of one rank's inputs (``megakernel.validate.check_call_inputs``)."""
        check_call_inputs(
            given, rank=rank, shape=self.shape, slots_per_rank=self.plan_cfg.slots_per_rank,
            num_experts=self.placement.num_experts, device=self.world.device, layer=layer,
            values=values, weights=weights,
        )  # fmt: skip

    def _prepare(self, rank: int, given: CallInputs, mode: str, validate: str | None) -> CallInputs:
        """One rank's inputs checked (``validate``: one of ``VALIDATE_MODES``, None: unchecked)
        and in the layout the kernels read."""
        layer = mode == "layer"
        if layer and given.topk_weights is None:
            raise ValueError('mode "layer" needs topk_weights')
        if layer and given.w2 is None:
            raise ValueError('mode "layer" needs w2 [L, H, I]')
        check_biases_given(given.b13, given.b2, self.shape, mode)
        if validate:
            self.check_inputs(rank, given, layer, values=validate == "host")
        # NOTE: the kernels are compiled for 16-byte aligned pointers (megakernel.launch): a
        # misaligned view is copied, or would need another variant compiled while peers spin
        x, w13, w2 = aligned(given.x), aligned(given.w13), aligned(given.w2)
        w13_scale, w2_scale = aligned(given.w13_scale), aligned(given.w2_scale)
        b13, b2 = aligned(given.b13), aligned(given.b2)
        weights, out = given.topk_weights, given.out
        if layer:
            weights = aligned(weights.to(torch.float32))
            if out is None:
                out = torch.empty(x.shape[0], self.shape.hidden, dtype=x.dtype, device=x.device)
            elif out.data_ptr() % 16:
                raise ValueError("out must be 16-byte aligned (a fresh tensor is)")
        ids = self.plan_ws.prepare_ids(given.topk_ids, validate=False)
        return CallInputs(x, ids, weights, w13, w2, out, w13_scale, w2_scale, b13, b2)

    def run(
        self,
        x: dict[int, torch.Tensor],
        topk_ids: dict[int, torch.Tensor],
        topk_weights: dict[int, torch.Tensor] | None,
        w13: dict[int, torch.Tensor],
        w2: dict[int, torch.Tensor] | None = None,
        *,
        out: dict[int, torch.Tensor] | None = None,
        w13_scale: dict[int, torch.Tensor] | None = None,
        w2_scale: dict[int, torch.Tensor] | None = None,
        b13: dict[int, torch.Tensor] | None = None,
        b2: dict[int, torch.Tensor] | None = None,
        mode: str = "gemm",
        overlap: bool | None = None,
        split: bool = False,
        validate: bool | str = "device",
        stage: str = "all",
    ) -> dict[int, DispatchHandle]:
        """One call on every local rank (inputs keyed by rank). ``mode``: "layer" (the whole MoE
        layer: needs ``topk_weights`` and ``w2``; writes ``out [T, H]`` when given, else a new
        tensor), "gemm" (dispatch + GEMM1, fused) or "dispatch" (dispatch, then resolve every
        indirect row). With ``MoEShape.fp8`` only "layer", and the weights are e4m3 with their
        block scales ``w13_scale`` / ``w2_scale`` (``megakernel.fp8``). With ``MoEShape.bias``
        the experts' fp32 biases ``b13 [L, 2I]`` (where GEMM1 runs) and ``b2 [L, H]`` ("layer").

        ``split`` runs the layer as two kernels (dispatch + GEMM1, then down projection + combine
        + top-k reduce) instead of one.

        ``stage`` times parts alone. Modes "gemm" and "dispatch": "dispatch" (plan and dispatch
        tasks only); "sends" (no plan: rerun the last call's dispatch tasks, which put the same
        rows again; the data movement alone); "tiles" (no plan, no dispatch: rerun the last
        call's tile tasks on its received rows). Mode "layer": "comm" (a whole call without the
        GEMM math: communication, flags and the top-k reduce; the outputs are junk); "compute"
        (both GEMMs rerun on the last call's rows, outputs kept on this rank). "all": the real
        call.

        ``overlap`` (default: when the world runs ranks concurrently) runs each rank's task range
        in one launch (two with ``split``); otherwise each task kind runs on every rank before the
        next kind starts (the CPU interpreter must; on one GPU it isolates a hang from a race).

        ``validate``: "device" (or True) checks shapes, dtypes and devices on the host and every
        routing id on the device, with no host synchronisation: a bad id is dropped, that rank's
        output is NaN, and ``RoutingError`` is raised once a later call was launched (the device
        has run the bad one by then) or by ``check_errors()``. "host" also reads the id range
        back before launching (one sync per call); False checks nothing on the host.

        Errors (``megakernel.errors``): each call, once launched, raises what the device has
        reported so far, reading host-mapped alarm words (no synchronisation unless one is up).
        After a device failure (a timeout, an overflow) every call is skipped on the device and
        raises, until ``reset()``.
        """
        if self.closed:
            raise RuntimeError("this Megakernel workspace is closed: build a new one to call it")
        probe = self._check_call(mode, stage)
        validate = validate_mode(validate)
        ranks = self.world.local_ranks
        none = {r: None for r in ranks}
        given = {
            r: CallInputs(
                x[r],
                topk_ids[r],
                (topk_weights or none)[r],
                w13[r],
                (w2 or none)[r],
                (out or none)[r],
                (w13_scale or none)[r],
                (w2_scale or none)[r],
                (b13 or none)[r],
                (b2 or none)[r],
            )  # fmt: skip
            for r in ranks
        }
        ready = {r: self._prepare(r, given[r], mode, validate) for r in ranks}
        self.warmup(mode, probe, ready[ranks[0]])
        rerun = stage in ("sends", "tiles", "compute")
        if not rerun:
            rounds = self.meta(mode, probe).ROUNDS
            for phase in self.plan_ws.phases():
                self.world.run_ranks(
                    lambda r, p=phase: self.plan_ws.launch(
                        r, ready[r].topk_ids, p, validate=False, max_rounds=rounds
                    )
                )
        elif stage != "sends":  # (the puts alone wait on nothing; clearing would be timed too)
            for r in ranks:  # the rerun's tasks wait for its own GEMM1 tasks and resolves
                self.state["act_ready"][r].zero_()
                self.state["resolved"][r].zero_()
        self._launch(ready, mode, probe, self._ranges(mode, stage, overlap, split))
        handles = {r: self._handle(r, ready[r], advance=not rerun) for r in ranks}
        self.after_call()
        return handles

    def _check_call(self, mode: str, stage: str) -> int:
        """The call's mode and stage are known and go together; returns the stage's probe."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if mode == "layer" and not self.combine:
            raise ValueError('mode "layer" needs a workspace built with combine=True')
        if self.shape.fp8 and mode != "layer":
            raise ValueError(
                f'mode "{mode}" hands back the receive buffers, which the FP8 path fills with '
                'e4m3 rows and scales: MoEShape(fp8=True) runs mode "layer" only'
            )
        layer_stages = ("all", "comm", "compute")
        if (mode == "layer") != (stage in layer_stages) and stage != "all":
            raise ValueError(f'stage {stage!r} is not one of mode "{mode}"')
        if stage in ("sends", "tiles", "compute") and min(self.epoch.values()) == 0:
            raise ValueError(
                f"stage={stage!r} reruns the last call's tasks: make a full call first"
            )
        return {"comm": PROBE_COMM, "compute": PROBE_COMPUTE}.get(stage, PROBE_OFF).value

    def _launch(self, ready: dict[int, CallInputs], mode: str, probe: int, ranges) -> None:
        """One megakernel launch per rank, round and task range: rounds in order, each round's
        ranges in order (launches past a call's rounds do nothing)."""
        meta, key = self.meta(mode, probe), (mode, probe)
        if self.config.trace:
            for r in self.world.local_ranks:
                self.state["trace"][r].zero_()
        grid = (self.programs(mode),)
        for rnd in range(meta.ROUNDS):
            for begin, end in ranges:

                def launch(r: int, begin: int = begin, end: int = end, rnd: int = rnd) -> None:
                    args = self.kernel_args(r, ready[r], meta, begin, end, rnd)
                    self._kernel(key, grid, args, **self._options)

                self.world.run_ranks(launch)

    def _handle(self, r: int, ready: CallInputs, advance: bool) -> DispatchHandle:
        self.epoch[r] += advance
        recv_x, recv_src = self._recv_views[r][self.epoch[r] % 2]
        return DispatchHandle(
            rank=r,
            epoch=self.epoch[r],
            act=self.act[r],
            recv_x=recv_x,
            recv_src=recv_src,
            stats=self.plan_ws.bufs[r]["stats"][0, : len(STATS)],
            topk_weights=ready.topk_weights,
            out=ready.out,
            trace=self.state["trace"][r] if self.config.trace else None,
            plan_views=lambda: self.plan_ws.plan(r),
        )

    def _ranges(
        self, mode: str, stage: str, overlap: bool | None, split: bool
    ) -> list[tuple[int, int]]:
        """The task id ranges to launch, in order (each one launch per rank)."""
        regions = self.task_regions(mode)
        if stage in ("dispatch", "sends"):
            return [regions["dispatch"]]
        if stage == "tiles":
            return [(regions["gemm1"][0], max(e for _, e in regions.values()))]
        if stage == "compute":
            return [(regions["gemm1"][0], regions["down"][1])]
        overlap = self.world.concurrent if overlap is None else overlap
        if not overlap:
            return list(regions.values())
        end = max(e for _, e in regions.values())
        if split and "down" in regions:
            cut = regions["down"][0]
            return [(0, cut), (cut, end)]
        return [(0, end)]

    def check_errors(self) -> None:
        """Wait for the device, then raise if a call failed: ``WaitTimeoutError`` or
        ``CapacityError`` (until ``reset()``), ``RoutingError`` (once)."""
        self.errors.check()

    def after_call(self) -> None:
        """Raise what the device has reported so far (after a call was launched; no sync unless
        an alarm is up)."""
        self.errors.after_call(max(self.epoch.values()))

    def set_placement(self, placement: Placement) -> None:
        """Switch to ``placement`` (same E, R and L; between calls, no recompilation): the plan's
        tables change in place. The caller moves the weights (``FusedEPMoE.rebalance``)."""
        self.plan_ws.set_placement(placement)
        self.placement = placement

    def reset(self) -> None:
        """Bring the ranks back in step after a failed call, so that the next call works again
        (collective: every rank calls it, between calls). Waits for every rank's device work,
        clears the error records, the counters and the combine counts a failed call may have
        left, and sets every rank's epoch to the latest any rank reached."""
        self.world.barrier()
        ranks = self.world.local_ranks
        for r in ranks:
            for name in ("group_done", "act_done", "pending", "counters"):
                self.state[name][r].zero_()
            if self.combine:
                self.sym["combine_count"].peer(r).zero_()
        epoch = self.world.all_max(max(int(self.plan_ws.epoch[r]) for r in ranks))
        for r in ranks:
            self.plan_ws.epoch[r].fill_(epoch)
            self.epoch[r] = epoch
        self.errors.reset()
        self.world.barrier()

    def close(self) -> None:
        """Free the symmetric buffers (collective, in allocation order). A second call does
        nothing."""
        if self.closed:
            return
        self.closed = True
        self.plan_ws.close()
        for t in self.sym.values():
            self.world.free(t)


def _even(n: int) -> int:
    return n + n % 2


def dispatch_gemm(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor | None,
    w13: torch.Tensor,
    *,
    workspace: Megakernel,
    mode: str = "gemm",
    b13: torch.Tensor | None = None,
) -> tuple[torch.Tensor, DispatchHandle]:
    """This rank's tokens ``x [T, H]`` routed by ``topk_ids [T, K]`` to the experts, whose
    ``w13 [L, 2I, H]`` this rank holds: returns ``act [C, I]`` (rows in the receive order,
    ``handle.num_recv()`` of them valid) and the handle the combine needs. ``b13 [L, 2I]``:
    the experts' GEMM1 biases (fp32), where the shape has them (``MoEShape.bias``).

    For a world with one rank per process (NVSHMEM under torchrun). No host synchronisation:
    errors surface at ``workspace.check_errors()``.
    """
    ranks = workspace.world.local_ranks
    if len(ranks) != 1:
        raise ValueError(
            f"dispatch_gemm runs one rank; this world runs {len(ranks)} in one process: use "
            "Megakernel.run with inputs keyed by rank"
        )
    (r,) = ranks
    biases = None if b13 is None else {r: b13}
    handle = workspace.run(
        {r: x}, {r: topk_ids}, {r: topk_weights}, {r: w13}, b13=biases, mode=mode
    )[r]
    return handle.act, handle
