"""The quality benchmark's table and goal checks (eval/bench_quality.py): bold only where a method wins, goals from
the numbers, random seeds averaged."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_quality", Path(__file__).resolve().parents[1] /
                                               "eval/bench_quality.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _row(method, family, bits, ppl, tuned=False, **extra):
    return {"method": method + (" + tune" if tuned else ""), "family": family, "tuned": tuned, "avg_bits": bits,
            "stored_bits": bits + 0.375, "expert_bytes": int(bits * 1000), "ppl": ppl, "kl": 0.01, **extra}


ROWS = [
    _row("bf16", "bf16", 16.0, 10.0),
    _row("uniform rtn 3-bit", "uniform rtn (context)", 3.0, 10.1),  # context: never bold even though lowest
    _row("uniform gptq 2-bit", "uniform gptq", 2.0, 12.0),
    _row("uniform gptq 3-bit", "uniform gptq", 3.0, 10.6),
    _row("ours gptq 2.5", "ours", 2.5, 10.5),
    _row("popularity-only gptq 2.5", "popularity-only", 2.5, 11.0),
    _row("random s0 gptq 2.5", "random", 2.5, 11.5, budget=2.5),
    _row("random s1 gptq 2.5", "random", 2.5, 12.5, budget=2.5),
    _row("ours gptq 3.0", "ours", 3.0, 10.6),  # ties uniform 3-bit: nobody bold at 3.0
    _row("ours gptq 2.5", "ours", 2.5, 10.4, tuned=True),
    _row("popularity-only gptq 2.5", "popularity-only", 2.5, 10.45, tuned=True),
]


def test_table_bolds_only_strict_winners_and_averages_random_seeds():
    lines = bench.table(ROWS)
    bold = [line.split(" | ")[0].strip("| *") for line in lines[2:] if "**" in line]
    assert bold == ["ours gptq 2.5", "ours gptq 2.5 + tune"]  # alone in its group (2-bit): nothing to win
    mean = next(line for line in lines if "random gptq 2.5 (mean of 2)" in line)
    assert "| 12.000 | +2.000 |" in mean
    assert not any("**" in line for line in lines if "3-bit" in line or "3.0" in line)


def test_goals_from_the_numbers():
    out = bench.goals(ROWS)
    untuned = [g for g in out if "without tuning" in g]
    # ours 0.5 vs popularity 1.0: ratio 0.5 <= 0.75
    assert "= 0.500 (goal <= 0.75): MET" in untuned[0]
    # line at 2.5 bits: (12.0 + 10.6) / 2 = 11.3, Δ 1.3; ours Δ 0.5 -> 0.385 <= 0.5
    assert "(11.300) = 0.385 (goal <= 0.5): MET" in untuned[1]
    assert "ours@3.0 ppl 10.600 vs uniform GPTQ 3-bit 10.600 (goal: lower): MISSED" in untuned[2]
    assert untuned[3].endswith("MET") and "17% fewer expert bytes" in untuned[3]
    tuned = [g for g in out if "with tuning" in g]
    assert len(tuned) == 3 and "= 0.889 (goal <= 0.75): MISSED" in tuned[0]  # 0.4 / 0.45
    assert tuned[1] == "- with tuning: ours gptq 2.5 Δppl +0.400 vs +0.500 without it (x0.800)"


@pytest.mark.parametrize("seed", (0, 1))
def test_shuffled_plan_keeps_the_bit_histogram(seed):
    from moecompress.arch.layout import ModelLayout, MoELayer, ProjSpec
    from moecompress.artifacts.bit_plan import BitPlan

    projs = (ProjSpec("gate_up", "gate_up_proj", 64, 64), ProjSpec("down", "down_proj", 32, 64))
    moes = tuple(MoELayer(layer=i, decoder_layer=i, block_path=f"l{i}", experts_path=f"l{i}.experts",
                          router_path=f"l{i}.gate", num_experts=4, top_k=2, projs=projs, transposed=False,
                          interleaved=False) for i in range(2))
    layout = ModelLayout("qwen3_moe", 64, "layers", 2, moes)
    plan = BitPlan(64, False, {f"l{i}.experts": {"gate_up": (2, 3, 4, 8), "down": (2, 3, 4, 8)} for i in range(2)})
    out = bench.shuffled(plan, layout, seed)
    assert bench.plan_size(out, layout) == bench.plan_size(plan, layout)  # same bits, same bytes
    for projs_bits in out.experts.values():
        assert projs_bits["gate_up"] == projs_bits["down"]  # whole experts move


def test_post_quantization_rows_are_grouped_and_compared_with_the_same_step():
    rows = ROWS + [
        {**_row("ours gptq 2.5", "ours", 2.5, 10.45), "method": "ours gptq 2.5 + router", "post": "router"},
        {**_row("popularity-only gptq 2.5", "popularity-only", 2.5, 10.9), "method": "popularity-only gptq 2.5 + router",
         "post": "router"},
    ]
    bold = [line.split(" | ")[0].strip("| *") for line in bench.table(rows)[2:] if "**" in line]
    assert "ours gptq 2.5 + router" in bold  # its group: the router rows at 2.5 bits only
    out = [g for g in bench.goals(rows) if g.startswith("- with router")]
    assert "= 0.500 (goal <= 0.75): MET" in out[0]  # 0.45 / 0.9, both with the router refit
    assert "ours gptq 2.5 Δppl +0.450 vs +0.500 without it (x0.900)" in out[-2]
