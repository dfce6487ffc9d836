// XNOR-popcount binary convolution for recu (1-bit weights and activations).
//
// Layouts (all words are 64-bit, spare bits 0, bit = 1 means +1, sign(0) = +1):
//   activations  [N][H + 2 ph][W + 2 pw][CW]   zero words on the padded border
//   weights      [CB][kh][kw][CW][32]          32 output channels per block (zero-filled)
// A padded tap therefore reads as -1 everywhere; the Python side passes the image-independent
// border correction P (docs/method.md section 6) per pixel class in `ktab` = K + P, so that
//   dot = ktab[cls(y, x)][o] - 2 popc   (exact),   then the epilogue of `finish` below.
//
// The ISA is chosen at run time (AVX-512 VPOPCNTDQ, AVX2 nibble-LUT, portable scalar); the
// file is compiled without -march so the library runs on any x86-64 (or non-x86) CPU.
// Ops are registered with TORCH_LIBRARY (no pybind) to keep the first-use compile short; they
// are proper torch custom ops (schema + CPU kernel; fake kernels in ext.py) for torch.export.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/batch_norm.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

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
// Output floats per band of a fused block: a whole image at ResNet-18 sizes (one image at a
// time measured best here; 128 KB bands within it gained nothing), bands for larger inputs.
constexpr int64_t BAND_FLOATS = 1 << 20;
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
  const float* beta;  // per-channel activation threshold (RSign): bit = x >= beta; nullptr: 0
};

inline float thr(const PackGeom& g, int64_t c) { return g.beta ? g.beta[c] : 0.f; }

// One (n, h) image row; x is NHWC (channels contiguous per pixel).
void pack_row_nhwc_generic(const float* x, u64* out, const PackGeom& g) {
  for (int64_t w = 0; w < g.W; ++w) {
    const float* px = x + w * g.C;
    u64* po = out + w * g.CW;
    for (int64_t cw = 0; cw < g.CW; ++cw) {
      const int64_t c0 = cw * 64, c1 = std::min(g.C, c0 + 64);
      u64 word = 0;
      for (int64_t c = c0; c < c1; ++c) word |= static_cast<u64>(px[c] >= thr(g, c)) << (c - c0);
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
        word |= static_cast<u64>(x[c * plane + w] >= thr(g, c)) << (c - c0);
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
        const __m512 b = g.beta ? _mm512_maskz_loadu_ps(lm, g.beta + c) : zero;
        const __mmask16 k = _mm512_mask_cmp_ps_mask(lm, v, b, _CMP_GE_OQ);
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
        const __m512 b = g.beta ? _mm512_set1_ps(g.beta[c]) : zero;
        const __mmask16 k = _mm512_mask_cmp_ps_mask(lm, v, b, _CMP_GE_OQ);
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

enum Act : int64_t { ACT_NONE = 0, ACT_RELU = 1, ACT_HARDTANH = 2, ACT_PRELU = 3 };

struct ActSpec {
  int64_t kind;    // Act code
  float lo, hi;    // hardtanh bounds
  const float* w;  // per-channel PReLU slopes
};

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
  // Fused block epilogue (XnorBlock, NHWC only), after the BatchNorm:
  //   v = act(v + res);  store v;  next conv's input bit = v >= nbeta
  // in the order of the float block act(bn(conv(x)) + shortcut) and the next sign(x - beta).
  bool post;             // any of the three below
  const float* res;      // [N][Ho][Wo][Cout] residual (shortcut), nullptr: none
  ActSpec act;           // the block's activation ([CB*32] PReLU slopes)
  uint32_t* nbits;       // next conv's packed input [N][nHp][nWp][nCW] words, as 32-bit halves
  const float* nbeta;    // [CB*32] next conv's activation threshold (zeros if it has none)
  int64_t nHp, nWp, nCW, nph, npw;
};

// The activations exactly as ATen computes them in float32 (relu = max(v, 0),
// hardtanh = min(max(v, lo), hi), prelu = v > 0 ? v : w * v), NaN passed through as ATen does).
inline float activate(const ActSpec& a, float v, int64_t o) {
  switch (a.kind) {
    case ACT_RELU: return v < 0.f ? 0.f : v;
    case ACT_HARDTANH: return std::min(std::max(v, a.lo), a.hi);
    case ACT_PRELU: return v > 0.f ? v : a.w[o] * v;
    default: return v;
  }
}

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

// Store one pixel's nc outputs of channel block cb (values after `finish`).
inline void store_pixel(const ConvGeom& g, const Tile& t, int i, int64_t cb, int64_t nc,
                        const float* v) {
  const int64_t c0 = cb * NB;
  for (int64_t o = 0; o < nc; ++o) g.out[t.obase[i] + (c0 + o) * t.ostride] = v[o];
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
    float v[NB];
    for (int64_t o = 0; o < nc; ++o) v[o] = finish(g, t.krow[i][c0 + o], acc[o], c0 + o);
    store_pixel(g, t, i, cb, nc, v);
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
    float v[NB];
    for (int64_t o = 0; o < nc; ++o) v[o] = finish(g, t.krow[i][c0 + o], cnt[o], c0 + o);
    store_pixel(g, t, i, cb, nc, v);
  }
}
#endif

// Tasks are (pixel chunk, channel block) pairs, channel block fastest, so one thread walks a
// chunk of pixels per 32-channel weight block (the block stays in L1, the rows in L2).
// Output pixels pb..pe-1 (flat n, y, x order) only: a block runs its convs in row bands.
template <void (*TILE)(const ConvGeom&, const Tile&, int64_t)>
void run_tasks(const ConvGeom& g, int64_t begin, int64_t end, int64_t pb, int64_t pe) {
  const int64_t ntiles = (pe - pb + MR - 1) / MR;
  Tile t;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t chunk = task / g.CB, cb = task - chunk * g.CB;
    const int64_t t1 = std::min(ntiles, (chunk + 1) * TILES_PER_TASK);
    for (int64_t tile = chunk * TILES_PER_TASK; tile < t1; ++tile) {
      make_tile(g, pb + tile * MR, pe, t);
      TILE(g, t, cb);
    }
  }
}

