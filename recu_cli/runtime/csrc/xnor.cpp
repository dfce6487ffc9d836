// XNOR-popcount binary convolution for recu (1-bit weights and activations).
//
// Layouts (all words are 64-bit, spare bits 0, bit = 1 means +1, sign(0) = +1):
//   activations  [N][H + 2 ph][W + 2 pw][CW]   zero words on the padded border
//   weights      [CB][kh][kw][CW][32]          32 output channels per block (zero-filled)
// A padded tap therefore reads as -1 everywhere; the Python side passes the image-independent
// border correction P (prior-art 4.4) per pixel class in `ktab` = K + P, so that
//   dot = ktab[cls(y, x)][o] - 2 popc   (exact),   then the epilogue of `finish` below.
//
// The ISA is chosen at run time (AVX-512 VPOPCNTDQ, AVX2 nibble-LUT, portable scalar); the
// file is compiled without -march so the library runs on any x86-64 (or non-x86) CPU.
// Ops are registered with TORCH_LIBRARY (no pybind) to keep the first-use compile short; they
// are proper torch custom ops (schema + CPU kernel; fake kernels in ext.py) for torch.export.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#define RECU_X86 1
#include <immintrin.h>
#else
#define RECU_X86 0
#endif

namespace recu {
namespace {

using u64 = uint64_t;
constexpr int64_t NB = 32;        // output channels per weight block
constexpr int MR = 4;             // output pixels per micro-tile
constexpr int64_t TILES_PER_TASK = 16;
static_assert(MR == 4, "tile_avx512 loads exactly four pixel rows");

enum Isa : int64_t { GENERIC = 0, AVX2 = 1, AVX512 = 2 };

#if RECU_X86
#define T512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512vpopcntdq,fma,popcnt")))
#define T256 __attribute__((target("avx2,fma,popcnt")))

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("fma");
}
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("popcnt");
}
#else
bool cpu_has_avx512() { return false; }
bool cpu_has_avx2() { return false; }
#endif

int64_t best_isa() {
  if (cpu_has_avx512()) return AVX512;
  if (cpu_has_avx2()) return AVX2;
  return GENERIC;
}

int64_t resolve_isa(int64_t isa) {
  if (isa < 0) return best_isa();
  TORCH_CHECK(isa <= AVX512, "recu xnor: unknown isa ", isa);
  TORCH_CHECK(isa != AVX512 || cpu_has_avx512(), "recu xnor: this CPU lacks AVX-512 VPOPCNTDQ");
  TORCH_CHECK(isa != AVX2 || cpu_has_avx2(), "recu xnor: this CPU lacks AVX2");
  return isa;
}

// ------------------------------------------------------------------------------------------
// Activation packing
// ------------------------------------------------------------------------------------------

struct PackGeom {
  int64_t N, C, H, W, ph, pw, Hp, Wp, CW;
};

// One (n, h) image row; x is NHWC (channels contiguous per pixel).
void pack_row_nhwc_generic(const float* x, u64* out, const PackGeom& g) {
  for (int64_t w = 0; w < g.W; ++w) {
    const float* px = x + w * g.C;
    u64* po = out + w * g.CW;
    for (int64_t cw = 0; cw < g.CW; ++cw) {
      const int64_t c0 = cw * 64, c1 = std::min(g.C, c0 + 64);
      u64 word = 0;
      for (int64_t c = c0; c < c1; ++c) word |= static_cast<u64>(px[c] >= 0.f) << (c - c0);
      po[cw] = word;
    }
  }
}

// One (n, h) image row; x points at x[n][0][h][0] of a contiguous NCHW tensor.
void pack_row_nchw_generic(const float* x, u64* out, const PackGeom& g) {
  const int64_t plane = g.H * g.W;
  for (int64_t cw = 0; cw < g.CW; ++cw) {
    const int64_t c0 = cw * 64, c1 = std::min(g.C, c0 + 64);
    for (int64_t w = 0; w < g.W; ++w) {
      u64 word = 0;
      for (int64_t c = c0; c < c1; ++c)
        word |= static_cast<u64>(x[c * plane + w] >= 0.f) << (c - c0);
      out[w * g.CW + cw] = word;
    }
  }
}

