// Depthwise 3x3 conv + BatchNorm kernels for CvT's convolutional projection (see
// dwconv_bn.h for the math and the layout). Pure CUDA: nvcc alone compiles this file.
//
// Thread layout of the stencil kernels: a block is CX x TY threads (CX * TY <= 256). Thread
// x owns one vector of VEC channels (16 bytes of storage: 8 half/bfloat16 or 4 float, or 1
// channel on the scalar path); blockIdx.y picks the channel tile, so the CX threads of a
// row read one token's channels contiguously. Thread y walks rows first + y, first + y + TY,
// ... (rows_per_thread of them), so neighbouring threads read neighbouring tokens. The 9
// taps of the stencil are re-read through L1/L2 (no shared-memory halo).
//
// Reductions (statistics, BN and conv-weight gradients): each thread accumulates its rows,
// the TY threads of a channel vector are combined in thread order through shared memory,
// each block writes one partial per channel, and a second kernel combines the partials in
// block order (groups of blocks, then the groups in order). No atomics: the result depends
// only on the shape (and on whether the vector path runs), never on scheduling.

#include "dwconv_bn.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

namespace cvt_kernels {
namespace {

// Threads per stencil block. The kernels are declared __launch_bounds__(kThreads, 1): ptxas
// may then use up to 255 registers (the 9 x VEC conv weights live in registers), where its
// default target of 128 made the 16-bit statistics kernel spill. Each thread keeps 9
// independent 16-byte loads in flight per row, which covers the memory latency at one or
// two blocks per SM; the occupancy/ILP trade-off is for a GPU session to tune.
constexpr int kThreads = 256;
constexpr int kReduceCols = 32;    // second-level reductions: 32 columns x 8 groups
constexpr int kReduceGroups = 8;
constexpr int kMaxRowsPerThread = 64;
constexpr size_t kAlign = 256;     // workspace sub-buffer alignment (bytes)

// ----------------------------------------------------------------------------- storage
// Values move between memory and registers as raw bits (uint4 for 16 bytes, 16/32-bit words
// for one element), converted with intrinsics: no struct of __half ever needs a stack slot.

template <typename T>
__device__ __forceinline__ float bits_to_float(unsigned int b);  // value in the low bits
template <>
__device__ __forceinline__ float bits_to_float<float>(unsigned int b) { return __uint_as_float(b); }
template <>
__device__ __forceinline__ float bits_to_float<__half>(unsigned int b) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b & 0xffffu)));
}
template <>
__device__ __forceinline__ float bits_to_float<__nv_bfloat16>(unsigned int b) {
  return __uint_as_float(b << 16);  // bfloat16 is the top half of a float32: exact
}

template <typename T>
__device__ __forceinline__ unsigned int float_to_bits(float v);  // round to nearest even
template <>
__device__ __forceinline__ unsigned int float_to_bits<float>(float v) { return __float_as_uint(v); }
template <>
__device__ __forceinline__ unsigned int float_to_bits<__half>(float v) {
  return __half_as_ushort(__float2half_rn(v));
}
template <>
__device__ __forceinline__ unsigned int float_to_bits<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

template <typename T>
using Word = typename std::conditional<sizeof(T) == 4, unsigned int, unsigned short>::type;

// N consecutive elements as floats, in 16-byte transactions when N * sizeof(T) >= 16 (the
// caller guarantees 16-byte alignment then), element by element when N == 1. Loads go
// through the read-only cache: no kernel reads a buffer it writes.
template <typename T, int N>
struct Access {
  static constexpr bool kVector = N * sizeof(T) >= 16;
  static constexpr int kPerChunk = int(16 / sizeof(T));
  static_assert(!kVector || N % kPerChunk == 0, "vector width: whole 16-byte chunks");
  static_assert(kVector || N == 1, "vector width: 1 or whole 16-byte chunks");

  static __device__ __forceinline__ void load(const T* __restrict__ p, float (&out)[N]) {
    if constexpr (kVector) {
#pragma unroll
      for (int j = 0; j < N; j += kPerChunk) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p + j));
        const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if constexpr (sizeof(T) == 4) {
            out[j + k] = bits_to_float<T>(w[k]);
          } else {
            out[j + 2 * k] = bits_to_float<T>(w[k] & 0xffffu);
            out[j + 2 * k + 1] = bits_to_float<T>(w[k] >> 16);
          }
        }
      }
    } else {
      out[0] = bits_to_float<T>(__ldg(reinterpret_cast<const Word<T>*>(p)));
    }
  }

  static __device__ __forceinline__ void store(T* __restrict__ p, const float (&in)[N]) {
    if constexpr (kVector) {
#pragma unroll
      for (int j = 0; j < N; j += kPerChunk) {
        unsigned int w[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if constexpr (sizeof(T) == 4) {
            w[k] = float_to_bits<T>(in[j + k]);
          } else {
            w[k] = float_to_bits<T>(in[j + 2 * k]) | (float_to_bits<T>(in[j + 2 * k + 1]) << 16);
          }
        }
        *reinterpret_cast<uint4*>(p + j) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    } else {
      *reinterpret_cast<Word<T>*>(p) = static_cast<Word<T>>(float_to_bits<T>(in[0]));
    }
  }
};

