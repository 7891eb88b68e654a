"""Experts: the modules that replace a transformers model's experts and dense linears and compute from packed groups.

`packed_group` (one (projection, bits) group of a layer's experts, stored packed), `packed_experts` (the fused
experts module of transformers 5.x), `packed_linear` (a dense linear), `cpu_moe` (a decode-sized MoE layer in one
C++ call), `cpu_prefill` (a prefill-sized one), `cpu_prefill16` (the prefill of unquantized bf16 / float16 models
on CPUs without native bf16: their fused experts and attention linears through a float32-FMA GEMM). They call
`runtime/kernels`; `runtime/store` computes the same experts from a budgeted slot cache.
"""