#if RECU_X86
T512 void pack_row_nhwc_avx512(const float* x, u64* out, const PackGeom& g) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t w = 0; w < g.W; ++w) {
    const float* px = x + w * g.C;
    u64* po = out + w * g.CW;
    for (int64_t cw = 0; cw < g.CW; ++cw) {
      u64 word = 0;
      for (int j = 0; j < 4; ++j) {
        const int64_t c = cw * 64 + j * 16;
        if (c >= g.C) break;
        const int64_t rem = g.C - c;
        const __mmask16 lm = rem >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rem) - 1u);
        const __m512 v = _mm512_maskz_loadu_ps(lm, px + c);
        const __mmask16 k = _mm512_mask_cmp_ps_mask(lm, v, zero, _CMP_GE_OQ);
        word |= static_cast<u64>(k) << (16 * j);
      }
      po[cw] = word;
    }
  }
}

T512 void pack_row_nchw_avx512(const float* x, u64* out, const PackGeom& g) {
  const int64_t plane = g.H * g.W;
  const __m512 zero = _mm512_setzero_ps();
  alignas(64) u64 tmp[16];
  for (int64_t cw = 0; cw < g.CW; ++cw) {
    const int64_t c0 = cw * 64, c1 = std::min(g.C, c0 + 64);
    for (int64_t w0 = 0; w0 < g.W; w0 += 16) {
      const int64_t nw = std::min<int64_t>(16, g.W - w0);
      const __mmask16 lm = nw == 16 ? __mmask16(0xFFFF) : __mmask16((1u << nw) - 1u);
      __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
      for (int64_t c = c0; c < c1; ++c) {
        const __m512 v = _mm512_maskz_loadu_ps(lm, x + c * plane + w0);
        const __mmask16 k = _mm512_mask_cmp_ps_mask(lm, v, zero, _CMP_GE_OQ);
        const __m512i bit = _mm512_set1_epi64(static_cast<long long>(u64(1) << (c - c0)));
        lo = _mm512_mask_or_epi64(lo, __mmask8(k & 0xFF), lo, bit);
        hi = _mm512_mask_or_epi64(hi, __mmask8(k >> 8), hi, bit);
      }
      _mm512_store_si512(tmp, lo);
      _mm512_store_si512(tmp + 8, hi);
      for (int64_t j = 0; j < nw; ++j) out[(w0 + j) * g.CW + cw] = tmp[j];
    }
  }
}
#endif

// ------------------------------------------------------------------------------------------
// Convolution micro-kernels: MR pixels x 32 output channels, implicit im2col on packed rows
// ------------------------------------------------------------------------------------------

struct ConvGeom {
  int64_t N, Hp, Wp, CW, kh, kw, sh, sw, dh, dw, Ho, Wo, Cout, CB, nxc;
  bool nhwc_out;         // output memory order: NHWC (channels_last) or NCHW
  const u64* a;          // packed activations
  const u64* wt;         // packed weights [CB][K][32]
  const int64_t* ktab;   // [nyc*nxc][CB*32] K + P per pixel class (exact integers)
  const float* s;        // [CB*32] alpha per output channel
  const float* t;        // [CB*32] bias (nullptr: none)
  const float* bn_a;     // [CB*32] BatchNorm fma multiplier (nullptr: no BN folded)
  const float* bn_c;     // [CB*32] BatchNorm fma addend
  const int32_t* ymap;   // [Ho] row class
  const int32_t* xmap;   // [Wo] column class
  float* out;
  int64_t toff[64];      // tap offsets in words (kh*kw <= 64)
};

// Pointers for the MR pixels of one tile; pixels past the end repeat the first one.
// Output element (pixel i, channel o) lives at out[obase[i] + o * ostride].
struct Tile {
  const u64* arow[MR];
  const int64_t* krow[MR];
  int64_t obase[MR];
  int64_t ostride;
  int nvalid;
  bool run;  // all MR pixels valid and adjacent in memory for each channel (NCHW fast store)
};

