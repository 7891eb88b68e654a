"""Each stage of the main job as glue: read the previous stages' artifacts, call the stage, write its artifact.

Every step has the signature `step(ctx, tmp)` and writes only into `tmp` (renamed into place by the runner).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moecompress.arch.layout import ModelLayout
from moecompress.artifacts.bit_plan import BitPlan
from moecompress.artifacts.calibration_stats import CalibrationStats
from moecompress.artifacts.cost_table import CostTable
from moecompress.artifacts.quantized import QuantizedTensors
from moecompress.errors import MoecompressError
from moecompress.format.files import write_manifest
from moecompress.recipe import Quantizer, Recipe

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
COST_FILE = "cost_table.json"
TUNE_REPORT = "tune.json"
PLAN_FILE = "bit_plan.json"
ALLOC_REPORT = "report.json"
FIT_STATS = "fit"  # calibration/fit/: statistics of the fit sequences alone (calibration.held_back)
HEAD = "lm_head"  # the output projection's module path in every supported architecture (protect.lm_head)


@dataclass(frozen=True)
class RunContext:
    recipe: Recipe
    out: Path
    model_path: str
    dataset_path: str
    progress: bool
    load: Callable[[], tuple]  # () -> (model, tokenizer, layout), loaded once per run

    def dir(self, name: str) -> Path:
        return self.out / name


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, with what to do instead."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise MoecompressError(f"device {device!r}: CUDA is not available here ({why}, torch {torch.__version__}); "
                                   "use --device cpu, or install a CUDA build of torch on a machine with a GPU")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise MoecompressError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                   f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def load_model(model_path: str, revision: str | None, dtype: torch.dtype, device: str = "cpu"):
    """The model in eval mode on `device` (calibration, sensitivity, GPTQ and tuning run where it is)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moecompress.arch.adapters import describe

    check_device(device)
    model = AutoModelForCausalLM.from_pretrained(model_path, revision=revision, dtype=dtype).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision)
    return model, tokenizer, describe(model)


def _dense_groups(recipe: Recipe, layout: ModelLayout) -> dict[str, tuple[tuple[str, ...], int]]:
    """Dense linear group -> (its paths, its protect bits)."""
    p = recipe.protect
    return {"attention": (layout.attention_linears, p.attention),
            "shared_experts": (layout.shared_expert_linears, p.shared_experts),
            "dense_mlp": (layout.dense_mlp_linears, p.dense_mlp)}


def protected_linears(recipe: Recipe, layout: ModelLayout) -> dict[str, int]:
    """Dense linears quantized by the recipe's protect rules (16 = kept, so left out); the groups the allocation
    decides (allocation.dense) are left out too."""
    linears = {path: bits for group, (paths, bits) in _dense_groups(recipe, layout).items()
               if bits != 16 and group not in recipe.allocation.dense for path in paths}
    if recipe.protect.lm_head != 16:
        linears[HEAD] = recipe.protect.lm_head
    return linears


def check_head(recipe: Recipe, model) -> None:
    """protect.lm_head needs an lm_head of its own: a tied one is the input embeddings' matrix."""
    if recipe.protect.lm_head == 16:
        return
    head, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or dict(model.named_modules()).get(HEAD) is not head:
        raise MoecompressError(f"protect.lm_head: this model's output projection is not a module named {HEAD!r}; "
                               "leave protect.lm_head at 16")
    if head.weight is inputs.weight or getattr(model.config, "tie_word_embeddings", False):
        raise MoecompressError(f"protect.lm_head: {recipe.protect.lm_head} bits, but this model ties lm_head to its "
                               "input embeddings (one matrix for both); quantizing it would store a second copy. "
                               "Leave protect.lm_head at 16 for this model")


def allocated_linears(recipe: Recipe, layout: ModelLayout) -> dict[str, int]:
    """Dense linears allocated in the experts' budget (allocation.dense) -> their protect bits, which set how many
    bytes they bring into the budget."""
    groups = _dense_groups(recipe, layout)
    return {path: groups[g][1] for g in recipe.allocation.dense for path in groups[g][0]}


