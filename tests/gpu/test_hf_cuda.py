"""Hugging Face MoE blocks on the fused layer, on one GPU in bf16: every supported family's block
against the HF block at R = 1 (the experts swapped inside the block), and from_hf on two
emulated ranks, each with its own batch."""

import copy

import pytest
import torch
from torch import nn

from megakernel import FusedEPMoE
from megakernel.integrations.hf import FusedExperts, close_moe_blocks, replace_moe_blocks
from symm_mem import EmulatedWorld

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")

H, I, E, K = 1024, 512, 32, 4
TOLERANCE = 2e-2  # relative error of a bf16 block against the HF block in bf16


def config(family: str):
    common = dict(hidden_size=H, num_experts_per_tok=K, hidden_act="silu")
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, moe_intermediate_size=I, num_experts=E)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common, moe_intermediate_size=I, num_experts=E, shared_expert_intermediate_size=2 * I
        )
    if family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=I, num_local_experts=E)
    return transformers.DeepseekV3Config(
        **common, moe_intermediate_size=I, n_routed_experts=E, n_shared_experts=1, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
    )  # fmt: skip


BLOCKS = {
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    "mixtral": ("mixtral", "MixtralSparseMoeBlock"),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3MoE"),
}


def block_of(family: str, seed: int) -> nn.Module:
    mod, name = BLOCKS[family]
    module = __import__(f"transformers.models.{mod}.modeling_{mod}", fromlist=[name])
    block = getattr(module, name)(config(family))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for b in block.buffers():
            b.copy_(torch.rand(b.shape, generator=g) * 0.1)
    return block.to("cuda", torch.bfloat16).eval()


def rel_err(got, want) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("family", list(BLOCKS))
def test_block_matches_the_hf_block_in_bf16(family):
    block = block_of(family, seed=1)
    x = torch.randn(4, 96, H, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = block(x)
    holder = nn.ModuleDict({"mlp": copy.deepcopy(block)})
    with EmulatedWorld(1, "cuda") as world:
        replace_moe_blocks(holder, world, max_tokens=512)
        assert isinstance(holder["mlp"].experts, FusedExperts)
        with torch.no_grad():
            got = holder["mlp"](x)
        holder["mlp"].experts.layer.check_errors()
        err = rel_err(got, want)
        print(f"{family}: relative error against the HF block {err:.2e}")
        assert err < TOLERANCE
        close_moe_blocks(holder)


def test_from_hf_on_two_emulated_ranks():
    block = block_of("qwen3_moe", seed=2)
    xs = [torch.randn(300 + 17 * r, H, device="cuda", dtype=torch.bfloat16) for r in (0, 1)]
    with EmulatedWorld(2, "cuda") as world:
        layer = FusedEPMoE.from_hf(block, world, max_tokens=512)
        with torch.no_grad():
            routed = [block.gate(x) for x in xs]
            want = [block(x[None])[0] for x in xs]
            got = layer(dict(enumerate(xs)), {r: routed[r][2] for r in (0, 1)},
                        {r: routed[r][1] for r in (0, 1)})  # fmt: skip
        layer.check_errors()
        for r in (0, 1):
            err = rel_err(got[r], want[r])
            print(f"qwen3_moe, rank {r} of 2: relative error {err:.2e}")
            assert err < TOLERANCE
        layer.close()


def test_gpt_oss_block_matches_the_hf_block_in_bf16():
    """gpt-oss's block (clamped SwiGLU, biases, transposed and interleaved weights): the
    swapped block against the HF block, both in bf16; its biases spread so the clamps act."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    cfg = transformers.GptOssConfig(
        hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K
    )
    block = GptOssMLP(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * H**-0.5)
        block.experts.gate_up_proj_bias.normal_(0, 4, generator=g)
    block = block.to("cuda", torch.bfloat16).eval()
    x = torch.randn(4, 96, H, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want, _ = block(x)
    holder = nn.ModuleDict({"mlp": copy.deepcopy(block)})
    with EmulatedWorld(1, "cuda") as world:
        replace_moe_blocks(holder, world, max_tokens=512)
        layer = holder["mlp"].experts.layer
        assert (layer.shape.activation, layer.shape.bias) == ("swigluoai", True)
        with torch.no_grad():
            got, _ = holder["mlp"](x)
        layer.check_errors()
        err = rel_err(got, want)
        print(f"gpt_oss: relative error against the HF block {err:.2e}")
        assert err < TOLERANCE
        close_moe_blocks(holder)