inline void make_tile(const ConvGeom& g, int64_t p0, int64_t M, Tile& t) {
  t.nvalid = static_cast<int>(std::min<int64_t>(MR, M - p0));
  const int64_t hw = g.Ho * g.Wo;
  t.ostride = g.nhwc_out ? 1 : hw;
  for (int i = 0; i < MR; ++i) {
    const int64_t p = i < t.nvalid ? p0 + i : p0;
    const int64_t n = p / hw, r = p - n * hw, y = r / g.Wo, x = r - y * g.Wo;
    t.arow[i] = g.a + ((n * g.Hp + y * g.sh) * g.Wp + x * g.sw) * g.CW;
    t.krow[i] = g.ktab + (static_cast<int64_t>(g.ymap[y]) * g.nxc + g.xmap[x]) * g.CB * NB;
    t.obase[i] = g.nhwc_out ? p * g.Cout : n * g.Cout * hw + r;
  }
  t.run = !g.nhwc_out && t.nvalid == MR && t.obase[MR - 1] - t.obase[0] == MR - 1;
}

// The epilogue of fold.py: dot = K + P - 2 popc exactly in integers, then the float32
// operations of BinaryConv2d and ATen's eval BatchNorm in their order: v = dot * alpha;
// v = v + bias; v = fma(v, a, c). Built with -ffp-contract=off so the compiler never fuses
// the multiply and the add, which would round differently from the float model.
inline float finish(const ConvGeom& g, int64_t kc, int64_t cnt, int64_t o) {
  float v = static_cast<float>(kc - 2 * cnt) * g.s[o];
  if (g.t) v = v + g.t[o];
  if (g.bn_a) v = std::fma(v, g.bn_a[o], g.bn_c[o]);
  return v;
}

// Portable path; on x86 GCC/Clang also clone it with the POPCNT instruction (ifunc-dispatched)
// so CPUs without AVX2 still get a hardware popcount instead of libgcc's bit tricks.
#if RECU_X86 && defined(__GNUC__) && defined(__ELF__)
__attribute__((target_clones("popcnt", "default")))
#endif
void tile_generic(const ConvGeom& g, const Tile& t, int64_t cb) {
  const int64_t ntaps = g.kh * g.kw, c0 = cb * NB;
  const int64_t nc = std::min<int64_t>(NB, g.Cout - c0);
  for (int i = 0; i < t.nvalid; ++i) {
    int64_t acc[NB] = {0};
    const u64* wp = g.wt + cb * ntaps * g.CW * NB;
    for (int64_t tap = 0; tap < ntaps; ++tap) {
      const u64* ap = t.arow[i] + g.toff[tap];
      for (int64_t c = 0; c < g.CW; ++c, wp += NB) {
        const u64 a = ap[c];
        for (int64_t o = 0; o < NB; ++o) acc[o] += __builtin_popcountll(a ^ wp[o]);
      }
    }
    for (int64_t o = 0; o < nc; ++o)
      g.out[t.obase[i] + (c0 + o) * t.ostride] = finish(g, t.krow[i][c0 + o], acc[o], c0 + o);
  }
}