// The fused block epilogue (XnorBlock) on output pixels p0..p1-1, right after the conv
// tiles of those pixels stored v = bn(conv(x)) for every channel block, so the data is in L1:
//   y = act(v + res); store y; next conv's input bit = y >= nbeta.
// Same float operations, same order, as the float block act(bn(conv(x)) + shortcut).
// Where output pixel p's sign bits go in the next conv's zero-bordered input (nullptr: none).
inline uint32_t* next_bits(const ConvGeom& g, int64_t p) {
  if (!g.nbits) return nullptr;
  const int64_t hw = g.Ho * g.Wo;
  const int64_t n = p / hw, r = p - n * hw, y = r / g.Wo, x = r - y * g.Wo;
  return g.nbits + ((n * g.nHp + y + g.nph) * g.nWp + x + g.npw) * g.nCW * 2;
}

void post_generic(const ConvGeom& g, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    float* o = g.out + p * g.Cout;
    const float* r = g.res ? g.res + p * g.Cout : nullptr;
    uint32_t* nb = next_bits(g, p);
    for (int64_t c0 = 0; c0 < g.Cout; c0 += 32) {
      uint32_t bits = 0;
      for (int64_t c = c0; c < std::min(g.Cout, c0 + 32); ++c) {
        float v = o[c];
        if (r) v = v + r[c];
        v = activate(g.act, v, c);
        o[c] = v;
        bits |= static_cast<uint32_t>(v >= g.nbeta[c]) << (c - c0);
      }
      if (nb) nb[c0 / 32] = bits;
    }
  }
}

#if RECU_X86
// `activate` on 16 floats; w: the PReLU slopes of these channels. Operand order keeps NaN.
T512 inline __m512 activate512(const ActSpec& a, __m512 v, __m512 w) {
  const __m512 zero = _mm512_setzero_ps();
  switch (a.kind) {
    case ACT_RELU: return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), v, zero);
    case ACT_HARDTANH:
      return _mm512_min_ps(_mm512_set1_ps(a.hi), _mm512_max_ps(_mm512_set1_ps(a.lo), v));
    case ACT_PRELU:
      return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ), _mm512_mul_ps(w, v), v);
    default: return v;
  }
}

T512 void post_avx512(const ConvGeom& g, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    float* o = g.out + p * g.Cout;
    const float* r = g.res ? g.res + p * g.Cout : nullptr;
    uint32_t* nb = next_bits(g, p);
    uint32_t bits = 0;
    for (int64_t c = 0; c < g.Cout; c += 16) {
      const int64_t rem = g.Cout - c;
      const __mmask16 m = rem >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rem) - 1u);
      __m512 v = _mm512_maskz_loadu_ps(m, o + c);
      if (r) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, r + c));
      const __m512 w = g.act.w ? _mm512_maskz_loadu_ps(m, g.act.w + c) : _mm512_setzero_ps();
      v = activate512(g.act, v, w);
      _mm512_mask_storeu_ps(o + c, m, v);
      const __mmask16 k = _mm512_mask_cmp_ps_mask(m, v, _mm512_maskz_loadu_ps(m, g.nbeta + c),
                                                  _CMP_GE_OQ);
      bits |= static_cast<uint32_t>(k) << (c & 31);
      if ((c & 31) == 16 || c + 16 >= g.Cout) {
        if (nb) nb[c / 32] = bits;
        bits = 0;
      }
    }
  }
}
#endif

