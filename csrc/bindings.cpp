// torch/pybind11 entry points of cvt_kernels._C: check every argument, allocate outputs and
// workspace through torch's caching allocator, launch on the current CUDA stream.
//
// The kernels (kernels/dwconv_bn.cu) know nothing of torch; this file knows nothing of
// CUDA kernels. Every check names the argument and says what was expected, before any
// launch; the Python backend (cvt_kernels/backends/cuda.py) is the only caller.
// Headers: c10's stream and guard only (not ATen/cuda/CUDAContext.h, which pulls cuBLAS and
// cuSPARSE headers), so csrc/check_compile.py --bindings can syntax-check this file against
// a CPU torch's headers and a bare toolkit.

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "kernels/dwconv_bn.h"

namespace {

using at::Tensor;

cvt_kernels::DType to_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cvt_kernels::DType::kFloat32;
    case at::kHalf:
      return cvt_kernels::DType::kFloat16;
    case at::kBFloat16:
      return cvt_kernels::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "cvt_kernels._C: ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
  return cvt_kernels::DType::kFloat32;  // unreachable
}

void check_cuda_dense(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "cvt_kernels._C: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), "cvt_kernels._C: ", name, " is on ", t.device(),
              ", x is on ", like.device());
  TORCH_CHECK(t.is_contiguous(), "cvt_kernels._C: ", name, " must be contiguous");
}

void check_channel_vector(const Tensor& t, const char* name, const Tensor& x, int64_t channels) {
  check_cuda_dense(t, name, x);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "cvt_kernels._C: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, "cvt_kernels._C: ", name,
              " must have shape (", channels, "), got ", t.sizes());
}

const float* optional_vector(const std::optional<Tensor>& t, const char* name, const Tensor& x,
                             int64_t channels) {
  if (!t.has_value()) return nullptr;
  check_channel_vector(*t, name, x, channels);
  return t->data_ptr<float>();
}

// x (B, [1 +] h*w, C) and the conv weight (C, 1, 3, 3) float32: the shape every entry takes.
cvt_kernels::DwConvShape check_input(const Tensor& x, const Tensor& weight, int64_t h,
                                     int64_t w, int64_t stride, bool cls) {
  TORCH_CHECK(x.is_cuda(), "cvt_kernels._C: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.is_contiguous(), "cvt_kernels._C: x must be contiguous");
  to_dtype(x, "x");
  TORCH_CHECK(x.dim() == 3, "cvt_kernels._C: x must be (B, tokens, C), got ", x.sizes());
  TORCH_CHECK(h >= 1 && w >= 1, "cvt_kernels._C: h and w must be >= 1, got ", h, ", ", w);
  TORCH_CHECK(stride == 1 || stride == 2, "cvt_kernels._C: stride must be 1 or 2, got ", stride);
  TORCH_CHECK(x.size(1) == h * w + (cls ? 1 : 0), "cvt_kernels._C: x has ", x.size(1),
              " tokens, expected h*w", cls ? " + 1" : "", " = ", h * w + (cls ? 1 : 0));
  const int64_t channels = x.size(2);
  TORCH_CHECK(channels >= 1, "cvt_kernels._C: x must have at least one channel");
  check_cuda_dense(weight, "weight", x);
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "cvt_kernels._C: weight must be float32, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == channels && weight.size(1) == 1 &&
                  weight.size(2) == 3 && weight.size(3) == 3,
              "cvt_kernels._C: weight must have shape (", channels, ", 1, 3, 3), got ",
              weight.sizes());
  cvt_kernels::DwConvShape shape{x.size(0), h, w, channels, static_cast<int>(stride), cls};
  const char* unsupported = cvt_kernels::dwconv_bn_unsupported(shape);
  TORCH_CHECK(unsupported == nullptr, "cvt_kernels._C: x of shape ", x.sizes(), ": ",
              unsupported == nullptr ? "" : unsupported);
  return shape;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "cvt_kernels._C: ", what, " failed: ", cudaGetErrorString(err));
}

Tensor workspace(size_t bytes, const Tensor& x) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                   x.options().dtype(at::kByte));
}

// (mean, biased var), float32 (C), of the depthwise conv output (training pass 1).
std::tuple<Tensor, Tensor> dwconv_bn_stats(const Tensor& x, const Tensor& weight, int64_t h,
                                           int64_t w, int64_t stride, bool cls) {
  const auto shape = check_input(x, weight, h, w, stride, cls);
  TORCH_CHECK(shape.batch * cvt_kernels::dwconv_out_size(h, static_cast<int>(stride)) *
                      cvt_kernels::dwconv_out_size(w, static_cast<int>(stride)) >
                  0,
              "cvt_kernels._C: dwconv_bn_stats needs at least one output position (x is ",
              x.sizes(), ")");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor mean = at::empty({shape.channels}, x.options().dtype(at::kFloat));
  Tensor var = at::empty_like(mean);
  Tensor ws = workspace(cvt_kernels::dwconv_bn_stats_workspace(shape), x);
  check_launch(cvt_kernels::dwconv_bn_stats(to_dtype(x, "x"), x.data_ptr(),
                                            weight.data_ptr<float>(), mean.data_ptr<float>(),
                                            var.data_ptr<float>(), ws.data_ptr(), shape,
                                            c10::cuda::getCurrentCUDAStream()),
               "dwconv_bn_stats");
  return {mean, var};
}

