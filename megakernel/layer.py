"""``FusedEPMoE``: the expert-parallel MoE layer as one ``nn.Module`` (DESIGN §2, §6).

Shape legend: T tokens on a rank, H hidden, I expert FFN width, E experts, L physical slots per
rank, K top-k, R ranks.

Each rank holds the experts of its slots (``w13 [L, 2I, H]``, ``w2 [L, H, I]``, placed by a
``Placement``) and calls the layer with its own tokens; one persistent kernel per rank then
dispatches them, runs both expert GEMMs and combines the results, with no host synchronisation
(``megakernel.kernel``). Errors found on the device (a bad routing id, a peer that never arrived,
a receive buffer that would overflow) are raised by the next call, with no synchronisation until
one happens (``megakernel.errors``), by ``check_errors()``, or at once with
``check_every_call=True``. A failed call's output is NaN, never plausible numbers.

Worlds: with one rank per process (``NvshmemWorld`` under torchrun) tensors are passed plainly;
a world that runs several ranks in one process (``EmulatedWorld``) takes and returns dicts keyed
by rank.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import torch
from torch import nn

from megakernel.config import KernelConfig
from megakernel.fp8 import quantize_experts
from megakernel.graphs import CallGraphs
from megakernel.placement import Placement
from megakernel.placement.stats import RoutingStats
from megakernel.routing import route_topk
from megakernel.shapes import MoEShape
from megakernel.validate import VALIDATE_MODES
from megakernel.workspace import Megakernel
from symm_mem.buffer import World

Router = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x -> (weights, ids)


class TopKRouter(nn.Module):
    """Softmax top-k gate: ``logits = x @ gate^T`` (``gate [E, H]``), then
    ``megakernel.routing.route_topk``. Returns (``topk_weights [T, K]`` fp32, ``topk_ids [T, K]``
    int32)."""

    def __init__(self, gate: torch.Tensor, topk: int, renormalize: bool = True) -> None:
        super().__init__()
        self.gate = nn.Parameter(gate, requires_grad=False)
        self.topk, self.renormalize = topk, renormalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route_topk(x @ self.gate.t(), self.topk, self.renormalize)


class FusedEPMoE(nn.Module):
    """This process's ranks of an expert-parallel MoE layer.

    ``w13`` / ``w2``: this rank's experts (``[L, 2I, H]`` / ``[L, H, I]``), or a dict keyed by
    rank in a world that runs several. With ``MoEShape.fp8`` they are e4m3 and ``w13_scale`` /
    ``w2_scale`` hold their fp32 128 x 128 block scales (``[L, 2I/128, H/128]`` /
    ``[L, H/128, I/128]``, DeepSeek-V3's ``weight_scale_inv``; ``megakernel.fp8``).
    ``from_dense`` shards a single-process MoE's ``[E, ...]`` weights instead (and quantises
    them for FP8). With ``MoEShape.bias``, ``b13`` / ``b2`` are the experts' biases (``[L, 2I]``
    / ``[L, H]``, any float dtype, held in fp32). ``router`` maps ``x`` to (``topk_weights``,
    ``topk_ids``) when a call gives none. The symmetric workspace is allocated once here
    (``describe()`` prints its buffers) and freed by ``close()``, which every rank calls.

    Calls need no host synchronisation and can be captured in a CUDA graph (make one call first,
    so every kernel is compiled). ``validate="device"`` checks every routing id on the device: a
    bad one is dropped, that rank's output is NaN and ``RoutingError`` is raised by a later call
    or ``check_errors()``; ``validate="host"`` reads the id range back first (one sync per
    call). After a device failure (``WaitTimeoutError``: a peer did not arrive in
    ``world.timeout_s``) every call is skipped and raises until ``reset()`` brings the ranks back
    in step.

    Forward only: the output carries no gradient (a call whose ``x`` or ``topk_weights`` want one
    warns, once a layer).
    """

    def __init__(
        self,
        world: World,
        shape: MoEShape,
        w13: torch.Tensor | Mapping[int, torch.Tensor],
        w2: torch.Tensor | Mapping[int, torch.Tensor],
        *,
        w13_scale: torch.Tensor | Mapping[int, torch.Tensor] | None = None,
        w2_scale: torch.Tensor | Mapping[int, torch.Tensor] | None = None,
        b13: torch.Tensor | Mapping[int, torch.Tensor] | None = None,
        b2: torch.Tensor | Mapping[int, torch.Tensor] | None = None,
        placement: Placement | None = None,
        config: KernelConfig | None = None,
        capacity: int | None = None,
        router: Router | None = None,
        split: bool = False,
        check_every_call: bool = False,
        validate: str = "device",
        graphs: bool = True,
    ) -> None:
        super().__init__()
        self.world, self.shape = world, shape
        self.placement = placement or Placement.contiguous(shape.num_experts, world.world_size)
        if self.placement.world_size != world.world_size:
            raise ValueError(
                f"the placement is for {self.placement.world_size} ranks, the world has "
                f"{world.world_size}"
            )
        if self.placement.num_experts != shape.num_experts:
            raise ValueError(
                f"the placement has {self.placement.num_experts} experts, the shape "
                f"{shape.num_experts}"
            )
        L, H, I = self.placement.slots_per_rank, shape.hidden, shape.ffn
        self.w13 = self._weights("w13", w13, (L, 2 * I, H), shape.gemm_dtype)
        self.w2 = self._weights("w2", w2, (L, H, I), shape.gemm_dtype)
        self.w13_scale = self.w2_scale = None
        if shape.fp8:
            if w13_scale is None or w2_scale is None:
                raise ValueError(
                    "MoEShape(fp8=True): give w13_scale and w2_scale, the weights' block scales "
                    "(or use FusedEPMoE.from_dense, which quantises dense weights)"
                )
            want13, want2 = shape.weight_scale_shapes(L)
            self.w13_scale = self._weights("w13_scale", w13_scale, want13, torch.float32)
            self.w2_scale = self._weights("w2_scale", w2_scale, want2, torch.float32)
            _check_scales("w13_scale", self.w13_scale)
            _check_scales("w2_scale", self.w2_scale)
        elif w13_scale is not None or w2_scale is not None:
            raise ValueError("weight scales are for MoEShape(fp8=True); this layer is not FP8")
        self.b13 = self.b2 = None
        if shape.bias:
            if b13 is None or b2 is None:
                raise ValueError("MoEShape(bias=True): give b13 [L, 2I] and b2 [L, H]")
            want13, want2 = shape.bias_shapes(L)
            self.b13 = self._weights("b13", _as_fp32(b13), want13, torch.float32)
            self.b2 = self._weights("b2", _as_fp32(b2), want2, torch.float32)
        elif b13 is not None or b2 is not None:
            raise ValueError("biases are for MoEShape(bias=True); this layer's experts have none")
        self._by_rank_cache: dict[str, dict[int, torch.Tensor]] | None = None
        self._warned_no_backward = False
        self.router = router
        if validate not in VALIDATE_MODES:
            raise ValueError(f"validate must be one of {VALIDATE_MODES}, got {validate!r}")
        self.split, self.check_every_call, self.validate = split, check_every_call, validate
        self.workspace = Megakernel(
            world, shape, placement=self.placement, config=config, capacity=capacity
        )
        self.graphs = CallGraphs(self.workspace) if graphs else None

    @classmethod
    def from_dense(
        cls,
        world: World,
        shape: MoEShape,
        w13: torch.Tensor,
        w2: torch.Tensor,
        b13: torch.Tensor | None = None,
        b2: torch.Tensor | None = None,
        **kw: object,
    ) -> FusedEPMoE:
        """Shard every expert's ``w13 [E, 2I, H]`` / ``w2 [E, H, I]`` (any device) onto this
        process's ranks by the placement (``kw`` as for the constructor). With ``MoEShape.fp8``
        each weight is either dense (any float dtype: quantised here, one scale per 128 x 128
        block) or an already quantised pair (e4m3 weights, fp32 block scales ``[E, N/128,
        K/128]``), loaded as given. With ``MoEShape.bias``, ``b13 [E, 2I]`` / ``b2 [E, H]``
        (sharded the same way)."""
        E, H, I = shape.num_experts, shape.hidden, shape.ffn
        dense = {"w13": (w13, (E, 2 * I, H)), "w2": (w2, (E, H, I))}
        biases = {"b13": (b13, (E, 2 * I)), "b2": (b2, (E, H))}
        placement = kw.pop("placement", None) or Placement.contiguous(E, world.world_size)
        experts = {}
        for name, (given, want) in dense.items():
            if shape.fp8:
                q, scale = given if isinstance(given, tuple) else quantize_experts(given)
                experts[name], experts[f"{name}_scale"] = q, scale
            elif isinstance(given, tuple):
                raise ValueError(f"{name} is a (weights, scales) pair, but the shape is not FP8")
            else:
                experts[name] = given
            if tuple(experts[name].shape) != want:
                shape_given = tuple(experts[name].shape)
                raise ValueError(f"dense {name} has shape {shape_given}, expected {want}")
        for name, (given, want) in biases.items():
            if given is None:
                continue  # (the constructor says whether the shape needs it)
            if tuple(given.shape) != want:
                raise ValueError(f"{name} has shape {tuple(given.shape)}, expected {want}")
            experts[name] = given
        dev = world.device
        local = {
            name: {r: placement.local_weights(t, r).to(dev) for r in world.local_ranks}
            for name, t in experts.items()
        }
        for name in ("w13", "w2"):
            local[name] = {r: t.to(shape.gemm_dtype) for r, t in local[name].items()}
        return cls(world, shape, **local, placement=placement, **kw)

    @classmethod
    def from_hf(cls, block: nn.Module, world: World, **kw: object) -> FusedEPMoE:
        """The routed experts of a Hugging Face sparse MoE block (Qwen3-MoE, Qwen2-MoE,
        Mixtral, DeepSeek-V3, gpt-oss; ``megakernel.integrations.hf``), sharded onto ``world``'s
        ranks. ``kw``: ``max_tokens`` (per rank per call), ``dtype``, and the constructor's."""
        from megakernel.integrations.hf import from_hf

        return from_hf(block, world, **kw)

    def _weights(self, name: str, w, want: tuple[int, ...], dtype: torch.dtype) -> nn.ParameterDict:
        """Checked per-rank weights as parameters (the tensors themselves where contiguous)."""
        params = {}
        for r, t in self._by_rank(name, w).items():
            if tuple(t.shape) != want:
                hint = (
                    ": that is every expert; FusedEPMoE.from_dense shards dense weights"
                    if t.dim() == 3 and t.shape[0] == self.shape.num_experts != want[0]
                    else ""
                )
                raise ValueError(
                    f"{name} of rank {r} has shape {tuple(t.shape)}, expected {want}{hint}"
                )
            if t.dtype != dtype:
                raise ValueError(f"{name} of rank {r} is {t.dtype}, the layer needs {dtype}")
            if t.device != self.world.device:
                raise ValueError(
                    f"{name} of rank {r} is on {t.device}, but rank {r} runs on {self.world.device}"
                )
            params[str(r)] = nn.Parameter(t.contiguous(), requires_grad=False)
        return nn.ParameterDict(params)

    # -- calls ----------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor | Mapping[int, torch.Tensor],
        topk_ids: torch.Tensor | Mapping[int, torch.Tensor] | None = None,
        topk_weights: torch.Tensor | Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor | dict[int, torch.Tensor]:
        """``x [T, H]`` -> ``[T, H]``: sum over k of ``topk_weights[t, k] * FFN_{topk_ids[t, k]}
        (x[t])``. Without ids the router picks them. Dicts keyed by rank in a world running
        several ranks per process."""
        if self.workspace.closed:
            raise RuntimeError("this FusedEPMoE is closed: build a new layer to call it")
        ranks = self.world.local_ranks
        plain = isinstance(x, torch.Tensor)
        xs, ids, weights = (
            self._by_rank(name, v)
            for name, v in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights))
        )
        if ids is None:
            if weights is not None:
                raise ValueError("topk_weights without topk_ids: give both, or neither")
            if self.router is None:
                raise ValueError("no topk_ids given and the layer has no router")
            routed = {r: self.router(xs[r]) for r in ranks}
            weights = {r: w for r, (w, _) in routed.items()}
            ids = {r: i for r, (_, i) in routed.items()}
        elif weights is None:
            raise ValueError("topk_ids without topk_weights: the layer needs both")
        for r in ranks:
            if not xs[r].is_contiguous():
                raise ValueError(f"x of rank {r} is not contiguous: pass x.contiguous()")
        if torch.is_grad_enabled() and not self._warned_no_backward:
            self._warn_if_gradients_wanted(xs, weights)
        outs = self._replayed(xs, ids, weights)
        if outs is None:
            outs = self._launched(xs, ids, weights)
        if self.check_every_call:
            self.check_errors()
        return outs[ranks[0]] if plain else outs

    def _warn_if_gradients_wanted(self, xs, weights) -> None:
        """Warn, once a layer, when a call's tokens or routing weights want gradients: the layer
        has no backward, so its output would carry none to them (nor to the router or the
        experts) without a word. The output itself is right."""
        if any(t.requires_grad for t in (*xs.values(), *weights.values())):
            self._warned_no_backward = True
            warnings.warn(
                "FusedEPMoE is forward only: its output carries no gradient to x, topk_weights "
                "(the router) or the experts. Call it under torch.no_grad() or "
                "torch.inference_mode() where none is wanted",
                UserWarning,
                stacklevel=2,
            )

    def _replayed(self, xs, ids, weights) -> dict[int, torch.Tensor] | None:
        """The call replayed from its captured graph (``graphs``, the default checks), or None."""
        if self.graphs is None or self.validate != "device" or not self.graphs.usable():
            return None
        return self.graphs(xs, ids, weights, self.split, **self._experts_by_rank())

    def _experts(self) -> dict[str, nn.ParameterDict]:
        """The experts' parameters by ``Megakernel.run``'s argument names (with FP8, the scales
        too; with biases, the biases)."""
        experts = {"w13": self.w13, "w2": self.w2}
        if self.shape.fp8:
            experts |= {"w13_scale": self.w13_scale, "w2_scale": self.w2_scale}
        if self.shape.bias:
            experts |= {"b13": self.b13, "b2": self.b2}
        return experts

    def _experts_by_rank(self) -> dict[str, dict[int, torch.Tensor]]:
        """``_experts()`` as {name: {rank: tensor}}, built once (host time per call otherwise);
        ``_apply``, which may give the module new parameters (``.to()``), forgets them."""
        if self._by_rank_cache is None:
            ranks = self.world.local_ranks
            self._by_rank_cache = {
                name: {r: params[str(r)] for r in ranks} for name, params in self._experts().items()
            }
        return self._by_rank_cache

    def _apply(self, fn, *args, **kw):
        self._by_rank_cache = None
        return super()._apply(fn, *args, **kw)

    def _launched(self, xs, ids, weights) -> dict[int, torch.Tensor]:
        handles = self.workspace.run(
            xs, ids, weights, mode="layer", split=self.split, validate=self.validate,
            **self._experts_by_rank(),
        )  # fmt: skip
        return {r: h.out for r, h in handles.items()}

    def _by_rank(self, name: str, value) -> dict[int, torch.Tensor] | None:
        """``value`` as {rank: tensor} for this process's ranks: a plain tensor where the process
        runs one rank, else a dict with exactly its ranks."""
        ranks = self.world.local_ranks
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            if len(ranks) != 1:
                raise ValueError(
                    f"this world runs ranks {ranks} in one process: give {name} as a dict keyed "
                    "by rank"
                )
            return {ranks[0]: value}
        if not isinstance(value, Mapping):
            raise ValueError(
                f"{name} must be a tensor or a dict keyed by rank, got {type(value).__name__}"
            )
        if set(value) != set(ranks):
            raise ValueError(
                f"{name} is given for ranks {sorted(value)}, this process runs {ranks}"
            )
        for r, t in value.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(
                    f"{name} of rank {r} must be a torch.Tensor, got {type(t).__name__}"
                )
        return dict(value)

    # -- workspace ------------------------------------------------------------------------

    def check_errors(self) -> None:
        """Wait for the device; raise if a call failed: ``WaitTimeoutError`` or ``CapacityError``
        (a device failure: every call raises until ``reset()``), ``RoutingError`` (raised once).
        The message names the failed call and the later calls skipped because of it."""
        self.workspace.check_errors()

    def reset(self) -> None:
        """Bring the layer back in step after a device failure (a timeout), so that the next call
        works again without rebuilding it. Collective: every rank calls it, between calls."""
        self.workspace.reset()

    def rebalance(self, placement: Placement) -> None:
        """Move to ``placement`` (the same experts, ranks and slots per rank), between calls:
        collective, every rank calls it with the same placement. Each rank stages its experts
        in a symmetric buffer, then copies the experts of its new slots from whichever rank held
        them (its own where it did: over NVLink otherwise, no host staging), and the plan's
        tables switch in place: nothing is recompiled, and captured graphs stay valid. Needs
        room for a second copy of this rank's weights while it runs."""
        self.workspace.plan_ws.check_placement(placement)  # before any weight moves
        old, ranks, L = self.placement, self.world.local_ranks, self.placement.slots_per_rank
        self.world.barrier()  # every rank's calls are done: nobody reads the weights
        for weights in self._experts().values():
            some = weights[str(ranks[0])]
            staged = self.world.alloc(tuple(some.shape), some.dtype)
            for r in ranks:
                staged.peer(r).copy_(weights[str(r)])
            self.world.barrier()
            for r in ranks:
                for local, e in enumerate(placement.slot_expert()[r * L : (r + 1) * L]):
                    if e >= 0:
                        src = next((p for p in old.replicas[e] if p // L == r), old.replicas[e][0])
                        weights[str(r)].data[local].copy_(staged.peer(src // L)[src % L])
            self.world.barrier()  # every rank has its copies before the staging is freed
            self.world.free(staged)
        self.workspace.set_placement(placement)
        self.placement = placement

    def routing_stats(self) -> RoutingStats:
        """Per-expert token counts and co-selected expert pairs (of every 4th chunk of tokens)
        of this process's ranks, accumulated on the device by every call since the layer was
        built or ``clear_routing_stats()``; the input of the placement policies
        (``megakernel.placement.policies``). Reading waits for the calls made so far; the calls
        themselves never wait. Sum them over processes for the whole world's."""
        return self.workspace.plan_ws.routing_stats()

    def clear_routing_stats(self) -> None:
        self.workspace.plan_ws.clear_stats()

    def stats(self) -> dict[str, int]:
        """Calls of this process's ranks that took several rounds (their busiest rank received
        more than ``capacity`` rows), and those calls' rounds, since the layer was built; with
        the capacity and the most rounds a call may take. Reading waits for the calls made so
        far."""
        calls, rounds = self.workspace.plan_ws.round_calls()
        return {
            "calls_in_rounds": calls,
            "rounds_of_those_calls": rounds,
            "capacity": self.workspace.capacity,
            "max_rounds": self.workspace.plan_cfg.rounds,
        }

    def describe(self) -> str:
        """Per-buffer sizes of the workspace, per rank."""
        return self.workspace.describe()

    def close(self) -> None:
        """Free the symmetric workspace (collective: every rank calls it). A second call does
        nothing; a call of the layer after it raises."""
        self.workspace.close()

    def extra_repr(self) -> str:
        s = self.shape
        return (
            f"H={s.hidden}, I={s.ffn}, E={s.num_experts}, K={s.topk}, "
            f"R={self.world.world_size}, L={self.placement.slots_per_rank}, split={self.split}"
        )


def _as_fp32(value):
    """Biases (a tensor, or tensors by rank) as fp32, which the kernels read."""
    if isinstance(value, torch.Tensor):
        return value.float()
    if isinstance(value, Mapping):
        return {r: t.float() if isinstance(t, torch.Tensor) else t for r, t in value.items()}
    return value  # (``_by_rank`` names what is wrong with it)


def _check_scales(name: str, scales: nn.ParameterDict) -> None:
    """Block scales multiply e4m3 weights, and the GEMMs divide by them (their running-scale
    products, ``megakernel.ops.fp8``): each must be a positive finite number (a block of zeros
    takes scale 1, as ``megakernel.fp8`` quantises it). Read once, at construction."""
    for r, t in scales.items():
        bad = ~(torch.isfinite(t) & (t > 0))
        if bad.any():
            first = tuple(bad.nonzero()[0].tolist())
            raise ValueError(
                f"{name} of rank {r} has {int(bad.sum())} block scales that are not positive "
                f"finite numbers (the first at {first}: {float(t[first])})"
            )
