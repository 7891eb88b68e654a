"""evaluate(model, tokenizer, dataset, ...) -> EvalResult: perplexity per domain and KL against a reference.

Sampling: `samples` sequences of `seq_len` tokens in all, drawn exactly as calibration draws them
(moecompress.calibrate.dataset.build_calibration_data): round-robin over the domains, so each domain gets an
equal share while it has text; deterministic for a seed. Held-out means a different text: evaluate on an eval
split (e.g. builtin:stdlib-eval) rather than the calibration file, since the same file and seed give the same
sequences.

Scoring: every next-token prediction inside a sequence (padding excluded, first token unscored); perplexity of a
domain is exp of its token-weighted mean NLL, and the overall perplexity is exp of the mean over all scored tokens,
so overall log-perplexity = sum_d tokens_d * log ppl_d / sum_d tokens_d. KL(reference || model) is the mean over
the same tokens. Both models see one batch at a time and its logits are dropped before the next: memory is one
batch of logits per model, never the whole set.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from moecompress.calibrate.dataset import CalibrationData, DatasetSpec, read_documents, sequences_from_documents
from moecompress.errors import MoecompressError
from moecompress.evaluate.metrics import target_mask, token_kl, token_nll
from moecompress.evaluate.overlap import MIN_CHARS, TextOverlap, drop_overlap, text_overlap
from moecompress.evaluate.result import DomainScore, EvalResult
from moecompress.evaluate.size import checkpoint_size, parameter_size

OVERALL = "all"  # domain name used internally when the dataset has none


def _device(model) -> torch.device:
    p = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def _logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    dev = _device(model)
    return model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits


def read_text(dataset: DatasetSpec | str | Path) -> list[tuple[str, str | None]]:
    """The (text, domain) documents of a dataset; `builtin:` names are resolved to their local file first."""
    if isinstance(dataset, str) and dataset.startswith("builtin:"):
        from moecompress.builtin import resolve_dataset

        dataset = resolve_dataset(dataset)
    return read_documents(dataset if isinstance(dataset, DatasetSpec) else DatasetSpec.parse(dataset))


def prepare_eval_data(dataset: CalibrationData | DatasetSpec | str | Path, tokenizer, samples: int, seq_len: int,
                      seed: int = 0, calibration: DatasetSpec | str | Path | None = None, keep_overlap: bool = False,
                      min_chars: int = MIN_CHARS) -> tuple[CalibrationData, TextOverlap | None]:
    """Tokenized evaluation sequences and, when the `calibration` dataset is given, the overlap of the two texts
    (evaluate/overlap.py), dropped from the evaluation text unless `keep_overlap`. Tokenized data is used as is."""
    if isinstance(dataset, CalibrationData):
        return dataset, None
    docs, name = read_text(dataset), str(dataset)  # the name, not a builtin's cache path
    if calibration is None:
        return sequences_from_documents(docs, tokenizer, samples, seq_len, seed, name), None
    calib = [text for text, _ in read_text(calibration)]
    overlap = text_overlap(calib, [text for text, _ in docs], min_chars, dropped=not keep_overlap)
    if not keep_overlap:
        docs, name = drop_overlap(calib, docs, min_chars), f"{name} without lines in {calibration}"
    return sequences_from_documents(docs, tokenizer, samples, seq_len, seed, name), overlap


def load_eval_data(dataset: CalibrationData | DatasetSpec | str | Path, tokenizer, samples: int, seq_len: int,
                   seed: int = 0, calibration: DatasetSpec | str | Path | None = None,
                   keep_overlap: bool = False) -> CalibrationData:
    """Tokenized evaluation sequences (prepare_eval_data without the overlap count)."""
    return prepare_eval_data(dataset, tokenizer, samples, seq_len, seed, calibration, keep_overlap)[0]


@torch.no_grad()
def evaluate(model, tokenizer, dataset: CalibrationData | DatasetSpec | str | Path, samples: int = 64,
             seq_len: int = 512, seed: int = 0, reference_model=None, batch_size: int = 4, method: str = "model",
             family: str | None = None, reference: str | None = None, progress: bool = True,
             calibration: DatasetSpec | str | Path | None = None, keep_overlap: bool = False) -> EvalResult:
    """Perplexity of `model` per domain and overall on `dataset`; mean KL(reference_model || model) when given.

    model / reference_model: causal LMs called as model(input_ids=, attention_mask=, use_cache=False).logits
    (their own devices; put them in eval mode). dataset: a dataset spec (see calibrate/dataset.py), a
    `builtin:` name, or already tokenized CalibrationData (then tokenizer, samples, seq_len and seed are unused).
    calibration: the calibration dataset; its overlap with `dataset` is counted (result.overlap) and dropped from
    the evaluation text unless `keep_overlap` (see prepare_eval_data).
    """
    if batch_size < 1:
        raise MoecompressError(f"batch_size must be a positive integer, got {batch_size!r}")
    data, overlap = prepare_eval_data(dataset, tokenizer, samples, seq_len, seed, calibration, keep_overlap)
    names = data.domains or (OVERALL,)
    nll_sum = torch.zeros(len(names), dtype=torch.float64)
    kl_sum = torch.zeros(len(names), dtype=torch.float64)
    tokens = torch.zeros(len(names), dtype=torch.int64)
    from tqdm.auto import tqdm

    for ids, mask, dom in tqdm(list(data.batches(batch_size)), desc=f"eval {method}", unit="batch",
                               disable=not progress):
        dom = dom if dom is not None else torch.zeros(ids.shape[0], dtype=torch.int64)
        logits = _logits(model, ids, mask)  # [b, L, V]
        ref = _logits(reference_model, ids, mask) if reference_model is not None else None  # [b, L, V]
        for i in range(ids.shape[0]):  # one sequence at a time: float32 temporaries stay [L, V]
            row = slice(i, i + 1)
            d = int(dom[i])
            nll_sum[d] += token_nll(logits[row], ids[row], mask[row]).sum().item()
            tokens[d] += int(target_mask(mask[row]).sum())
            if ref is not None:
                kl_sum[d] += token_kl(ref[row], logits[row], mask[row]).sum().item()
        del logits, ref
    total = int(tokens.sum())
    if total == 0:
        raise MoecompressError(f"no token to score in {data.description}: every sequence has fewer than 2 tokens; "
                               "raise seq_len or give longer documents")
    has_ref = reference_model is not None
    domains = tuple(
        DomainScore(name=n, tokens=int(tokens[d]), nll=float(nll_sum[d] / max(int(tokens[d]), 1)),
                    kl=float(kl_sum[d] / max(int(tokens[d]), 1)) if has_ref else None)
        for d, n in enumerate(names)) if data.domains else ()
    return EvalResult(
        method=method, family=family or method.split("@")[0], dataset=data.description,
        samples=data.num_sequences, seq_len=data.seq_len, seed=seed, tokens=total,
        nll=float(nll_sum.sum() / total), domains=domains,
        kl=float(kl_sum.sum() / total) if has_ref else None,
        reference=(reference or "reference") if has_ref else None, overlap=overlap)


def is_moecompress_checkpoint(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "moecompress"


def load_model(spec: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A local moecompress checkpoint (checked and loaded by moecompress.from_pretrained), or any other local
    directory / hub id / `builtin:` model through transformers; in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    from moecompress.runtime.loading.load import from_pretrained

    spec = _resolve_model(spec)
    if is_moecompress_checkpoint(spec):
        model = from_pretrained(spec, dtype=dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(spec), dtype=dtype)
        except OSError as e:
            raise MoecompressError(f"model {spec!r} is neither a loadable local directory nor a reachable hub id "
                                   f"({e})") from None
    return model.to(device).eval()


def _resolve_model(spec: str | Path) -> str | Path:
    if isinstance(spec, str) and spec.startswith("builtin:"):
        from moecompress.builtin import resolve_model

        return resolve_model(spec)
    return spec


def _method_label(path: Path) -> tuple[str, str | None]:
    """(method, family) from the checkpoint manifest's "method"/"family" keys, else the directory name."""
    manifest = path / "moecompress.json"
    meta = json.loads(manifest.read_text()) if manifest.is_file() else {}
    return str(meta.get("method") or path.name), meta.get("family")


