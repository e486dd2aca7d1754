"""Eager layer calls replayed from CUDA graphs, one per T seen before.

An eager call costs the host its checks, four launches and their bookkeeping (perf/NOTES.md,
"Eager calls"); a graph replay costs one launch. ``CallGraphs`` captures one mode-"layer" call of
a ``Megakernel`` on static input buffers the second time a (T per rank, weights) key is seen;
later calls with that key copy their inputs into the buffers and replay it. Each call still
returns a fresh output tensor.

NOTE: the plan bumps the call's epoch on the device, so a replay is a new call to the peers
(DESIGN §7), exactly as the launch path's; only the host's mirror of the epoch is advanced here.
"""

from __future__ import annotations

import torch

from megakernel.handles import CallInputs
from megakernel.workspace import Megakernel

MAX_GRAPHS = 8  # captured keys kept (a graph holds its static buffers and a memory pool)
MAX_SEEN = 64  # keys remembered once seen (prefill with a new T every call captures nothing)


class CallGraphs:
    """The captured calls of one workspace's layer, by key."""

    def __init__(self, ws: Megakernel) -> None:
        self.ws = ws
        self.seen: set[tuple] = set()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict]] = {}

    def usable(self) -> bool:
        """On a GPU, and not inside a graph the caller is capturing."""
        return self.ws.world.device.type == "cuda" and not torch.cuda.is_current_stream_capturing()

    def __call__(self, x, ids, weights, split: bool, **experts) -> dict[int, torch.Tensor] | None:
        """The outputs of one layer call by rank, replayed; None where this key has no graph
        (yet): the caller then runs the call itself. ``experts``: ``w13``, ``w2`` (and with FP8
        ``w13_scale``, ``w2_scale``) by rank, as ``Megakernel.run`` takes them. Inputs are
        checked as a call checks them (the weights are the layer's own, checked when it was
        built)."""
        ranks = self.ws.world.local_ranks
        for r in ranks:
            given = CallInputs(x[r], ids[r], weights[r], experts["w13"][r], experts["w2"][r], None)
            self.ws.check_inputs(r, given, layer=True, values=False, weights=False)
        held = [t for t in experts.values() if t is not None]
        key = (split, *((x[r].shape[0], *(t[r].data_ptr() for t in held)) for r in ranks))
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen or len(self.graphs) >= MAX_GRAPHS:
                if len(self.seen) >= MAX_SEEN:
                    self.seen.clear()
                self.seen.add(key)
                return None
            entry = self.graphs[key] = self._capture(x, ids, split, experts)
        graph, static = entry
        _copy_into(static, {"x": x, "ids": ids, "weights": weights}, ranks)
        graph.replay()
        for r in ranks:
            self.ws.epoch[r] += 1
            self.ws.plan_ws.count_tokens(x[r].shape[0])  # (the device counts its part itself)
        outs = {r: static["out"][r].clone() for r in ranks}
        self.ws.after_call()  # as a launched call does
        return outs

    def _capture(self, x, ids, split: bool, experts: dict) -> tuple[torch.cuda.CUDAGraph, dict]:
        """One layer call on fresh static buffers, captured (nothing runs)."""
        ranks, dev, shape = self.ws.world.local_ranks, self.ws.world.device, self.ws.shape
        K, H = shape.topk, shape.hidden
        static = {
            "x": {r: torch.zeros(x[r].shape, dtype=shape.dtype, device=dev) for r in ranks},
            "ids": {r: torch.full((ids[r].shape[0], K), -1, dtype=torch.int32, device=dev)
                    for r in ranks},
            "weights": {r: torch.zeros(ids[r].shape[0], K, device=dev) for r in ranks},
            "out": {r: torch.empty(x[r].shape[0], H, dtype=shape.dtype, device=dev)
                    for r in ranks},
        }  # fmt: skip
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        epochs = dict(self.ws.epoch)
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            self.ws.run(
                static["x"], static["ids"], static["weights"], out=static["out"], mode="layer",
                split=split, validate=False, **experts,
            )  # fmt: skip
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.ws.epoch.update(epochs)  # the capture ran nothing
        return graph, static


def _copy_into(static: dict, given: dict, ranks: list[int]) -> None:
    """``static[name][r].copy_(given[name][r])`` for every input and rank, in one launch where the
    dtypes match (byte views, ``torch._foreach_copy_``): a copy each is host time per call."""
    dsts, srcs = [], []
    for name, by_rank in given.items():
        for r in ranks:
            dst, src = static[name][r], by_rank[r]
            if src.dtype == dst.dtype and src.is_contiguous():
                dsts.append(dst.view(torch.uint8))
                srcs.append(src.view(torch.uint8))
            else:
                dst.copy_(src)
    torch._foreach_copy_(dsts, srcs)