#if RECU_X86
T512 void tile_avx512(const ConvGeom& g, const Tile& t, int64_t cb) {
  const int64_t ntaps = g.kh * g.kw, c0 = cb * NB;
  __m512i acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_setzero_si512();
  const u64* wp = g.wt + cb * ntaps * g.CW * NB;
  for (int64_t tap = 0; tap < ntaps; ++tap) {
    const int64_t off = g.toff[tap];
    const u64* a0 = t.arow[0] + off;
    const u64* a1 = t.arow[1] + off;
    const u64* a2 = t.arow[2] + off;
    const u64* a3 = t.arow[3] + off;
    for (int64_t c = 0; c < g.CW; ++c, wp += NB) {
      const __m512i w0 = _mm512_loadu_si512(wp);
      const __m512i w1 = _mm512_loadu_si512(wp + 8);
      const __m512i w2 = _mm512_loadu_si512(wp + 16);
      const __m512i w3 = _mm512_loadu_si512(wp + 24);
      const __m512i x[MR] = {
          _mm512_set1_epi64(static_cast<long long>(a0[c])),
          _mm512_set1_epi64(static_cast<long long>(a1[c])),
          _mm512_set1_epi64(static_cast<long long>(a2[c])),
          _mm512_set1_epi64(static_cast<long long>(a3[c])),
      };
      for (int i = 0; i < MR; ++i) {
        acc[i][0] = _mm512_add_epi64(acc[i][0], _mm512_popcnt_epi64(_mm512_xor_si512(x[i], w0)));
        acc[i][1] = _mm512_add_epi64(acc[i][1], _mm512_popcnt_epi64(_mm512_xor_si512(x[i], w1)));
        acc[i][2] = _mm512_add_epi64(acc[i][2], _mm512_popcnt_epi64(_mm512_xor_si512(x[i], w2)));
        acc[i][3] = _mm512_add_epi64(acc[i][3], _mm512_popcnt_epi64(_mm512_xor_si512(x[i], w3)));
      }
    }
  }
  // Epilogue: exact integer dot -> float -> * s (+ t), as in `finish`.
  __m256 res[MR][4];
  for (int i = 0; i < MR; ++i) {
    const int64_t* kc = t.krow[i] + c0;
    for (int v = 0; v < 4; ++v) {
      const __m512i twice = _mm512_add_epi64(acc[i][v], acc[i][v]);
      const __m512i d = _mm512_sub_epi64(_mm512_loadu_si512(kc + 8 * v), twice);
      res[i][v] = _mm256_mul_ps(_mm512_cvtepi64_ps(d), _mm256_loadu_ps(g.s + c0 + 8 * v));
      if (g.t) res[i][v] = _mm256_add_ps(res[i][v], _mm256_loadu_ps(g.t + c0 + 8 * v));
      if (g.bn_a)
        res[i][v] = _mm256_fmadd_ps(res[i][v], _mm256_loadu_ps(g.bn_a + c0 + 8 * v),
                                    _mm256_loadu_ps(g.bn_c + c0 + 8 * v));
    }
  }
  const int64_t nc = std::min<int64_t>(NB, g.Cout - c0);
  if (g.nhwc_out) {
    for (int i = 0; i < MR; ++i) {
      if (i >= t.nvalid) break;
      float* o = g.out + t.obase[i] + c0;
      for (int v = 0; v < 4; ++v) {
        const int64_t rem = nc - 8 * v;
        if (rem <= 0) break;
        const __mmask8 cm = rem >= 8 ? __mmask8(0xFF) : __mmask8((1u << rem) - 1u);
        _mm256_mask_storeu_ps(o + 8 * v, cm, res[i][v]);
      }
    }
  } else if (t.run) {
    // NCHW: transpose each 4 pixels x 8 channels block into 8 runs of 4 adjacent pixels.
    float* o = g.out + t.obase[0] + c0 * t.ostride;
    for (int v = 0; v < 4; ++v) {
      if (nc - 8 * v <= 0) break;
      const __m256 t0 = _mm256_unpacklo_ps(res[0][v], res[1][v]);
      const __m256 t1 = _mm256_unpackhi_ps(res[0][v], res[1][v]);
      const __m256 t2 = _mm256_unpacklo_ps(res[2][v], res[3][v]);
      const __m256 t3 = _mm256_unpackhi_ps(res[2][v], res[3][v]);
      const __m256 u[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                           _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE)};
      for (int j = 0; j < 8; ++j) {
        const int64_t ch = 8 * v + j;
        if (ch >= nc) break;
        const __m128 q = j < 4 ? _mm256_castps256_ps128(u[j]) : _mm256_extractf128_ps(u[j - 4], 1);
        _mm_storeu_ps(o + ch * t.ostride, q);
      }
    }
  } else {
    alignas(32) float tmp[4][8];
    for (int i = 0; i < MR; ++i) {
      if (i >= t.nvalid) break;
      for (int v = 0; v < 4; ++v) {
        if (nc - 8 * v <= 0) break;
        _mm256_store_ps(tmp[v], res[i][v]);
        for (int j = 0; j < 8 && 8 * v + j < nc; ++j)
          g.out[t.obase[i] + (c0 + 8 * v + j) * t.ostride] = tmp[v][j];
      }
    }
  }
}