def evaluate_checkpoint(model: str | Path | nn.Module, dataset: CalibrationData | DatasetSpec | str | Path,
                        tokenizer=None, reference: str | Path | nn.Module | None = None, samples: int = 64,
                        seq_len: int = 512, seed: int = 0, batch_size: int = 4, method: str | None = None,
                        family: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        progress: bool = True, calibration: DatasetSpec | str | Path | None = None,
                        keep_overlap: bool = False) -> EvalResult:
    """evaluate() plus the model's size: a moecompress checkpoint (a directory, or a model loaded from one) is
    measured from its files; any other model counts its parameters in bf16 at 16 bits.

    model / reference: a directory, hub id or `builtin:` name (loaded in `dtype` on `device`), or a loaded model.
    The tokenizer defaults to the model's (its directory), else the reference's.
    method / family: labels; default to the checkpoint manifest's "method" / "family" keys, else the directory
    name (a plain model: "bf16"), the family being the label before any "@".
    """
    source = Path(str(_resolve_model(model))) if isinstance(model, (str, Path)) else \
        Path(getattr(getattr(model, "config", None), "_name_or_path", "") or ".")
    compressed = is_moecompress_checkpoint(source) if str(source) != "." else False
    if isinstance(model, (str, Path)):
        model = load_model(model, dtype, device)
    ref_label = None
    if isinstance(reference, (str, Path)):
        ref_label = str(reference)
        reference = load_model(reference, dtype, device)
    if tokenizer is None and not isinstance(dataset, CalibrationData):
        tokenizer = _load_tokenizer(source, ref_label)
    default_method, default_family = _method_label(source) if compressed else ("bf16", None)
    result = evaluate(model, tokenizer, dataset, samples, seq_len, seed, reference_model=reference,
                      batch_size=batch_size, method=method or default_method, family=family or default_family,
                      reference=ref_label, progress=progress, calibration=calibration, keep_overlap=keep_overlap)
    size = checkpoint_size(source) if compressed else parameter_size(model)
    return replace(result, size=size)


def _load_tokenizer(source: Path, reference: str | None):
    from transformers import AutoTokenizer

    for where in (str(source), reference):
        if where is None or where == ".":
            continue
        try:
            return AutoTokenizer.from_pretrained(str(_resolve_model(where)))
        except (OSError, ValueError):
            continue
    raise MoecompressError(f"no tokenizer found in {source}" + (f" or {reference}" if reference else "") +
                           "; export the checkpoint with its tokenizer or pass the original model as --reference")