// A fused conv's schedule: a task is one chunk of pixels through every channel block, then the
// fused epilogue on that chunk while it is in cache.
template <void (*TILE)(const ConvGeom&, const Tile&, int64_t), void (*POST)(const ConvGeom&, int64_t, int64_t)>
void run_chunks_post(const ConvGeom& g, int64_t begin, int64_t end, int64_t pb, int64_t pe) {
  Tile t;
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    const int64_t p0 = pb + chunk * TILES_PER_TASK * MR;
    const int64_t p1 = std::min(pe, p0 + TILES_PER_TASK * MR);
    for (int64_t cb = 0; cb < g.CB; ++cb)
      for (int64_t p = p0; p < p1; p += MR) {
        make_tile(g, p, p1, t);
        TILE(g, t, cb);
      }
    POST(g, p0, p1);
  }
}

void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "recu xnor: ", name, " must be a contiguous float32 CPU tensor");
}

// Packing of one activation tensor, runnable in row ranges (rows are n * H + h).
struct Packer {
  PackGeom g;
  bool nhwc;
  at::Tensor xc, out;
  const float* xp;
  u64* op;
  int64_t isa;

  Packer(const at::Tensor& x, int64_t ph, int64_t pw, int64_t isa_, const float* beta) {
    TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.scalar_type() == at::kFloat,
                "recu xnor: input must be a 4-D float32 CPU tensor");
    g = PackGeom{x.size(0), x.size(1), x.size(2), x.size(3), ph, pw, 0, 0, 0, beta};
    g.Hp = g.H + 2 * ph;
    g.Wp = g.W + 2 * pw;
    g.CW = (g.C + 63) / 64;
    nhwc = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
    xc = nhwc ? x : x.contiguous();
    out = at::zeros({g.N, g.Hp, g.Wp, g.CW}, x.options().dtype(at::kLong));
    xp = xc.data_ptr<float>();
    op = reinterpret_cast<u64*>(out.data_ptr<int64_t>());
    isa = resolve_isa(isa_);
  }

  void rows(int64_t rb, int64_t re) const {
    if (re <= rb) return;
    at::parallel_for(rb, re, 8, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / g.H, h = r - n * g.H;
        u64* orow = op + ((n * g.Hp + h + g.ph) * g.Wp + g.pw) * g.CW;
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
  }
};

at::Tensor pack_impl(const at::Tensor& x, int64_t ph, int64_t pw, int64_t isa,
                     const float* beta = nullptr) {
  Packer p(x, ph, pw, isa, beta);
  p.rows(0, p.g.N * p.g.H);
  return p.out;
}

const float* opt_float(const c10::optional<at::Tensor>& t, int64_t numel, const char* name) {
  if (!t.has_value()) return nullptr;
  check_cpu_float(*t, name);
  TORCH_CHECK(t->numel() == numel, "recu xnor: ", name, " must have ", numel, " values");
  return t->data_ptr<float>();
}

// The geometry, weights and epilogue of one conv on packed activations `a` (padded already).
ConvGeom conv_geom(const at::Tensor& a, const at::Tensor& wpk, int64_t cout, int64_t kh,
                   int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw,
                   const at::Tensor& ktab, const at::Tensor& s, const c10::optional<at::Tensor>& t,
                   const c10::optional<at::Tensor>& bn_a, const c10::optional<at::Tensor>& bn_c,
                   const at::Tensor& ymap, const at::Tensor& xmap) {
  TORCH_CHECK(a.scalar_type() == at::kLong && a.is_contiguous() && a.dim() == 4,
              "recu xnor: packed activations must be contiguous int64 [N, Hp, Wp, CW]");
  TORCH_CHECK(bn_a.has_value() == bn_c.has_value(), "recu xnor: give both bn_a and bn_c or neither");
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
  TORCH_CHECK(ktab.size(2) == cp, "recu xnor: ktab must be padded to a multiple of 32 channels");
  g.nxc = ktab.size(1);
  for (int64_t y = 0; y < kh; ++y)
    for (int64_t x = 0; x < kw; ++x) g.toff[y * kw + x] = (y * dh * g.Wp + x * dw) * g.CW;
  g.a = reinterpret_cast<const u64*>(a.data_ptr<int64_t>());
  g.wt = reinterpret_cast<const u64*>(wpk.data_ptr<int64_t>());
  g.ktab = ktab.data_ptr<int64_t>();
  TORCH_CHECK(s.numel() == cp, "recu xnor: s must be padded to a multiple of 32 channels");
  check_cpu_float(s, "s");
  g.s = s.data_ptr<float>();
  g.t = opt_float(t, cp, "t");
  g.bn_a = opt_float(bn_a, cp, "bn_a");
  g.bn_c = opt_float(bn_c, cp, "bn_c");
  g.ymap = ymap.data_ptr<int32_t>();
  g.xmap = xmap.data_ptr<int32_t>();
  return g;
}