// AVX2 has no vector popcount: nibble lookup (Mula, Kurz, Lemire 2018) + SAD to 64-bit lanes.
T256 inline __m256i popcnt256(__m256i v, __m256i lut, __m256i low) {
  const __m256i lo = _mm256_and_si256(v, low);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  const __m256i cnt = _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
  return _mm256_sad_epu8(cnt, _mm256_setzero_si256());
}

T256 void tile_avx2(const ConvGeom& g, const Tile& t, int64_t cb) {
  const int64_t ntaps = g.kh * g.kw, c0 = cb * NB;
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2,
                                       1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0F);
  const int64_t nc = std::min<int64_t>(NB, g.Cout - c0);
  alignas(32) int64_t cnt[NB];
  for (int i = 0; i < t.nvalid; ++i) {
    for (int h = 0; h < 2; ++h) {  // two halves of 16 channels keep 4 accumulators in registers
      __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                        _mm256_setzero_si256()};
      const u64* wp = g.wt + cb * ntaps * g.CW * NB + 16 * h;
      for (int64_t tap = 0; tap < ntaps; ++tap) {
        const u64* ap = t.arow[i] + g.toff[tap];
        for (int64_t c = 0; c < g.CW; ++c, wp += NB) {
          const __m256i x = _mm256_set1_epi64x(static_cast<long long>(ap[c]));
          for (int v = 0; v < 4; ++v) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 4 * v));
            acc[v] = _mm256_add_epi64(acc[v], popcnt256(_mm256_xor_si256(x, w), lut, low));
          }
        }
      }
      for (int v = 0; v < 4; ++v)
        _mm256_store_si256(reinterpret_cast<__m256i*>(cnt + 16 * h + 4 * v), acc[v]);
    }
    for (int64_t o = 0; o < nc; ++o)
      g.out[t.obase[i] + (c0 + o) * t.ostride] = finish(g, t.krow[i][c0 + o], cnt[o], c0 + o);
  }
}
#endif

// Tasks are (pixel chunk, channel block) pairs, channel block fastest, so one thread walks a
// chunk of pixels per 32-channel weight block (the block stays in L1, the rows in L2).
template <void (*TILE)(const ConvGeom&, const Tile&, int64_t)>
void run_tasks(const ConvGeom& g, int64_t begin, int64_t end) {
  const int64_t M = g.N * g.Ho * g.Wo;
  const int64_t ntiles = (M + MR - 1) / MR;
  Tile t;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t chunk = task / g.CB, cb = task - chunk * g.CB;
    const int64_t t1 = std::min(ntiles, (chunk + 1) * TILES_PER_TASK);
    for (int64_t tile = chunk * TILES_PER_TASK; tile < t1; ++tile) {
      make_tile(g, tile * MR, M, t);
      TILE(g, t, cb);
    }
  }
}

void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "recu xnor: ", name, " must be a contiguous float32 CPU tensor");
}