# -- the stages ------------------------------------------------------------------------------------------------------
def calibrate_step(ctx: RunContext, tmp: Path) -> None:
    from moecompress.calibrate.options import CalibrationOptions
    from moecompress.calibrate.plots import save_plots
    from moecompress.calibrate.report import format_summary
    from moecompress.calibrate.run import calibrate

    r, c = ctx.recipe, ctx.recipe.calibration
    model, tokenizer, layout = ctx.load()
    check_head(r, model)
    # no Hessian for lm_head: GPTQ falls back to round to nearest there (reported with the other fallbacks)
    dense = tuple(p for p in {**protected_linears(r, layout), **allocated_linears(r, layout)} if p != HEAD) \
        if r.quantize.method == Quantizer.GPTQ else ()
    options = CalibrationOptions(samples=c.samples, seq_len=c.seq_len, seed=c.seed, batch_size=c.batch_size,
                                 hessians=True, dense_hessians=dense or False, all_experts=c.all_experts,
                                 layerwise=c.layerwise, min_tokens=c.min_tokens, dtype=r.compute_dtype,
                                 hessian_dir=str(tmp), device=r.device, progress=ctx.progress)
    source = ctx.model_path if c.layerwise else model
    if not c.held_back:
        stats = calibrate(source, tokenizer, ctx.dataset_path, options)
    else:  # all sequences for the quantize stage; the fit ones alone for the sensitivity's candidates (fit/)
        data = calibration_data(ctx, tokenizer)
        stats = calibrate(source, tokenizer, data.all, options)
        fit_dir = tmp / FIT_STATS
        calibrate(source, tokenizer, data.fit, dataclasses.replace(options, hessian_dir=str(fit_dir))).save(fit_dir)
        write_manifest(fit_dir, {"stage": "calibrate", "split": "fit"})  # checked with the stage (run.check_finished)
    stats.save(tmp)
    save_plots(stats, tmp)
    (tmp / "summary.md").write_text(format_summary(stats) + "\n")


def sensitivity_step(ctx: RunContext, tmp: Path) -> None:
    from moecompress.sensitivity import SensitivityOptions, estimate_costs

    r = ctx.recipe
    model, tokenizer, layout = ctx.load()
    # with a held-back split, the candidates' GPTQ Hessians are those of the fit sequences alone
    stats = CalibrationStats.load(ctx.dir("calibration") / (FIT_STATS if r.calibration.held_back else ""))
    q = r.quantize
    options = SensitivityOptions(method=r.sensitivity.method.value, granularity=r.sensitivity.granularity.value,
                                 quantizer=r.sensitivity.quantizer.value, holdout=r.sensitivity.holdout, damp=q.damp,
                                 block_size=q.block_size, act_order=q.act_order, clip=q.clip.value,
                                 min_tokens=r.calibration.min_tokens, layer_scale=r.sensitivity.layer_scale,
                                 device=r.device)  # per-layer damages on the device, also when offloaded
    candidates = tuple(sorted(set(r.allocation.candidates) | {16}))
    # the measured methods run the held-back sequences (calibration.held_back: text the Hessians never saw), else
    # the last `holdout` share of the calibration sequences
    batches = None
    if options.method != "hessian" and r.calibration.held_back:
        held = calibration_data(ctx, tokenizer).held
        batches = [(ids, mask) for ids, mask, _ in held.batches(r.calibration.batch_size)]
        options = dataclasses.replace(options, holdout=1.0)
    elif options.method != "hessian":
        batches = calibration_batches(ctx, tokenizer)
    cost = estimate_costs(model, layout, stats, options, candidates=candidates, group_size=r.quantize.group_size,
                          symmetric=r.quantize.symmetric, calibration_batches=batches, progress=ctx.progress,
                          linears=tuple(allocated_linears(r, layout)))
    cost.save(tmp / COST_FILE)


@dataclass(frozen=True)
class CalibrationSplit:
    all: object  # CalibrationData: every calibration sequence (fit, then held back)
    fit: object | None = None  # with calibration.held_back: the sequences of the fit documents
    held: object | None = None  # and those of the held-back documents (the sensitivity measures on them)


def calibration_data(ctx: RunContext, tokenizer) -> CalibrationSplit:
    """The recipe's calibration sequences, and with calibration.held_back their split (calibrate/split.py)."""
    from moecompress.calibrate.dataset import build_calibration_data
    from moecompress.calibrate.split import held_back_data, held_samples, joined

    c = ctx.recipe.calibration
    if not c.held_back:
        return CalibrationSplit(build_calibration_data(ctx.dataset_path, tokenizer, c.samples, c.seq_len, c.seed))
    fit, held = held_back_data(ctx.dataset_path, tokenizer, c.samples,
                               held_samples(c.samples, ctx.recipe.sensitivity.holdout), c.seq_len, c.held_back, c.seed)
    return CalibrationSplit(joined(fit, held), fit, held)


