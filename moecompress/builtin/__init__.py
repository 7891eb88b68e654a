"""The built-in demo model and data: a tiny Qwen3-MoE trained on this Python's own standard library.

Lets `moecompress quantize --recipe recipes/demo.yaml` run offline on a fresh machine, with no hub: a recipe names
`model: builtin:demo-qwen3moe` and the datasets `builtin:stdlib-calib` / `builtin:stdlib-eval`;
`resolve_model` / `resolve_dataset` turn those into local paths (building into the cache on first use) and pass
any other string through unchanged.
"""
from moecompress.builtin.cache import (
    BUILTIN_DATASETS,
    BUILTIN_MODELS,
    builtin_dataset_path,
    builtin_model_dir,
    cache_root,
    resolve_dataset,
    resolve_model,
)

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_MODELS",
    "builtin_dataset_path",
    "builtin_model_dir",
    "cache_root",
    "resolve_dataset",
    "resolve_model",
]
