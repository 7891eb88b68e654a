// The Python module of the moecompress CPU kernels (built by cpu_kernels.py).
#include "common.h"
#ifdef MC_AMX
#include <sys/syscall.h>
#include <unistd.h>
#endif

torch::Tensor dequant_blocked(torch::Tensor packed, torch::Tensor sz, torch::Tensor slots, int64_t block, int64_t group);
torch::Tensor int4_mm_amx(torch::Tensor x, torch::Tensor packed, torch::Tensor sz, torch::Tensor slots,
                          torch::Tensor starts, int64_t block, int64_t group);
torch::Tensor packed_mm_amx(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                            int64_t bits, int64_t group, torch::Tensor slots, torch::Tensor starts);

bool mc::amx_available() {
#ifdef MC_AMX
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("amx_available", &mc::amx_available, "the AMX kernels can run in this process");
  m.def("dequant_blocked", &dequant_blocked, "blocked int4 -> bf16 [S, k, n]");
  m.def("int4_mm_amx", &int4_mm_amx, "x @ W^T per slot from blocked int4 weights (AMX)");
  m.def("packed_mm_amx", &packed_mm_amx, "x @ W^T per slot from moecompress-packed 2/3/4/8-bit weights (AMX)");
}
