"""The main job with one decoder layer on the GPU at a time (recipe `offload: layer`) against the whole model on
the GPU (`offload: none`): same costs, plans and quantized weights up to floating-point order, and the wall time
and peak GPU memory of each.

    python eval/offload_check.py --recipe recipes/refmoe-qwen3.yaml --out eval/results   # on a machine with CUDA

Runs calibrate .. quantize (the post steps run on the host under offload: not compared here) with the recipe's
settings, overridable for a quicker check (--samples, --quantizer). Writes quality_offload.{md,json}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moecompress.artifacts.bit_plan import BitPlan  # noqa: E402
from moecompress.artifacts.cost_table import CostTable  # noqa: E402
from moecompress.artifacts.quantized import QuantizedTensors  # noqa: E402
from moecompress.pipeline import quantize  # noqa: E402
from moecompress.recipe import Quantizer, load_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes/refmoe-qwen3.yaml"))
    ap.add_argument("--model", help="override the recipe's model path")
    ap.add_argument("--calib", help="override the recipe's calibration dataset")
    ap.add_argument("--samples", type=int, help="override calibration.samples")
    ap.add_argument("--quantizer", choices=("rtn", "gptq"), help="override sensitivity.quantizer")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=str(ROOT / "eval/results"))
    args = ap.parse_args()
    r = load_recipe(args.recipe)
    cal = dataclasses.replace(r.calibration, **({"dataset": args.calib} if args.calib else {}),
                              **({"samples": args.samples} if args.samples else {}))
    sens = r.sensitivity if not args.quantizer else dataclasses.replace(r.sensitivity,
                                                                        quantizer=Quantizer(args.quantizer))
    r = dataclasses.replace(r, model=args.model or r.model, calibration=cal, sensitivity=sens, device=args.device)
    res, dirs = {}, {}
    tmp = Path(tempfile.mkdtemp())
    for mode in ("none", "layer"):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        dirs[mode] = quantize(dataclasses.replace(r, offload=mode), out=tmp / mode, stop_after="quantize",
                              progress=False)
        res[mode] = {"seconds": round(time.time() - t, 1),
                     "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)
                     if torch.cuda.is_available() else None}
        print(mode, res[mode], flush=True)
    ca, cb = (CostTable.load(dirs[m] / "sensitivity/cost_table.json") for m in ("none", "layer"))
    da = torch.tensor([d for it in ca.items for d in it.damage], dtype=torch.float64)
    db = torch.tensor([d for it in cb.items for d in it.damage], dtype=torch.float64)
    pa, pb = (BitPlan.load(dirs[m] / "allocation/bit_plan.json") for m in ("none", "layer"))
    qa, qb = (QuantizedTensors.load(dirs[m] / "quantized") for m in ("none", "layer"))
    same_q = sum(torch.equal(w.q, qb.weights[k].q) for k, w in qa.weights.items())
    scale_diff = max(float((w.scales.float() - qb.weights[k].scales.float()).abs().max() /
                           w.scales.float().abs().max().clamp(min=1e-12)) for k, w in qa.weights.items())
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "recipe": args.recipe, "samples": cal.samples,
           "quantizer": sens.quantizer.value, "runs": res,
           "cost_items": len(ca.items), "cost_max_rel_diff": float(((da - db).abs() / da.abs().clamp(min=1e-30))
                                                                   .max()),
           "same_plan": pa == pb, "quantized_matrices": len(qa.weights), "identical_integer_codes": same_q,
           "max_rel_scale_diff": scale_diff}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "quality_offload.json").write_text(json.dumps(out, indent=1))
    md = ["## offload: layer vs none (calibrate .. quantize)", "", f"{out['device']}, torch {out['torch']}; "
          f"{args.recipe}, calibration.samples {cal.samples}, sensitivity.quantizer {out['quantizer']}", "",
          "| offload | wall s | peak GPU MiB |", "|---|---|---|"]
    md += [f"| {m} | {v['seconds']} | {v['peak_gpu_mib']} |" for m, v in res.items()]
    md += ["", f"- costs: {out['cost_items']} items, largest relative difference {out['cost_max_rel_diff']:.2e}",
           f"- bit plan identical: {out['same_plan']}",
           f"- quantized matrices with identical integer codes: {same_q} of {len(qa.weights)}; largest relative "
           f"scale difference {scale_diff:.2e}"]
    (Path(args.out) / "quality_offload.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    main()
