"""Architecture adapters: describe() against the configs, canonical expert weights against the experts' own forward."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig
from transformers.integrations.moe import use_experts_implementation

from moecompress.arch import (
    SUPPORTED, MoELayer, describe, experts_layout, proj_bias, proj_weights, set_proj_weights, split_gate_up,
)
from moecompress.arch.tiny import TINY_TYPES, tiny_config
from moecompress.errors import MoecompressError

from conftest import SUPPORTED_TYPES



pytestmark = pytest.mark.usefixtures("one_thread")


REQUIRED = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe",
            "granitemoe"}


def test_registry_covers_required_and_tiny():
    assert REQUIRED <= set(SUPPORTED)
    assert set(TINY_TYPES) == set(SUPPORTED) == set(SUPPORTED_TYPES)


def _expected(config):
    """What describe() must report, computed from the config alone."""
    mt = config.model_type
    n = config.num_hidden_layers
    if mt.startswith("deepseek"):
        moe_idx = list(range(config.first_k_dense_replace, n))
    elif mt in ("qwen2_moe", "qwen3_moe"):
        moe_idx = [i for i in range(n) if i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0]
    else:
        moe_idx = list(range(n))
    num_experts = {"deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts", "qwen2_moe": "num_experts",
                   "olmoe": "num_experts"}.get(mt, "num_local_experts")
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    shared = 1 if mt in ("qwen2_moe", "deepseek_v2", "deepseek_v3") else 0
    attn_per_layer = 5 if mt.startswith("deepseek") else 4  # MLA: q_a, q_b, kv_a, kv_b, o
    return dict(moe_idx=moe_idx, num_experts=getattr(config, num_experts), top_k=2 if mt == "phimoe"
                else config.num_experts_per_tok, inter=inter, shared=shared, attn=attn_per_layer * n,
                dense=3 * (n - len(moe_idx)))


@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_describe_matches_config(tiny_model, model_type):
    model = tiny_model(model_type)
    cfg, lay = model.config, describe(model)
    exp = _expected(cfg)
    assert lay.model_type == model_type and lay.hidden_size == cfg.hidden_size
    assert lay.num_decoder_layers == cfg.num_hidden_layers
    assert [m.decoder_layer for m in lay.moe_layers] == exp["moe_idx"]
    assert [m.layer for m in lay.moe_layers] == list(range(lay.num_layers))
    H, I = cfg.hidden_size, exp["inter"]
    gpt = model_type == "gpt_oss"
    for m in lay.moe_layers:
        assert m.num_experts == exp["num_experts"] and m.top_k == exp["top_k"]
        assert [p.name for p in m.projs] == ["gate_up", "down"]
        gu, down = m.proj("gate_up"), m.proj("down")
        assert (gu.out_features, gu.in_features, down.out_features, down.in_features) == (2 * I, H, H, I)
        assert (gu.bias_attr, down.bias_attr) == (("gate_up_proj_bias", "down_proj_bias") if gpt else (None, None))
        assert m.transposed == gpt and m.interleaved == gpt
        assert len(m.shared_expert_paths) == exp["shared"]
        router = model.get_submodule(m.router_path)
        assert tuple(router.weight.shape) == (m.num_experts, H)
        assert model.get_submodule(m.experts_path) is model.get_submodule(m.block_path).experts
    assert len(lay.shared_expert_linears) == 3 * exp["shared"] * lay.num_layers
    assert len(lay.attention_linears) == exp["attn"]
    assert len(lay.dense_mlp_linears) == exp["dense"]
    listed = lay.attention_linears + lay.shared_expert_linears + lay.dense_mlp_linears
    assert len(set(listed)) == len(listed)
    routers = {m.router_path for m in lay.moe_layers}
    for path in listed:
        mod = model.get_submodule(path)
        assert isinstance(mod, nn.Linear) and path not in routers and "lm_head" not in path
        assert mod.in_features % 64 == 0  # tiny configs keep every quantizable in-feature a multiple of 64
    assert not any(p.endswith("shared_expert_gate") for p in listed)


def _reference(experts, ml: MoELayer, h, idx, w):
    """Plain per-token loop over the selected experts using only the canonical accessors."""
    first, down = ml.projs
    w1, b1 = proj_weights(experts, ml, first), proj_bias(experts, ml, first)
    w2, b2 = proj_weights(experts, ml, down), proj_bias(experts, ml, down)
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            y = w1[e] @ h[t] + (b1[e] if b1 is not None else 0)
            if first.name == "gate_up":
                if ml.interleaved:
                    y = experts._apply_gate(y)
                else:
                    g, u = y.chunk(2, dim=-1)
                    y = experts.act_fn(g) * u
            else:
                y = experts.act_fn(y)
            out[t] += w[t, j] * (w2[e] @ y + (b2[e] if b2 is not None else 0))
    return out


def _routing(num_tokens, num_experts, top_k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    return idx, torch.rand(num_tokens, top_k, generator=gen)


@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_canonical_weights_reproduce_experts_forward(tiny_model, model_type):
    model = tiny_model(model_type)
    lay = describe(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for ml in lay.moe_layers:
            experts = model.get_submodule(ml.experts_path)
            h = torch.randn(12, lay.hidden_size, generator=gen)
            idx, w = _routing(12, ml.num_experts, ml.top_k, seed=ml.layer)
            ref = _reference(experts, ml, h, idx, w)
            assert ref.abs().max() > 1e-4  # non-trivial
            for impl in ("eager", "batched_mm", "grouped_mm"):
                model.set_experts_implementation(impl)
                torch.testing.assert_close(experts(h, idx, w), ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{impl}: {m}")


@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_set_proj_weights_writes_storage(tiny_model, model_type):
    model = tiny_model(model_type)
    ml = describe(model).moe_layers[-1]
    experts = model.get_submodule(ml.experts_path)
    for spec in ml.projs:
        before = {p.attr: getattr(experts, p.attr).detach().clone() for p in ml.projs}
        w = proj_weights(experts, ml, spec.name)
        assert tuple(w.shape) == (ml.num_experts, spec.out_features, spec.in_features)
        set_proj_weights(experts, ml, spec.name, w * 2)
        for p in ml.projs:
            now = getattr(experts, p.attr)
            assert now.dtype == before[p.attr].dtype and isinstance(now, nn.Parameter)
            torch.testing.assert_close(now.detach(), before[p.attr] * (2 if p.attr == spec.attr else 1), rtol=0,
                                       atol=0)
    with pytest.raises(ValueError):
        set_proj_weights(experts, ml, "down", torch.zeros(1, 2, 3))


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_set_proj_weights_keeps_low_precision_dtype(tiny_model, model_type):
    model = tiny_model(model_type, dtype=torch.bfloat16)
    ml = describe(model).moe_layers[0]
    experts = model.get_submodule(ml.experts_path)
    w = proj_weights(experts, ml, "gate_up").float()
    set_proj_weights(experts, ml, "gate_up", -w)
    assert experts.gate_up_proj.dtype == torch.bfloat16
    torch.testing.assert_close(proj_weights(experts, ml, "gate_up").float(), -w)


def test_split_gate_up_matches_apply_gate(tiny_model):
    model = tiny_model("gpt_oss")
    ml = describe(model).moe_layers[0]
    experts = model.get_submodule(ml.experts_path)
    gate, up = split_gate_up(proj_weights(experts, ml, "gate_up"), ml)
    gb, ub = split_gate_up(proj_bias(experts, ml, "gate_up"), ml, dim=-1)
    h = torch.randn(64)
    with torch.no_grad():
        y = proj_weights(experts, ml, "gate_up")[3] @ h + proj_bias(experts, ml, "gate_up")[3]
        g, u = gate[3] @ h + gb[3], up[3] @ h + ub[3]
        torch.testing.assert_close(experts._apply_gate(y), (u.clamp(-7, 7) + 1) * g.clamp(max=7)
                                   * torch.sigmoid(g.clamp(max=7) * experts.alpha))
    mix = tiny_model("mixtral")
    ml = describe(mix).moe_layers[0]
    t = proj_weights(mix.get_submodule(ml.experts_path), ml, "gate_up")
    gate, up = split_gate_up(t, ml)
    assert torch.equal(torch.cat([gate, up], dim=-2), t)


@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_describe_on_meta_device(tiny_model, model_type):
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config(model_type))
    assert next(meta.parameters()).is_meta
    lay = describe(meta)
    assert lay == describe(tiny_model(model_type))
    ml = lay.moe_layers[0]
    w = proj_weights(meta.get_submodule(ml.experts_path), ml, "down")
    assert w.is_meta and tuple(w.shape) == (ml.num_experts, lay.hidden_size, ml.proj("down").in_features)


@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_tiny_forward_nontrivial_and_routing_varies(tiny_model, model_type):
    model = tiny_model(model_type)
    lay = describe(model)
    picked = []
    hooks = [model.get_submodule(m.router_path).register_forward_hook(lambda mod, a, out: picked.append(out[-1]))
             for m in lay.moe_layers]
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for hk in hooks:
        hk.remove()
    assert logits.shape == (2, 16, model.config.vocab_size) and torch.isfinite(logits).all()
    assert logits.std() > 1e-2
    assert len(picked) == lay.num_layers
    for sel in picked:
        assert sel.shape == (32, 2)
        assert len({tuple(sorted(r)) for r in sel.tolist()}) > 1  # routing depends on the token


def test_tiny_model_is_deterministic_in_seed():
    from moecompress.arch.tiny import tiny_model as build

    a, b, c = build("olmoe", seed=3), build("olmoe", seed=3), build("olmoe", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.experts.down_proj"], sc["model.layers.0.mlp.experts.down_proj"])
    assert not a.training


def test_dense_layers_of_qwen_mlp_only_layers(tiny_model):
    model = tiny_model("qwen3_moe", mlp_only_layers=[1])
    lay = describe(model)
    assert [m.decoder_layer for m in lay.moe_layers] == [0, 2]
    assert lay.dense_mlp_linears == tuple(f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj"))


def test_describe_bare_base_model(tiny_model):
    lay = describe(tiny_model("mixtral").model)
    assert lay.decoder_layers_path == "layers" and lay.moe_layers[0].experts_path == "layers.0.mlp.experts"


def test_non_moe_model_raises_with_supported_list():
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(MoecompressError) as err:
        describe(model)
    for t in SUPPORTED_TYPES:
        assert t in str(err.value)


def test_unregistered_moe_type_raises(tiny_model):
    model = tiny_model("mixtral")
    model.config.model_type = "my_private_moe"
    with pytest.raises(MoecompressError, match="my_private_moe.*not supported.*mixtral"):
        describe(model)


# --- the generic experts path on layouts no supported architecture uses (ungated; transposed concatenated) ---
class _Cfg(PretrainedConfig):
    model_type = "synthetic"


def _synthetic(has_gate: bool, transposed: bool, bias: bool):
    @use_experts_implementation(has_gate=has_gate, is_transposed=transposed, has_bias=bias)
    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts, E, H, I = 4, 4, 32, 16
            first = (2 if has_gate else 1) * I
            name = "gate_up_proj" if has_gate else "up_proj"
            setattr(self, name, nn.Parameter(torch.randn(E, H, first) if transposed else torch.randn(E, first, H)))
            self.down_proj = nn.Parameter(torch.randn(E, I, H) if transposed else torch.randn(E, H, I))
            if bias:
                setattr(self, f"{name}_bias", nn.Parameter(torch.randn(E, first)))
                self.down_proj_bias = nn.Parameter(torch.randn(E, H))
            self.act_fn = nn.GELU()

        def forward(self, hidden_states, top_k_index, top_k_weights):  # "eager" is not exercised here
            raise NotImplementedError

    cfg = _Cfg()
    cfg._experts_implementation = "batched_mm"
    return Experts(cfg)


@pytest.mark.parametrize("has_gate,transposed,bias", [(False, False, False), (False, True, True), (True, True, False)])
def test_generic_experts_layouts(has_gate, transposed, bias):
    torch.manual_seed(0)
    experts = _synthetic(has_gate, transposed, bias)
    projs, tr, inter = experts_layout(experts)
    assert tr == transposed and not inter
    assert [p.name for p in projs] == (["gate_up", "down"] if has_gate else ["up", "down"])
    assert (projs[0].in_features, projs[0].out_features) == (32, 32 if has_gate else 16)
    assert (projs[1].in_features, projs[1].out_features) == (16, 32)
    assert (projs[0].bias_attr is not None) == bias
    ml = MoELayer(layer=0, decoder_layer=0, block_path="b", experts_path="b.experts", router_path="b.gate",
                  num_experts=4, top_k=2, projs=projs, transposed=tr, interleaved=inter)
    h = torch.randn(6, 32)
    idx, w = _routing(6, 4, 2)
    with torch.no_grad():
        torch.testing.assert_close(experts(h, idx, w), _reference(experts, ml, h, idx, w), atol=1e-4, rtol=1e-4)
