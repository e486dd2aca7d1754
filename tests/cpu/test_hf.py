"""Hugging Face MoE blocks on the fused layer (megakernel.integrations.hf), under the interpreter:
tiny random configs of every supported family, both module forms, the refusals, and a whole
model swapped and run."""

import copy

import pytest
import torch
from torch import nn

from megakernel import FusedEPMoE, KernelConfig
from megakernel.integrations.hf import (
    FusedExperts,
    PerExpertBlock,
    close_moe_blocks,
    replace_moe_blocks,
)
from symm_mem import EmulatedWorld

transformers = pytest.importorskip("transformers")

H, I, E, K, SHARED_I = 64, 32, 8, 2, 48
BATCH, SEQ = 2, 7


def small_config() -> KernelConfig:
    knobs = dict(block_m=16, block_n=16, block_k=16, down_block_n=32, down_block_k=16)
    return KernelConfig(**knobs, combine_block=8, reduce_h=32, block_h=32, chunk=4)


def family_config(family: str):
    common = dict(hidden_size=H, num_experts_per_tok=K, hidden_act="silu")
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common, moe_intermediate_size=I, num_experts=E, norm_topk_prob=True
        )
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common,
            moe_intermediate_size=I,
            num_experts=E,
            shared_expert_intermediate_size=SHARED_I,
            norm_topk_prob=False,
        )
    if family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=I, num_local_experts=E)
    if family == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **common,
            moe_intermediate_size=I,
            n_routed_experts=E,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
        )
    raise ValueError(family)


