"""moecompress: per-expert mixed-precision quantization and edge placement for Hugging Face MoE LLMs.

Importing the package registers the `moecompress` quantization method with transformers, so that
`AutoModelForCausalLM.from_pretrained(dir)` loads compressed checkpoints; `moecompress.from_pretrained(dir)` also
checks the files first.
"""
from moecompress.errors import MoecompressError
from moecompress.runtime.loading.hf_quantizer import register as _register
from moecompress.runtime.loading.load import from_pretrained

__version__ = "0.1.0"
__all__ = ["MoecompressError", "from_pretrained", "__version__"]

_register()
