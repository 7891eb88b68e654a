"""Loading: from files to a runnable model, checked before any weight is allocated.

`load.from_pretrained` (checkpoints and bundles), `validate` (structure against the model), `verify` (`moecompress
verify`: checksums without loading), `convert` (swap in `runtime/experts` modules as the FormatSpec says),
`hf_quantizer` (transformers' `quant_method: moecompress`), `bundles` (a bundle set in one process: the edge
runtime's simulation mode), `file_pages` (drop mapped pages no tensor uses), `inspect` (`moecompress inspect`).
"""
