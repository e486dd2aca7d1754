"""Random sequences of layer calls, for the randomized tests (``tests/cpu/test_random_calls.py``
and its GPU twin): each sequence builds a layer on an emulated world of R ranks, with a random
dtype, capacity and kind of experts (SwiGLU, or gpt-oss's clamped form, with or without
biases), and, where asked, some of the kernel's switches set away from their defaults
(``KNOBS``); then it makes a few calls with random token counts (0 and 1 included) and random
routings; every output is compared with ``moe_ref``, or the expected error is checked.

A sequence is data (``Sequence``), drawn from one seed by ``draw_sequence``, so a failure names
the seed that reproduces it; ``run_sequence`` runs one and returns what went wrong.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch
import triton

from megakernel import routing
from megakernel.config import KernelConfig
from megakernel.plan import MAX_ROUNDS, PlanConfig
from megakernel.shapes import MoEShape
from megakernel.testing import (
    compare_layer_output,
    layer_ref,
    make_biases,
    make_tokens,
    make_w2,
    make_w13,
)
from megakernel.validate import RoutingError

# "bad_id": uniform, but one rank names an expert outside [-1, E): its output must be NaN and
# the layer must raise RoutingError once, naming the rank; the other ranks' outputs stay right
KINDS = ("uniform", "zipf", "all_to_one", "hot", "dropped", "bad_id")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# switches of KernelConfig a user may set, each of which changes the kernel a call runs (the
# task order, what a tile waits for, the GEMMs' form); the defaults come first. Under the
# interpreter a config costs nothing more; on a GPU each one compiles the kernel again
KNOBS: dict[str, tuple] = {
    "token_saving": (True, False),
    "sorted_dispatch": (True, False),
    "per_tile_flags": (True, False),
    "pack": ("auto", "scan"),
    "gemm1_pairs": (True, False),
    "half_tiles": (True, False),
    "gemm1_group": (16, 1, 2),
    "tail_rows": (0, 8),
}


@dataclass
class Call:
    tokens: list[int]  # T per rank
    kind: str  # one of KINDS
    seed: int
    param: float = 0.0  # zipf exponent, hot fraction or drop probability
    rank: int = 0  # all_to_one: the destination; bad_id: the rank with the bad id
    expert: int = 0  # hot: the hot expert; bad_id: the bad id


@dataclass
class Sequence:
    seed: int
    world_size: int
    shape: MoEShape
    capacity: int | None  # None: the default
    refused: bool  # the capacity needs more than MAX_ROUNDS rounds: construction must fail
    calls: list[Call] = field(default_factory=list)
    knobs: dict[str, object] = field(default_factory=dict)  # KNOBS set away from the default

    def describe(self) -> str:
        kinds = ", ".join(f"{c.kind} T={c.tokens}" for c in self.calls)
        experts = self.shape.activation + (" + bias" if self.shape.bias else "")
        knobs = "".join(f" {k}={v!r}" for k, v in self.knobs.items())
        return (
            f"sequence {self.seed}: R={self.world_size} {str(self.shape.dtype)[6:]} {experts} "
            f"capacity {self.capacity}{knobs} ({kinds})"
        )


def worst_rows(shape: MoEShape, world_size: int) -> int:
    """Rows the worst routing sends one rank (contiguous placement)."""
    L, T = shape.num_experts // world_size, shape.max_tokens_per_rank
    return PlanConfig(world_size, L, shape.topk, max_tokens=T, capacity=1).worst_rows


def draw_sequence(
    seed: int,
    ranks: tuple[int, ...],
    dtypes: tuple[torch.dtype, ...],
    base: MoEShape,
    capacities: tuple[float | None, ...] | None = None,
    max_calls: int = 3,
    knobs: bool = False,
) -> Sequence:
    """One random sequence. ``capacities``: fractions of the worst routing's rows to pick from
    (None: the default capacity); None draws any capacity from the least allowed to the worst
    case, the default, or (rarely) one too small, which the layer must refuse. ``knobs``: each
    of ``KNOBS`` is set to one of its other values with probability 0.3 (``run_sequence``
    applies them to the config it is given)."""
    g = random.Random(seed)
    R = g.choice(ranks)
    shape = MoEShape(
        hidden=base.hidden, ffn=base.ffn, num_experts=base.num_experts, topk=base.topk,
        max_tokens_per_rank=base.max_tokens_per_rank, dtype=g.choice(dtypes),
    )  # fmt: skip
    worst = worst_rows(shape, R)
    least = triton.cdiv(worst, MAX_ROUNDS)
    refused = False
    if capacities is not None:
        frac = g.choice(capacities)
        capacity = None if frac is None else max(least, int(worst * frac))
    else:
        pick = g.random()
        if pick < 0.25:
            capacity = None
        elif pick < 0.3:
            capacity, refused = least - 1, least > 1
        else:
            capacity = g.randint(least, worst)
    seq = Sequence(seed, R, shape, capacity or None, refused)
    E, T_max = shape.num_experts, shape.max_tokens_per_rank
    for i in range(g.randint(1, max_calls)):
        tokens = [g.choice([0, 1, g.randint(0, T_max), T_max]) for _ in range(R)]
        kind = g.choice(KINDS)
        call = Call(tokens, kind, seed * 1000 + i)
        if kind == "zipf":
            call.param = g.uniform(0.5, 1.5)
        elif kind == "hot":
            call.param, call.expert = g.uniform(0.2, 1.0), g.randrange(E)
        elif kind == "dropped":
            call.param = g.uniform(0.1, 0.9)
        elif kind == "all_to_one":
            call.rank = g.randrange(R)
        elif kind == "bad_id":
            if not any(tokens):
                tokens[0] = 1
            call.rank = g.choice([r for r in range(R) if tokens[r]])
            call.expert = g.choice([E, E + 3, -2, -7])
        seq.calls.append(call)
    # the experts' kind, drawn last so the draws above stay what they were for every seed
    # (gpt-oss's 20%, its activation without biases 7%, SwiGLU with biases 8%, plain the rest)
    pick = g.random()
    if pick < 0.35:
        activation = "swigluoai" if pick < 0.27 else "silu"
        seq.shape = replace(shape, activation=activation, bias=not 0.2 <= pick < 0.27)
    if knobs:  # last again, so the draws above stay what they were
        for name, values in KNOBS.items():
            if g.random() < 0.3:
                seq.knobs[name] = g.choice(values[1:])
    return seq


def call_routing(call: Call, R: int, shape: MoEShape) -> routing.Routing:
    """The call's routing (global view)."""
    E, K, T = shape.num_experts, shape.topk, call.tokens
    if call.kind == "zipf":
        return routing.zipf(R, T, E, K, call.param, call.seed)
    if call.kind == "hot":
        return routing.hot_expert(R, T, E, K, call.param, call.seed, hot=call.expert)
    if call.kind == "dropped":
        return routing.drop(routing.uniform(R, T, E, K, call.seed), call.param, call.seed + 1)
    if call.kind == "all_to_one":
        return routing.all_to_one_rank(R, T, E, K, dst=call.rank, seed=call.seed)
    rt = routing.uniform(R, T, E, K, call.seed)
    if call.kind == "bad_id":
        ids = rt.topk_ids[call.rank].clone()
        ids[len(ids) // 2, K - 1] = call.expert
        rt.topk_ids[call.rank] = ids
    return rt


def run_sequence(
    seq: Sequence, device: str, config: KernelConfig | None = None, graphs: bool = False
) -> list[str]:
    """Run one sequence on an emulated world on ``device``; returns what went wrong (empty:
    every output equals moe_ref within the dtype's tolerance, and every expected error came).
    The sequence's knobs are set on ``config`` (the default config if None)."""
    from megakernel import FusedEPMoE
    from symm_mem import EmulatedWorld

    R, shape = seq.world_size, seq.shape
    problems: list[str] = []
    w13, w2 = make_w13(shape, seq.seed, device), make_w2(shape, seq.seed, device)
    biases = make_biases(shape, seq.seed, device)
    if seq.knobs:
        config = replace(config or KernelConfig(), **seq.knobs)
    with EmulatedWorld(R, device) as world:
        try:
            layer = FusedEPMoE.from_dense(
                world, shape, w13, w2, **biases, config=config, capacity=seq.capacity,
                graphs=graphs,
            )  # fmt: skip
        except ValueError as e:
            if seq.refused and "rounds" in str(e):
                return []
            return [f"construction failed: {e}"]
        if seq.refused:
            layer.close()
            return [f"capacity {seq.capacity} needs more than {MAX_ROUNDS} rounds: not refused"]
        for i, call in enumerate(seq.calls):
            problems += [f"call {i + 1} ({call.kind}): {p}" for p in _one_call(layer, call, seq)]
        layer.close()
    return problems


def _one_call(layer, call: Call, seq: Sequence) -> list[str]:
    R, shape, dev = seq.world_size, seq.shape, layer.world.device
    rt = call_routing(call, R, shape).to(dev)
    xs = make_tokens(shape, call.tokens, call.seed, dev)
    args = dict(enumerate(xs)), dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))
    raised = []
    out = None
    try:
        out = layer(*args)
    except RoutingError as e:
        raised.append(e)
    try:
        layer.check_errors()
    except RoutingError as e:
        raised.append(e)
    problems = []
    if call.kind == "bad_id":
        if len(raised) != 1:
            return [f"expected one RoutingError, got {len(raised)}"]
        if f"rank {call.rank}" not in str(raised[0]) or str(call.expert) not in str(raised[0]):
            problems.append(f"the RoutingError names another rank or id: {raised[0]}")
    elif raised:
        return [f"unexpected {raised[0]!r}"]
    if out is None:
        return problems
    for r in range(R):
        if call.kind == "bad_id" and r == call.rank:
            if not out[r].isnan().all():
                problems.append(f"rank {r}: a call with a bad id must return NaN")
            continue
        want = layer_ref(xs[r], rt.topk_ids[r], rt.topk_weights[r], shape, seq.seed)
        problems += compare_layer_output(out[r], want, shape.dtype, r)
    return problems
