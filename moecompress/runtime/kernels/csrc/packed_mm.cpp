// x @ W^T per expert straight from moecompress's own packing (format/pack.py), for 2/3/4/8-bit groups, with AMX.
//
// qweight: uint8 [N, n, k*bits/8], blocks of 8 values in `bits` bytes, little-endian, value i at bits
// [i*bits, (i+1)*bits); scales: float16 [N, n, k/group]; zeros: uint8 [N, n, k/group], or empty when symmetric
// (z = 2^(bits-1)). w = (q - z) * s, exact in float32, rounded once to bf16: the weights PackedGroup.dequantized()
// gives. W is AMX's A operand (rows of W are its rows, as stored), so a 64-row strip of W is dequantized into a buffer
// of A tiles; x is the B operand, its k pairs interleaved once per call, 16 rows per tile (zero-padded). Each C tile
// (16 rows of W x 16 rows of x, float32) is written transposed into the output.
#include "common.h"

namespace {

struct Packed {
  const uint8_t* q;
  const at::Half* s;
  const uint8_t* z;  // nullptr: symmetric
  int64_t n, k, bits, group, groups, row_bytes;
  const uint8_t* row(int64_t e, int64_t r) const { return q + (e * n + r) * row_bytes; }
};

#ifdef MC_AMX
// Unpacks 16 consecutive `bits`-bit values (2 * bits bytes) into 16 int32 lanes: vpermb gives lane i the two bytes
// holding its bits (value i starts at bit i * bits), then a per-lane shift and mask.
struct Unpack16 {
  __m512i idx, shift, mask;
  __mmask64 load;
  explicit Unpack16(int64_t bits) {
    alignas(64) uint8_t ix[64] = {};
    alignas(64) uint32_t sh[16];
    for (int i = 0; i < 16; ++i) {
      const int bit = i * static_cast<int>(bits);
      ix[4 * i] = bit / 8, ix[4 * i + 1] = bit / 8 + 1, sh[i] = bit % 8;  // bytes 2, 3: shifted out by the mask
    }
    idx = _mm512_load_si512(ix), shift = _mm512_load_si512(sh), mask = _mm512_set1_epi32((1 << bits) - 1);
    load = (__mmask64(1) << (2 * bits)) - 1;  // reads only this chunk's bytes
  }
  __m512 operator()(const uint8_t* src) const {
    const __m512i raw = _mm512_maskz_loadu_epi8(load, src);
    const __m512i v = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi8(idx, raw), shift), mask);
    return _mm512_cvtepi32_ps(v);
  }
};

// bits <= 4: 32 consecutive values (4 * bits bytes) into 32 uint16 lanes, the same way (vpermb, shift, mask).
struct Unpack32 {
  __m512i idx, shift, mask;
  __mmask64 load;
  explicit Unpack32(int64_t bits) {
    alignas(64) uint8_t ix[64];
    alignas(64) uint16_t sh[32];
    for (int i = 0; i < 32; ++i) {
      const int bit = i * static_cast<int>(bits);
      ix[2 * i] = bit / 8, ix[2 * i + 1] = bit / 8 + 1, sh[i] = bit % 8;
    }
    idx = _mm512_load_si512(ix), shift = _mm512_load_si512(sh), mask = _mm512_set1_epi16((1 << bits) - 1);
    load = (__mmask64(1) << (4 * bits)) - 1;
  }
  __m512i operator()(const uint8_t* src) const {
    const __m512i raw = _mm512_maskz_loadu_epi8(load, src);
    return _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi8(idx, raw), shift), mask);
  }
};

// rows [r0, r0 + 64) of expert e -> A tiles: abuf[j][ks] = rows r0 + 16j .. + 16, k columns 32ks .. 32ks + 32.
// bits <= 4: each group's 2^bits weights (q - z) * s are computed once, and 32 integers at a time look them up
// (vpermw); 8-bit: converted and scaled 16 at a time. Both give (q - z) * s exactly, rounded once to bf16.
void dequant_strip(const Packed& w, int64_t e, int64_t r0, uint16_t* abuf) {
  const int64_t steps = w.k / 32, per_group = w.group / 32;
  const Unpack16 unpack16(w.bits);
  const Unpack32 unpack32(w.bits <= 4 ? w.bits : 4);
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t r = 0; r < 64; ++r) {
    const uint8_t* src = w.row(e, r0 + r);
    uint16_t* dst = abuf + ((r / 16) * steps * 16 + r % 16) * 32;
    for (int64_t g = 0; g < w.groups; ++g) {
      const int64_t gi = (e * w.n + r0 + r) * w.groups + g;
      const __m512 s = _mm512_set1_ps(static_cast<float>(w.s[gi]));
      const __m512 z = _mm512_set1_ps(w.z ? static_cast<float>(w.z[gi]) : static_cast<float>(1 << (w.bits - 1)));
      if (w.bits <= 4) {
        const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(_mm512_setzero_ps(), _mm512_mul_ps(_mm512_sub_ps(iota, z), s));
        for (int64_t ks = g * per_group; ks < (g + 1) * per_group; ++ks)
          _mm512_storeu_si512(dst + ks * 512, _mm512_permutexvar_epi16(unpack32(src + ks * 4 * w.bits), table));
        continue;
      }
      for (int64_t ks = g * per_group; ks < (g + 1) * per_group; ++ks) {
        const __m512 lo = _mm512_mul_ps(_mm512_sub_ps(unpack16(src + 2 * ks * 2 * w.bits), z), s);
        const __m512 hi = _mm512_mul_ps(_mm512_sub_ps(unpack16(src + (2 * ks + 1) * 2 * w.bits), z), s);
        _mm512_storeu_si512(dst + ks * 512, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    }
  }
}
#endif

}  // namespace

