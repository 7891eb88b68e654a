"""Evaluation: perplexity per domain, KL against the uncompressed model, size; results table and Pareto plot."""
from moecompress.evaluate.metrics import perplexity, target_mask, token_kl, token_nll
from moecompress.evaluate.overlap import TextOverlap, drop_overlap, text_overlap
from moecompress.evaluate.plot import pareto_front, plot_pareto
from moecompress.evaluate.report import format_table, merge_results, read_results, write_results
from moecompress.evaluate.result import DomainScore, EvalResult, ModelSize
from moecompress.evaluate.run import evaluate, evaluate_checkpoint, load_eval_data, load_model, prepare_eval_data
from moecompress.evaluate.size import checkpoint_size, parameter_size

__all__ = [
    "DomainScore", "EvalResult", "ModelSize", "checkpoint_size", "evaluate", "evaluate_checkpoint", "format_table",
    "load_eval_data", "load_model", "merge_results", "pareto_front", "parameter_size", "perplexity", "plot_pareto",
    "prepare_eval_data", "read_results", "target_mask", "text_overlap", "drop_overlap", "TextOverlap", "token_kl",
    "token_nll", "write_results",
]
