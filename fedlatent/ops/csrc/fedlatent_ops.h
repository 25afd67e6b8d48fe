// fedlatent custom CUDA ops: the interface between the C++ bindings (fedlatent_ops.cpp, compiled by the
// host compiler with the PyTorch headers) and the kernels (fedlatent_ops_kernels.cu, compiled by nvcc
// WITHOUT any PyTorch header, which keeps the first-use compile short).
//
// Every launcher takes raw device pointers, element counts, a dtype code and a stream, and returns
// nullptr on success or a static CUDA error string. Tensors are dense and contiguous (the bindings
// check that). All written by the fedlatent authors for this project.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace fedlatent_ops {

// dtype codes (the bindings translate from at::ScalarType)
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Number of doubles per row of the packed DSA parameter table (one row per image, or one shared row).
constexpr int kDsaParams = 10;
// Row layout: brightness, saturation, contrast, shift_h, shift_w, cut_top, cut_left, cut_h, cut_w, flip.
enum DsaFlags : int { kDsaColor = 1, kDsaCrop = 2, kDsaCutout = 4, kDsaFlip = 8 };

// y = leaky_relu(x + b[c], alpha) * gain, c = (i / inner) % channels; b may be null (no bias).
const char* bias_act_fwd(int dtype, const void* x, const void* b, void* y, int64_t n, int64_t inner,
                         int64_t channels, double alpha, double gain, cudaStream_t stream);
// dx = dy * gain * (y > 0 ? 1 : alpha)   (needs alpha >= 0 and gain > 0, checked by the caller)
const char* bias_act_bwd(int dtype, const void* dy, const void* y, void* dx, int64_t n, double alpha, double gain,
                         cudaStream_t stream);

// out = theta - lr * g; lr is read from the device scalar lr_ptr (same dtype) when it is not null.
const char* sgd_step(int dtype, const void* theta, const void* g, const void* lr_ptr, double lr, void* out, int64_t n,
                     cudaStream_t stream);

// Trajectory loss ||e - t||^2 / ||s - t||^2 in one read of e, s, t: per-block partial sums (double) into
// partials[2 * nblocks], then a one-block pass in a fixed order (deterministic) writes loss (dtype) and
// stats[0] = ||e - t||^2, stats[1] = ||s - t||^2 (double).
int traj_num_blocks(int64_t n);
const char* traj_fwd(int dtype, const void* e, const void* s, const void* t, int64_t n, double* partials,
                     int nblocks, void* loss, double* stats, cudaStream_t stream);
// d_e = go * 2 (e - t) / den, d_s = -go * 2 num / den^2 (s - t), d_t = -(d_e + d_s); any output may be null.
// go is read from the device scalar go_ptr (dtype) or is 1 when go_ptr is null.
const char* traj_bwd(int dtype, const void* go_ptr, const double* stats, const void* e, const void* s, const void* t,
                     void* d_e, void* d_s, void* d_t, int64_t n, cudaStream_t stream);

// Fused DSA pass (colour -> crop -> cutout -> flip, the groups present in `flags`) on [B, C, H, W] images;
// params: [rows, kDsaParams] doubles on the device, rows = 1 (siamese) or B.
const char* dsa_fwd(int dtype, const void* x, void* y, const double* params, int rows, int B, int C, int H, int W,
                    int flags, cudaStream_t stream);
// Its adjoint (the transposed linear map) applied to dy.
const char* dsa_bwd(int dtype, const void* dy, void* dx, const double* params, int rows, int B, int C, int H, int W,
                    int flags, cudaStream_t stream);

}  // namespace fedlatent_ops