// ---------------------------------------------------------------------------- geometry

struct Geo {
  int B, H, W, HO, WO;
  int C, CV;      // channels, channel vectors (C / VEC)
  int stride, cls;
  int T_in, T_out;  // tokens per image in and out (class token included)
  int rows;         // B * HO * WO: map output rows (the BatchNorm population)
};

// Map output row r -> image b, map position p, (oy, ox).
__device__ __forceinline__ void map_row(const Geo& g, int r, int& b, int& p, int& oy, int& ox) {
  const int hw = g.HO * g.WO;
  b = r / hw;
  p = r - b * hw;
  oy = p / g.WO;
  ox = p - oy * g.WO;
}

// y[i] = sum over the 9 taps of x(b, oy * s + ky - 1, ox * s + kx - 1, c0 + i) * wt(tap, i),
// zero padding. `wt` reads the weights from registers or shared memory.
template <typename T, int VEC, typename WeightFn>
__device__ __forceinline__ void dwconv_at(const T* __restrict__ x, WeightFn wt, const Geo& g,
                                          int b, int oy, int ox, int64_t c0, float (&y)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) y[i] = 0.f;
  const int64_t base = static_cast<int64_t>(b) * g.T_in + g.cls;
#pragma unroll
  for (int ky = 0; ky < 3; ++ky) {
    const int iy = oy * g.stride + ky - 1;
    if (iy < 0 || iy >= g.H) continue;
#pragma unroll
    for (int kx = 0; kx < 3; ++kx) {
      const int ix = ox * g.stride + kx - 1;
      if (ix < 0 || ix >= g.W) continue;
      float xv[VEC];
      Access<T, VEC>::load(x + (base + static_cast<int64_t>(iy) * g.W + ix) * g.C + c0, xv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) y[i] = fmaf(xv[i], wt(ky * 3 + kx, i), y[i]);
    }
  }
}

template <int VEC>
__device__ __forceinline__ void load_weights(const float* __restrict__ w9, int64_t c0,
                                             float (&w)[9][VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
#pragma unroll
    for (int tap = 0; tap < 9; ++tap) w[tap][i] = __ldg(w9 + (c0 + i) * 9 + tap);
  }
}

// ------------------------------------------------------------------------------ kernels

// Pass 1: per block, per channel, (mean, M2) of y - shift over the block's rows.
// part: rows 2i (mean) and 2i+1 (M2) for block i, row 2 * gridDim.x the shift.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 1)
    stats_partials_kernel(const T* __restrict__ x, const float* __restrict__ w9,
                          float* __restrict__ part, const Geo g, const int rows_per_thread) {
  extern __shared__ float smem[];
  const int tx = threadIdx.x, ty = threadIdx.y, cx = blockDim.x, tyn = blockDim.y;
  const int width = cx * VEC;
  const int cv = blockIdx.y * cx + tx;
  const bool c_ok = cv < g.CV;
  const int64_t c0 = static_cast<int64_t>(cv) * VEC;

  float mean[VEC], m2[VEC], shift[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) mean[i] = m2[i] = shift[i] = 0.f;
  int n = 0;
  if (c_ok) {
    float w[9][VEC];
    load_weights<VEC>(w9, c0, w);
    auto wt = [&](int tap, int i) { return w[tap][i]; };
    // The shift: every block subtracts the same per-channel value (the conv output at the
    // first position), so a large mean cancels before any sum is formed.
    dwconv_at<T, VEC>(x, wt, g, 0, 0, 0, c0, shift);
    const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_thread * tyn;
    for (int k = 0; k < rows_per_thread; ++k) {
      const int64_t r = first + ty + static_cast<int64_t>(k) * tyn;
      if (r >= g.rows) break;
      int b, p, oy, ox;
      map_row(g, static_cast<int>(r), b, p, oy, ox);
      float y[VEC];
      dwconv_at<T, VEC>(x, wt, g, b, oy, ox, c0, y);
      ++n;
      const float inv = 1.f / static_cast<float>(n);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {  // Welford
        const float d = y[i] - shift[i];
        const float delta = d - mean[i];
        mean[i] = fmaf(delta, inv, mean[i]);
        m2[i] = fmaf(delta, d - mean[i], m2[i]);
      }
    }
  }
  float* s_mean = smem;
  float* s_m2 = smem + tyn * width;
  float* s_n = s_m2 + tyn * width;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    s_mean[ty * width + tx * VEC + i] = mean[i];
    s_m2[ty * width + tx * VEC + i] = m2[i];
  }
  s_n[ty * cx + tx] = static_cast<float>(n);
  __syncthreads();
  if (ty == 0 && c_ok) {
    float na = 0.f, ma[VEC], Ma[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) ma[i] = Ma[i] = 0.f;
    for (int j = 0; j < tyn; ++j) {  // Chan et al., in thread order
      const float nb = s_n[j * cx + tx];
      if (nb == 0.f) continue;
      const float nn = na + nb;
      const float fb = nb / nn, fab = na * nb / nn;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float delta = s_mean[j * width + tx * VEC + i] - ma[i];
        ma[i] = fmaf(delta, fb, ma[i]);
        Ma[i] += s_m2[j * width + tx * VEC + i] + delta * delta * fab;
      }
      na = nn;
    }
    float* out = part + static_cast<int64_t>(blockIdx.x) * 2 * g.C + c0;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      out[i] = ma[i];
      out[g.C + i] = Ma[i];
    }
    if (blockIdx.x == 0) {
      float* s = part + static_cast<int64_t>(gridDim.x) * 2 * g.C + c0;
#pragma unroll
      for (int i = 0; i < VEC; ++i) s[i] = shift[i];
    }
  }
}

