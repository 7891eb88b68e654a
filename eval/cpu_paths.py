"""Which kernel each (ISA, bits, path) takes on this CPU, for model (b)'s expert shapes (eval/bench_cpu.py: gate_up
1536 x 2048, down 2048 x 768, group 128), bf16 x; and which C++ modules are built and whether AMX is granted.

    .venv/bin/python eval/cpu_paths.py
"""
from __future__ import annotations

import torch

from moecompress.runtime.experts.packed_group import PackedGroup
from moecompress.runtime.kernels import cpu_features, cpu_int4, cpu_kernels, cpu_lowbit, kernel_registry

SHAPES = {"gate_up": (1536, 2048), "down": (2048, 768)}  # (out_features, in_features)


def main() -> None:
    features = cpu_features.detect()
    here = [isa for isa in cpu_features.ISA_ORDER if features.has(isa)]
    print("best ISA:", cpu_features.best_isa(), "| compute dtype:", cpu_features.compute_dtype(), "| ISAs here:", here)
    print("lowbit built:", cpu_lowbit.available(), "| cpu_kernels built:", cpu_kernels.available(),
          "| AMX granted:", cpu_kernels.amx(), "| int4 op:", cpu_int4.available(),
          "| int4 block layout (1536x2048):", cpu_int4.block_layout(1536, 2048))
    for isa in here:
        for name, (out_f, in_f) in SHAPES.items():
            row = []
            for bits in (2, 3, 4, 8):
                group = PackedGroup(tuple(range(8)), bits, in_f, out_f, 128, False, False, dtype=torch.bfloat16)
                picks = [kernel_registry.select(bits, p, group, torch.bfloat16, isa=isa).name
                         for p in kernel_registry.PATHS]
                row.append(f"{bits}-bit {picks[0]}/{picks[1]}")
            print(f"{isa:16s} {name:8s} decode/prefill: " + "; ".join(row))


if __name__ == "__main__":
    main()