// x: bf16 [R, k], rows sorted by slot (`starts`); returns bf16 [R, n], x @ W^T per slot.
torch::Tensor packed_mm_amx(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                            int64_t bits, int64_t group, torch::Tensor slots, torch::Tensor starts) {
  TORCH_CHECK(mc::amx_available(), "packed_mm_amx: no AMX here");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits");
  TORCH_CHECK(qweight.is_contiguous() && qweight.scalar_type() == torch::kUInt8, "qweight: contiguous uint8");
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == torch::kHalf, "scales: contiguous float16");
  const int64_t n = qweight.size(1), k = qweight.size(2) * 8 / bits, R = x.size(0);
  TORCH_CHECK(n % 64 == 0 && k % 32 == 0 && group % 32 == 0 && k % group == 0, "shapes: n % 64, k % 32, group % 32");
  TORCH_CHECK(scales.size(0) == qweight.size(0) && scales.size(1) == n && scales.size(2) == k / group, "scales shape");
  const bool symmetric = zeros.numel() == 0;
  TORCH_CHECK(symmetric || (zeros.is_contiguous() && zeros.scalar_type() == torch::kUInt8 && zeros.sizes() == scales.sizes()),
              "zeros: empty, or contiguous uint8 shaped like scales");
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kBFloat16 && x.size(1) == k, "x: contiguous bf16 [R, k]");
  const mc::Slots sl(slots, starts, qweight.size(0), R);
  const int64_t S = sl.S, steps = k / 32;
  torch::Tensor out = torch::empty({R, n}, torch::dtype(torch::kBFloat16));
#ifdef MC_AMX
  const Packed w{qweight.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(), symmetric ? nullptr : zeros.data_ptr<uint8_t>(),
                 n, k, bits, group, k / group, qweight.size(2)};
  // x as B tiles: per 16-row tile of a slot, xv[tile][ks] holds k pairs (32ks + 2t, +1) of rows c in dword [t][c]
  std::vector<int64_t> first_tile(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) first_tile[s + 1] = first_tile[s] + (sl.start[s + 1] - sl.start[s] + 15) / 16;
  std::vector<uint32_t> xv(first_tile[S] * steps * 256);
  const uint32_t* x32 = reinterpret_cast<const uint32_t*>(mc::bf16_data(x));
  // by tiles, not slots: a dense projection (one slot of many rows) spreads over the threads too
  std::vector<int64_t> tile_slot(first_tile[S]);
  for (int64_t s = 0; s < S; ++s) std::fill(tile_slot.begin() + first_tile[s], tile_slot.begin() + first_tile[s + 1], s);
  at::parallel_for(0, first_tile[S], 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t s = tile_slot[tile];
      const int64_t r0 = sl.start[s] + (tile - first_tile[s]) * 16, rows = std::min<int64_t>(16, sl.start[s + 1] - r0);
      uint32_t* dst = xv.data() + tile * steps * 256;
      for (int64_t ks = 0; ks < steps; ++ks)  // one 1 KiB tile at a time, so that it stays in L1 while filled
        for (int64_t c = 0; c < 16; ++c)
          for (int64_t t = 0; t < 16; ++t)
            dst[ks * 256 + t * 16 + c] = c < rows ? x32[(r0 + c) * (k / 2) + ks * 16 + t] : 0u;
    }
  });
  uint16_t* o = mc::bf16_data(out);
  at::parallel_for(0, (n / 64) * S, 1, [&](int64_t begin, int64_t end) {
    mc::configure_tiles();
    std::vector<uint16_t> abuf(64 * k);
    alignas(64) float cbuf[4][16][16];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / S, s = u % S;  // block-major: each thread gets a share of every slot's rows
      if (sl.start[s] == sl.start[s + 1]) continue;
      dequant_strip(w, sl.slot[s], b * 64, abuf.data());
      const uint16_t* a = abuf.data();
      for (int64_t tile = first_tile[s]; tile < first_tile[s + 1]; ++tile) {
        const uint32_t* bx = xv.data() + tile * steps * 256;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t ks = 0; ks < steps; ++ks) {
          _tile_loadd(4, bx + ks * 256, 64);
          _tile_loadd(5, a + (0 * steps + ks) * 512, 64);
          _tile_loadd(6, a + (1 * steps + ks) * 512, 64);
          _tile_dpbf16ps(0, 5, 4);
          _tile_loadd(7, a + (2 * steps + ks) * 512, 64);
          _tile_dpbf16ps(1, 6, 4);
          _tile_loadd(5, a + (3 * steps + ks) * 512, 64);
          _tile_dpbf16ps(2, 7, 4);
          _tile_dpbf16ps(3, 5, 4);
        }
        _tile_stored(0, cbuf[0], 64); _tile_stored(1, cbuf[1], 64);
        _tile_stored(2, cbuf[2], 64); _tile_stored(3, cbuf[3], 64);
        const int64_t r0 = sl.start[s] + (tile - first_tile[s]) * 16, rows = std::min<int64_t>(16, sl.start[s + 1] - r0);
        for (int64_t c = 0; c < rows; ++c) {
          alignas(64) float line[64];
          for (int j = 0; j < 4; ++j)
            for (int i = 0; i < 16; ++i) line[16 * j + i] = cbuf[j][i][c];
          mc::store_bf16_64(o + (r0 + c) * n + b * 64, line);
        }
      }
    }
    _tile_release();
  });
#endif
  return out;
}