// Pass 1, second level: Chan's merge of the block partials in block order (8 interleaved
// groups, then the groups in order); mean = shift + merged mean, var = M2 / count.
__global__ void __launch_bounds__(kReduceCols * kReduceGroups)
    stats_finalize_kernel(const float* __restrict__ part, float* __restrict__ mean_out,
                          float* __restrict__ var_out, const int C, const int n_blocks,
                          const int64_t rows, const int64_t rows_per_block) {
  __shared__ float s_n[kReduceGroups][kReduceCols];
  __shared__ float s_mean[kReduceGroups][kReduceCols];
  __shared__ float s_m2[kReduceGroups][kReduceCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * kReduceCols + tx;
  float na = 0.f, ma = 0.f, Ma = 0.f;
  if (c < C) {
    for (int i = ty; i < n_blocks; i += kReduceGroups) {
      const int64_t left = rows - static_cast<int64_t>(i) * rows_per_block;
      const float nb = static_cast<float>(left < rows_per_block ? left : rows_per_block);
      const float mb = part[static_cast<int64_t>(i) * 2 * C + c];
      const float Mb = part[static_cast<int64_t>(i) * 2 * C + C + c];
      const float nn = na + nb;
      const float delta = mb - ma;
      ma = fmaf(delta, nb / nn, ma);
      Ma += Mb + delta * delta * (na * nb / nn);
      na = nn;
    }
  }
  s_n[ty][tx] = na;
  s_mean[ty][tx] = ma;
  s_m2[ty][tx] = Ma;
  __syncthreads();
  if (ty == 0 && c < C) {
    float a = 0.f, m = 0.f, M = 0.f;
    for (int j = 0; j < kReduceGroups; ++j) {
      const float nb = s_n[j][tx];
      if (nb == 0.f) continue;
      const float nn = a + nb;
      const float delta = s_mean[j][tx] - m;
      m = fmaf(delta, nb / nn, m);
      M += s_m2[j][tx] + delta * delta * (a * nb / nn);
      a = nn;
    }
    mean_out[c] = part[static_cast<int64_t>(n_blocks) * 2 * C + c] + m;
    var_out[c] = M / a;
  }
}

// Conv + BN normalize over all output tokens (class token copied).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 1)
    normalize_kernel(const T* __restrict__ x, const float* __restrict__ w9,
                     const float* __restrict__ mean, const float* __restrict__ rstd,
                     const float* __restrict__ gamma, const float* __restrict__ beta,
                     T* __restrict__ out, const Geo g, const int rows_per_thread) {
  const int tx = threadIdx.x, ty = threadIdx.y, cx = blockDim.x, tyn = blockDim.y;
  const int cv = blockIdx.y * cx + tx;
  if (cv >= g.CV) return;  // no block-wide synchronization in this kernel
  const int64_t c0 = static_cast<int64_t>(cv) * VEC;
  float w[9][VEC];
  load_weights<VEC>(w9, c0, w);
  auto wt = [&](int tap, int i) { return w[tap][i]; };
  float m[VEC], a[VEC], sh[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    m[i] = mean[c0 + i];
    a[i] = rstd[c0 + i] * (gamma != nullptr ? gamma[c0 + i] : 1.f);
    sh[i] = beta != nullptr ? beta[c0 + i] : 0.f;
  }
  const int64_t total = static_cast<int64_t>(g.B) * g.T_out;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_thread * tyn;
  for (int k = 0; k < rows_per_thread; ++k) {
    const int64_t r = first + ty + static_cast<int64_t>(k) * tyn;
    if (r >= total) break;
    const int b = static_cast<int>(r / g.T_out);
    const int j = static_cast<int>(r - static_cast<int64_t>(b) * g.T_out);
    float t[VEC];
    if (j < g.cls) {
      Access<T, VEC>::load(x + static_cast<int64_t>(b) * g.T_in * g.C + c0, t);
    } else {
      const int p = j - g.cls;
      const int oy = p / g.WO, ox = p - oy * g.WO;
      float y[VEC];
      dwconv_at<T, VEC>(x, wt, g, b, oy, ox, c0, y);
#pragma unroll
      for (int i = 0; i < VEC; ++i) t[i] = fmaf(y[i] - m[i], a[i], sh[i]);
    }
    Access<T, VEC>::store(out + r * g.C + c0, t);
  }
}

// Backward 1: per block, per channel, sum(dz) and sum(dz * xhat) over the block's map rows.
// part: rows 2i and 2i+1 for block i.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 1)
    bn_grad_partials_kernel(const T* __restrict__ dt, const T* __restrict__ x,
                            const float* __restrict__ w9, const float* __restrict__ mean,
                            const float* __restrict__ rstd, float* __restrict__ part, const Geo g,
                            const int rows_per_thread) {
  extern __shared__ float smem[];
  const int tx = threadIdx.x, ty = threadIdx.y, cx = blockDim.x, tyn = blockDim.y;
  const int width = cx * VEC;
  const int cv = blockIdx.y * cx + tx;
  const bool c_ok = cv < g.CV;
  const int64_t c0 = static_cast<int64_t>(cv) * VEC;
  float s1[VEC], s2[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) s1[i] = s2[i] = 0.f;
  if (c_ok) {
    float w[9][VEC];
    load_weights<VEC>(w9, c0, w);
    auto wt = [&](int tap, int i) { return w[tap][i]; };
    float m[VEC], rs[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      m[i] = mean[c0 + i];
      rs[i] = rstd[c0 + i];
    }
    const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_thread * tyn;
    for (int k = 0; k < rows_per_thread; ++k) {
      const int64_t r = first + ty + static_cast<int64_t>(k) * tyn;
      if (r >= g.rows) break;
      int b, p, oy, ox;
      map_row(g, static_cast<int>(r), b, p, oy, ox);
      float dz[VEC], y[VEC];
      Access<T, VEC>::load(dt + (static_cast<int64_t>(b) * g.T_out + g.cls + p) * g.C + c0, dz);
      dwconv_at<T, VEC>(x, wt, g, b, oy, ox, c0, y);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        s1[i] += dz[i];
        s2[i] = fmaf(dz[i], (y[i] - m[i]) * rs[i], s2[i]);
      }
    }
  }
  float* r1 = smem;
  float* r2 = smem + tyn * width;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    r1[ty * width + tx * VEC + i] = s1[i];
    r2[ty * width + tx * VEC + i] = s2[i];
  }
  __syncthreads();
  if (ty == 0 && c_ok) {
    float* out = part + static_cast<int64_t>(blockIdx.x) * 2 * g.C + c0;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float a = 0.f, b = 0.f;
      for (int j = 0; j < tyn; ++j) {
        a += r1[j * width + tx * VEC + i];
        b += r2[j * width + tx * VEC + i];
      }
      out[i] = a;
      out[g.C + i] = b;
    }
  }
}

