"""transformers integration: `quant_method: "moecompress"` in config.json loads through from_pretrained.

Registered on `import moecompress` (register_quantization_config / register_quantizer are transformers' public
extension points). Without that import transformers refuses the checkpoint with "Unknown quantization type" —
it never silently builds a wrong model.
"""
from __future__ import annotations

from pathlib import Path

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from moecompress.errors import MoecompressError
from moecompress.format.spec import FORMAT_VERSION, QUANT_METHOD, FormatSpec
from moecompress.runtime.kernels import cpu_attention, heap
from moecompress.runtime.loading.convert import prepare_kernels, replace_modules
from moecompress.runtime.loading.validate import check_load


class MoecompressConfig(QuantizationConfigMixin):
    """Mirror of format/spec.py FormatSpec in the shape transformers expects."""

    def __init__(self, **fields):
        """`fields` are config.json's quantization_config, parsed strictly (missing or unknown keys are errors)."""
        if not fields:  # transformers may build a default instance to compare against
            fields = {"format_version": FORMAT_VERSION, "group_size": 64, "symmetric": False, "experts": {}}
        self.spec = FormatSpec.from_dict({"quant_method": QUANT_METHOD, **fields})
        d = self.spec.to_dict()
        self.quant_method = QUANT_METHOD
        self.format_version = d["format_version"]
        self.group_size = d["group_size"]
        self.symmetric = d["symmetric"]
        self.experts = d["experts"]
        self.linears = d["linears"]

    def to_dict(self) -> dict:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "experts": self.experts,
            "linears": self.linears,
        }

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    @classmethod
    def from_spec(cls, spec: FormatSpec) -> "MoecompressConfig":
        return cls(**spec.to_dict())


class MoecompressQuantizer(HfQuantizer):
    requires_calibration = True  # pre-quantized checkpoints only: moecompress quantizes offline

    def __init__(self, quantization_config: MoecompressConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        """Check the directory's files and structure (runtime/loading/validate.py), then swap in the packed modules."""
        if not checkpoint_files:
            raise MoecompressError("a moecompress checkpoint loads from its directory (config.json, safetensors "
                                   "and moecompress.json), not from a state_dict")
        spec, dtype = self.quantization_config.spec, kwargs.get("dtype") or model.dtype
        check_load(model, spec, Path(checkpoint_files[0]).parent, lambda: replace_modules(model, spec, dtype=dtype))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        prepare_kernels(model, model.dtype)
        cpu_attention.install(model)  # one-token attention without the slow grouped-query path on CPU
        heap.install(model)  # freed prefill buffers go back to the OS
        return model

    def get_new_dtype(self, converter, param, dtype):
        # Keep the stored dtype of packed ints and float16 scales; other float tensors follow the requested dtype.
        stored = param.get_dtype() if hasattr(param, "get_dtype") else str(param.dtype)
        if stored in ("F16", "U8", "I32", "torch.float16", "torch.uint8", "torch.int32"):
            return None
        return super().get_new_dtype(converter, param, dtype)

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return False


def register() -> None:
    """Idempotent registration with transformers' quantizer registries."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MoecompressConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MoecompressQuantizer)