void run_conv(const ConvGeom& g, int64_t isa, int64_t pb = 0, int64_t pe = -1) {
  if (pe < 0) pe = g.N * g.Ho * g.Wo;
  if (pe <= pb) return;
  const int64_t nchunks = ((pe - pb + MR - 1) / MR + TILES_PER_TASK - 1) / TILES_PER_TASK;
  if (g.post) {
    at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
#if RECU_X86
      if (isa == AVX512) return run_chunks_post<tile_avx512, post_avx512>(g, b, e, pb, pe);
      if (isa == AVX2) return run_chunks_post<tile_avx2, post_generic>(g, b, e, pb, pe);
#endif
      run_chunks_post<tile_generic, post_generic>(g, b, e, pb, pe);
    });
    return;
  }
  at::parallel_for(0, nchunks * g.CB, 1, [&](int64_t b, int64_t e) {
#if RECU_X86
    if (isa == AVX512) return run_tasks<tile_avx512>(g, b, e, pb, pe);
    if (isa == AVX2) return run_tasks<tile_avx2>(g, b, e, pb, pe);
#endif
    run_tasks<tile_generic>(g, b, e, pb, pe);
  });
}

// ------------------------------------------------------------------------------------------
// Stem tail: BatchNorm, activation and max-pool in one pass over an NHWC tensor
// ------------------------------------------------------------------------------------------

struct PoolGeom {
  int64_t N, C, H, W, Ho, Wo, k, s, p;
  const float* x;
  const float* bn_a;  // nullptr: no BatchNorm
  const float* bn_c;
  ActSpec act;
  float* out;
};

inline float bn_act(const PoolGeom& g, float v, int64_t c) {
  if (g.bn_a) v = std::fma(v, g.bn_a[c], g.bn_c[c]);
  return activate(g.act, v, c);
}

void pool_row_generic(const PoolGeom& g, int64_t n, int64_t oy) {
  for (int64_t ox = 0; ox < g.Wo; ++ox) {
    float* o = g.out + ((n * g.Ho + oy) * g.Wo + ox) * g.C;
    for (int64_t c = 0; c < g.C; ++c) {
      float m = -INFINITY;
      for (int64_t ky = 0; ky < g.k; ++ky) {
        const int64_t iy = oy * g.s - g.p + ky;
        if (iy < 0 || iy >= g.H) continue;
        for (int64_t kx = 0; kx < g.k; ++kx) {
          const int64_t ix = ox * g.s - g.p + kx;
          if (ix < 0 || ix >= g.W) continue;
          const float v = bn_act(g, g.x[((n * g.H + iy) * g.W + ix) * g.C + c], c);
          if (v > m || std::isnan(v)) m = v;
        }
      }
      o[c] = m;
    }
  }
}

#if RECU_X86
T512 void pool_row_avx512(const PoolGeom& g, int64_t n, int64_t oy) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t ox = 0; ox < g.Wo; ++ox) {
    float* o = g.out + ((n * g.Ho + oy) * g.Wo + ox) * g.C;
    for (int64_t c = 0; c < g.C; c += 16) {
      const int64_t rem = g.C - c;
      const __mmask16 lm = rem >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rem) - 1u);
      const __m512 a = g.bn_a ? _mm512_maskz_loadu_ps(lm, g.bn_a + c) : zero;
      const __m512 b = g.bn_a ? _mm512_maskz_loadu_ps(lm, g.bn_c + c) : zero;
      const __m512 w = g.act.kind == ACT_PRELU ? _mm512_maskz_loadu_ps(lm, g.act.w + c) : zero;
      __m512 m = _mm512_set1_ps(-INFINITY);
      __mmask16 nan = 0;
      for (int64_t ky = 0; ky < g.k; ++ky) {
        const int64_t iy = oy * g.s - g.p + ky;
        if (iy < 0 || iy >= g.H) continue;
        for (int64_t kx = 0; kx < g.k; ++kx) {
          const int64_t ix = ox * g.s - g.p + kx;
          if (ix < 0 || ix >= g.W) continue;
          __m512 v = _mm512_maskz_loadu_ps(lm, g.x + ((n * g.H + iy) * g.W + ix) * g.C + c);
          if (g.bn_a) v = _mm512_fmadd_ps(v, a, b);
          v = activate512(g.act, v, w);
          nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
          m = _mm512_max_ps(m, v);
        }
      }
      m = _mm512_mask_mov_ps(m, nan, _mm512_set1_ps(NAN));  // max-pool propagates NaN
      _mm512_mask_storeu_ps(o + c, lm, m);
    }
  }
}
#endif

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
  ConvGeom g = conv_geom(a, wpk, cout, kh, kw, sh, sw, dh, dw, ktab, s, t, bn_a, bn_c, ymap, xmap);
  g.nhwc_out = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  at::Tensor out = at::empty(
      {g.N, cout, g.Ho, g.Wo},
      x.options().memory_format(g.nhwc_out ? at::MemoryFormat::ChannelsLast
                                           : at::MemoryFormat::Contiguous));
  g.out = out.data_ptr<float>();
  run_conv(g, isa);
  return out;
}