// Backward 2: dy (float32, (B*HO*WO, C)) from dz, and per-block partials of the depthwise
// weight gradient, part (blocks, 9, C). The conv weights sit in shared memory here (the 9 x
// VEC gradient accumulators already fill the registers). sums = (sum dz, sum dz * xhat).
template <typename T, int VEC, bool BATCH_STATS>
__global__ void __launch_bounds__(kThreads, 1)
    conv_grad_kernel(const T* __restrict__ dt, const T* __restrict__ x,
                     const float* __restrict__ w9, const float* __restrict__ mean,
                     const float* __restrict__ rstd, const float* __restrict__ gamma,
                     const float* __restrict__ sums, float* __restrict__ dy,
                     float* __restrict__ part, const Geo g, const int rows_per_thread) {
  extern __shared__ float smem[];
  const int tx = threadIdx.x, ty = threadIdx.y, cx = blockDim.x, tyn = blockDim.y;
  const int width = cx * VEC;
  const int cv = blockIdx.y * cx + tx;
  const bool c_ok = cv < g.CV;
  const int64_t c0 = static_cast<int64_t>(cv) * VEC;
  float* s_w = smem;                 // [9][width], BATCH_STATS only
  float* s_red = smem + (BATCH_STATS ? 9 * width : 0);  // [tyn][width]
  if (BATCH_STATS) {
    const int64_t tile0 = static_cast<int64_t>(blockIdx.y) * width;
    for (int idx = ty * cx + tx; idx < 9 * width; idx += cx * tyn) {
      const int tap = idx / width;
      const int64_t c = tile0 + (idx - tap * width);
      s_w[idx] = c < g.C ? w9[c * 9 + tap] : 0.f;
    }
    __syncthreads();
  }
  float dw[9][VEC];
#pragma unroll
  for (int tap = 0; tap < 9; ++tap) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dw[tap][i] = 0.f;
  }
  if (c_ok) {
    float m[VEC], rs[VEC], a[VEC], k1[VEC], k2[VEC];
    const float inv_n = 1.f / static_cast<float>(g.rows);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      m[i] = mean[c0 + i];
      rs[i] = rstd[c0 + i];
      a[i] = rs[i] * (gamma != nullptr ? gamma[c0 + i] : 1.f);
      k1[i] = BATCH_STATS ? sums[c0 + i] * inv_n : 0.f;
      k2[i] = BATCH_STATS ? sums[g.C + c0 + i] * inv_n : 0.f;
    }
    auto wt = [&](int tap, int i) { return s_w[tap * width + tx * VEC + i]; };
    const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_thread * tyn;
    for (int k = 0; k < rows_per_thread; ++k) {
      const int64_t r = first + ty + static_cast<int64_t>(k) * tyn;
      if (r >= g.rows) break;
      int b, p, oy, ox;
      map_row(g, static_cast<int>(r), b, p, oy, ox);
      float d[VEC];
      Access<T, VEC>::load(dt + (static_cast<int64_t>(b) * g.T_out + g.cls + p) * g.C + c0, d);
      if (BATCH_STATS) {
        float y[VEC];
        dwconv_at<T, VEC>(x, wt, g, b, oy, ox, c0, y);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float xhat = (y[i] - m[i]) * rs[i];
          d[i] = a[i] * (d[i] - k1[i] - xhat * k2[i]);
        }
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) d[i] *= a[i];
      }
      Access<float, VEC>::store(dy + r * g.C + c0, d);
      const int64_t base = static_cast<int64_t>(b) * g.T_in + g.cls;
