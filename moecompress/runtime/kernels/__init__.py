"""Kernels: compute a matmul from packed weights, picked per (ISA, bits, path) in `kernel_registry`.

`cpu_features` reads the CPU's instruction sets; `cpu_lowbit` (int8 activations x 2/3/4/8-bit weights on AVX2,
AVX-512 VNNI, NEON, portable C++), `cpu_kernels` (AMX), `cpu_int4` (PyTorch's int4 op) and `cpu_attention` wrap the
C++ sources in `csrc/`, built on first use and imported from the build after that (`extension`, `build_lock`); the CUDA kernels live in `runtime/cuda`. `heap` gives
the memory a long forward freed back to the OS; `huge_pages` moves the weights a decode step streams onto 2 MB pages.
Nothing here knows about models: that is `runtime/experts`.
"""