// One binary conv of a Bi-Real block with the block's float work fused into its epilogue
// (NHWC): out = act(bn(conv(a)) + residual), and, if emit_bits, the packed input of the next
// binary conv (its threshold next_beta, its zero padding next_ph/next_pw), so that each block
// reads and writes its activations once. `a`: packed by XnorBlock, or the bits an earlier
// conv wrote. run_conv(call.g, ...) then fills call.out (and call.bits).
struct BlockCall {
  ConvGeom g;
  at::Tensor out, bits, zeros_beta;  // keep what g points into alive
};

BlockCall prepare_block(
    const at::Tensor& a, const at::Tensor& wpk, int64_t cout, int64_t kh, int64_t kw, int64_t sh,
    int64_t sw, int64_t dh, int64_t dw, const at::Tensor& ktab, const at::Tensor& s,
    const c10::optional<at::Tensor>& t, const c10::optional<at::Tensor>& bn_a,
    const c10::optional<at::Tensor>& bn_c, const at::Tensor& ymap, const at::Tensor& xmap,
    const c10::optional<at::Tensor>& residual, int64_t act, double act_lo, double act_hi,
    const c10::optional<at::Tensor>& act_w, bool emit_bits,
    const c10::optional<at::Tensor>& next_beta, int64_t next_ph, int64_t next_pw) {
  BlockCall c;
  ConvGeom& g = c.g;
  g = conv_geom(a, wpk, cout, kh, kw, sh, sw, dh, dw, ktab, s, t, bn_a, bn_c, ymap, xmap);
  TORCH_CHECK(act >= ACT_NONE && act <= ACT_PRELU, "recu xnor: unknown activation code ", act);
  const int64_t cp = g.CB * NB;
  g.nhwc_out = true;
  g.post = true;
  g.act = ActSpec{act, static_cast<float>(act_lo), static_cast<float>(act_hi),
                  opt_float(act_w, cp, "act_w")};
  TORCH_CHECK(act != ACT_PRELU || g.act.w, "recu xnor: PReLU needs act_w");
  auto opts = a.options().dtype(at::kFloat);
  c.out = at::empty({g.N, cout, g.Ho, g.Wo}, opts.memory_format(at::MemoryFormat::ChannelsLast));
  g.out = c.out.data_ptr<float>();
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.device().is_cpu() && r.scalar_type() == at::kFloat && r.dim() == 4 &&
                    r.size(0) == g.N && r.size(1) == cout && r.size(2) == g.Ho &&
                    r.size(3) == g.Wo && r.is_contiguous(at::MemoryFormat::ChannelsLast),
                "recu xnor: residual must be a channels_last float32 tensor shaped like the output");
    g.res = r.data_ptr<float>();
  }
  if (emit_bits) {
    g.nph = next_ph;
    g.npw = next_pw;
    g.nHp = g.Ho + 2 * next_ph;
    g.nWp = g.Wo + 2 * next_pw;
    g.nCW = (cout + 63) / 64;
    c.bits = at::zeros({g.N, g.nHp, g.nWp, g.nCW}, a.options());
    g.nbits = reinterpret_cast<uint32_t*>(c.bits.data_ptr<int64_t>());
    g.nbeta = opt_float(next_beta, cp, "next_beta");
  } else {
    c.bits = at::empty({0}, a.options());
  }
  if (!g.nbeta) {
    c.zeros_beta = at::zeros({cp}, opts);
    g.nbeta = c.zeros_beta.data_ptr<float>();
  }
  return c;
}