#pragma unroll
      for (int ky = 0; ky < 3; ++ky) {
        const int iy = oy * g.stride + ky - 1;
        if (iy < 0 || iy >= g.H) continue;
#pragma unroll
        for (int kx = 0; kx < 3; ++kx) {
          const int ix = ox * g.stride + kx - 1;
          if (ix < 0 || ix >= g.W) continue;
          float xv[VEC];
          Access<T, VEC>::load(x + (base + static_cast<int64_t>(iy) * g.W + ix) * g.C + c0, xv);
#pragma unroll
          for (int i = 0; i < VEC; ++i) dw[ky * 3 + kx][i] = fmaf(d[i], xv[i], dw[ky * 3 + kx][i]);
        }
      }
    }
  }
  // Combine the TY threads of each channel vector, tap by tap, in thread order.
#pragma unroll
  for (int tap = 0; tap < 9; ++tap) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) s_red[ty * width + tx * VEC + i] = dw[tap][i];
    __syncthreads();
    if (ty == 0 && c_ok) {
      float* out = part + (static_cast<int64_t>(blockIdx.x) * 9 + tap) * g.C + c0;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float s = 0.f;
        for (int j = 0; j < tyn; ++j) s += s_red[j * width + tx * VEC + i];
        out[i] = s;
      }
    }
    __syncthreads();
  }
}

// Backward 3: grad_x. Each input token gathers the (up to 9) output positions whose window
// covers it: one writer per element. Class-token rows copy grad_tokens' class token.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 1)
    grad_input_kernel(const float* __restrict__ dy, const T* __restrict__ dt,
                      const float* __restrict__ w9, T* __restrict__ dx, const Geo g,
                      const int rows_per_thread) {
  const int tx = threadIdx.x, ty = threadIdx.y, cx = blockDim.x, tyn = blockDim.y;
  const int cv = blockIdx.y * cx + tx;
  if (cv >= g.CV) return;  // no block-wide synchronization in this kernel
  const int64_t c0 = static_cast<int64_t>(cv) * VEC;
  float w[9][VEC];
  load_weights<VEC>(w9, c0, w);
  const int64_t total = static_cast<int64_t>(g.B) * g.T_in;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_thread * tyn;
  for (int k = 0; k < rows_per_thread; ++k) {
    const int64_t r = first + ty + static_cast<int64_t>(k) * tyn;
    if (r >= total) break;
    const int b = static_cast<int>(r / g.T_in);
    const int j = static_cast<int>(r - static_cast<int64_t>(b) * g.T_in);
    float acc[VEC];
    if (j < g.cls) {
      Access<T, VEC>::load(dt + static_cast<int64_t>(b) * g.T_out * g.C + c0, acc);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
      const int q = j - g.cls;
      const int iy = q / g.W, ix = q - iy * g.W;
      const int64_t base = static_cast<int64_t>(b) * g.HO * g.WO;
#pragma unroll
      for (int ky = 0; ky < 3; ++ky) {
        const int ny = iy + 1 - ky;  // = oy * stride when (oy, ky) reads row iy
        if (ny < 0) continue;
        const int oy = ny / g.stride;
        if (oy * g.stride != ny || oy >= g.HO) continue;
#pragma unroll
        for (int kx = 0; kx < 3; ++kx) {
          const int nx = ix + 1 - kx;
          if (nx < 0) continue;
          const int ox = nx / g.stride;
          if (ox * g.stride != nx || ox >= g.WO) continue;
          float dv[VEC];
          Access<float, VEC>::load(dy + (base + static_cast<int64_t>(oy) * g.WO + ox) * g.C + c0,
                                   dv);
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] = fmaf(dv[i], w[ky * 3 + kx][i], acc[i]);
        }
      }
    }
    Access<T, VEC>::store(dx + r * g.C + c0, acc);
  }
}

