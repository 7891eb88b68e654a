"""Build the built-in demo model: a tiny Qwen3-MoE trained for a few CPU minutes on the stdlib corpus.

`build_model(out_dir)` is the whole recipe: corpus -> tokenizer -> token stream -> training -> save -> measure.
The weights are saved in float32: the model is small (a few MB), CPU bf16 matmuls are slower than float32 ones on
most CPUs, and quantization error measured against a float32 reference is not blurred by bf16 rounding.
Training is seeded (init, batches); bitwise equality across machines or thread counts is not promised (float
reduction order), equal quality is.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

from moecompress.builtin.corpus import corpus_digest, read_corpus_jsonl, stdlib_documents, write_corpus_jsonl
from moecompress.builtin.measure import evaluate
from moecompress.builtin.tokenizer import DEFAULT_VOCAB_SIZE, train_tokenizer


@dataclass(frozen=True)
class ModelDims:
    hidden_size: int = 128
    num_layers: int = 4
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    vocab_size: int = DEFAULT_VOCAB_SIZE


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600  # ~2.2 min of training on 2 idle cores (0.21 s/step measured), see build_info.json
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    router_aux_loss_coef: float = 0.01
    seed: int = 0
    max_chars_per_domain: int | None = 3_000_000  # training text per domain (train split)
    log_every: int = 25


@dataclass(frozen=True)
class BuildSpec:
    dims: ModelDims = field(default_factory=ModelDims)
    train: TrainConfig = field(default_factory=TrainConfig)
    split_max_chars: int | None = None  # per domain in corpus/{calib,eval}.jsonl.gz; None: SPLIT_MAX_CHARS


def qwen3moe_config(dims: ModelDims, router_aux_loss_coef: float = 0.01, eos_token_id: int = 0) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        intermediate_size=4 * dims.hidden_size,  # unused: every layer is MoE
        num_hidden_layers=dims.num_layers,
        num_attention_heads=dims.num_heads,
        num_key_value_heads=dims.num_kv_heads,
        head_dim=dims.head_dim,
        max_position_embeddings=2048,
        num_experts=dims.num_experts,
        num_experts_per_tok=dims.top_k,
        moe_intermediate_size=dims.moe_intermediate_size,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=True,
        output_router_logits=False,  # switched on per call while training; inference gets the plain forward
        router_aux_loss_coef=router_aux_loss_coef,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        use_sliding_window=False,
        sliding_window=None,
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """All texts tokenized and concatenated, each followed by EOS: int64 [n_tokens]."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    ids = [i for enc in encodings for i in (*enc.ids, eos)]
    return torch.tensor(ids, dtype=torch.long)


def usable_cores() -> int:
    """$OMP_NUM_THREADS if set, else the cores this process may run on (os.cpu_count() narrowed by taskset/cpusets)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: Qwen3MoeForCausalLM, stream: torch.Tensor, cfg: TrainConfig, progress: bool = True
) -> list[tuple[int, float]]:
    """Train in place on random windows of `stream`.

    Returns the LM loss (without the aux term) as (step, mean over the steps since the previous entry): step 0
    alone, then every log_every steps, and the last step.
    """
    if stream.numel() < cfg.seq_len + 2:
        raise ValueError(f"token stream of {stream.numel()} tokens is shorter than one window of {cfg.seq_len + 1}")
    gen = torch.Generator().manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    offsets = torch.arange(cfg.seq_len + 1)
    model.train()
    log: list[tuple[int, float]] = []
    window_losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="train builtin model", disable=not progress, file=sys.stderr)
    for step in bar:
        starts = torch.randint(0, stream.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        window = stream[starts[:, None] + offsets]  # [batch, seq_len + 1]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        out = model(input_ids=window[:, :-1], output_router_logits=True)
        lm_loss = F.cross_entropy(out.logits.flatten(0, 1), window[:, 1:].flatten())  # every position predicts
        (lm_loss + model.config.router_aux_loss_coef * out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window_losses.append(lm_loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log.append((step, round(sum(window_losses) / len(window_losses), 4)))
            bar.set_postfix(loss=f"{log[-1][1]:.3f}")
            window_losses = []
    model.eval()
    return log


def build_model(
    out_dir: str | os.PathLike, spec: BuildSpec = BuildSpec(), threads: int | None = None, progress: bool = True
) -> dict:
    """Build the demo model into `out_dir` (created; must not exist) and return its build_info.

    out_dir/ holds the model (config.json, model.safetensors), the tokenizer, corpus/{calib,eval}.jsonl.gz and
    build_info.json. threads: torch CPU threads while building (default: `usable_cores()`); restored afterwards.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True)
    cfg, dims = spec.train, spec.dims
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or usable_cores())
    try:
        docs = stdlib_documents(max_chars=cfg.max_chars_per_domain, split="train")
        texts = [d["text"] for d in docs]
        tokenizer = train_tokenizer(texts, vocab_size=dims.vocab_size)
        stream = token_stream(tokenizer, texts)
        t_data = time.perf_counter() - t0

        torch.manual_seed(cfg.seed)
        model = Qwen3MoeForCausalLM(qwen3moe_config(dims, cfg.router_aux_loss_coef, tokenizer.eos_token_id)).float()
        t1 = time.perf_counter()
        log = train(model, stream, cfg, progress=progress)
        t_train = time.perf_counter() - t1

        for split in ("calib", "eval"):
            write_corpus_jsonl(out / "corpus" / f"{split}.jsonl.gz", split, max_chars=spec.split_max_chars)
        report = evaluate(model, tokenizer, read_corpus_jsonl(out / "corpus" / "eval.jsonl.gz"), cfg.seq_len)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {
        "name": out.name,
        "architecture": "qwen3_moe",
        "dtype": "float32",
        "params": sum(p.numel() for p in model.parameters()),
        "dims": asdict(dims),
        "train": asdict(cfg),
        "steps": cfg.steps,
        "tokens_per_step": cfg.batch_size * cfg.seq_len,
        "train_stream_tokens": stream.numel(),
        "train_corpus_sha256": corpus_digest(docs),
        "start_loss": log[0][1],
        "final_loss": log[-1][1],
        "loss_log": log,
        "eval_ppl": {k: round(v, 3) for k, v in report["ppl"].items()},
        "eval_tokens": report["tokens"],
        "routing_max_over_mean": [round(x, 3) for x in report["max_over_mean"]],
        "routing_min_over_mean": [round(x, 3) for x in report["min_over_mean"]],
        "routing_expert_tokens": report["expert_tokens"],
        "seconds_data": round(t_data, 1),
        "seconds_train": round(t_train, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "threads": used_threads,
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    if progress:
        print(f"built {out.name}: loss {info['start_loss']} -> {info['final_loss']} in {cfg.steps} steps, "
              f"eval ppl {info['eval_ppl']}, {info['seconds']} s", file=sys.stderr)
    return info