// BatchNorm (fma(x, a, c), as fold.py checks against ATen), activation and a k x k max-pool
// (stride s, padding p, k = 0: none) of an NHWC tensor in one pass: the stem's tail.
at::Tensor bn_act_pool(const at::Tensor& x, const c10::optional<at::Tensor>& bn_a,
                       const c10::optional<at::Tensor>& bn_c, int64_t act, double act_lo,
                       double act_hi, const c10::optional<at::Tensor>& act_w, int64_t pk,
                       int64_t ps, int64_t pp, int64_t isa, const c10::optional<at::Tensor>& out_) {
  isa = resolve_isa(isa);
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.scalar_type() == at::kFloat &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "recu xnor: bn_act_pool needs a channels_last float32 CPU tensor");
  TORCH_CHECK(bn_a.has_value() == bn_c.has_value(), "recu xnor: give both bn_a and bn_c or neither");
  TORCH_CHECK(act >= ACT_NONE && act <= ACT_PRELU, "recu xnor: unknown activation code ", act);
  PoolGeom g{};
  g.N = x.size(0); g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  if (pk == 0) { pk = 1; ps = 1; pp = 0; }
  TORCH_CHECK(pk > 0 && ps > 0 && pp >= 0 && 2 * pp <= pk, "recu xnor: bad pooling geometry");
  g.k = pk; g.s = ps; g.p = pp;
  g.Ho = (g.H + 2 * pp - pk) / ps + 1;
  g.Wo = (g.W + 2 * pp - pk) / ps + 1;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "recu xnor: input smaller than the pooling window");
  g.x = x.data_ptr<float>();
  g.bn_a = opt_float(bn_a, g.C, "bn_a");
  g.bn_c = opt_float(bn_c, g.C, "bn_c");
  g.act = ActSpec{act, static_cast<float>(act_lo), static_cast<float>(act_hi),
                  opt_float(act_w, g.C, "act_w")};
  TORCH_CHECK(act != ACT_PRELU || g.act.w, "recu xnor: PReLU needs act_w");
  at::Tensor out;
  if (out_.has_value()) {  // a caller's buffer, e.g. one image of a batch
    out = *out_;
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 4 && out.size(0) == g.N &&
                    out.size(1) == g.C && out.size(2) == g.Ho && out.size(3) == g.Wo &&
                    out.is_contiguous(at::MemoryFormat::ChannelsLast),
                "recu xnor: bn_act_pool's out must be channels_last float32 of the output shape");
  } else {
    out = at::empty({g.N, g.C, g.Ho, g.Wo},
                    x.options().memory_format(at::MemoryFormat::ChannelsLast));
  }
  g.out = out.data_ptr<float>();
  at::parallel_for(0, g.N * g.Ho, 4, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / g.Ho, oy = r - n * g.Ho;
#if RECU_X86
      if (isa == AVX512) { pool_row_avx512(g, n, oy); continue; }
#endif
      pool_row_generic(g, n, oy);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------
// XnorBlock: a whole Bi-Real basic block behind one call
// ------------------------------------------------------------------------------------------

// A torch custom class rather than an op: a block has ~60 parameters, and passing them
// through the dispatcher on every call cost ~15 us per conv (more than the conv itself on
// 7x7 maps). The object keeps them once; forward takes only the activations.
struct BlockConv {
  at::Tensor wpk, ktab, s, ymap, xmap;
  c10::optional<at::Tensor> t, bn_a, bn_c, act_w, beta;
  int64_t cout = 0, kh = 0, kw = 0, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1, act = 0;
  double lo = 0, hi = 0;

  BlockCall prepare(const at::Tensor& a, const at::Tensor& residual, const BlockConv* next) const {
    return prepare_block(a, wpk, cout, kh, kw, sh, sw, dh, dw, ktab, s, t, bn_a, bn_c, ymap, xmap,
                         residual, act, lo, hi, act_w, next != nullptr,
                         next ? next->beta : c10::nullopt, next ? next->ph : 0,
                         next ? next->pw : 0);
  }
};

struct XnorBlock : torch::CustomClassHolder {
  BlockConv conv[2];
  c10::optional<at::Tensor> in_beta;  // conv1's threshold, unpadded [Cin]
  // Downsample shortcut computed here with the same ATen ops nn.Conv2d / nn.BatchNorm2d call.
  bool has_ds = false;
  at::Tensor ds_w, ds_mean, ds_var;
  c10::optional<at::Tensor> ds_bias, ds_bn_w, ds_bn_b;
  std::vector<int64_t> ds_stride, ds_pad, ds_dil;
  double ds_eps = 1e-5;
  int64_t isa = -1;

  void set_conv(int64_t i, at::Tensor wpk, int64_t cout, int64_t kh, int64_t kw, int64_t sh,
                int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, at::Tensor ktab,
                at::Tensor s, c10::optional<at::Tensor> t, c10::optional<at::Tensor> bn_a,
                c10::optional<at::Tensor> bn_c, at::Tensor ymap, at::Tensor xmap, int64_t act,
                double lo, double hi, c10::optional<at::Tensor> act_w,
                c10::optional<at::Tensor> beta) {
    TORCH_CHECK(i == 0 || i == 1, "recu xnor: a block has convs 0 and 1");
    BlockConv& c = conv[i];
    c.wpk = wpk; c.cout = cout; c.kh = kh; c.kw = kw; c.sh = sh; c.sw = sw; c.ph = ph; c.pw = pw;
    c.dh = dh; c.dw = dw; c.ktab = ktab; c.s = s; c.t = t; c.bn_a = bn_a; c.bn_c = bn_c;
    c.ymap = ymap; c.xmap = xmap; c.act = act; c.lo = lo; c.hi = hi; c.act_w = act_w;
    c.beta = beta;  // padded to the previous conv's 32-channel blocks (conv 1), unused (conv 0)
  }

  // beta: conv1's threshold [Cin] (packing); beta_padded: the same padded to 32-channel blocks,
  // for the previous block of a chain, whose last epilogue writes this block's input bits.
  void set_input(c10::optional<at::Tensor> beta, c10::optional<at::Tensor> beta_padded,
                 int64_t isa_code) {
    in_beta = beta;
    conv[0].beta = beta_padded;
    isa = resolve_isa(isa_code);
  }

  void set_downsample(at::Tensor w, c10::optional<at::Tensor> bias, std::vector<int64_t> stride,
                      std::vector<int64_t> pad, std::vector<int64_t> dil,
                      c10::optional<at::Tensor> bn_w, c10::optional<at::Tensor> bn_b,
                      at::Tensor mean, at::Tensor var, double eps) {
    has_ds = true;
    ds_w = w; ds_bias = bias; ds_stride = stride; ds_pad = pad; ds_dil = dil;
    ds_bn_w = bn_w; ds_bn_b = bn_b; ds_mean = mean; ds_var = var; ds_eps = eps;
  }

  // x: NHWC float32; shortcut: the block's shortcut when Python computed it (else None).
  at::Tensor forward(const at::Tensor& x, const c10::optional<at::Tensor>& shortcut) const {
    return std::get<0>(run(x, shortcut, at::Tensor(), nullptr));
  }

  // (out, input bits of `next` or an empty tensor). in_bits: this block's input bits when the
  // previous block's last epilogue wrote them (a chain), else undefined and packed here.
  std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& x,
                                         const c10::optional<at::Tensor>& shortcut,
                                         const at::Tensor& in_bits, const XnorBlock* next) const {
    at::Tensor sc;
    if (shortcut.has_value()) {
      sc = *shortcut;
    } else if (has_ds) {
      sc = at::batch_norm(at::conv2d(x, ds_w, ds_bias, ds_stride, ds_pad, ds_dil, 1), ds_bn_w,
                          ds_bn_b, ds_mean, ds_var, false, 0.1, ds_eps, true);
      sc = sc.contiguous(at::MemoryFormat::ChannelsLast);
    } else {
      sc = x;
    }
    std::optional<Packer> pk;
    at::Tensor a = in_bits;
    if (!a.defined()) {
      pk.emplace(x, conv[0].ph, conv[0].pw, isa, opt_float(in_beta, x.size(1), "beta"));
      a = pk->out;
    }
    const BlockCall c1 = conv[0].prepare(a, sc, &conv[1]);
    const BlockCall c2 = conv[1].prepare(c1.bits, c1.out, next ? &next->conv[0] : nullptr);
    run_banded(pk ? &*pk : nullptr, x.size(2), c1.g, c2.g);
    return {c2.out, c2.bits};
  }

  // Depth first, in bands of output rows: pack the input rows a band needs, run conv1 on the
  // rows conv2 needs, then conv2, so that each band's activations are still in cache when the
  // next step reads them (layer1 of a ResNet-18 holds three 800 KB tensors, more than L2).
  void run_banded(const Packer* pk, int64_t H, const ConvGeom& g1, const ConvGeom& g2) const {
    const int64_t H1 = g1.Ho, W1 = g1.Wo, H2 = g2.Ho, W2 = g2.Wo;
    const int64_t band = std::max<int64_t>(1, BAND_FLOATS / std::max<int64_t>(1, W2 * g2.Cout));
    for (int64_t n = 0; n < g2.N; ++n) {
      int64_t x_done = 0, o1_done = 0;
      for (int64_t o2 = 0; o2 < H2; o2 += band) {
        const int64_t r2 = std::min(H2, o2 + band);
        const int64_t r1 = std::min(H1, rows_needed(g2, r2, conv[1].ph));
        const int64_t rx = std::min(H, rows_needed(g1, r1, conv[0].ph));
        if (pk) pk->rows(n * H + x_done, n * H + rx);
        x_done = std::max(x_done, rx);
        run_conv(g1, isa, (n * H1 + o1_done) * W1, (n * H1 + r1) * W1);
        o1_done = std::max(o1_done, r1);
        run_conv(g2, isa, (n * H2 + o2) * W2, (n * H2 + r2) * W2);
      }
    }
  }

  // How many unpadded input rows the first r output rows of a conv read.
  static int64_t rows_needed(const ConvGeom& g, int64_t r, int64_t ph) {
    return (r - 1) * g.sh + g.dh * (g.kh - 1) - ph + 1;
  }
};