// out = sum over parts of part[i, :] in a fixed order (8 interleaved groups, then the groups
// in order). With taps > 0, column j = tap * C + c is written to out[c * taps + tap].
__global__ void __launch_bounds__(kReduceCols * kReduceGroups)
    sum_partials_kernel(const float* __restrict__ part, float* __restrict__ out,
                        const int n_parts, const int64_t n_cols, const int channels,
                        const int taps) {
  __shared__ float s[kReduceGroups][kReduceCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kReduceCols + tx;
  float acc = 0.f;
  if (col < n_cols) {
    for (int i = ty; i < n_parts; i += kReduceGroups) acc += part[static_cast<int64_t>(i) * n_cols + col];
  }
  s[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && col < n_cols) {
    float total = 0.f;
    for (int j = 0; j < kReduceGroups; ++j) total += s[j][tx];
    if (taps > 0) {
      const int64_t tap = col / channels, c = col - tap * channels;
      out[c * taps + tap] = total;
    } else {
      out[col] = total;
    }
  }
}

// -------------------------------------------------------------------------------- host

template <typename T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<T>{}, integral_constant<VEC>) for the storage dtype and vector width.
template <typename Fn>
cudaError_t dispatch(DType dtype, bool vec, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      return vec ? fn(Tag<float>{}, std::integral_constant<int, 4>{})
                 : fn(Tag<float>{}, std::integral_constant<int, 1>{});
    case DType::kFloat16:
      return vec ? fn(Tag<__half>{}, std::integral_constant<int, 8>{})
                 : fn(Tag<__half>{}, std::integral_constant<int, 1>{});
    case DType::kBFloat16:
      return vec ? fn(Tag<__nv_bfloat16>{}, std::integral_constant<int, 8>{})
                 : fn(Tag<__nv_bfloat16>{}, std::integral_constant<int, 1>{});
  }
  return cudaErrorInvalidValue;
}

int vec_width(DType dtype) { return dtype == DType::kFloat32 ? 4 : 8; }

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

Geo make_geo(const DwConvShape& s, int vec) {
  Geo g;
  g.B = static_cast<int>(s.batch);
  g.H = static_cast<int>(s.height);
  g.W = static_cast<int>(s.width);
  g.HO = static_cast<int>(dwconv_out_size(s.height, s.stride));
  g.WO = static_cast<int>(dwconv_out_size(s.width, s.stride));
  g.C = static_cast<int>(s.channels);
  g.CV = g.C / vec;
  g.stride = s.stride;
  g.cls = s.cls ? 1 : 0;
  g.T_in = g.H * g.W + g.cls;
  g.T_out = g.HO * g.WO + g.cls;
  g.rows = g.B * g.HO * g.WO;
  return g;
}

// How a stencil kernel covers `rows` rows x the channel vectors.
struct Plan {
  dim3 grid, block;
  int rows_per_thread;
  int64_t rows_per_block;
};

// Threads along channels: all channel vectors when they fit a warp, else a divisor of
// their count in [16, 32] (no idle tail tile), else 32.
int pick_cx(int cv) {
  if (cv <= 32) return std::max(cv, 1);
  for (int cx = 32; cx >= 16; --cx) {
    if (cv % cx == 0) return cx;
  }
  return 32;
}

// Rows per thread grow with the problem so the grid stays near `target_blocks` blocks: a
// function of the shape only (the reductions' order never depends on the GPU).
Plan make_plan(const Geo& g, int64_t rows, int64_t target_blocks) {
  Plan p;
  const int cx = pick_cx(g.CV);
  const int ty = std::max(1, kThreads / cx);
  const int tiles = (g.CV + cx - 1) / cx;
  const int64_t row_blocks = std::max<int64_t>(1, target_blocks / tiles);
  int64_t rpt = (rows + static_cast<int64_t>(ty) * row_blocks - 1) / (static_cast<int64_t>(ty) * row_blocks);
  rpt = std::min<int64_t>(std::max<int64_t>(rpt, 1), kMaxRowsPerThread);
  p.rows_per_thread = static_cast<int>(rpt);
  p.rows_per_block = rpt * ty;
  p.block = dim3(cx, ty);
  p.grid = dim3(static_cast<unsigned>(std::max<int64_t>(1, (rows + p.rows_per_block - 1) / p.rows_per_block)),
                static_cast<unsigned>(tiles));
  return p;
}

constexpr int64_t kReductionBlocks = 1024;  // grid target of the reduction kernels
constexpr int64_t kStencilBlocks = 4096;    // grid target of the element-wise stencils

size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