def calibration_batches(ctx: RunContext, tokenizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The recipe's calibration sequences as (input_ids, attention_mask) batches, as the calibrate stage saw them."""
    c = ctx.recipe.calibration
    return [(ids, mask) for ids, mask, _ in calibration_data(ctx, tokenizer).all.batches(c.batch_size)]


def dense_bytes(model, layout: ModelLayout, recipe: Recipe) -> int:
    """Stored bytes of everything but the routed experts, at the checkpoint's dtype and protect rules."""
    from moecompress.format.sizes import matrix_bytes

    itemsize = torch.empty(0, dtype=getattr(torch, recipe.dtype)).element_size()
    experts = tuple(m.experts_path + "." for m in layout.moe_layers)
    quantized = protected_linears(recipe, layout)
    total, seen = 0, set()
    for name, p in model.named_parameters(remove_duplicate=True):
        module = name.rpartition(".")[0]
        if name.startswith(experts) or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if module in quantized and name.endswith(".weight"):
            total += matrix_bytes(p.shape[0], p.shape[1], quantized[module], recipe.quantize.group_size,
                                  recipe.quantize.symmetric)
        else:
            total += p.numel() * itemsize
    return total


def server_budget(recipe: Recipe, model, layout: ModelLayout) -> int:
    """Expert bytes that fit on the recipe's servers: their memory less the dense weights each must hold, less one
    largest expert per server (whole experts do not pack a server to the byte)."""
    from moecompress.artifacts.cost_table import expert_bytes
    from moecompress.shard.spec import parse_servers

    dense = dense_bytes(model, layout, recipe)
    q, top = recipe.quantize, max(recipe.allocation.candidates)
    largest = max(expert_bytes(m, "*", top, q.group_size, q.symmetric) for m in layout.moe_layers)
    free = parse_servers(recipe.allocation.budget.servers).expert_capacity(dense)
    capacity = sum(max(c - largest, 0) for c in free)
    if capacity <= 0:
        raise MoecompressError(f"servers {recipe.allocation.budget.servers} cannot even hold the dense weights "
                               f"({dense} bytes each); give them more memory")
    return capacity


def allocation_inputs(recipe: Recipe, layout: ModelLayout, model=None):
    """Budget and rules of the recipe, in the allocator's types (first/last-layer pins as key patterns)."""
    from moecompress.allocate import AllocationRules, Budget

    a, p = recipe.allocation, recipe.protect
    if a.budget.servers is not None:
        budget = Budget(bytes=server_budget(recipe, model, layout))
    else:
        budget = Budget(avg_bits=a.budget.avg_bits, megabytes=a.budget.megabytes)
    n = layout.num_layers
    pinned = set(range(min(p.first_layers, n))) | set(range(max(n - p.last_layers, 0), n))
    pins = {f"{layout.moe_layers[i].experts_path}.*": p.pin_bits for i in sorted(pinned)}
    rules = AllocationRules(candidates=tuple(sorted(set(a.candidates) | ({p.pin_bits} if pins else set()))),
                            min_bits=a.min_bits, max_bits=a.max_bits, layer_min_bits=dict(a.layer_min_bits), pins=pins)
    return budget, rules


def with_dense_bytes(budget, cost: CostTable, linears: dict[str, int], model):
    """The budget grown by the bytes the allocated dense `linears` take at their protect bits, so that avg_bits
    and megabytes keep meaning the experts' share; unchanged without such linears."""
    from moecompress.allocate import Budget
    from moecompress.allocate.rules import metadata_bytes
    from moecompress.format.sizes import matrix_bytes

    if not linears:
        return budget
    g, sym = cost.group_size, cost.symmetric
    extra = sum(matrix_bytes(*model.get_submodule(path).weight.shape, bits, g, sym) for path, bits in linears.items())
    experts = [it for it in cost.items if it.kind == "expert"]
    return Budget(bytes=budget.to_bytes(sum(it.numel for it in experts), metadata_bytes(experts)) + extra)


def allocate_step(ctx: RunContext, tmp: Path) -> None:
    from moecompress.allocate import allocate, allocation_report, copies_bytes, plot_bits_heatmap, to_bit_plan

    r = ctx.recipe
    cost = CostTable.load(ctx.dir("sensitivity") / COST_FILE)
    model, _, layout = ctx.load()
    check_head(r, model)
    budget, rules = allocation_inputs(r, layout, model)
    budget = with_dense_bytes(budget, cost, allocated_linears(r, layout), model)
    copy_bits = r.store.copy_bits  # the low-bit copies' bytes come out of the budget first
    allocation = allocate(cost, budget, rules, solver=r.allocation.solver.value,
                          copy_bytes=copies_bytes(layout, copy_bits, cost.group_size, cost.symmetric))
    plan = to_bit_plan(allocation, layout)
    plan = dataclasses.replace(plan, linears={**protected_linears(r, layout), **plan.linears}, copy_bits=copy_bits)
    plan.save(tmp / PLAN_FILE)
    (tmp / ALLOC_REPORT).write_text(json.dumps(allocation_report(allocation), indent=1))
    plot_bits_heatmap(plan, layout, tmp / "bits_heatmap.png")


def quantize_step(ctx: RunContext, tmp: Path) -> None:
    from moecompress.artifacts.quantized import COPIES_STEM
    from moecompress.quantize.stage import QuantizeOptions, quantize_copies, quantize_model

    q = ctx.recipe.quantize
    model, _, layout = ctx.load()
    plan = BitPlan.load(ctx.dir("allocation") / PLAN_FILE)
    stats = CalibrationStats.load(ctx.dir("calibration")) if q.method == Quantizer.GPTQ else None
    options = QuantizeOptions(method=q.method.value, damp=q.damp, block_size=q.block_size, act_order=q.act_order,
                              min_tokens=ctx.recipe.calibration.min_tokens, clip=q.clip.value)
    device = ctx.recipe.device  # GPTQ on the device, also when the model is offloaded to the host
    quantize_model(model, layout, plan, stats, options, progress=ctx.progress, device=device).save(tmp)
    if plan.copy_bits is not None:
        quantize_copies(model, layout, plan, stats, options, progress=ctx.progress, device=device).save(
            tmp, stem=COPIES_STEM)


def post_options(recipe: Recipe):
    from moecompress.quantize.post import BlockwiseOptions, PostOptions, RouterFitOptions, TuneOptions

    t = recipe.tune
    return PostOptions(blockwise=BlockwiseOptions(steps=t.blockwise_steps, holdout=t.holdout, seed=t.seed),
                       tune=TuneOptions(steps=t.steps, lr=t.lr, batch_size=t.batch_size, holdout=t.holdout, seed=t.seed),
                       router=RouterFitOptions(steps=t.router_steps, holdout=t.holdout))


def tune_step(ctx: RunContext, tmp: Path) -> None:
    from moecompress.quantize.post import post_quantize, save_routers

    options = post_options(ctx.recipe)
    if not options.active:
        (tmp / TUNE_REPORT).write_text(json.dumps({"steps": 0, "skipped": True}) + "\n")
        return
    model, tokenizer, layout = ctx.load()
    quantized = QuantizedTensors.load(ctx.dir("quantized"))
    tuned, routers, report = post_quantize(model, layout, quantized, calibration_batches(ctx, tokenizer), options,
                                           progress=ctx.progress)
    tuned.save(tmp)
    save_routers(routers, tmp)
    (tmp / TUNE_REPORT).write_text(json.dumps(report, indent=1) + "\n")


def final_quantized_dir(ctx: RunContext) -> Path:
    """Where the quantized tensors the checkpoint is made of live: tuned/ when a post-quantization step ran,
    else quantized/."""
    return ctx.dir("tuned") if post_options(ctx.recipe).active else ctx.dir("quantized")


def export_step(ctx: RunContext, tmp: Path) -> None:
    from moecompress.artifacts.quantized import COPIES_STEM
    from moecompress.export.checkpoint import export_checkpoint
    from moecompress.export.stats import expert_stats_from_calibration
    from moecompress.quantize.post import load_routers

    model, tokenizer, layout = ctx.load()
    model.to("cpu")  # the last stage: the checkpoint is written from host memory (the report evaluates on the CPU)
    plan = BitPlan.load(ctx.dir("allocation") / PLAN_FILE)
    quantized = QuantizedTensors.load(final_quantized_dir(ctx))
    # the low-bit copies are never scale-tuned: always those of the quantize stage
    copies = None if plan.copy_bits is None else QuantizedTensors.load(ctx.dir("quantized"), stem=COPIES_STEM)
    stats = expert_stats_from_calibration(CalibrationStats.load(ctx.dir("calibration")))
    routers = load_routers(final_quantized_dir(ctx))  # refitted routers (tune.router_steps), written for the export
    saved = {p: model.get_submodule(p).weight.detach().clone() for p in routers}
    try:
        with torch.no_grad():
            for p, w in routers.items():
                model.get_submodule(p).weight.copy_(w)
        export_checkpoint(model, layout, plan, quantized, tmp, tokenizer=tokenizer, dtype=DTYPES[ctx.recipe.dtype],
                          manifest={"recipe": "../recipe.lock.yaml"}, overwrite=True, expert_stats=stats, copies=copies)
    finally:  # the loaded model stays the unquantized reference (the report evaluates against it)
        with torch.no_grad():
            for p, w in saved.items():
                model.get_submodule(p).weight.copy_(w)


STEPS: dict[str, Callable[[RunContext, Path], None]] = {
    "calibrate": calibrate_step, "sensitivity": sensitivity_step, "allocate": allocate_step,
    "quantize": quantize_step, "tune": tune_step, "export": export_step,
}
