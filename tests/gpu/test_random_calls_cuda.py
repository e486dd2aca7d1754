"""Random sequences of layer calls on one GPU (``megakernel.fuzz``), bf16, R in {1, 2, 4, 8}
emulated, the default capacity or a quarter of the worst case (a few compiled variants), 1-3
calls each (token counts 0 to max_tokens; uniform, zipf, all-to-one, hot-expert, dropped or
bad-id routing), replayed from the layer's graphs where a T repeats. ``MK_RANDOM_SEQUENCES``
(default 100) sequences."""

import os

import pytest
import torch

from megakernel.fuzz import draw_sequence, run_sequence
from megakernel.shapes import MoEShape

BASE = MoEShape(hidden=1024, ffn=512, num_experts=64, topk=6, max_tokens_per_rank=256)
COUNT = int(os.environ.get("MK_RANDOM_SEQUENCES", "100"))


@pytest.mark.parametrize("seed", range(COUNT))
def test_random_sequence_on_the_gpu(seed):
    seq = draw_sequence(
        seed, ranks=(1, 2, 4, 8), dtypes=(torch.bfloat16,), base=BASE, capacities=(None, 0.25)
    )
    problems = run_sequence(seq, "cuda", graphs=True)
    assert problems == [], f"{seq.describe()}: {problems}"