struct StatsLayout {
  size_t part, bytes;
};
StatsLayout stats_layout(const Geo& g, const Plan& p) {
  StatsLayout l;
  l.part = 0;
  l.bytes = round_up(sizeof(float) * (2 * static_cast<size_t>(p.grid.x) + 1) * g.C);
  return l;
}

struct BackwardLayout {
  size_t dy, bn_part, sums, conv_part, bytes;
};
BackwardLayout backward_layout(const Geo& g, const Plan& p) {
  BackwardLayout l;
  l.dy = 0;
  l.bn_part = l.dy + round_up(sizeof(float) * static_cast<size_t>(g.rows) * g.C);
  l.sums = l.bn_part + round_up(sizeof(float) * 2 * static_cast<size_t>(p.grid.x) * g.C);
  l.conv_part = l.sums + round_up(sizeof(float) * 2 * static_cast<size_t>(g.C));
  l.bytes = l.conv_part + round_up(sizeof(float) * 9 * static_cast<size_t>(p.grid.x) * g.C);
  return l;
}

dim3 reduce_grid(int64_t cols) {
  return dim3(static_cast<unsigned>((cols + kReduceCols - 1) / kReduceCols));
}
const dim3 kReduceBlock(kReduceCols, kReduceGroups);

}  // namespace

// ------------------------------------------------------------------------ entry points

const char* dwconv_bn_unsupported(const DwConvShape& s) {
  if (s.stride != 1 && s.stride != 2) return "stride must be 1 or 2";
  if (s.batch < 0 || s.height < 1 || s.width < 1 || s.channels < 1) {
    return "batch must be >= 0 and height, width, channels >= 1";
  }
  const int64_t tokens = s.height * s.width + (s.cls ? 1 : 0);
  if (s.height > INT_MAX || s.width > INT_MAX || s.channels > INT_MAX ||
      s.batch > INT_MAX / std::max<int64_t>(tokens, 1)) {
    return "batch * tokens must be below 2^31 (32-bit row indices)";
  }
  // Channel tiles on grid.y (at most 65535), scalar path (the widest grid) included.
  if ((s.channels + 31) / 32 > 65535) return "too many channels for one grid (at most 2097120)";
  return nullptr;
}

size_t dwconv_bn_stats_workspace(const DwConvShape& shape) {
  if (dwconv_bn_unsupported(shape) != nullptr) return 0;
  size_t bytes = 0;
  for (int vec : {1, 4, 8}) {  // whichever path the pointers allow
    if (shape.channels % vec != 0) continue;
    const Geo g = make_geo(shape, vec);
    bytes = std::max(bytes, stats_layout(g, make_plan(g, g.rows, kReductionBlocks)).bytes);
  }
  return bytes;
}

size_t dwconv_bn_backward_workspace(const DwConvShape& shape) {
  if (dwconv_bn_unsupported(shape) != nullptr) return 0;
  size_t bytes = 0;
  for (int vec : {1, 4, 8}) {
    if (shape.channels % vec != 0) continue;
    const Geo g = make_geo(shape, vec);
    bytes = std::max(bytes, backward_layout(g, make_plan(g, g.rows, kReductionBlocks)).bytes);
  }
  return bytes;
}

