// Depthwise 3x3 conv + BatchNorm on channel-last CvT tokens: plain launch functions.
//
// Pure CUDA: this header and dwconv_bn.cu include only CUDA and C++ headers, so nvcc alone
// compiles them (csrc/check_compile.py does, for sm_80 and sm_90). csrc/bindings.cpp is the
// only file that knows torch: it checks the tensors and calls these functions.
//
// Tokens are x of shape (B, T_in, C), T_in = cls + H*W, row-major and dense (channel-last):
// token 0 is the class token when `cls`, the map tokens follow in row-major (y, x) order.
// The conv is depthwise, kernel 3, padding 1, stride 1 or 2, no bias: output map HO x WO with
// HO = (H - 1) / stride + 1. BatchNorm statistics are over the B*HO*WO conv outputs of each
// channel (the class token is excluded); the class token passes through unchanged.
//
// Storage dtypes float32, float16, bfloat16; every sum, statistic and gradient accumulates in
// float32. Loads and stores are 16 bytes wide when C is a multiple of 16 / sizeof(dtype) and
// every token pointer is 16-byte aligned; otherwise a scalar path runs (same results up to
// the order of the per-block partial sums). All reductions are two-level (per-block
// partials, then a fixed-order sum): no atomics, run-to-run deterministic.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace cvt_kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct DwConvShape {
  int64_t batch;     // B
  int64_t height;    // H (input map)
  int64_t width;     // W
  int64_t channels;  // C
  int stride;        // 1 or 2
  bool cls;          // token 0 is a class token
};

// Output size of the 3x3, padding 1 conv along an axis of size n.
inline int64_t dwconv_out_size(int64_t n, int stride) { return (n - 1) / stride + 1; }

// nullptr when the shape is supported, else a message (sizes beyond 32-bit row indices,
// stride not 1 or 2, empty dimensions, too many channels for one grid).
const char* dwconv_bn_unsupported(const DwConvShape& shape);

// Bytes of float32 scratch memory each entry point needs (the caller allocates it; any
// 16-byte-aligned device buffer of at least this size).
size_t dwconv_bn_stats_workspace(const DwConvShape& shape);
size_t dwconv_bn_backward_workspace(const DwConvShape& shape);

// Training pass 1: per-channel mean and biased variance (float32, C each) of the conv
// output over (B, HO, WO). Each block computes the conv for its tokens and keeps per-thread
// Welford statistics of (y - shift), shift = the conv output at (b=0, 0, 0); blocks write
// (mean, M2) partials merged in block order with Chan's formula. No conv output is stored.
cudaError_t dwconv_bn_stats(DType dtype, const void* x, const float* weight, float* mean,
                            float* var, void* workspace, const DwConvShape& shape,
                            cudaStream_t stream);

// Conv + BatchNorm normalize: out (B, cls + HO*WO, C), dtype of x:
//   out[map token] = (dwconv(x) - mean) * rstd * gamma + beta,   out[class token] = x[class token]
// mean/rstd are the batch statistics (training) or the running ones (eval: BN folded into a
// per-channel scale rstd * gamma). gamma/beta may be nullptr (1 and 0).
cudaError_t dwconv_bn_normalize(DType dtype, const void* x, const float* weight,
                                const float* mean, const float* rstd, const float* gamma,
                                const float* beta, void* out, const DwConvShape& shape,
                                cudaStream_t stream);

// Backward of dwconv_bn_normalize, given grad_tokens = d out (B, cls + HO*WO, C), dtype of x.
//   xhat = (dwconv(x) - mean) * rstd,  dz = grad_tokens of the map tokens
//   grad_beta = sum(dz), grad_gamma = sum(dz * xhat)                      (over B, HO, WO)
//   dy = gamma * rstd * (dz - mean(dz) - xhat * mean(dz * xhat))   if batch_stats
//   dy = gamma * rstd * dz                                          otherwise
//   grad_weight[c, tap] = sum dy * x(tap),  grad_x = transposed depthwise conv of dy,
//   grad_x[class token] = grad_tokens[class token].
// grad_x has the dtype of x; grad_weight (C, 9), grad_gamma, grad_beta (C) are float32.
cudaError_t dwconv_bn_backward(DType dtype, const void* grad_tokens, const void* x,
                               const float* weight, const float* mean, const float* rstd,
                               const float* gamma, bool batch_stats, void* grad_x,
                               float* grad_weight, float* grad_gamma, float* grad_beta,
                               void* workspace, const DwConvShape& shape, cudaStream_t stream);

// `weight` everywhere: the depthwise conv weight as float32 (C, 9), tap = 3 * ky + kx
// (nn.Conv2d's (C, 1, 3, 3) memory layout).

}  // namespace cvt_kernels