at::Tensor pack_impl(const at::Tensor& x, int64_t ph, int64_t pw, int64_t isa) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "recu xnor: input must be a 4-D float32 CPU tensor");
  PackGeom g{x.size(0), x.size(1), x.size(2), x.size(3), ph, pw, 0, 0, 0};
  g.Hp = g.H + 2 * ph;
  g.Wp = g.W + 2 * pw;
  g.CW = (g.C + 63) / 64;
  const bool nhwc = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  at::Tensor xc = nhwc ? x : x.contiguous();
  at::Tensor out = at::zeros({g.N, g.Hp, g.Wp, g.CW}, x.options().dtype(at::kLong));
  const float* xp = xc.data_ptr<float>();
  u64* op = reinterpret_cast<u64*>(out.data_ptr<int64_t>());
  isa = resolve_isa(isa);
  at::parallel_for(0, g.N * g.H, 8, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / g.H, h = r - n * g.H;
      u64* orow = op + ((n * g.Hp + h + ph) * g.Wp + pw) * g.CW;
      if (nhwc) {
        const float* xr = xp + (n * g.H + h) * g.W * g.C;
#if RECU_X86
        if (isa == AVX512) { pack_row_nhwc_avx512(xr, orow, g); continue; }
#endif
        pack_row_nhwc_generic(xr, orow, g);
      } else {
        const float* xr = xp + n * g.C * g.H * g.W + h * g.W;
#if RECU_X86
        if (isa == AVX512) { pack_row_nchw_avx512(xr, orow, g); continue; }
#endif
        pack_row_nchw_generic(xr, orow, g);
      }
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------

at::Tensor pack_activations(const at::Tensor& x, int64_t ph, int64_t pw, int64_t isa) {
  return pack_impl(x, ph, pw, isa);
}

// w: float [Cout, Cin, kh, kw] (+-1); returns int64 [CB, kh, kw, CW, 32] with bit = (w >= 0).
at::Tensor pack_weights(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 4, "recu xnor: weights must be 4-D");
  check_cpu_float(w, "weights");
  const int64_t Cout = w.size(0), Cin = w.size(1), kh = w.size(2), kw = w.size(3);
  const int64_t CW = (Cin + 63) / 64, CB = (Cout + NB - 1) / NB;
  at::Tensor out = at::zeros({CB, kh, kw, CW, NB}, w.options().dtype(at::kLong));
  const float* wp = w.data_ptr<float>();
  u64* op = reinterpret_cast<u64*>(out.data_ptr<int64_t>());
  for (int64_t o = 0; o < Cout; ++o)
    for (int64_t c = 0; c < Cin; ++c)
      for (int64_t y = 0; y < kh; ++y)
        for (int64_t x = 0; x < kw; ++x) {
          if (!(wp[((o * Cin + c) * kh + y) * kw + x] >= 0.f)) continue;
          const int64_t cb = o / NB, ol = o % NB;
          op[((((cb * kh + y) * kw + x) * CW + c / 64) * NB) + ol] |= u64(1) << (c % 64);
        }
  return out;
}

