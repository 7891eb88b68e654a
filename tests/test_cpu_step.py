"""The whole-model CPU decode step (csrc/lowbit/step.cpp, runtime/cpu_step/) against transformers' own forward.

Tiny Qwen3-MoE, OLMoE and Mixtral checkpoints (float32, 3 layers) quantized with a mixed plan: experts at
2/3/4/8/16 bits in every layer, attention linears at 2/3/4/8/16 bits too. The step uses the q8 decode kernels (int8
activations), so the reference forward runs with MOECOMPRESS_INT8_ACTIVATIONS=always: both sides then quantize the
same activations, and differ by float32 summation order, plus the rare flip of one int8 rounding that such a
difference can cause (measured: rows 1e-6 apart, one OLMoE row 6e-3 after such a flip, the logits' scale ~3).
Bounds: the median row of the step logits within SUM_ORDER_TOL, every row within LOGIT_TOL, of the logits' scale;
greedy tokens equal transformers' generate, or the first divergence of a row lies where the reference's logits of the
two tokens are within TIE_TOL.
"""
from __future__ import annotations

import copy
import gc
import sys
from pathlib import Path

import pytest
import torch
from helpers import mixed_plan, quantize_tiny

import moecompress
from moecompress.arch.adapters import describe
from moecompress.export.checkpoint import export_checkpoint
from moecompress.runtime.kernels import cpu_features, cpu_lowbit, kernel_registry
from moecompress.runtime.experts import packed_group
from moecompress.runtime.cpu_step import CpuDecoder, StepPlan, UnsupportedModel
from moecompress.runtime.cpu_step import decoder as decoder_module

pytestmark = [pytest.mark.skipif(not cpu_lowbit.available(), reason="the low-bit C++ kernels are not built"),
              pytest.mark.usefixtures("one_thread")]  # tiny ops: threads only spin (test_two_threads checks them)

ARCHS = ("qwen3_moe", "olmoe", "mixtral", "qwen2_moe")
SUM_ORDER_TOL = 1e-5  # the median row of the step logits' errors (float32 summation order only)
LOGIT_TOL = 5e-3  # every row: an int8 rounding flip moves a logit by up to ~2e-3 of the logits' scale
TIE_TOL = 2e-2  # absolute, logits of scale ~3
NEW = 12
_BUILT: dict = {}


@pytest.fixture(autouse=True)
def int8_activations(monkeypatch):
    """int8 activations on both sides, at any rows per expert: the reference's forwards reach 48+ rows per expert
    (the tiny configs have use_cache=False, so transformers' generate feeds all 3 x 16 tokens again at step 7), where
    the registry's prefill kernel of a CPU without an int8 prefill op (every ISA but AVX2) is the float32 tiles
    (session 24: a token flip there on the AMX CPU and with MOECOMPRESS_CPU_ISA=cpu:portable)."""
    monkeypatch.setenv(kernel_registry.INT8_ACTIVATIONS_ENV, "always")
    monkeypatch.setattr(packed_group, "PREFILL_MIN_ROWS", 1 << 30)


def checkpoint(arch: str, tmp_path_factory):
    """A tiny mixed-plan checkpoint of `arch` (float32), exported once per session."""
    if arch not in _BUILT:
        from conftest import _build

        model = _build(arch)
        with torch.no_grad():  # sharper logits than the default init: fewer near-ties in the argmax
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        layout = describe(model)
        linears = {path: (2, 3, 4, 8, 16)[i % 5] for i, path in enumerate(layout.attention_linears)}
        layout, plan, quantized = quantize_tiny(model, mixed_plan(layout, linears=linears))
        ck = tmp_path_factory.mktemp(arch) / "ck"
        from edge_bundles import char_tokenizer

        export_checkpoint(model, layout, plan, quantized, ck, tokenizer=char_tokenizer(), dtype=torch.float32)
        _BUILT[arch] = ck
    return _BUILT[arch]


def load(ck):
    return moecompress.from_pretrained(ck, dtype=torch.float32).eval()


def prompts(batch: int, n: int = 9, seed: int = 0):
    ids = torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if batch == 3:  # left padding: three lengths in one batch
        mask[1, :3] = 0
        mask[2, :5] = 0
        ids[mask == 0] = 0
    return ids, mask


