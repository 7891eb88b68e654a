"""Token policies installed into a whole model (a `with` block), and expert similarity from real expert weights."""
from __future__ import annotations

import pytest
import torch

from moecompress.arch.adapters import describe
from moecompress.execution.tokens import (
    PolicyExperts, PolicyState, build_pipeline, expert_similarity, similarity_from_coactivation, token_policies,
)

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def tables(layout, num_servers=2):
    L, E = len(layout.moe_layers), layout.moe_layers[0].num_experts
    holds = torch.zeros(L, E, num_servers, dtype=torch.bool)
    holds[:, torch.arange(E), torch.arange(E) % num_servers] = True
    return holds, (torch.arange(E) % num_servers).expand(L, E).clone()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "olmoe"])
def test_lossless_policies_reproduce_the_model_and_restore_it(tiny_model, model_type):
    model = tiny_model(model_type)
    layout = describe(model)
    paths = [m.experts_path for m in layout.moe_layers]
    originals = [model.get_submodule(p) for p in paths]
    holds, primary = tables(layout)
    renorm = bool(getattr(model.config, "norm_topk_prob", False))
    with torch.no_grad():
        ref = model(IDS).logits
        with token_policies(model, paths, holds, primary, build_pipeline(None), renormalize=renorm) as run:
            assert all(isinstance(model.get_submodule(p), PolicyExperts) for p in paths)
            out = model(IDS).logits
        assert torch.equal(run.position, torch.arange(IDS.shape[1]).repeat(IDS.shape[0]))  # read by the pre-hook
        assert torch.equal(run.sequence, torch.arange(IDS.shape[0]).repeat_interleave(IDS.shape[1]))
        assert len(run.traffic) == len(paths) and all(t.tokens == IDS.numel() for t in run.traffic)
        assert sum(t.round_trip for t in run.traffic) == len(paths)  # half the experts are remote
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-2)  # bf16 payloads of a float32 model
        assert all(model.get_submodule(p) is o for p, o in zip(paths, originals))
        assert not model._forward_pre_hooks
        with pytest.raises(RuntimeError, match="boom"):
            with token_policies(model, paths, holds, primary, build_pipeline(None), renormalize=renorm):
                raise RuntimeError("boom")
        assert all(model.get_submodule(p) is o for p, o in zip(paths, originals))
        spec = "prune_server:threshold=1,relative=true+precision:dispatch=int8,return=int8"
        with token_policies(model, paths, holds, primary, build_pipeline(spec), renormalize=renorm) as run:
            lossy = model(IDS).logits
        assert sum(t.remote_tokens for t in run.traffic) < sum(t.lossless_remote_tokens for t in run.traffic)
        assert not torch.equal(lossy, ref)


def test_expert_similarity_from_weights_and_substitution(tiny_model):
    model = tiny_model("qwen3_moe")
    layout = describe(model)
    paths = [m.experts_path for m in layout.moe_layers]
    E = layout.moe_layers[0].num_experts
    with torch.no_grad():
        sims = torch.stack([expert_similarity(model.get_submodule(p), E, hidden_size=layout.hidden_size)
                            for p in paths])
    assert sims.shape == (len(paths), E, E)
    torch.testing.assert_close(sims.diagonal(dim1=1, dim2=2), torch.ones(len(paths), E))
    torch.testing.assert_close(sims, sims.transpose(1, 2))
    assert sims.abs().max() <= 1 + 1e-5
    holds, primary = tables(layout)
    spec = "substitute:threshold=1,relative=true"
    with torch.no_grad(), token_policies(model, paths, holds, primary, build_pipeline(spec), renormalize=True,
                                         state=PolicyState(similarity=sims)) as run:
        model(IDS)
    assert sum(t.substituted_pairs for t in run.traffic) > 0
    assert sum(t.remote_tokens for t in run.traffic) < sum(t.lossless_remote_tokens for t in run.traffic)
    co = torch.tensor([[4.0, 2.0], [2.0, 1.0]])
    torch.testing.assert_close(similarity_from_coactivation(co), torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
