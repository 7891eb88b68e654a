"""calibrate(model, tokenizer, dataset, options) -> CalibrationStats: the calibration stage, whole-model or
layer by layer."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from moecompress.arch import ModelLayout, describe
from moecompress.artifacts.calibration_stats import CalibrationStats, HessianFiles
from moecompress.calibrate.dataset import CalibrationData, DatasetSpec, build_calibration_data
from moecompress.calibrate.hooks import RoutingHooks
from moecompress.calibrate.layerwise import LayerwiseModel, run_layerwise
from moecompress.calibrate.options import CalibrationOptions
from moecompress.calibrate.recorder import RecordSpec, RoutingRecorder
from moecompress.errors import MoecompressError


def dense_paths(layout: ModelLayout, which: bool | tuple[str, ...]) -> tuple[str, ...]:
    """The dense linears whose input Hessians are wanted (see CalibrationOptions.dense_hessians)."""
    if which is True:
        return layout.attention_linears + layout.shared_expert_linears + layout.dense_mlp_linears
    return tuple(which) if which else ()


@contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def calibrate(model: nn.Module | str | Path, tokenizer=None,
              dataset: CalibrationData | DatasetSpec | str | Path | None = None,
              options: CalibrationOptions = CalibrationOptions()) -> CalibrationStats:
    """Run the calibration set through `model` and return what the routed experts saw.

    model: a loaded transformers MoE causal LM, or a checkpoint directory / hub id (loaded in `options.dtype`;
    with `options.layerwise` it must be a directory of safetensors and is never loaded whole).
    dataset: tokenized `CalibrationData`, or a source for `build_calibration_data` (then `tokenizer` is needed;
    with a path model and no tokenizer, the model's own tokenizer is loaded).
    """
    if dataset is None:
        raise MoecompressError("calibrate needs a dataset")
    if not isinstance(dataset, CalibrationData):
        if tokenizer is None and isinstance(model, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model))
        dataset = build_calibration_data(dataset, tokenizer, options.samples, options.seq_len, options.seed,
                                         progress=options.progress)
    batches = list(dataset.batches(options.batch_size))
    if options.hessian_dir:
        for stale in Path(options.hessian_dir).glob("hessians.*.safetensors"):
            stale.unlink()
    spec = RecordSpec(hessians=options.hessians, all_experts=options.all_experts, trace=options.trace,
                      hessian_dtype=options.torch_hessian_dtype)

    if options.layerwise:
        if not isinstance(model, (str, Path)) or not Path(model).is_dir():
            raise MoecompressError("layerwise calibration needs the model as a local checkpoint directory "
                                   f"(got {type(model).__name__ if not isinstance(model, (str, Path)) else model})")
        lm = LayerwiseModel(model, dtype=options.torch_dtype, device=options.device)
        layout = lm.layout
        recorder = RoutingRecorder(layout, len(dataset.domains), spec)

        def layer_done(i: int) -> None:
            for m in layout.moe_layers:
                if m.decoder_layer == i and options.hessian_dir:
                    recorder.spill_layer(m.layer, options.hessian_dir)

        with RoutingHooks(lm.model, layout, recorder, dense_paths(layout, options.dense_hessians)):
            run_layerwise(lm, [(ids, mask) for ids, mask, _ in batches],
                          lambda b: recorder.begin_batch(b, batches[b][1], batches[b][2]), layer_done,
                          progress=options.progress)
        return build_stats(recorder, layout, dataset, options)

    if isinstance(model, (str, Path)):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=options.torch_dtype).to(options.device)
    layout = describe(model)
    recorder = RoutingRecorder(layout, len(dataset.domains), spec)
    device = next(model.parameters()).device
    from tqdm.auto import tqdm

    with RoutingHooks(model, layout, recorder, dense_paths(layout, options.dense_hessians)), \
            _eval_mode(model), torch.no_grad():
        for b, (ids, mask, dom) in enumerate(tqdm(batches, desc="calibrate", unit="batch",
                                                  disable=not options.progress)):
            recorder.begin_batch(b, mask, dom)
            model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    if options.hessian_dir:
        for m in layout.moe_layers:
            recorder.spill_layer(m.layer, options.hessian_dir)
    return build_stats(recorder, layout, dataset, options)


def build_stats(recorder: RoutingRecorder, layout: ModelLayout, data: CalibrationData,
                options: CalibrationOptions) -> CalibrationStats:
    L, E, D = recorder.L, recorder.E, recorder.D
    trace = recorder.trace()
    return CalibrationStats(
        model_type=layout.model_type,
        experts_paths=tuple(m.experts_path for m in layout.moe_layers),
        num_experts=E,
        top_k=max(m.top_k for m in layout.moe_layers),
        tokens=recorder.tokens.clone(),
        mass=recorder.mass.clone(),
        coactivation=recorder.coactivation.view(L, E, E).clone(),
        paths=recorder.paths.view(max(L - 1, 0), E, E).clone(),
        num_tokens=recorder.num_tokens,
        seq_len=data.seq_len,
        samples=data.num_sequences,
        seed=options.seed,
        dataset=data.description,
        domains=data.domains,
        domain_tokens=recorder.domain_tokens.view(L, D, E).transpose(0, 1).contiguous() if D else None,
        domain_mass=recorder.domain_mass.view(L, D, E).transpose(0, 1).contiguous() if D else None,
        hessians=HessianFiles(options.hessian_dir) if options.hessian_dir and options.hessians
        else {k: v.cpu() for k, v in recorder.hessians.items()},
        hessian_tokens=recorder.hessian_tokens.clone() if options.hessians else None,
        hessian_dtype=options.hessian_dtype,
        all_experts=options.all_experts,
        dense_hessians={k: v.cpu() for k, v in recorder.dense.items()},
        dense_tokens=max(recorder.dense_tokens.values(), default=0),
        trace_indices=trace[0] if trace else None,
        trace_weights=trace[1] if trace else None,
        min_tokens=options.min_tokens,
    )
