"""The runtime: runs a packed checkpoint or a deployment's bundles. It never imports the compression side.

Read it bottom up, each layer using only the ones above it in this list:
- `loading/`: files -> a model (validate, convert, from_pretrained; bundles in one process);
- `kernels/`: matmuls from packed weights per (ISA, bits, path), C++ sources in `kernels/csrc`; `cuda/` on GPUs;
- `experts/`: the packed experts and linears that replace a model's modules; `store/`: the same experts under a
  memory budget (slot cache, pinning, prefetch, low-bit copies);
- `cpu_step/`, `cuda/graph_decode.py`, `generation.py`, `sampling.py`: decoding one checkpoint token by token;
- `edge/`: the deployment across servers (dispatcher, transport, homes, pipeline); token policies plug into its
  dispatch from `moecompress.execution.tokens`.
"""
