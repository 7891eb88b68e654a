"""Mixed-bit home copies through the CLI: bench_tokens' refmoe-olmoe S=0.5 row (README "Exact and mixed-bit home
copies", tokens_olmoe_copiesmix_s26) reproduced from `moecompress calibrate` -> `moecompress shard --home-copies 4
--home-copies-from CKPT4 --home-copies-high 8` bundles.

Needs the bench's exports in --work (run the bench once: eval/bench_tokens.py ... --copies-bits 4 --copies-high-bits 8):
refmoe-olmoe-rtn8 (the sharded checkpoint; its 8-bit experts are also the high-bit copies) and
refmoe-olmoe-copies4gptq (the 4-bit copies), and tokens-refmoe-olmoe-expert4-h0equal (the bench's bundles). The rtn8
export carries no tokenizer; a copy with the model's tokenizer is sharded (bundles without one cannot be evaluated).
Measured the bench's way (its eval data and batch, bench_tokens.evaluate's ppl and round trips) on the CLI bundles and
on the bench's bundles + attach_home_copy_sources with the same experts: the two must be equal (logits torch.equal).

    nice .venv/bin/python eval/repro_shard_copiesmix.py
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SPEC = "int8+localize:threshold=0.1,copies=true,copy_threshold=2.0"
ROW = {"ppl": 21.203323330437275, "rt_per_token": 1.198974609375, "copy_pairs_per_token": 12.676513671875}
LOSSLESS = {"ppl": 21.026910192244458, "rt_per_token": 4.607666015625}  # the bench's default placement, lossless


def cli(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "moecompress.cli", *argv], check=True, cwd=ROOT)


def measure(d, data) -> tuple[dict, torch.Tensor]:
    """bench_tokens.evaluate's ppl and counts (batch 8, no attention mask), and the logits."""
    d.reset_counters()
    nll, count, logits = 0.0, 0, []
    for i in range(0, data.input_ids.shape[0], 8):
        ids = data.input_ids[i:i + 8]
        out = d(ids)
        logits.append(out)
        logp = out.float()[:, :-1].log_softmax(-1)
        nll -= logp.gather(-1, ids[:, 1:, None]).sum().item()
        count += ids[:, 1:].numel()
    c = d.reset_counters()
    t = c.token_counts()["total"]
    return {"ppl": float(np.exp(nll / count)), "rt_per_token": t["remote_tokens"] / c.tokens,
            "copy_pairs_per_token": t["copy_pairs"] / c.tokens}, torch.cat(logits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/refmoe-olmoe"))
    ap.add_argument("--calib", default=str(ROOT.parent / "shared/data/corpus/calib.jsonl.gz"))
    ap.add_argument("--eval", default=str(ROOT.parent / "shared/data/corpus/eval.jsonl.gz"))
    ap.add_argument("--work", default="/tmp/moecompress-bench-tokens")
    ap.add_argument("--tmp", default="/tmp/moecompress-repro-copiesmix")
    ap.add_argument("--out", default=str(ROOT / "eval/results"))
    ap.add_argument("--name", default="shard_copiesmix_olmoe_s26")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from moecompress.evaluate.run import load_eval_data
    from moecompress.format.files import write_manifest
    from moecompress.runtime.edge import deploy
    from moecompress.runtime.edge.tokens_copies import attach_home_copy_sources

    t0, work, tmp = time.time(), Path(args.work), Path(args.tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "rtn8").mkdir(parents=True)
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(work / "refmoe-olmoe-rtn8" / f, tmp / "rtn8" / f)
    for f in Path(args.model).glob("tokenizer*.json"):
        shutil.copy(f, tmp / "rtn8" / f.name)
    write_manifest(tmp / "rtn8", {"format": "moecompress"})
    cli("calibrate", "--model", args.model, "--dataset", args.calib, "--samples", "32", "--seq-len", "256",
        "--no-hessians", "--out", str(tmp / "stats"))
    shard = ["shard", "--model", str(tmp / "rtn8"), "--stats", str(tmp / "stats"), "--servers", "4x10538496B",
             "--mode", "expert", "--home-copies", "4", "--home-copies-from", str(work / "refmoe-olmoe-copies4gptq"),
             "--home-copies-high", "8", "--home-copies-high-share", "0.5", "--out", str(tmp / "bundles")]
    cli(*shard)
    placement = json.loads((tmp / "bundles/placement.json").read_text())
    bench_placement = json.loads((work / "tokens-refmoe-olmoe-expert4-h0equal/placement.json").read_text())
    desc = json.loads((tmp / "bundles/server-0/home-copies/home_copies.json").read_text())
    high = desc["high"]["experts"]
    low = [sorted(set(a) - set(h)) for a, h in zip(desc["experts"], high)]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = load_eval_data(args.eval, tokenizer, 16, 256, calibration=args.calib)
    with deploy(tmp / "bundles", simulate=True, tokens=SPEC) as d:
        ours, our_logits = measure(d, data)
    with deploy(work / "tokens-refmoe-olmoe-expert4-h0equal", simulate=True, verify=False) as d:
        attach_home_copy_sources(d, [(work / "refmoe-olmoe-rtn8", high), (work / "refmoe-olmoe-copies4gptq", low)])
        d.set_tokens(SPEC)
        api, api_logits = measure(d, data)
    result = {"cli": ours, "api": api, "bench_row": ROW, "logits_equal": torch.equal(our_logits, api_logits),
              "same_assignment": placement["assignment"] == bench_placement["assignment"],
              "copies": {"high_at_8": sum(map(len, high)), "low_at_4": sum(map(len, low)), "bytes": desc["bytes"]},
              "dppl_vs_default_lossless": 100 * (ours["ppl"] / LOSSLESS["ppl"] - 1),
              "rt_vs_lossless": 100 * ours["rt_per_token"] / LOSSLESS["rt_per_token"],
              "seconds": time.time() - t0}
    out = Path(args.out)
    command = "nice .venv/bin/python eval/repro_shard_copiesmix.py"
    (out / f"{args.name}.json").write_text(json.dumps({"command": command, **result}, indent=1))
    rows = [("CLI bundles (`moecompress shard --home-copies 4 --home-copies-high 8`)", ours),
            ("bench bundles + attach_home_copy_sources (same experts)", api), ("README / bench row (session 26)", ROW)]
    lines = [f"    {command}", "", "shard: `moecompress " + " ".join(shard[:1] + [a.replace(str(tmp), "$TMP")
                                                                        for a in shard[1:]]) + "`", "",
             f"refmoe-olmoe, 4 servers, home 0: {result['copies']['high_at_8']} copies at 8 bits + "
             f"{result['copies']['low_at_4']} at 4 bits ({desc['bytes']} bytes); placement equal to the bench's: "
             f"{result['same_assignment']}; logits equal (torch.equal): {result['logits_equal']}", "",
             "| run | ppl | Δppl vs default lossless | round trips/token | vs lossless | copy pairs/token |",
             "|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['ppl']!r} | {100 * (r['ppl'] / LOSSLESS['ppl'] - 1):+.2f} % | "
                     f"{r['rt_per_token']!r} | {100 * r['rt_per_token'] / LOSSLESS['rt_per_token']:.1f} % | "
                     f"{r['copy_pairs_per_token']!r} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