// x: float [N, Cin, H, W], NCHW or channels_last; the output keeps the input's memory format
// (as F.conv2d does), so the float layers around it see the layouts they would see without it.
at::Tensor conv(const at::Tensor& x, const at::Tensor& wpk, int64_t cout, int64_t kh, int64_t kw,
                int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                const at::Tensor& ktab, const at::Tensor& s, const c10::optional<at::Tensor>& t,
                const c10::optional<at::Tensor>& bn_a, const c10::optional<at::Tensor>& bn_c,
                const at::Tensor& ymap, const at::Tensor& xmap, int64_t isa) {
  isa = resolve_isa(isa);
  at::Tensor a = pack_impl(x, ph, pw, isa);
  check_cpu_float(s, "s");
  if (t.has_value()) check_cpu_float(*t, "t");
  TORCH_CHECK(bn_a.has_value() == bn_c.has_value(), "recu xnor: give both bn_a and bn_c or neither");
  if (bn_a.has_value()) {
    check_cpu_float(*bn_a, "bn_a");
    check_cpu_float(*bn_c, "bn_c");
  }
  TORCH_CHECK(ktab.scalar_type() == at::kLong && ktab.is_contiguous() && ktab.dim() == 3,
              "recu xnor: ktab must be contiguous int64 [nyc, nxc, Cpad]");
  TORCH_CHECK(wpk.scalar_type() == at::kLong && wpk.is_contiguous() && wpk.dim() == 5,
              "recu xnor: packed weights must be int64 [CB, kh, kw, CW, 32]");
  TORCH_CHECK(ymap.scalar_type() == at::kInt && xmap.scalar_type() == at::kInt &&
                  ymap.is_contiguous() && xmap.is_contiguous(),
              "recu xnor: ymap/xmap must be contiguous int32");
  TORCH_CHECK(kh * kw <= 64, "recu xnor: kernels with more than 64 taps are not supported");
  ConvGeom g{};
  g.N = a.size(0);
  g.Hp = a.size(1);
  g.Wp = a.size(2);
  g.CW = a.size(3);
  g.kh = kh; g.kw = kw; g.sh = sh; g.sw = sw; g.dh = dh; g.dw = dw;
  g.Ho = (g.Hp - dh * (kh - 1) - 1) / sh + 1;
  g.Wo = (g.Wp - dw * (kw - 1) - 1) / sw + 1;
  g.Cout = cout;
  g.CB = (cout + NB - 1) / NB;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "recu xnor: input smaller than the kernel");
  TORCH_CHECK(wpk.size(0) == g.CB && wpk.size(1) == kh && wpk.size(2) == kw &&
                  wpk.size(3) == g.CW && wpk.size(4) == NB,
              "recu xnor: packed weights do not match the input channels or kernel");
  TORCH_CHECK(ymap.numel() == g.Ho && xmap.numel() == g.Wo, "recu xnor: ymap/xmap size");
  const int64_t cp = g.CB * NB;
  TORCH_CHECK(s.numel() == cp && (!t.has_value() || t->numel() == cp) &&
                  (!bn_a.has_value() || (bn_a->numel() == cp && bn_c->numel() == cp)) &&
                  ktab.size(2) == cp,
              "recu xnor: s/t/ktab must be padded to a multiple of 32 channels");
  g.nxc = ktab.size(1);
  for (int64_t y = 0; y < kh; ++y)
    for (int64_t x = 0; x < kw; ++x) g.toff[y * kw + x] = (y * dh * g.Wp + x * dw) * g.CW;
  g.a = reinterpret_cast<const u64*>(a.data_ptr<int64_t>());
  g.wt = reinterpret_cast<const u64*>(wpk.data_ptr<int64_t>());
  g.ktab = ktab.data_ptr<int64_t>();
  g.s = s.data_ptr<float>();
  g.t = t.has_value() ? t->data_ptr<float>() : nullptr;
  g.bn_a = bn_a.has_value() ? bn_a->data_ptr<float>() : nullptr;
  g.bn_c = bn_c.has_value() ? bn_c->data_ptr<float>() : nullptr;
  g.ymap = ymap.data_ptr<int32_t>();
  g.xmap = xmap.data_ptr<int32_t>();
  g.nhwc_out = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  at::Tensor out = at::empty(
      {g.N, cout, g.Ho, g.Wo},
      x.options().memory_format(g.nhwc_out ? at::MemoryFormat::ChannelsLast
                                           : at::MemoryFormat::Contiguous));
  g.out = out.data_ptr<float>();
  const int64_t M = g.N * g.Ho * g.Wo;
  const int64_t nchunks = ((M + MR - 1) / MR + TILES_PER_TASK - 1) / TILES_PER_TASK;
  at::parallel_for(0, nchunks * g.CB, 1, [&](int64_t b, int64_t e) {
#if RECU_X86
    if (isa == AVX512) return run_tasks<tile_avx512>(g, b, e);
    if (isa == AVX2) return run_tasks<tile_avx2>(g, b, e);
#endif
    run_tasks<tile_generic>(g, b, e);
  });
  return out;
}

int64_t detect_isa() { return best_isa(); }

bool isa_supported(int64_t isa) {
  return isa == GENERIC || (isa == AVX2 && cpu_has_avx2()) || (isa == AVX512 && cpu_has_avx512());
}

}  // namespace
}  // namespace recu

// Schemas first, kernels per dispatch key: the tensor ops are CPU kernels (not catch-all
// CompositeImplicitAutograd ones), so that the fake kernels registered from Python
// (recu_cli/runtime/ext.py, torch.library.register_fake) let torch.export trace them.
TORCH_LIBRARY(recu_xnor, lib) {
  lib.def("detect_isa() -> int", &recu::detect_isa);
  lib.def("isa_supported(int isa) -> bool", &recu::isa_supported);
  lib.def("pack_activations(Tensor x, int ph, int pw, int isa) -> Tensor");
  lib.def("pack_weights(Tensor w) -> Tensor");
  lib.def(
      "conv(Tensor x, Tensor wpk, int cout, int kh, int kw, int sh, int sw, int ph, int pw, "
      "int dh, int dw, Tensor ktab, Tensor s, Tensor? t, Tensor? bn_a, Tensor? bn_c, Tensor ymap, "
      "Tensor xmap, int isa) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(recu_xnor, CPU, lib) {
  lib.impl("pack_activations", &recu::pack_activations);
  lib.impl("pack_weights", &recu::pack_weights);
  lib.impl("conv", &recu::conv);
}
