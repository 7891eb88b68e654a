"""The post-quantization steps in their order, for the pipeline's tune stage: block-wise output reconstruction of
the scales (blockwise.py), end-to-end scale tuning (tune.py), then the router refit (router.py) on the final
scales. Each is off at 0 steps. Output: the QuantizedTensors (new scales only), the refitted router weights
(`routers.safetensors` beside them; absent when no router changed) and one report."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moecompress.arch.layout import ModelLayout
from moecompress.artifacts.quantized import QuantizedTensors
from moecompress.quantize.blockwise import BlockwiseOptions, reconstruct_blocks
from moecompress.quantize.router import RouterFitOptions, refit_routers
from moecompress.quantize.tune import TuneOptions, quantized_weights, tune_scales

ROUTERS_FILE = "routers.safetensors"


@dataclass(frozen=True)
class PostOptions:
    blockwise: BlockwiseOptions = BlockwiseOptions(steps=0)
    tune: TuneOptions = TuneOptions(steps=0)
    router: RouterFitOptions = RouterFitOptions(steps=0)

    @property
    def active(self) -> bool:
        return bool(self.blockwise.steps or self.tune.steps or self.router.steps)


def post_quantize(model: nn.Module, layout: ModelLayout, quantized: QuantizedTensors,
                  batches: list[tuple[torch.Tensor, torch.Tensor]], options: PostOptions,
                  progress: bool = True) -> tuple[QuantizedTensors, dict[str, torch.Tensor], dict]:
    """(QuantizedTensors with new scales, {router_path: weight [E, H]}, report). The report keeps scale tuning's
    keys at its top level ({"steps": 0, "skipped": True} when tuning is off) and adds "blockwise" and "router"."""
    report: dict = {"steps": 0, "skipped": True}
    if options.blockwise.steps:
        quantized, report["blockwise"] = reconstruct_blocks(model, layout, quantized, batches, options.blockwise)
    if options.tune.steps:
        quantized, tuned = tune_scales(model, layout, quantized, batches, options.tune, progress=progress)
        report = {**tuned, **{k: v for k, v in report.items() if k in ("blockwise",)}}
    routers: dict[str, torch.Tensor] = {}
    if options.router.steps:
        routers, report["router"] = refit_routers(model, layout, quantized_weights(model, layout, quantized),
                                                  batches, options.router)
    return quantized, routers, report


def save_routers(routers: dict[str, torch.Tensor], directory: str | Path) -> None:
    if routers:
        save_file({path: w.detach().cpu().contiguous() for path, w in routers.items()}, Path(directory) / ROUTERS_FILE)


def load_routers(directory: str | Path) -> dict[str, torch.Tensor]:
    """{router_path: weight}; empty when the run refitted no router."""
    path = Path(directory) / ROUTERS_FILE
    return load_file(path) if path.exists() else {}