def assert_same_greedy(got: torch.Tensor, ref, n: int):
    """Equal tokens, or the first divergence of a row where the reference's logits tie within TIE_TOL."""
    want = ref.sequences
    assert got.shape == want.shape and torch.equal(got[:, :n], want[:, :n])
    for r in range(want.shape[0]):
        diff = (got[r] != want[r]).nonzero()
        if len(diff):
            t = int(diff[0, 0]) - n
            scores = ref.logits[t][r]
            gap = float(scores[want[r, n + t]] - scores[got[r, n + t]])
            assert 0 <= gap <= TIE_TOL, (r, t, gap)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_equal_transformers_generate(arch, batch, tmp_path_factory):
    model = load(checkpoint(arch, tmp_path_factory))
    ids, mask = prompts(batch)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    decoder = CpuDecoder(model, max_cache_len=32, batch_size=batch)
    got = decoder.generate(ids, NEW, attention_mask=mask)
    assert_same_greedy(got, ref, ids.shape[1])
    again = decoder.generate(ids, NEW, attention_mask=mask)  # reused: the cache and mask are rewound
    assert torch.equal(again, got)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("isa", ["best", "cpu:portable"])
def test_step_logits_match_the_forward(arch, isa, tmp_path_factory, monkeypatch):
    """Prompt + 3 steps of given tokens: each step's logits against the full-sequence forward's, batch 3 left-padded,
    on the CPU's kernels and on the forced portable ones (the forward then takes them too)."""
    if isa != "best":
        monkeypatch.setenv(cpu_features.ISA_ENV, isa)
    model = load(checkpoint(arch, tmp_path_factory))
    ids, mask = prompts(3, seed=1)
    extra = torch.randint(3, 128, (3, 3), generator=torch.Generator().manual_seed(2))
    decoder = CpuDecoder(model, max_cache_len=16, batch_size=3)
    assert decoder.plan.isa == (cpu_features.best_isa() if isa == "best" else isa) or decoder.plan.isa == \
        "cpu:avx512_vnni"
    _, positions = decoder.prefill(ids, mask)
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    with torch.no_grad():
        want = model(input_ids=full_ids, attention_mask=full_mask).logits  # [3, n + 3, V]
    n = ids.shape[1]
    position = positions[:, -1].clone()
    errors = []
    for t in range(3):
        position += 1
        got = decoder.step_logits(extra[:, t], position, n + t)
        errors += (got - want[:, n + t]).abs().amax(-1).tolist()  # per row
    scale = want[:, n:].abs().max().item()
    assert sorted(errors)[len(errors) // 2] <= SUM_ORDER_TOL * scale, errors  # most rows: summation order only
    assert max(errors) <= LOGIT_TOL * scale, errors  # all: within one int8 rounding flip


def test_two_threads_give_the_same_logits(tmp_path_factory):
    """The step's threaded paths (the experts' work units; the lm_head and attention above their work threshold)
    against one thread: float32 summation order only."""
    model = load(checkpoint("qwen3_moe", tmp_path_factory))
    ids, mask = prompts(3, seed=7)
    logits = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        decoder = CpuDecoder(model, max_cache_len=16, batch_size=3)
        _, positions = decoder.prefill(ids, mask)
        logits.append(decoder.step_logits(ids[:, -1], positions[:, -1] + 1, ids.shape[1]))
    torch.set_num_threads(1)
    assert (logits[0] - logits[1]).abs().max() <= LOGIT_TOL * logits[0].abs().max()  # (a flip of an int8 rounding)


def test_eos_pads_and_stops_like_transformers(tmp_path_factory):
    model = load(checkpoint("qwen3_moe", tmp_path_factory))
    ids, mask = prompts(3, seed=4)
    decoder = CpuDecoder(model, max_cache_len=40, batch_size=3)
    free = decoder.generate(ids, 20, attention_mask=mask)
    eos = int(free[0, ids.shape[1] + 2])  # a token row 0 generates (its 3rd)
    got = decoder.generate(ids, 20, attention_mask=mask, eos_token_id=eos, pad_token_id=-1)
    n = ids.shape[1]
    for r in range(3):
        hits = (free[r, n:] == eos).nonzero()
        stop = n + int(hits[0, 0]) + 1 if len(hits) else free.shape[1]
        assert torch.equal(got[r, :stop], free[r, :stop])
        assert (got[r, stop:] == -1).all()
    assert got.shape[1] <= free.shape[1]


def test_greedy_steps_equal_one_step_at_a_time(tmp_path_factory):
    """greedy_steps (the C++ loop generate runs) = step_logits + argmax token by token; it stops once every row has
    produced an EOS (a row's input token counts)."""
    model = load(checkpoint("mixtral", tmp_path_factory))
    ids, mask = prompts(3, seed=6)
    n = ids.shape[1]
    decoder = CpuDecoder(model, max_cache_len=24, batch_size=3)
    logits, positions = decoder.prefill(ids, mask)
    first, pos = logits.argmax(-1), positions[:, -1] + 1
    loop, nxt = [], first
    for t in range(10):
        nxt = decoder.step_logits(nxt, pos + t, n + t).argmax(-1)
        loop.append(nxt)
    loop = torch.stack(loop, 1)
    decoder.prefill(ids, mask)
    assert torch.equal(decoder.greedy_steps(first, pos, n, 10), loop)
    eos = [int(loop[0, 2]), int(loop[1, 4]), int(loop[2, 1])]  # each row has produced one of them by step 5
    last = max(int((torch.isin(loop[r], torch.tensor(eos))).nonzero()[0, 0]) for r in range(3))
    decoder.prefill(ids, mask)
    assert torch.equal(decoder.greedy_steps(first, pos, n, 10, eos), loop[:, :last + 1])


def _mapping(ptr: int):
    """(start, end, resident bytes) of this process's mapping that holds address `ptr`, or None."""
    found = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                inside = lo <= ptr < hi
            elif inside and line.startswith("Rss:"):
                found = (lo, hi, int(head[1]) * 1024)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_the_kv_cache_is_its_own_mapping_and_leaves_with_the_decoder(tmp_path_factory):
    """The decoder's KV cache (kernels/heap.mapped_zeros) is resident only where written and is unmapped with the
    decoder, never kept in malloc's free lists (session 27: 2.4 MB of a batch-4 decoder stayed in the heap)."""
    model = load(checkpoint("qwen3_moe", tmp_path_factory))
    decoder = CpuDecoder(model, max_cache_len=4096, batch_size=2)
    ptrs = [decoder.k_cache.data_ptr(), decoder.v_cache.data_ptr()]
    spans = [_mapping(p) for p in ptrs]
    for p, (lo, hi, rss) in zip(ptrs, spans):
        assert lo == p and hi - lo >= decoder.k_cache.numel() * 4 and rss == 0  # nothing written yet
    ids, mask = prompts(2)
    out = decoder.generate(ids, 5, attention_mask=mask)
    assert out.shape == (2, ids.shape[1] + 5)
    for p, (lo, hi, _) in zip(ptrs, spans):
        rss = _mapping(p)[2]
        assert 0 < rss < (hi - lo) / 2  # 14 of 4096 positions written
    del decoder
    gc.collect()
    for p, (lo, hi, _) in zip(ptrs, spans):
        assert _mapping(p) is None or _mapping(p)[:2] != (lo, hi)


def test_sampling_is_seeded_and_stays_in_the_nucleus(tmp_path_factory):
    model = load(checkpoint("olmoe", tmp_path_factory))
    ids, mask = prompts(1, seed=5)
    decoder = CpuDecoder(model, max_cache_len=32, batch_size=1)
    a = decoder.generate(ids, 8, sample=True, temperature=0.8, top_p=0.9, seed=3)
    b = decoder.generate(ids, 8, sample=True, temperature=0.8, top_p=0.9, seed=3)
    assert torch.equal(a, b)
    tiny = decoder.generate(ids, 8, sample=True, top_p=1e-6, seed=9)  # nucleus of one token: greedy
    assert torch.equal(tiny, decoder.generate(ids, 8))


def test_refusals_say_why(tiny_model, tmp_path_factory):
    with pytest.raises(UnsupportedModel, match="model_type 'deepseek_v2'"):
        StepPlan.of(tiny_model("deepseek_v2"))
    plain = tiny_model("qwen3_moe")  # an unquantized transformers model: read (test_unquantized_...), unless ...
    StepPlan.of(plain)
    plain.model.layers[2].mlp.experts.is_transposed = True  # ... its experts are laid out otherwise
    with pytest.raises(UnsupportedModel, match="layer 2: experts other than"):
        StepPlan.of(plain)
    model = load(checkpoint("mixtral", tmp_path_factory))
    model.config.sliding_window = 8
    with pytest.raises(UnsupportedModel, match="sliding window 8"):
        CpuDecoder(model, max_cache_len=32)
    model.config.sliding_window = None
    model.model.layers[1].mlp.experts.expert_store = object()
    with pytest.raises(UnsupportedModel, match="layer 1: experts in a tiered expert store"):
        CpuDecoder(model, max_cache_len=32)


def unquantized(arch: str, dtype: torch.dtype):
    """(a tiny transformers model of `arch` in `dtype`, the same weights in float32): the step computes in float32,
    so the float32 model's forward is its exact reference."""
    from conftest import _build

    model = _build(arch)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    ref = copy.deepcopy(model).to(dtype).float().eval()  # Module.to is in place: a copy for the reference
    return model.to(dtype).eval(), ref


def step_errors(model, ref, ids, mask, extra, cache_len: int) -> tuple[list[float], float]:
    """The prompt through `ref` (its KV cache into the step's), then extra's tokens one step at a time through the
    step of `model` -> (each step's max |logit error| per row against ref's full forward, the logits' scale)."""
    decoder = CpuDecoder(model, max_cache_len=cache_len, batch_size=ids.shape[0])
    decoder.model = ref  # the prompt's cache in float32, as the reference computes it
    _, positions = decoder.prefill(ids, mask)
    decoder.model = model
    full_ids, full_mask = torch.cat([ids, extra], 1), torch.cat([mask, torch.ones_like(extra)], 1)
    with torch.no_grad():
        want = ref(input_ids=full_ids, attention_mask=full_mask,
                   position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    n, position, errors = ids.shape[1], positions[:, -1].clone(), []
    for t in range(extra.shape[1]):
        position += 1
        got = decoder.step_logits(extra[:, t], position, n + t)
        errors += (got - want[:, n + t]).abs().amax(-1).tolist()
    return errors, want[:, n:].abs().max().item()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_unquantized_models_step_logits_match_the_forward(arch, dtype):
    """A plain transformers model (experts as fused 3-D gate_up_proj / down_proj, dense linears): the step reads its
    weights as they are (bfloat16 / float32 views, float16 one float32 copy) and computes in float32, so against the
    float32 forward of the same weights it differs by summation order only, every row, batch 3 left-padded."""
    model, ref = unquantized(arch, dtype)
    plan = StepPlan.of(model)
    if dtype != torch.float16:  # views of the model's own expert tensors, no copies
        own = {p.data_ptr() for p in model.parameters()}
        assert all(t.data_ptr() in own for L in plan.layers for ts in (L.experts.args[0], L.experts.args[5]) for t in ts)
    ids, mask = prompts(3, seed=1)
    extra = torch.randint(3, 128, (3, 3), generator=torch.Generator().manual_seed(2))
    errors, scale = step_errors(model, ref, ids, mask, extra, 16)
    assert max(errors) <= SUM_ORDER_TOL * scale, errors


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
def test_unquantized_greedy_equals_transformers_generate(arch):
    model, _ = unquantized(arch, torch.float32)
    ids, mask = prompts(3)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    from moecompress.runtime.generation import pick_decoder

    decoder, name, _ = pick_decoder(model, 3, ids.shape[1] + NEW, {"attention_mask": True, "sample": False})
    assert name == "cpu_step"
    assert_same_greedy(decoder.generate(ids, NEW, attention_mask=mask), ref, ids.shape[1])


def test_generate_cli_with_model(tmp_path_factory, capsys):
    from moecompress.cli import main

    ck = checkpoint("qwen3_moe", tmp_path_factory)
    assert main(["generate", "--model", str(ck), "--prompt", "def model", "--prompt", "bits",
                 "--max-new-tokens", "5"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 2 and '"prompt": "def model"' in lines[0]


REF_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "refmoe-qwen3"


@pytest.mark.slow
@pytest.mark.skipif(not REF_MODEL.exists(), reason="../shared/models/refmoe-qwen3 is absent")
def test_refmoe_qwen3_greedy_equals_transformers(tmp_path):
    """The shared reference model, experts at 4 bits and attention at 8 (RTN, group 64), float32: 24 greedy tokens."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(REF_MODEL, dtype=torch.float32).eval()
    layout = describe(src)
    plan = mixed_plan(layout, group_size=64)
    plan = replace(plan, experts={p: {k: (4,) * len(v) for k, v in projs.items()} for p, projs in plan.experts.items()},
                   linears={p: 8 for p in layout.attention_linears})
    layout, plan, quantized = quantize_tiny(src, plan)
    export_checkpoint(src, layout, plan, quantized, tmp_path / "ck", dtype=torch.float32)
    model = load(tmp_path / "ck")
    ids, mask = prompts(3, n=24, seed=6)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                             eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    got = CpuDecoder(model, max_cache_len=64, batch_size=3).generate(ids, 24, attention_mask=mask)
    assert_same_greedy(got, ref, ids.shape[1])


SHARED = REF_MODEL.parent


@pytest.mark.slow
@pytest.mark.parametrize("name", ["refmoe-qwen3", "refmoe-olmoe"])
@pytest.mark.parametrize("batch", [1, 4])
def test_refmoe_bf16_step_equals_the_float32_forward(name, batch):
    """The shared reference models as stored (bfloat16), unquantized: 5 steps after a 20-token prompt (batch 4
    left-padded) against the float32 forward of the same weights, within summation order."""
    if not (SHARED / name).exists():
        pytest.skip(f"../shared/models/{name} is absent")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SHARED / name, dtype=torch.bfloat16).eval()
    ref = AutoModelForCausalLM.from_pretrained(SHARED / name, dtype=torch.float32).eval()
    ids = torch.randint(3, 1000, (batch, 20), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)
    if batch == 4:
        mask[1, :3] = 0
        mask[2, :7] = 0
        ids[mask == 0] = 0
    extra = torch.randint(3, 1000, (batch, 5), generator=torch.Generator().manual_seed(9))
    errors, scale = step_errors(model, ref, ids, mask, extra, 40)
    assert max(errors) <= SUM_ORDER_TOL * scale, errors


def _safetensors_rss() -> int:
    """Resident bytes of this process's mappings of .safetensors files (/proc/self/smaps)."""
    total, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                current = len(head) > 5 and head[5].endswith(".safetensors")
            elif current and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not REF_MODEL.exists(), reason="../shared/models/refmoe-qwen3 is absent")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_decoder_drops_the_file_pages_of_experts_transformers_copied(monkeypatch):
    """transformers copies an unquantized checkpoint's experts into fused tensors at load; their file pages stayed
    resident beside the copies (every expert byte twice in RSS). The first decoder of the model drops them: what
    stays resident of the file mappings is at most the tensors that still view them (+ a page each), before and
    after generating, and the tokens equal those of the same model loaded again and decoded without the drop."""
    from transformers import AutoModelForCausalLM

    from moecompress.runtime.loading.file_pages import file_mappings

    model = AutoModelForCausalLM.from_pretrained(REF_MODEL, dtype=torch.bfloat16).eval()
    ranges = [(a, b) for a, b, _ in file_mappings()]
    viewing = [t for t in (*model.parameters(), *model.buffers()) if any(a <= t.data_ptr() < b for a, b in ranges)]
    viewed = sum(t.untyped_storage().nbytes() + 4096 for t in viewing)
    experts = sum(t.nbytes for n, t in model.named_parameters() if ".experts." in n)
    before = _safetensors_rss()
    assert before > viewed + experts // 2  # the copied experts' pages are resident after load
    decoder = CpuDecoder(model, max_cache_len=32, batch_size=2)
    assert _safetensors_rss() <= viewed
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    got = decoder.generate(ids, 8)
    assert _safetensors_rss() <= viewed
    monkeypatch.setattr(decoder_module, "release_unused", lambda model: 0)
    kept = AutoModelForCausalLM.from_pretrained(REF_MODEL, dtype=torch.bfloat16).eval()
    assert torch.equal(got, CpuDecoder(kept, 32, 2).generate(ids, 8))