// The basic blocks of one ResNet stage behind one call: each block's last epilogue writes the
// next block's input bits, so only the first block packs its input, and Python is entered
// once per stage instead of once per block.
struct XnorChain : torch::CustomClassHolder {
  std::vector<c10::intrusive_ptr<XnorBlock>> blocks;

  void append(c10::intrusive_ptr<XnorBlock> block) { blocks.push_back(std::move(block)); }

  at::Tensor forward(const at::Tensor& x) const {
    at::Tensor h = x, bits;
    for (size_t i = 0; i < blocks.size(); ++i) {
      const XnorBlock* next = i + 1 < blocks.size() ? blocks[i + 1].get() : nullptr;
      std::tie(h, bits) = blocks[i]->run(h, c10::nullopt, bits, next);
    }
    return h;
  }
};

// ------------------------------------------------------------------------------------------
// u8 quantization of the input of an int8 full-precision layer (--fp-layers int8)
// ------------------------------------------------------------------------------------------

// q = clamp(nearbyint(x / scale) + zp, 0, 255), as torch.quantize_per_tensor rounds; ATen's
// version needs a second pass (int_repr) to give the plain uint8 tensor oneDNN takes.
void quantize_range_generic(const float* x, uint8_t* q, int64_t n, float inv, int32_t zp) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::nearbyint(x[i] * inv) + static_cast<float>(zp);
    q[i] = static_cast<uint8_t>(std::min(255.f, std::max(0.f, v)));
  }
}