// Normalized tokens (B, [1 +] h'*w', C), dtype of x, ready for the projection GEMM.
Tensor dwconv_bn_forward(const Tensor& x, const Tensor& weight, const Tensor& mean,
                         const Tensor& rstd, const std::optional<Tensor>& gamma,
                         const std::optional<Tensor>& beta, int64_t h, int64_t w, int64_t stride,
                         bool cls) {
  const auto shape = check_input(x, weight, h, w, stride, cls);
  check_channel_vector(mean, "mean", x, shape.channels);
  check_channel_vector(rstd, "rstd", x, shape.channels);
  const float* g = optional_vector(gamma, "gamma", x, shape.channels);
  const float* b = optional_vector(beta, "beta", x, shape.channels);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t tokens = cvt_kernels::dwconv_out_size(h, static_cast<int>(stride)) *
                             cvt_kernels::dwconv_out_size(w, static_cast<int>(stride)) +
                         (cls ? 1 : 0);
  Tensor out = at::empty({shape.batch, tokens, shape.channels}, x.options());
  check_launch(cvt_kernels::dwconv_bn_normalize(
                   to_dtype(x, "x"), x.data_ptr(), weight.data_ptr<float>(),
                   mean.data_ptr<float>(), rstd.data_ptr<float>(), g, b, out.data_ptr(), shape,
                   c10::cuda::getCurrentCUDAStream()),
               "dwconv_bn_normalize");
  return out;
}

// (grad_x (dtype of x), grad_weight (C, 1, 3, 3), grad_gamma (C), grad_beta (C)), float32
// parameter gradients, from grad_tokens = d(normalized tokens).
std::tuple<Tensor, Tensor, Tensor, Tensor> dwconv_bn_backward(
    const Tensor& grad_tokens, const Tensor& x, const Tensor& weight, const Tensor& mean,
    const Tensor& rstd, const std::optional<Tensor>& gamma, int64_t h, int64_t w,
    int64_t stride, bool cls, bool batch_stats) {
  const auto shape = check_input(x, weight, h, w, stride, cls);
  check_channel_vector(mean, "mean", x, shape.channels);
  check_channel_vector(rstd, "rstd", x, shape.channels);
  const float* g = optional_vector(gamma, "gamma", x, shape.channels);
  check_cuda_dense(grad_tokens, "grad_tokens", x);
  TORCH_CHECK(grad_tokens.scalar_type() == x.scalar_type(),
              "cvt_kernels._C: grad_tokens must have the dtype of x (", x.scalar_type(),
              "), got ", grad_tokens.scalar_type());
  const int64_t tokens = cvt_kernels::dwconv_out_size(h, static_cast<int>(stride)) *
                             cvt_kernels::dwconv_out_size(w, static_cast<int>(stride)) +
                         (cls ? 1 : 0);
  TORCH_CHECK(grad_tokens.dim() == 3 && grad_tokens.size(0) == shape.batch &&
                  grad_tokens.size(1) == tokens && grad_tokens.size(2) == shape.channels,
              "cvt_kernels._C: grad_tokens must have shape (", shape.batch, ", ", tokens, ", ",
              shape.channels, "), got ", grad_tokens.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor grad_x = at::empty_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor grad_weight = at::empty({shape.channels, 1, 3, 3}, f32);
  Tensor grad_gamma = at::empty({shape.channels}, f32);
  Tensor grad_beta = at::empty({shape.channels}, f32);
  Tensor ws = workspace(cvt_kernels::dwconv_bn_backward_workspace(shape), x);
  check_launch(cvt_kernels::dwconv_bn_backward(
                   to_dtype(x, "x"), grad_tokens.data_ptr(), x.data_ptr(),
                   weight.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), g,
                   batch_stats, grad_x.data_ptr(), grad_weight.data_ptr<float>(),
                   grad_gamma.data_ptr<float>(), grad_beta.data_ptr<float>(), ws.data_ptr(),
                   shape, c10::cuda::getCurrentCUDAStream()),
               "dwconv_bn_backward");
  return {grad_x, grad_weight, grad_gamma, grad_beta};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cvt_kernels CUDA kernels: depthwise 3x3 conv + BatchNorm on channel-last tokens";
  m.def("dwconv_bn_stats", &dwconv_bn_stats, "(mean, biased var) of the depthwise conv output",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("h"), pybind11::arg("w"),
        pybind11::arg("stride"), pybind11::arg("cls"));
  m.def("dwconv_bn_forward", &dwconv_bn_forward,
        "class token + (dwconv(x) - mean) * rstd * gamma + beta, as tokens", pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("mean"), pybind11::arg("rstd"),
        pybind11::arg("gamma"), pybind11::arg("beta"), pybind11::arg("h"), pybind11::arg("w"),
        pybind11::arg("stride"), pybind11::arg("cls"));
  m.def("dwconv_bn_backward", &dwconv_bn_backward,
        "(grad_x, grad_weight, grad_gamma, grad_beta) of dwconv_bn_forward",
        pybind11::arg("grad_tokens"), pybind11::arg("x"), pybind11::arg("weight"),
        pybind11::arg("mean"), pybind11::arg("rstd"), pybind11::arg("gamma"),
        pybind11::arg("h"), pybind11::arg("w"), pybind11::arg("stride"), pybind11::arg("cls"),
        pybind11::arg("batch_stats"));
}
