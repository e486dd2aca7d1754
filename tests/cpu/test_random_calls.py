"""Random sequences of layer calls under the interpreter (``megakernel.fuzz``): R in {1, 2, 4},
fp32 / fp16 / bf16, SwiGLU or gpt-oss experts with or without biases, random capacities (a few
too small, which must be refused), some of the kernel's switches away from their defaults
(``fuzz.KNOBS``; I = 32, so a tile has two GEMM1 column blocks for their order), 1-3 calls
each with token counts from 0 to max_tokens and uniform, zipf, all-to-one, hot-expert, dropped
or bad-id routing. Every output is compared with moe_ref, or the expected error checked.

CI runs ``MK_RANDOM_SEQUENCES`` sequences (default 6); ``MK_RANDOM_SEQUENCES=200`` is the full
suite (300 took 11 minutes on two cores, 2026-12-07).
"""

import os

import pytest
import torch

from megakernel import KernelConfig
from megakernel.fuzz import DTYPES, KNOBS, draw_sequence, run_sequence
from megakernel.shapes import MoEShape

BASE = MoEShape(hidden=32, ffn=32, num_experts=8, topk=2, max_tokens_per_rank=24)
COUNT = int(os.environ.get("MK_RANDOM_SEQUENCES", "6"))


def tiny_config() -> KernelConfig:
    knobs = dict(block_m=16, block_n=16, block_k=16, down_block_n=32, down_block_k=16)
    return KernelConfig(**knobs, combine_block=8, reduce_h=32, block_h=32, chunk=4)


@pytest.mark.parametrize("seed", range(COUNT))
def test_random_sequence(seed):
    seq = draw_sequence(seed, ranks=(1, 2, 4), dtypes=DTYPES, base=BASE, knobs=True)
    problems = run_sequence(seq, "cpu", config=tiny_config())
    assert problems == [], f"{seq.describe()}: {problems}"


def test_the_draws_cover_what_the_suite_promises():
    """Over the full suite's 200 seeds: every R, dtype, kind of experts and routing kind, token
    counts 0, 1 and max_tokens, the default capacity, a custom one and a refused one, and every
    other value of each kernel switch all occur."""
    seqs = [
        draw_sequence(s, ranks=(1, 2, 4), dtypes=DTYPES, base=BASE, knobs=True) for s in range(200)
    ]
    calls = [c for s in seqs for c in s.calls]
    assert {s.world_size for s in seqs} == {1, 2, 4}
    assert {s.shape.dtype for s in seqs} == set(DTYPES)
    assert {c.kind for c in calls} == {"uniform", "zipf", "all_to_one", "hot", "dropped", "bad_id"}
    counts = {t for c in calls for t in c.tokens}
    assert {0, 1, BASE.max_tokens_per_rank} <= counts
    assert any(s.capacity is None for s in seqs) and any(s.capacity for s in seqs)
    assert any(s.refused for s in seqs)
    assert torch.bfloat16 in {s.shape.dtype for s in seqs}
    kinds = {(s.shape.activation, s.shape.bias) for s in seqs}
    assert kinds == {("silu", False), ("silu", True), ("swigluoai", True), ("swigluoai", False)}
    for name, values in KNOBS.items():
        assert {s.knobs[name] for s in seqs if name in s.knobs} == set(values[1:]), name
    assert any(not s.knobs for s in seqs) and any(len(s.knobs) >= 4 for s in seqs)