#if RECU_X86
T512 void quantize_range_avx512(const float* x, uint8_t* q, int64_t n, float inv, int32_t zp) {
  const __m512 vi = _mm512_set1_ps(inv), vz = _mm512_set1_ps(static_cast<float>(zp));
  const __m512 lo = _mm512_setzero_ps(), hi = _mm512_set1_ps(255.f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), vi),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, vz), lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i),
                     _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  quantize_range_generic(x + i, q + i, n - i, inv, zp);
}
#endif

at::Tensor quantize_u8(const at::Tensor& x, double scale, int64_t zp, int64_t isa) {
  isa = resolve_isa(isa);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "recu xnor: quantize_u8 needs a float32 CPU tensor");
  const bool nhwc = x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor xc = nhwc ? x : x.contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte).memory_format(
                                          nhwc ? at::MemoryFormat::ChannelsLast
                                               : at::MemoryFormat::Contiguous));
  const float inv = 1.0f / static_cast<float>(scale);  // as ATen: float reciprocal, then x * inv
  const float* xp = xc.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t b, int64_t e) {
#if RECU_X86
    if (isa == AVX512) return quantize_range_avx512(xp + b, qp + b, e - b, inv, zp);
#endif
    quantize_range_generic(xp + b, qp + b, e - b, inv, zp);
  });
  return q;
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
  lib.class_<recu::XnorBlock>("XnorBlock")
      .def(torch::init<>())
      .def("set_conv", &recu::XnorBlock::set_conv)
      .def("set_input", &recu::XnorBlock::set_input)
      .def("set_downsample", &recu::XnorBlock::set_downsample)
      .def("forward", &recu::XnorBlock::forward);
  lib.class_<recu::XnorChain>("XnorChain")
      .def(torch::init<>())
      .def("append", &recu::XnorChain::append)
      .def("forward", &recu::XnorChain::forward);
  lib.def("detect_isa() -> int", &recu::detect_isa);
  lib.def("isa_supported(int isa) -> bool", &recu::isa_supported);
  lib.def("pack_activations(Tensor x, int ph, int pw, int isa) -> Tensor");
  lib.def("pack_weights(Tensor w) -> Tensor");
  lib.def(
      "conv(Tensor x, Tensor wpk, int cout, int kh, int kw, int sh, int sw, int ph, int pw, "
      "int dh, int dw, Tensor ktab, Tensor s, Tensor? t, Tensor? bn_a, Tensor? bn_c, Tensor ymap, "
      "Tensor xmap, int isa) "
      "-> Tensor");
  lib.def("quantize_u8(Tensor x, float scale, int zp, int isa) -> Tensor");
  lib.def(
      "bn_act_pool(Tensor x, Tensor? bn_a, Tensor? bn_c, int act, float act_lo, float act_hi, "
      "Tensor? act_w, int pk, int ps, int pp, int isa, Tensor? out=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(recu_xnor, CPU, lib) {
  lib.impl("pack_activations", &recu::pack_activations);
  lib.impl("pack_weights", &recu::pack_weights);
  lib.impl("conv", &recu::conv);
  lib.impl("bn_act_pool", &recu::bn_act_pool);
  lib.impl("quantize_u8", &recu::quantize_u8);
}
