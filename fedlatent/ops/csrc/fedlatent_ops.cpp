// Python bindings of fedlatent's CUDA kernels (fedlatent_ops_kernels.cu): argument checks, output
// allocation, device guard and current stream. The autograd Functions live in fedlatent/ops/fused.py;
// the same entry points exist in pure PyTorch in fedlatent/ops/emulate.py (used for testing on CPU).
#include <torch/extension.h>

// c10's stream/guard headers only: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers, which
// minimal CUDA toolkits (runtime + nvcc) do not ship.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <vector>

#include "fedlatent_ops.h"

namespace {

using fedlatent_ops::DType;

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return fedlatent_ops::kFloat32;
    case at::kDouble: return fedlatent_ops::kFloat64;
    case at::kHalf: return fedlatent_ops::kFloat16;
    case at::kBFloat16: return fedlatent_ops::kBFloat16;
    default: TORCH_CHECK(false, "fedlatent_ops: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fedlatent_ops: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), "fedlatent_ops: ", name, " must be contiguous");
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  check_cuda(t, name);
  TORCH_CHECK(t.device() == ref.device(), "fedlatent_ops: ", name, " is on another device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fedlatent_ops: ", name, " has another dtype");
}

void check_launch(const char* err) { TORCH_CHECK(err == nullptr, "fedlatent_ops: CUDA error: ", err); }

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

at::Tensor bias_act_fwd(const at::Tensor& x, const std::optional<at::Tensor>& b, int64_t inner, int64_t channels,
                        double alpha, double gain) {
  check_cuda(x, "x");
  TORCH_CHECK(inner >= 1 && channels >= 1 && x.numel() % (inner * channels) == 0, "fedlatent_ops: bad bias layout");
  const void* bp = nullptr;
  if (b.has_value() && b->defined()) {
    check_like(*b, x, "b");
    TORCH_CHECK(b->numel() == channels, "fedlatent_ops: bias has ", b->numel(), " elements for ", channels,
                " channels");
    bp = b->data_ptr();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  check_launch(fedlatent_ops::bias_act_fwd(dtype_code(x), x.data_ptr(), bp, y.data_ptr(), x.numel(), inner, channels,
                                           alpha, gain, stream_of(x)));
  return y;
}

at::Tensor bias_act_bwd(const at::Tensor& dy, const at::Tensor& y, double alpha, double gain) {
  check_cuda(y, "y");
  check_like(dy, y, "dy");
  TORCH_CHECK(dy.numel() == y.numel(), "fedlatent_ops: dy and y differ in size");
  TORCH_CHECK(alpha >= 0.0 && gain > 0.0, "fedlatent_ops: bias_act backward needs alpha >= 0 and gain > 0");
  const c10::cuda::CUDAGuard guard(y.device());
  auto dx = at::empty_like(y);
  check_launch(fedlatent_ops::bias_act_bwd(dtype_code(y), dy.data_ptr(), y.data_ptr(), dx.data_ptr(), y.numel(), alpha,
                                           gain, stream_of(y)));
  return dx;
}

at::Tensor sgd_step(const at::Tensor& theta, const at::Tensor& g, const std::optional<at::Tensor>& lr_t, double lr) {
  check_cuda(theta, "theta");
  check_like(g, theta, "g");
  TORCH_CHECK(g.numel() == theta.numel(), "fedlatent_ops: theta and g differ in size");
  const void* lp = nullptr;
  if (lr_t.has_value() && lr_t->defined()) {
    check_like(*lr_t, theta, "lr");
    TORCH_CHECK(lr_t->numel() == 1, "fedlatent_ops: lr must be one number");
    lp = lr_t->data_ptr();
  }
  const c10::cuda::CUDAGuard guard(theta.device());
  auto out = at::empty_like(theta);
  check_launch(fedlatent_ops::sgd_step(dtype_code(theta), theta.data_ptr(), g.data_ptr(), lp, lr, out.data_ptr(),
                                       theta.numel(), stream_of(theta)));
  return out;
}

std::vector<at::Tensor> traj_fwd(const at::Tensor& e, const at::Tensor& s, const at::Tensor& t) {
  check_cuda(t, "theta_target");
  check_like(e, t, "theta_end");
  check_like(s, t, "theta_start");
  TORCH_CHECK(e.numel() == t.numel() && s.numel() == t.numel(), "fedlatent_ops: parameter vectors differ in size");
  const c10::cuda::CUDAGuard guard(t.device());
  const int nblocks = fedlatent_ops::traj_num_blocks(t.numel());
  auto dopt = t.options().dtype(at::kDouble);
  auto partials = at::empty({2 * nblocks}, dopt);
  auto stats = at::empty({2}, dopt);
  auto loss = at::empty({}, t.options());
  check_launch(fedlatent_ops::traj_fwd(dtype_code(t), e.data_ptr(), s.data_ptr(), t.data_ptr(), t.numel(),
                                       partials.data_ptr<double>(), nblocks, loss.data_ptr(),
                                       stats.data_ptr<double>(), stream_of(t)));
  return {loss, stats};
}

std::vector<at::Tensor> traj_bwd(const std::optional<at::Tensor>& go, const at::Tensor& stats, const at::Tensor& e,
                                 const at::Tensor& s, const at::Tensor& t, bool need_e, bool need_s, bool need_t) {
  check_cuda(t, "theta_target");
  check_like(e, t, "theta_end");
  check_like(s, t, "theta_start");
  check_cuda(stats, "stats");
  TORCH_CHECK(stats.scalar_type() == at::kDouble && stats.numel() == 2, "fedlatent_ops: bad loss statistics");
  const void* gp = nullptr;
  if (go.has_value() && go->defined()) {
    check_like(*go, t, "grad_loss");
    TORCH_CHECK(go->numel() == 1, "fedlatent_ops: grad_loss must be one number");
    gp = go->data_ptr();
  }
  const c10::cuda::CUDAGuard guard(t.device());
  at::Tensor de, ds, dt;
  if (need_e) de = at::empty_like(t);
  if (need_s) ds = at::empty_like(t);
  if (need_t) dt = at::empty_like(t);
  check_launch(fedlatent_ops::traj_bwd(dtype_code(t), gp, stats.data_ptr<double>(), e.data_ptr(), s.data_ptr(),
                                       t.data_ptr(), need_e ? de.data_ptr() : nullptr,
                                       need_s ? ds.data_ptr() : nullptr, need_t ? dt.data_ptr() : nullptr, t.numel(),
                                       stream_of(t)));
  return {de, ds, dt};
}

void check_dsa(const at::Tensor& x, const at::Tensor& params) {
  check_cuda(x, "images");
  TORCH_CHECK(x.dim() == 4, "fedlatent_ops: DSA expects [B, C, H, W] images");
  check_cuda(params, "params");
  TORCH_CHECK(params.device() == x.device() && params.scalar_type() == at::kDouble && params.dim() == 2 &&
                  params.size(1) == fedlatent_ops::kDsaParams && (params.size(0) == 1 || params.size(0) == x.size(0)),
              "fedlatent_ops: DSA parameters must be a [1 or B, ", fedlatent_ops::kDsaParams,
              "] float64 tensor on the images' device");
  TORCH_CHECK(x.size(1) * x.size(2) * x.size(3) < (int64_t(1) << 31), "fedlatent_ops: image too large");
}

at::Tensor dsa_fwd(const at::Tensor& x, const at::Tensor& params, int64_t flags) {
  check_dsa(x, params);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  check_launch(fedlatent_ops::dsa_fwd(dtype_code(x), x.data_ptr(), y.data_ptr(), params.data_ptr<double>(),
                                      int(params.size(0)), int(x.size(0)), int(x.size(1)), int(x.size(2)),
                                      int(x.size(3)), int(flags), stream_of(x)));
  return y;
}

at::Tensor dsa_bwd(const at::Tensor& dy, const at::Tensor& params, int64_t flags) {
  check_dsa(dy, params);
  const c10::cuda::CUDAGuard guard(dy.device());
  auto dx = at::empty_like(dy);
  check_launch(fedlatent_ops::dsa_bwd(dtype_code(dy), dy.data_ptr(), dx.data_ptr(), params.data_ptr<double>(),
                                      int(params.size(0)), int(dy.size(0)), int(dy.size(1)), int(dy.size(2)),
                                      int(dy.size(3)), int(flags), stream_of(dy)));
  return dx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fedlatent custom CUDA ops (bias_act, sgd_step, trajectory loss, fused DSA)";
  m.attr("DSA_PARAMS") = fedlatent_ops::kDsaParams;
  m.def("bias_act_fwd", &bias_act_fwd, "y = leaky_relu(x + b, alpha) * gain", py::arg("x"), py::arg("b"),
        py::arg("inner"), py::arg("channels"), py::arg("alpha"), py::arg("gain"));
  m.def("bias_act_bwd", &bias_act_bwd, "dx = dy * gain * (y > 0 ? 1 : alpha)", py::arg("dy"), py::arg("y"),
        py::arg("alpha"), py::arg("gain"));
  m.def("sgd_step", &sgd_step, "theta - lr * g", py::arg("theta"), py::arg("g"), py::arg("lr_tensor"),
        py::arg("lr"));
  m.def("traj_fwd", &traj_fwd, "[loss, stats(num, den)]", py::arg("theta_end"), py::arg("theta_start"),
        py::arg("theta_target"));
  m.def("traj_bwd", &traj_bwd, "[d_end, d_start, d_target] (None where not needed)", py::arg("grad_loss"),
        py::arg("stats"), py::arg("theta_end"), py::arg("theta_start"), py::arg("theta_target"), py::arg("need_end"),
        py::arg("need_start"), py::arg("need_target"));
  m.def("dsa_fwd", &dsa_fwd, "fused DSA colour/crop/cutout/flip", py::arg("x"), py::arg("params"), py::arg("flags"));
  m.def("dsa_bwd", &dsa_bwd, "adjoint of dsa_fwd", py::arg("dy"), py::arg("params"), py::arg("flags"));
}
