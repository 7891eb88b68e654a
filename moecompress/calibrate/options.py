"""CalibrationOptions: every knob of the calibration stage, one frozen dataclass."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moecompress.errors import MoecompressError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class CalibrationOptions:
    samples: int = 128  # sequences
    seq_len: int = 512  # tokens per sequence
    seed: int = 0
    batch_size: int = 8  # sequences per forward
    hessians: bool = True  # per-expert Hessians of the gate_up/up and down inputs (plain and routing-weighted)
    hessian_dtype: str = "float32"  # accumulation dtype: "float32" | "float64"
    # Hessians of dense nn.Linear inputs: True = every attention, shared-expert and dense-MLP linear of the layout;
    # a tuple of module paths = those; False = none.
    dense_hessians: bool | tuple[str, ...] = False
    all_experts: bool = False  # Hessians only: every kept token feeds every expert (the output stays routed)
    layerwise: bool = False  # load and run one decoder layer at a time (model given as a checkpoint directory)
    # Write each MoE layer's expert Hessians to <hessian_dir>/hessians.<layer>.safetensors as soon as the layer has
    # seen every batch (layer by layer: one layer's Hessians in memory at a time) and return stats that read them
    # from there; None keeps them all in memory.
    hessian_dir: str | None = None
    trace: bool = False  # keep the top-k indices and weights of every kept token, [T, L, K]
    min_tokens: int = 16  # coverage threshold reported per expert
    dtype: str = "float32"  # weights dtype when the model is loaded from a path: "float32" | "bfloat16" | "float16"
    device: str = "cpu"
    progress: bool = True  # tqdm bars

    def __post_init__(self):
        for name in ("samples", "seq_len", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise MoecompressError(f"{name} must be a positive integer, got {v!r}")
        if self.seq_len < 2:  # one token per sequence predicts nothing and routes almost nothing
            raise MoecompressError(f"seq_len must be at least 2, got {self.seq_len}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise MoecompressError(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise MoecompressError(f"hessian_dtype {self.hessian_dtype!r}; allowed: {', '.join(HESSIAN_DTYPES)}")
        if self.dtype not in DTYPES:
            raise MoecompressError(f"dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if isinstance(self.dense_hessians, (list, tuple)):
            object.__setattr__(self, "dense_hessians", tuple(str(p) for p in self.dense_hessians))
        elif not isinstance(self.dense_hessians, bool):
            raise MoecompressError(f"dense_hessians must be true/false or a list of module paths, "
                                   f"got {self.dense_hessians!r}")
        if self.all_experts and not self.hessians:
            raise MoecompressError("all_experts only changes the Hessians; it needs hessians=True")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_hessian_dtype(self) -> torch.dtype:
        return HESSIAN_DTYPES[self.hessian_dtype]
