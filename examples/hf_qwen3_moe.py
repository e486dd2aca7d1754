"""A small random Qwen3-MoE model with its MoE blocks on the fused layer: ``python
examples/hf_qwen3_moe.py [--layers 4] [--new-tokens 32]`` (one GPU), or ``python -m
symm_mem.launch [--nproc N] examples/hf_qwen3_moe.py`` (N GPUs: each rank holds E / N experts and
generates from its own prompts). ``--family gpt_oss``: a small random gpt-oss model instead (its
experts' biases and clamped SwiGLU on the layer: ``MoEShape(activation="swigluoai",
bias=True)``).

Builds the model (random weights, bf16), generates greedily with the original blocks, swaps the
blocks' routed experts for ``FusedEPMoE`` layers (``replace_moe_blocks``), generates again from
the same prompts and prints how many tokens match. Then times the MoE blocks alone, original
against swapped, on the hidden states they saw in a prefill and in a decode step.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics

import torch
import transformers

from megakernel.integrations.hf import close_moe_blocks, is_moe_block, replace_moe_blocks
from symm_mem import EmulatedWorld, World, init_world


def small_model(family: str, layers: int, seed: int) -> transformers.PreTrainedModel:
    """A random bf16 model of ``family`` ("qwen3_moe" or "gpt_oss") with ``layers`` MoE layers."""
    common = dict(
        vocab_size=4096, hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=4, head_dim=64, num_experts_per_tok=8,
    )  # fmt: skip
    torch.manual_seed(seed)
    if family == "gpt_oss":
        cfg = transformers.GptOssConfig(**common, intermediate_size=512, num_local_experts=64)
        model = transformers.GptOssForCausalLM(cfg)
        with torch.no_grad():  # (its init leaves the experts' biases at 0)
            for m in model.modules():
                if hasattr(m, "gate_up_proj_bias"):
                    m.gate_up_proj_bias.normal_(0, 1.0)
                    m.down_proj_bias.normal_(0, 0.02)
    else:
        cfg = transformers.Qwen3MoeConfig(
            **common, intermediate_size=2048, moe_intermediate_size=512, num_experts=64,
            norm_topk_prob=True, decoder_sparse_step=1,
        )  # fmt: skip
        model = transformers.Qwen3MoeForCausalLM(cfg)
    return model.to("cuda", torch.bfloat16).eval()


def block_inputs(model, prompt: torch.Tensor) -> list[list[torch.Tensor]]:
    """The hidden states each MoE block sees in a prefill of ``prompt`` and in one decode step."""
    seen: list[list[torch.Tensor]] = []
    blocks = [m for m in model.modules() if is_moe_block(m)]
    hooks = [b.register_forward_pre_hook(lambda _, a: seen.append(a[0].clone())) for b in blocks]
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, do_sample=False)
    for h in hooks:
        h.remove()
    n = len(blocks)
    return [seen[:n], seen[n : 2 * n]]  # prefill, first decode step


def moe_us(model, inputs: list[torch.Tensor], reps: int = 20) -> float:
    """Median microseconds of one pass through every MoE block on ``inputs``, called eagerly."""
    blocks = [m for m in model.modules() if is_moe_block(m)]
    times = []
    with torch.no_grad():
        for i in range(reps + 3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for block, x in zip(blocks, inputs, strict=True):
                block(x)
            end.record()
            end.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def greedy(tokens: int) -> dict:
    """Greedy decoding of exactly ``tokens`` tokens: every rank makes the same layer calls."""
    return dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)


def open_world() -> World:
    """Under ``symm_mem.launch`` (torchrun): the NVSHMEM world; else one rank on this GPU."""
    return init_world() if "RANK" in os.environ else EmulatedWorld(1, "cuda")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="qwen3_moe", choices=["qwen3_moe", "gpt_oss"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    world = open_world()
    model = small_model(args.family, args.layers, seed=0)  # the same model on every rank
    cfg = model.config
    g = torch.Generator(device="cuda").manual_seed(1 + world.rank)  # each rank its own prompts
    prompt = torch.randint(
        0, cfg.vocab_size, (args.batch, args.prompt_len), device="cuda", generator=g
    )
    with torch.no_grad():
        want = model.generate(prompt, **greedy(args.new_tokens))
    original = copy.deepcopy(model)
    inputs = block_inputs(original, prompt)
    with world:
        replace_moe_blocks(model, world, max_tokens=args.batch * args.prompt_len)
        with torch.no_grad():
            got = model.generate(prompt, **greedy(args.new_tokens))
        new = want[:, args.prompt_len :], got[:, args.prompt_len :]
        same = int((new[0] == new[1]).sum())
        diff = new[0] != new[1]
        first = [int(d.nonzero()[0]) if d.any() else None for d in diff]
        say = print if world.rank == 0 else (lambda *a: None)
        ffn = getattr(cfg, "moe_intermediate_size", cfg.intermediate_size)
        experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
        say(f"{torch.cuda.get_device_name()} x {world.world_size}, {args.family} {args.layers} "
            f"layers, H {cfg.hidden_size}, I {ffn}, E {experts}, K {cfg.num_experts_per_tok}, "
            "bf16, random weights")  # fmt: skip
        say(f"rank 0: greedy tokens matching: {same} of {new[0].numel()} "
            f"(first mismatch per sequence: {first})")  # fmt: skip
        for name, xs in zip(("prefill", "decode"), inputs, strict=True):
            ours, theirs = moe_us(model, xs), moe_us(original, xs)
            tokens = xs[0].shape[0] * xs[0].shape[1]
            say(f"rank 0, MoE blocks, {name} ({tokens} tokens): original {theirs:.0f} us, fused "
                f"{ours:.0f} us ({theirs / ours:.2f}x)")  # fmt: skip
        close_moe_blocks(model)


if __name__ == "__main__":
    main()
