"""``PlanWorkspace``: the plan's buffers and launches for every rank this process runs.

Shape legend: T tokens on this rank (at most T_max), K top-k, R ranks, L physical slots per rank,
P = R * L, E experts.
"""

from __future__ import annotations

import torch
import triton

from megakernel.config import pow2
from megakernel.launch import Launcher, aligned
from megakernel.placement import Placement
from megakernel.placement.stats import RoutingStats
from megakernel.plan.config import (
    DISPATCH_TASK_COLS,
    PAD_BLOCK,
    PROGRAMS_PER_SM,
    STATS,
    STATS_STRIDE,
    TABLE_BLOCK,
    TILE_COLS,
    Plan,
    PlanConfig,
)
from megakernel.plan.count import (
    ROUTING_ERR_WORDS,
    PlacementTables,
    plan_count_kernel,
    plan_scan_kernel,
)
from megakernel.plan.layout import LayoutOut, plan_layout_kernel
from megakernel.validate import check_routing
from symm_mem.buffer import World


class PlanWorkspace:
    """Buffers and launches of the plan for every rank this process runs.

    Symmetric: ``counts [2, R, P]`` (double-buffered by epoch parity: a rank can publish call
    e + 1 while a peer still reads call e, but cannot reach e + 2 before every peer has read e,
    since its e + 1 layout waits on their e + 1 counts) and ``counts_ready [R]``.
    """

    def __init__(self, world: World, cfg: PlanConfig, placement: Placement) -> None:
        if placement.world_size != world.world_size or cfg.world_size != world.world_size:
            raise ValueError(
                f"plan for {cfg.world_size} ranks, placement for {placement.world_size}, "
                f"world of {world.world_size}"
            )
        if placement.slots_per_rank != cfg.slots_per_rank:
            raise ValueError(
                f"placement has {placement.slots_per_rank} slots per rank, plan "
                f"{cfg.slots_per_rank}"
            )
        self.world, self.cfg, self.placement = world, cfg, placement
        R, P, dev = cfg.world_size, cfg.num_slots, world.device
        self.sym_counts = world.alloc((2, R, P), torch.int32)
        self.sym_ready = world.alloc((R,), torch.int64)
        # NOTE: one column per rank, the most replicas an expert can have (one per rank), so a
        # new placement (set_placement) changes no kernel constant
        self.replicas = placement.replica_table(dev, width=R)
        self.num_replicas = torch.tensor(
            [len(r) for r in placement.replicas], dtype=torch.int32, device=dev
        )
        self.meta = cfg.meta(placement.num_experts, max_replicas=R)
        # [local ranks, ROUTING_ERR_WORDS] int64: each rank's first bad routing id (plan.count)
        self.routing_err = torch.zeros(
            len(world.local_ranks), ROUTING_ERR_WORDS, dtype=torch.int64, device=dev
        )
        self._index = {r: i for i, r in enumerate(world.local_ranks)}
        # routing statistics, added up over calls (megakernel.placement.stats): rows sent to
        # each slot, co-selected pairs of sampled tokens, and the host's token counts
        n, E = len(world.local_ranks), placement.num_experts
        self.stat_load = torch.zeros(n, pow2(cfg.num_slots), dtype=torch.int64, device=dev)
        self.stat_pairs = torch.zeros(n, E * E, dtype=torch.int64, device=dev)
        self.stat_tokens = [0, 0]  # tokens counted, tokens sampled for the pairs
        self.bufs = {r: self._alloc(r) for r in world.local_ranks}
        # what the kernels read that is the same every call, built once
        self._tables = {
            r: PlacementTables(self.replicas, self.num_replicas, self.bufs[r]["on_rank"])
            for r in world.local_ranks
        }
        self._outs = {
            r: LayoutOut(**{name: self.bufs[r][name] for name in LayoutOut._fields})
            for r in world.local_ranks
        }
        self._count = Launcher(plan_count_kernel)
        self._scan = Launcher(plan_scan_kernel)
        self._layout = Launcher(plan_layout_kernel)
        self.num_tokens = {r: 0 for r in world.local_ranks}
        # this rank's call counter on the device: the epoch of its current call
        self.epoch = {r: torch.zeros(1, dtype=torch.int64, device=dev) for r in world.local_ranks}
        self.calls = 0  # host mirror, counted by run()
        # NOTE: both kernels are persistent, with a few programs per SM of this rank's share.
        # Layout programs spin on peers' counts, which is safe because run() launches every
        # rank's count kernel before any layout kernel.
        self.max_programs = PROGRAMS_PER_SM * world.sms_per_rank

    def _alloc(self, rank: int) -> dict[str, torch.Tensor]:
        """Rank ``rank``'s plan buffers, by name (``LayoutOut``'s fields among them)."""
        cfg, placement, dev = self.cfg, self.placement, self.world.device
        R, L, T, K = cfg.world_size, cfg.slots_per_rank, cfg.max_tokens, cfg.topk

        def i32(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int32, device=dev)

        return dict(
            on_rank=torch.tensor(placement.on_rank(rank), dtype=torch.int32, device=dev),
            phys=i32(T, K),
            chunk_rows=i32(cfg.max_chunks, 2, pow2(cfg.num_slots)),
            totals=i32(2, pow2(cfg.num_slots)),
            arrive=i32(1),
            all_counts=i32(R, cfg.num_slots),
            slot_pos=i32(T, K),
            data_pos=i32(T, K),
            first_at=i32(T, R),
            send_units=i32(cfg.max_units),
            recv_offset=i32(L, R),
            expert_start=i32(L),
            expert_rows=i32(L),
            tiles=i32(cfg.rounds, cfg.max_tiles, TILE_COLS),
            dispatch_tasks=i32(cfg.rounds, cfg.max_dispatch_tasks, DISPATCH_TASK_COLS),
            stats=i32(cfg.rounds, STATS_STRIDE),
            round_calls=torch.zeros(2, dtype=torch.int64, device=dev),
            routing_err=self.routing_err[self.world.local_ranks.index(rank)],
        )

    def nbytes(self) -> int:
        """Bytes per rank of the plan's buffers, symmetric ones included."""
        bufs = self.bufs[self.world.local_ranks[0]]
        return sum(b.nbytes for b in bufs.values()) + self.sym_counts.nbytes + self.sym_ready.nbytes

    def phases(self) -> list[int]:
        return [0, 1]

    def launch(
        self,
        rank: int,
        topk_ids: torch.Tensor,
        phase: int | None = None,
        validate: bool = True,
        max_rounds: int = 1,
    ) -> None:
        """Plan the next call of ``rank`` (``phase`` 0: bump the epoch and count, 1: layout;
        None: both). ``topk_ids [T, K]`` logical experts (-1 dropped). ``validate`` checks them on
        the host first (one sync); without it, ids must already be valid. ``max_rounds``: the
        most rounds the call may take (more rows than that at a rank is an overflow).

        NOTE: the epoch lives in device memory and the count kernel bumps it, so a captured
        CUDA graph replays with a fresh epoch each time and flags are never reset.
        """
        topk_ids = self.prepare_ids(topk_ids, validate)
        T = topk_ids.shape[0]
        self.num_tokens[rank] = T
        chunks = max(1, triton.cdiv(T, self.cfg.tokens_per_chunk))
        if phase in (None, 0):
            self.count_tokens(T)
            self._count("plan", (min(chunks, self.max_programs),), self.count_args(rank, topk_ids))
            self._scan(
                "plan", (min(self._scan_blocks(), self.max_programs),), self.scan_args(rank, T)
            )
        if phase in (None, 1):
            grid = (min(self._layout_items(chunks), self.max_programs),)
            self._layout("plan", grid, self.layout_args(rank, T, max_rounds))

    def check_placement(self, placement: Placement) -> None:
        """A placement the plan can switch to: the same experts, ranks and slots per rank."""

        def sizes(pl: Placement) -> tuple[int, int, int]:
            return pl.num_experts, pl.world_size, pl.slots_per_rank

        if sizes(placement) != sizes(self.placement):
            raise ValueError(
                "a new placement keeps the experts, the ranks and the slots per rank: (E, R, L) "
                f"= {sizes(placement)}, the plan's {sizes(self.placement)}; build a new layer "
                "to change them"
            )

    def set_placement(self, placement: Placement) -> None:
        """Switch the plan's placement tables in place (between calls; the kernels and any
        captured graph read the same tensors). Same experts, ranks and slots per rank."""
        self.check_placement(placement)
        dev = self.world.device
        self.replicas.copy_(placement.replica_table(dev, width=self.replicas.shape[1]))
        self.num_replicas.copy_(
            torch.tensor([len(r) for r in placement.replicas], dtype=torch.int32)
        )
        for r in self.world.local_ranks:
            self.bufs[r]["on_rank"].copy_(torch.tensor(placement.on_rank(r), dtype=torch.int32))
        self.placement = placement

    def count_tokens(self, T: int) -> None:
        """The host's part of the routing statistics: tokens, and tokens of sampled chunks."""
        ct, sample = self.cfg.tokens_per_chunk, self.meta.PAIR_SAMPLE
        self.stat_tokens[0] += T
        self.stat_tokens[1] += sum(min(ct, T - c) for c in range(0, T, ct * sample))

    def routing_stats(self) -> RoutingStats:
        """The routing statistics of this process's ranks since the last ``clear_stats``, summed
        (reading them waits for the calls made so far: the calls themselves never wait)."""
        slots = self.placement.num_slots
        load_per_slot = self.stat_load[:, :slots].sum(0).cpu()
        load = torch.zeros(self.placement.num_experts, dtype=torch.int64)
        for e, replicas in enumerate(self.placement.replicas):
            load[e] = load_per_slot[list(replicas)].sum()
        E = self.placement.num_experts
        pairs = self.stat_pairs.sum(0).cpu().view(E, E)
        return RoutingStats(load, pairs, *self.stat_tokens)

    def clear_stats(self) -> None:
        self.stat_load.zero_()
        self.stat_pairs.zero_()
        self.stat_tokens = [0, 0]

    def prepare_ids(self, topk_ids: torch.Tensor, validate: bool) -> torch.Tensor:
        """``topk_ids`` as the count kernel reads them (int32, contiguous); ``validate`` checks
        them on the host first (one sync)."""
        if validate:
            check_routing(
                topk_ids,
                None,
                num_experts=self.placement.num_experts,
                topk=self.cfg.topk,
                max_tokens=self.cfg.max_tokens,
                device=self.world.device,
            )
        return aligned(topk_ids.to(torch.int32))

    def _scan_blocks(self) -> int:
        return 2 * pow2(self.cfg.num_slots) // self.meta.SCAN_COLS

    def _layout_items(self, chunks: int) -> int:
        """The layout's items for a call of one round (a call of more takes more, persistently)."""
        cfg = self.cfg
        items = chunks + 1 + triton.cdiv(cfg.max_tiles, TABLE_BLOCK)
        items += triton.cdiv(cfg.max_dispatch_tasks, TABLE_BLOCK)
        return items + triton.cdiv(cfg.max_units, PAD_BLOCK)

    def count_args(self, rank: int, topk_ids: torch.Tensor) -> dict[str, object]:
        """``plan_count_kernel``'s arguments, by name."""
        b = self.bufs[rank]
        return dict(
            ids_ptr=topk_ids,
            placement=self._tables[rank],
            phys_ptr=b["phys"],
            chunk_rows_ptr=b["chunk_rows"],
            routing_err_ptr=b["routing_err"],
            pairs_ptr=self.stat_pairs[self._index[rank]],
            epoch_ptr=self.epoch[rank],
            T=topk_ids.shape[0],
            M=self.meta,
        )

    def scan_args(self, rank: int, T: int) -> dict[str, object]:
        """``plan_scan_kernel``'s arguments, by name."""
        b = self.bufs[rank]
        return dict(
            chunk_rows_ptr=b["chunk_rows"],
            totals_ptr=b["totals"],
            arrive_ptr=b["arrive"],
            counts_base=self.sym_counts.peer_base,
            ready_base=self.sym_ready.peer_base,
            epoch_ptr=self.epoch[rank],
            load_ptr=self.stat_load[self._index[rank]],
            rank=rank,
            T=T,
            M=self.meta,
        )

    def layout_args(self, rank: int, T: int, max_rounds: int = 1) -> dict[str, object]:
        """``plan_layout_kernel``'s arguments, by name."""
        b, cfg = self.bufs[rank], self.cfg
        return dict(
            phys_ptr=b["phys"],
            chunk_rows_ptr=b["chunk_rows"],
            totals_ptr=b["totals"],
            counts_ptr=self.sym_counts.peer(rank),
            ready_ptr=self.sym_ready.peer(rank),
            out=self._outs[rank],
            err_ptr=self.world.error_record(rank),
            epoch_ptr=self.epoch[rank],
            rank=rank,
            T=T,
            capacity=cfg.capacity,
            max_rounds=max_rounds,
            timeout_ns=self.world.timeout_ns(),
            max_units=cfg.max_units,
            max_dispatch=cfg.max_dispatch_tasks,
            max_tiles=cfg.max_tiles,
            M=self.meta,
        )

    def warmup(self) -> None:
        """Compile and load the three kernels (no launch) before anything spins: a module load
        waits behind running kernels. A no-op under the interpreter."""
        if self.world.device.type != "cuda":
            return
        ids = torch.zeros(1, self.cfg.topk, dtype=torch.int32, device=self.world.device)
        r = self.world.local_ranks[0]  # every rank launches the same variants
        self._count.compile("plan", self.count_args(r, ids))
        self._scan.compile("plan", self.scan_args(r, 1))
        self._layout.compile("plan", self.layout_args(r, 1))

    def run(self, topk_ids: dict[int, torch.Tensor], validate: bool = True) -> None:
        """Plan the next call on every local rank (``topk_ids[rank] [T, K]``): every rank's count
        kernel, then every rank's layout kernel (each still waits on its peers' counts).

        NOTE: phase order matters in the emulated CUDA world: with 8 ranks on one GPU, once five
        ranks' layout kernels spun, the remaining ranks' count grids were never scheduled (more
        hardware queues did not help), so no kernel is launched behind a spinning peer. The
        NVSHMEM world runs one rank per process and is not affected."""
        # NOTE: every rank's inputs are checked and converted before any rank launches: a torch
        # op launched while a peer's kernel spins can stall on a lazy module load until the
        # peer's wait times out.
        ready = {r: self.prepare_ids(topk_ids[r], validate) for r in self.world.local_ranks}
        for phase in self.phases():
            self.world.run_ranks(lambda r, p=phase: self.launch(r, ready[r], p, validate=False))
        self.calls += 1

    def mismatches(self, topk_ids: list[torch.Tensor]) -> dict[int, list[str]]:
        """Check the last call against ``plan_ref``: ``topk_ids`` is every rank's routing (the
        global view); returns, per local rank whose plan differs, the fields that differ."""
        from megakernel.reference import plan_mismatches, plan_ref, resolve_all_ref

        phys = resolve_all_ref([ids.cpu() for ids in topk_ids], self.placement)
        wrong = {}
        for r in self.world.local_ranks:
            fields_off = plan_mismatches(self.plan(r), plan_ref(phys, self.cfg, r))
            if fields_off:
                wrong[r] = fields_off
        return wrong

    def plan(self, rank: int) -> Plan:
        """Views of ``rank``'s plan buffers (valid after its launch has run)."""
        b, T, R = self.bufs[rank], self.num_tokens[rank], self.cfg.world_size
        P = self.cfg.num_slots
        return Plan(
            phys=b["phys"][:T],
            counts=b["totals"][0, :P],
            all_counts=b["all_counts"],
            slot_pos=b["slot_pos"][:T],
            data_pos=b["data_pos"][:T],
            first_at=b["first_at"][:T, :R],
            send_units=b["send_units"],
            recv_offset=b["recv_offset"],
            expert_start=b["expert_start"],
            expert_rows=b["expert_rows"],
            tiles=b["tiles"][0],
            dispatch_tasks=b["dispatch_tasks"][0],
            stats=b["stats"][0, : len(STATS)],
        )

    def round_calls(self) -> tuple[int, int]:
        """(calls that took several rounds, their rounds) since the workspace was built (every
        rank counts the same calls; reading them waits for the calls made so far)."""
        counts = torch.stack([self.bufs[r]["round_calls"] for r in self.world.local_ranks])
        calls, rounds = counts.amax(0).tolist()
        return calls, rounds

    def close(self) -> None:
        self.world.free(self.sym_ready)
        self.world.free(self.sym_counts)
