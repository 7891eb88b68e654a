// Kernels over PyTorch's blocked CPU int4 layout (what 4-bit groups are converted to at load, see cpu_int4.py).
//
// packed: uint8 [N, n, k/2] in blocks of `block` rows (viewed [N, n/block, k, block/2]: byte j holds row j in its
// low nibble and row j + block/2 in its high nibble); sz: bf16 [N, k/group, n, 2] (scale, zero) with
// w = (q - 8) * scale + zero, computed as q * scale + (zero - 8 * scale) in float32 and rounded once to bf16.
//
// dequant_blocked: the weights of some experts in bf16, one pass (AVX-512 BF16 where compiled in, else scalar).
// int4_mm_amx: x @ W^T per expert without writing W out whole: each 64-column strip of W is dequantized into a
//   buffer in AMX's pair-interleaved layout and multiplied there (AMX BF16 tiles, float32 accumulation).
#include "common.h"

namespace {
using mc::from_bf16;

struct Int4 {
  const uint8_t* p;
  const uint16_t* sz;
  int64_t n, k, block, group, half, nb, groups;  // half = block / 2, nb = n / block, groups = k / group
  // the k rows of `half` bytes of block b of expert e
  const uint8_t* strip(int64_t e, int64_t b) const { return p + (e * nb + b) * k * half; }
  const uint16_t* sz_row(int64_t e, int64_t g) const { return sz + (e * groups + g) * n * 2; }
};

Int4 make_int4(const torch::Tensor& packed, const torch::Tensor& sz, int64_t block, int64_t group) {
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == torch::kUInt8, "packed: contiguous uint8");
  TORCH_CHECK(sz.is_contiguous() && sz.scalar_type() == torch::kBFloat16, "sz: contiguous bf16");
  const int64_t n = packed.size(1), k = packed.size(2) * 2;
  TORCH_CHECK(block > 0 && group > 0 && n % block == 0 && k % group == 0 && group % 2 == 0, "shapes");
  TORCH_CHECK(sz.size(0) == packed.size(0) && sz.size(1) == k / group && sz.size(2) == n && sz.size(3) == 2, "sz shape");
  return Int4{packed.data_ptr<uint8_t>(), mc::bf16_data(sz), n, k, block, group, block / 2, n / block, k / group};
}

// scalar: the `block` weights of block b at k row kk, as float
void dequant_scalar(const Int4& w, int64_t e, int64_t b, int64_t kk, float* vals) {
  const uint8_t* src = w.strip(e, b) + kk * w.half;
  const uint16_t* szr = w.sz_row(e, kk / w.group) + b * w.block * 2;
  for (int64_t c = 0; c < w.block; ++c) {
    const int q = c < w.half ? (src[c] & 15) : (src[c - w.half] >> 4);
    const float s = from_bf16(szr[2 * c]), shift = from_bf16(szr[2 * c + 1]) - 8.0f * s;
    vals[c] = static_cast<float>(q) * s + shift;
  }
}

#ifdef MC_AVX512_BF16
inline __m512 nib16(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }

// one 64-row block: scale and shift of its 64 columns for one group, and its k rows as float (4 x 16 columns)
struct Block64 {
  __m512 s[4], z[4];
  void load(const uint16_t* szr) {  // 64 (scale, zero) bf16 pairs
    for (int j = 0; j < 4; ++j) {
      const __m512i pairs = _mm512_loadu_si512(szr + 32 * j);
      s[j] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(0xFFFF0000u)));
      z[j] = _mm512_sub_ps(zero, _mm512_mul_ps(_mm512_set1_ps(8.0f), s[j]));
    }
  }
  void row(const uint8_t* src, __m512* f) const {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    const __m256i mask = _mm256_set1_epi8(15);
    const __m256i ql = _mm256_and_si256(bytes, mask), qh = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
    f[0] = _mm512_add_ps(_mm512_mul_ps(nib16(_mm256_castsi256_si128(ql)), s[0]), z[0]);
    f[1] = _mm512_add_ps(_mm512_mul_ps(nib16(_mm256_extracti128_si256(ql, 1)), s[1]), z[1]);
    f[2] = _mm512_add_ps(_mm512_mul_ps(nib16(_mm256_castsi256_si128(qh)), s[2]), z[2]);
    f[3] = _mm512_add_ps(_mm512_mul_ps(nib16(_mm256_extracti128_si256(qh, 1)), s[3]), z[3]);
  }
};
#endif

}  // namespace