cudaError_t dwconv_bn_stats(DType dtype, const void* x, const float* weight, float* mean,
                            float* var, void* workspace, const DwConvShape& shape,
                            cudaStream_t stream) {
  if (dwconv_bn_unsupported(shape) != nullptr) return cudaErrorInvalidValue;
  const int vw = vec_width(dtype);
  const bool vec = shape.channels % vw == 0 && aligned16(x);
  const Geo g = make_geo(shape, vec ? vw : 1);
  if (g.rows == 0) return cudaErrorInvalidValue;  // statistics of nothing
  const Plan p = make_plan(g, g.rows, kReductionBlocks);
  float* part = static_cast<float*>(workspace) + stats_layout(g, p).part / sizeof(float);
  cudaError_t err = dispatch(dtype, vec, [&](auto tag, auto v) {
    using T = typename decltype(tag)::type;
    constexpr int V = decltype(v)::value;
    const size_t smem = sizeof(float) * (2 * p.block.x * V + p.block.x) * p.block.y;
    stats_partials_kernel<T, V><<<p.grid, p.block, smem, stream>>>(
        static_cast<const T*>(x), weight, part, g, p.rows_per_thread);
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;
  stats_finalize_kernel<<<reduce_grid(g.C), kReduceBlock, 0, stream>>>(
      part, mean, var, g.C, static_cast<int>(p.grid.x), g.rows, p.rows_per_block);
  return cudaGetLastError();
}

cudaError_t dwconv_bn_normalize(DType dtype, const void* x, const float* weight,
                                const float* mean, const float* rstd, const float* gamma,
                                const float* beta, void* out, const DwConvShape& shape,
                                cudaStream_t stream) {
  if (dwconv_bn_unsupported(shape) != nullptr) return cudaErrorInvalidValue;
  const int vw = vec_width(dtype);
  const bool vec = shape.channels % vw == 0 && aligned16(x) && aligned16(out);
  const Geo g = make_geo(shape, vec ? vw : 1);
  const int64_t total = static_cast<int64_t>(g.B) * g.T_out;
  if (total == 0) return cudaSuccess;
  const Plan p = make_plan(g, total, kStencilBlocks);
  return dispatch(dtype, vec, [&](auto tag, auto v) {
    using T = typename decltype(tag)::type;
    constexpr int V = decltype(v)::value;
    normalize_kernel<T, V><<<p.grid, p.block, 0, stream>>>(
        static_cast<const T*>(x), weight, mean, rstd, gamma, beta, static_cast<T*>(out), g,
        p.rows_per_thread);
    return cudaGetLastError();
  });
}

cudaError_t dwconv_bn_backward(DType dtype, const void* grad_tokens, const void* x,
                               const float* weight, const float* mean, const float* rstd,
                               const float* gamma, bool batch_stats, void* grad_x,
                               float* grad_weight, float* grad_gamma, float* grad_beta,
                               void* workspace, const DwConvShape& shape, cudaStream_t stream) {
  if (dwconv_bn_unsupported(shape) != nullptr) return cudaErrorInvalidValue;
  const int vw = vec_width(dtype);
  const bool vec = shape.channels % vw == 0 && aligned16(grad_tokens) && aligned16(x) &&
                   aligned16(grad_x) && aligned16(workspace);
  const Geo g = make_geo(shape, vec ? vw : 1);
  if (g.rows == 0) {  // empty batch: zero parameter gradients, nothing else to write
    cudaError_t err = cudaMemsetAsync(grad_weight, 0, sizeof(float) * 9 * g.C, stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(grad_gamma, 0, sizeof(float) * g.C, stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(grad_beta, 0, sizeof(float) * g.C, stream);
    return err;
  }
  const Plan p = make_plan(g, g.rows, kReductionBlocks);
  const BackwardLayout l = backward_layout(g, p);
  char* ws = static_cast<char*>(workspace);
  float* dy = reinterpret_cast<float*>(ws + l.dy);
  float* bn_part = reinterpret_cast<float*>(ws + l.bn_part);
  float* sums = reinterpret_cast<float*>(ws + l.sums);
  float* conv_part = reinterpret_cast<float*>(ws + l.conv_part);
  const int64_t total_in = static_cast<int64_t>(g.B) * g.T_in;
  const Plan pin = make_plan(g, total_in, kStencilBlocks);

  return dispatch(dtype, vec, [&](auto tag, auto v) {
    using T = typename decltype(tag)::type;
    constexpr int V = decltype(v)::value;
    const T* dt = static_cast<const T*>(grad_tokens);
    const T* xt = static_cast<const T*>(x);
    const size_t width = p.block.x * V;
    // 1. sum(dz), sum(dz * xhat): BN's parameter gradients and the training backward's sums.
    bn_grad_partials_kernel<T, V><<<p.grid, p.block, sizeof(float) * 2 * width * p.block.y,
                                    stream>>>(dt, xt, weight, mean, rstd, bn_part, g,
                                              p.rows_per_thread);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    sum_partials_kernel<<<reduce_grid(2 * g.C), kReduceBlock, 0, stream>>>(
        bn_part, sums, static_cast<int>(p.grid.x), 2 * static_cast<int64_t>(g.C), g.C, 0);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    if ((err = cudaMemcpyAsync(grad_beta, sums, sizeof(float) * g.C, cudaMemcpyDeviceToDevice,
                               stream)) != cudaSuccess) return err;
    if ((err = cudaMemcpyAsync(grad_gamma, sums + g.C, sizeof(float) * g.C,
                               cudaMemcpyDeviceToDevice, stream)) != cudaSuccess) return err;
    // 2. dy and the depthwise weight gradient.
    if (batch_stats) {
      const size_t smem = sizeof(float) * (9 * width + width * p.block.y);
      conv_grad_kernel<T, V, true><<<p.grid, p.block, smem, stream>>>(
          dt, xt, weight, mean, rstd, gamma, sums, dy, conv_part, g, p.rows_per_thread);
    } else {
      const size_t smem = sizeof(float) * width * p.block.y;
      conv_grad_kernel<T, V, false><<<p.grid, p.block, smem, stream>>>(
          dt, xt, weight, mean, rstd, gamma, sums, dy, conv_part, g, p.rows_per_thread);
    }
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    sum_partials_kernel<<<reduce_grid(9 * static_cast<int64_t>(g.C)), kReduceBlock, 0, stream>>>(
        conv_part, grad_weight, static_cast<int>(p.grid.x), 9 * static_cast<int64_t>(g.C), g.C,
        9);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    // 3. grad_x (class token included).
    grad_input_kernel<T, V><<<pin.grid, pin.block, 0, stream>>>(
        dy, dt, weight, static_cast<T*>(grad_x), g, pin.rows_per_thread);
    return cudaGetLastError();
  });
}

}  // namespace cvt_kernels