def family_block(family: str, seed: int) -> nn.Module:
    """One sparse MoE block of ``family`` with random weights (and router bias), fp32."""
    cfg = family_config(family)
    module = {
        "qwen3_moe": "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",
        "qwen2_moe": "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",
        "mixtral": "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock",
        "deepseek_v3": "transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE",
    }[family]
    path, name = module.rsplit(".", 1)
    block = getattr(__import__(path, fromlist=[name]), name)(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for b in block.buffers():  # DeepSeek-V3's e_score_correction_bias
            b.copy_(torch.rand(b.shape, generator=g) * 0.1)
    return block.float().eval()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"])
def test_fused_form_block_matches_the_hf_block(family):
    """The block with its experts swapped (router, shared experts and the rest its own) gives
    the HF block's output."""
    block = family_block(family, seed=1)
    x = torch.randn(BATCH, SEQ, H, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = block(x)
    swapped = copy.deepcopy(block)
    with EmulatedWorld(1) as world:
        holder = nn.ModuleDict({"mlp": swapped})
        assert replace_moe_blocks(holder, world, config=small_config(), max_tokens=64) is holder
        assert isinstance(swapped.experts, FusedExperts)
        with torch.no_grad():
            got = swapped(x)
        swapped.experts.layer.check_errors()
        assert got.shape == want.shape
        assert rel_err(got, want) < 1e-5, rel_err(got, want)
        close_moe_blocks(holder)


def test_from_hf_in_bf16_on_two_emulated_ranks():
    """``FusedEPMoE.from_hf`` shards a Qwen3-MoE block's experts onto two ranks; each rank's own
    batch, routed by the block's router, gives the HF block's output within bf16 tolerance."""
    block = family_block("qwen3_moe", seed=3).to(torch.bfloat16)
    xs = [torch.randn(SEQ + r, H, generator=torch.Generator().manual_seed(r)) for r in (0, 1)]
    xs = [x.to(torch.bfloat16) for x in xs]
    with EmulatedWorld(2) as world:
        layer = FusedEPMoE.from_hf(block, world, config=small_config(), max_tokens=64)
        assert layer.shape.dtype == torch.bfloat16 and layer.shape.topk == K
        with torch.no_grad():
            routed = [block.gate(x) for x in xs]  # (logits, weights, ids)
            want = [block(x[None])[0] for x in xs]
            got = layer(dict(enumerate(xs)), {r: routed[r][2] for r in (0, 1)},
                        {r: routed[r][1] for r in (0, 1)})  # fmt: skip
        layer.check_errors()
        for r in (0, 1):
            assert rel_err(got[r], want[r]) < 2e-2, (r, rel_err(got[r], want[r]))
        layer.close()


class LegacyMLP(nn.Module):
    """A transformers-4 expert MLP: ``gate_proj``/``up_proj``/``down_proj`` (Qwen) or
    ``w1``/``w3``/``w2`` (Mixtral)."""

    def __init__(self, hidden: int, ffn: int, mixtral: bool) -> None:
        super().__init__()
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        self.names = names
        setattr(self, names[0], nn.Linear(hidden, ffn, bias=False))
        setattr(self, names[1], nn.Linear(hidden, ffn, bias=False))
        setattr(self, names[2], nn.Linear(ffn, hidden, bias=False))
        self.act_fn = nn.SiLU()

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class LegacySparseMoeBlock(nn.Module):
    """The transformers-4 blocks' forward, as it was: router inline, a loop over the experts,
    ``(hidden, router_logits)`` returned. Qwen2-MoE's adds a gated shared expert; Mixtral's
    always renormalises (and has no ``norm_topk_prob``)."""

    def __init__(self, shared: bool, norm_topk_prob: bool, mixtral: bool) -> None:
        super().__init__()
        self.top_k, self.renormalize = K, norm_topk_prob or mixtral
        if not mixtral:
            self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(LegacyMLP(H, I, mixtral) for _ in range(E))
        if shared:
            self.shared_expert = LegacyMLP(H, SHARED_I, mixtral=False)
            self.shared_expert_gate = nn.Linear(H, 1, bias=False)

    def forward(self, hidden_states):
        B, S, D = hidden_states.shape
        x = hidden_states.view(-1, D)
        router_logits = self.gate(x)
        weights = torch.softmax(router_logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        if self.renormalize:
            weights /= weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(len(self.experts)):
            token, k = torch.where(selected == e)
            out.index_add_(0, token, self.experts[e](x[token]) * weights[token, k, None])
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(B, S, D), router_logits


@pytest.mark.parametrize(
    "shared, norm, mixtral", [(False, True, False), (True, False, False), (False, False, True)]
)
def test_per_expert_form_block_matches(shared, norm, mixtral):
    """The transformers-4 form (Qwen3-MoE, Qwen2-MoE with its shared expert, Mixtral's w1/w3/w2):
    the whole block is replaced, routes as it did and returns (hidden, router_logits)."""
    torch.manual_seed(4)
    block = LegacySparseMoeBlock(shared, norm, mixtral)
    with torch.no_grad():
        for p in block.parameters():
            p.mul_(2.0)
    x = torch.randn(BATCH, SEQ, H)
    with torch.no_grad():
        want, want_logits = block(x)
    model = nn.ModuleDict({"moe": block})
    with EmulatedWorld(1) as world:
        replace_moe_blocks(model, world, config=small_config(), max_tokens=64)
        assert isinstance(model["moe"], PerExpertBlock)
        with torch.no_grad():
            got, logits = model["moe"](x)
        assert torch.equal(logits, want_logits)
        assert rel_err(got, want) < 1e-5, rel_err(got, want)
        close_moe_blocks(model)


def gpt_oss_block(seed: int) -> nn.Module:
    """A gpt-oss MoE block (router + experts with biases; weights transposed, gate and up
    columns interleaved) with random weights, fp32; its gate/up biases spread so that some gate
    and up values pass the clamps at +-7."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    cfg = transformers.GptOssConfig(
        hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K
    )
    block = GptOssMLP(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        block.experts.gate_up_proj_bias.mul_(40.0)  # 0 +- 8
    return block.float().eval()


def test_gpt_oss_block_matches_the_hf_block():
    """gpt-oss's experts (clamped SwiGLU with alpha, biases, transposed and interleaved
    weights) on the layer: ``activation="swigluoai"``, ``bias=True``, the weights in the layer's
    layout; the swapped block gives the HF block's output (its router, softmax over the top-k
    logits, its own). The probe tells the gate by what it computes."""
    block = gpt_oss_block(seed=7)
    x = torch.randn(BATCH, SEQ, H, generator=torch.Generator().manual_seed(8))
    gate_up = torch.einsum("bsh,ehi->bsei", x, block.experts.gate_up_proj)
    gate_up = gate_up + block.experts.gate_up_proj_bias
    assert (gate_up[..., 0::2] > 7).any() and (gate_up[..., 1::2].abs() > 7).any(), "clamps"
    with torch.no_grad():
        want, want_scores = block(x)
    swapped = copy.deepcopy(block)
    with EmulatedWorld(1) as world:
        holder = nn.ModuleDict({"mlp": swapped})
        replace_moe_blocks(holder, world, config=small_config(), max_tokens=64)
        layer = swapped.experts.layer
        assert (layer.shape.activation, layer.shape.bias, layer.shape.topk) == (
            "swigluoai",
            True,
            K,
        )
        with torch.no_grad():
            got, scores = swapped(x)
        layer.check_errors()
        assert torch.equal(scores, want_scores)
        assert rel_err(got, want) < 1e-5, rel_err(got, want)
        close_moe_blocks(holder)


def test_unsupported_experts_are_refused_clearly():
    """A gate that computes something else (gpt-oss's with another alpha; SiLU clamped at 10, as
    DeepSeek-V4's), experts without a gate, another activation function: refused, naming what
    differs, and nothing swapped."""
    altered = gpt_oss_block(seed=9)
    altered.experts.alpha = 1.5
    model = nn.ModuleDict({"mlp": altered})
    with EmulatedWorld(1) as world:
        with pytest.raises(NotImplementedError, match="computes none of .*alpha 1.702"):
            replace_moe_blocks(model, world)
        clamped = family_block("qwen3_moe", seed=9)  # DeepSeek-V4's gate: SiLU, clamped at 10
        clamped.experts._apply_gate = lambda gate_up: (
            torch.nn.functional.silu(gate_up.chunk(2, dim=-1)[0]).clamp(max=10.0)
            * gate_up.chunk(2, dim=-1)[1].clamp(-10.0, 10.0)
        )
        with pytest.raises(NotImplementedError, match="computes none of"):
            FusedEPMoE.from_hf(clamped, world)
        ungated = gpt_oss_block(seed=9)
        ungated.experts.has_gate = False
        with pytest.raises(NotImplementedError, match="no gate"):
            FusedEPMoE.from_hf(ungated, world)
        gelu = family_block("mixtral", seed=5)
        gelu.experts.act_fn = nn.GELU()
        with pytest.raises(NotImplementedError, match="experts use GELU.*SwiGLU"):
            FusedEPMoE.from_hf(gelu, world)
        with pytest.raises(ValueError, match="has no sparse MoE block"):
            replace_moe_blocks(nn.Linear(2, 2), world)
    assert isinstance(model["mlp"].experts, nn.Module) and not isinstance(
        model["mlp"].experts, FusedExperts
    ), "nothing was swapped"


def test_a_whole_qwen3_moe_model_generates_the_same_tokens():
    """A one-layer random Qwen3-MoE model, its blocks swapped in place: the logits of a prompt
    match and greedy decoding gives the same tokens."""
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=97, hidden_size=H, intermediate_size=2 * H, moe_intermediate_size=I,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=E, num_experts_per_tok=K, norm_topk_prob=True, decoder_sparse_step=1,
    )  # fmt: skip
    torch.manual_seed(6)
    model = transformers.Qwen3MoeForCausalLM(cfg).float().eval()
    assert_swapped_model_generates_the_same(model, swapped_blocks=1)


def assert_swapped_model_generates_the_same(model, swapped_blocks: int) -> None:
    """Greedy tokens of a prompt, before and after ``replace_moe_blocks``, are equal."""
    prompt = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=4, do_sample=False)
    with EmulatedWorld(1) as world:
        replace_moe_blocks(model, world, config=small_config(), max_tokens=64)
        assert sum(isinstance(m, FusedExperts) for m in model.modules()) == swapped_blocks
        with torch.no_grad():
            got = model.generate(prompt, max_new_tokens=4, do_sample=False)
        assert torch.equal(got, want)
        close_moe_blocks(model)


def test_a_whole_gpt_oss_model_generates_the_same_tokens():
    """A two-layer random gpt-oss model (sliding and full attention), both MoE blocks swapped:
    greedy decoding gives the same tokens. The experts' biases are spread so the clamps act."""
    cfg = transformers.GptOssConfig(
        vocab_size=97, hidden_size=H, intermediate_size=I, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=E,
        num_experts_per_tok=K, layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
    )  # fmt: skip
    torch.manual_seed(6)
    model = transformers.GptOssForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "gate_up_proj_bias"):
                m.gate_up_proj.normal_(0, 0.2)
                m.down_proj.normal_(0, 0.2)
                m.gate_up_proj_bias.normal_(0, 4)
                m.down_proj_bias.normal_(0, 0.5)
    assert_swapped_model_generates_the_same(model, swapped_blocks=2)


def test_deepseek_v3_fp8_experts_load_as_an_fp8_layer():
    """A DeepSeek-V3 block whose experts transformers holds in FP8 (``FP8Experts``: e4m3 weights,
    fp32 scales per 128 x 128 block, as its FP8 checkpoints load) becomes an FP8 layer with those
    weights and scales as they are; the routed experts' output, for the routing the block's own
    router chose, is ``moe_fp8_ref``'s, and the block is within the FP8 error of the dense one."""
    from transformers.integrations.finegrained_fp8 import FP8Experts

    from megakernel.fp8 import FP8_DENSE_ERROR, FP8_TOLERANCE, moe_fp8_ref, quantize_experts
    from megakernel.testing import compare_layer_output

    cfg = family_config("deepseek_v3")
    cfg.hidden_size, cfg.moe_intermediate_size = 256, 128  # whole 128-blocks
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    dense = DeepseekV3MoE(cfg)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    dense = dense.to(torch.bfloat16).eval()
    block = copy.deepcopy(dense)
    block.experts = FP8Experts(cfg, block_size=(128, 128))
    q13 = quantize_experts(dense.experts.gate_up_proj.detach())
    q2 = quantize_experts(dense.experts.down_proj.detach())
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(q13[0])
        block.experts.gate_up_proj_scale_inv.copy_(q13[1])
        block.experts.down_proj.copy_(q2[0])
        block.experts.down_proj_scale_inv.copy_(q2[1])
    x = torch.randn(BATCH, SEQ, 256, generator=g).to(torch.bfloat16)
    with EmulatedWorld(1) as world:
        holder = nn.ModuleDict({"mlp": block})
        replace_moe_blocks(holder, world, config=small_config(), max_tokens=64)
        layer = block.experts.layer
        assert layer.shape.fp8 and layer.shape.dtype == torch.bfloat16
        assert torch.equal(layer.w13_scale["0"], q13[1]), "the checkpoint's scales, as given"
        seen = {}
        run = block.experts.forward

        def recording(hidden, ids, weights):
            seen.update(hidden=hidden, ids=ids, weights=weights, out=run(hidden, ids, weights))
            return seen["out"]

        block.experts.forward = recording
        with torch.no_grad():
            got, want_dense = block(x), dense(x)
        layer.check_errors()
        want = moe_fp8_ref(seen["hidden"], seen["ids"], seen["weights"], q13, q2)
        assert compare_layer_output(seen["out"], want, FP8_TOLERANCE, 0, "moe_fp8_ref") == []
        assert rel_err(got, want_dense) < FP8_DENSE_ERROR, rel_err(got, want_dense)
        close_moe_blocks(holder)


def test_fp8_experts_with_ue8m0_scales_read_as_fp32_powers_of_two():
    """Checkpoints that store the block scales as UE8M0 (powers of two) give the same fp32
    scales; other block sizes are refused clearly."""
    from transformers.integrations.finegrained_fp8 import FP8Experts

    from megakernel.integrations.hf import fp8_weights

    cfg = family_config("deepseek_v3")
    cfg.hidden_size, cfg.moe_intermediate_size = 256, 128
    block = nn.Module()
    block.experts = FP8Experts(cfg, block_size=(128, 128), scale_fmt="ue8m0")
    powers = torch.tensor([0.125, 0.5, 2.0, 64.0])
    with torch.no_grad():
        for name in ("gate_up_proj_scale_inv", "down_proj_scale_inv"):
            scale = getattr(block.experts, name)
            scale.copy_(powers[torch.arange(scale.numel()) % 4].view(scale.shape).to(scale.dtype))
    (_, s13), (_, s2) = fp8_weights(block)
    assert s13.dtype == s2.dtype == torch.float32
    assert torch.equal(s13.flatten(), powers[torch.arange(s13.numel()) % 4])
    block.experts.block_size = (64, 64)
    with pytest.raises(NotImplementedError, match="128 x 128 weight blocks"):
        fp8_weights(block)