// slots: int64 [S] rows of `packed`. Returns bf16 [S, k, n] (transposed: the [in, out] order of a matmul).
torch::Tensor dequant_blocked(torch::Tensor packed, torch::Tensor sz, torch::Tensor slots, int64_t block, int64_t group) {
  const Int4 w = make_int4(packed, sz, block, group);
  const int64_t S = slots.size(0), n = w.n, k = w.k, nb = w.nb;
  const int64_t* sl = mc::slot_ids(slots, packed.size(0));
  torch::Tensor out = torch::empty({S, k, n}, torch::dtype(torch::kBFloat16));
  uint16_t* o = mc::bf16_data(out);
  at::parallel_for(0, S * nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> vals(w.block);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t s = u / nb, b = u % nb, e = sl[s], c0 = b * block;
      const uint8_t* src = w.strip(e, b);
      for (int64_t g = 0; g < w.groups; ++g) {
#ifdef MC_AVX512_BF16
        if (block == 64) {
          Block64 blk;
          blk.load(w.sz_row(e, g) + c0 * 2);
          for (int64_t kk = g * group; kk < (g + 1) * group; ++kk) {
            __m512 f[4];
            blk.row(src + kk * 32, f);
            uint16_t* orow = o + (s * k + kk) * n + c0;
            _mm512_storeu_si512(orow, (__m512i)_mm512_cvtne2ps_pbh(f[1], f[0]));
            _mm512_storeu_si512(orow + 32, (__m512i)_mm512_cvtne2ps_pbh(f[3], f[2]));
          }
          continue;
        }
#endif
        for (int64_t kk = g * group; kk < (g + 1) * group; ++kk) {
          dequant_scalar(w, e, b, kk, vals.data());
          uint16_t* orow = o + (s * k + kk) * n + c0;
          for (int64_t c = 0; c < block; ++c) orow[c] = mc::to_bf16(vals[c]);
        }
      }
    }
  });
  return out;
}

// x: bf16 [R, k], rows sorted by slot (`starts`). Returns bf16 [R, n], x @ W^T per slot.
torch::Tensor int4_mm_amx(torch::Tensor x, torch::Tensor packed, torch::Tensor sz, torch::Tensor slots,
                          torch::Tensor starts, int64_t block, int64_t group) {
  TORCH_CHECK(mc::amx_available(), "int4_mm_amx: no AMX here");
  const Int4 w = make_int4(packed, sz, block, group);
  TORCH_CHECK(block == 64 && w.k % 32 == 0, "int4_mm_amx: 64-row blocks and k % 32 == 0");
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kBFloat16 && x.size(1) == w.k, "x: contiguous bf16 [R, k]");
  const int64_t n = w.n, k = w.k, nb = w.nb, R = x.size(0);
  const mc::Slots sl(slots, starts, packed.size(0), R);
  const int64_t S = sl.S;
  torch::Tensor out = torch::empty({R, n}, torch::dtype(torch::kBFloat16));
#ifdef MC_AMX
  const uint16_t* xp = mc::bf16_data(x);
  uint16_t* o = mc::bf16_data(out);
  const int64_t strip = (k / 2) * 32;  // one 16-column tile column of the buffer: k/2 pair rows of 64 bytes
  at::parallel_for(0, S * nb, 1, [&](int64_t begin, int64_t end) {
    mc::configure_tiles();
    std::vector<uint16_t> buf(4 * strip), tail(16 * k, 0);
    alignas(64) float cbuf[16 * 64];
    const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t u = begin; u < end; ++u) {
      // units run block-major, so that each thread gets a share of every slot's rows
      const int64_t b = u / S, s = u % S, e = sl.slot[s], c0 = b * 64, r_begin = sl.start[s], r_end = sl.start[s + 1];
      if (r_begin == r_end) continue;
      // dequantize the strip: buf[j][t] holds columns 16j..16j+15, k rows 2t and 2t+1 interleaved
      Block64 blk;
      const uint8_t* src = w.strip(e, b);
      for (int64_t g = 0; g < w.groups; ++g) {
        blk.load(w.sz_row(e, g) + c0 * 2);
        for (int64_t t = g * group / 2; t < (g + 1) * group / 2; ++t) {
          __m512 f0[4], f1[4];
          blk.row(src + t * 64, f0);
          blk.row(src + t * 64 + 32, f1);
          uint16_t* dst = buf.data() + t * 32;
          for (int j = 0; j < 4; ++j)
            _mm512_storeu_si512(dst + j * strip, _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(f1[j], f0[j])));
        }
      }
      const uint16_t* b0 = buf.data();
      for (int64_t r0 = r_begin; r0 < r_end; r0 += 16) {
        const int64_t rows = std::min<int64_t>(16, r_end - r0);
        const uint16_t* a = xp + r0 * k;  // rows past the slot's own belong to the next slots: computed, not kept
        if (r0 + 16 > R) {  // the tile would read past x: a zero-padded copy of the last rows
          std::fill(tail.begin(), tail.end(), 0);
          std::memcpy(tail.data(), a, (R - r0) * k * 2);
          a = tail.data();
        }
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t ks = 0; ks < k / 32; ++ks) {
          _tile_loadd(4, a + ks * 32, k * 2);
          _tile_loadd(5, b0 + 0 * strip + ks * 512, 64);
          _tile_loadd(6, b0 + 1 * strip + ks * 512, 64);
          _tile_dpbf16ps(0, 4, 5);
          _tile_loadd(7, b0 + 2 * strip + ks * 512, 64);
          _tile_dpbf16ps(1, 4, 6);
          _tile_loadd(5, b0 + 3 * strip + ks * 512, 64);
          _tile_dpbf16ps(2, 4, 7);
          _tile_dpbf16ps(3, 4, 5);
        }
        _tile_stored(0, cbuf, 256); _tile_stored(1, cbuf + 16, 256);
        _tile_stored(2, cbuf + 32, 256); _tile_stored(3, cbuf + 48, 256);
        for (int64_t i = 0; i < rows; ++i) mc::store_bf16_64(o + (r0 + i) * n + c0, cbuf + i * 64);
      }
    }
    _tile_release();
  });
#endif
  return out;
}
