// fedlatent custom CUDA kernels (written for fedlatent; see fedlatent/ops/__init__.py for the math).
//
// Deliberately free of PyTorch headers: nvcc only sees the CUDA runtime, so the first-use build is
// short. Arithmetic runs in the "accumulation type" of the storage type (float for float16/bfloat16/
// float32, double for float64); reductions accumulate in double (trajectory loss) or in the
// accumulation type inside one block (DSA colour statistics), in a fixed order (deterministic).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fedlatent_ops.h"

namespace fedlatent_ops {
namespace {

constexpr int kThreads = 256;

template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccT<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_sums[32];
  __shared__ A total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();  // the shared buffers may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? warp_sums[lane] : A(0);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

inline unsigned grid_for(int64_t n, int64_t cap = int64_t(1) << 20) {
  int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks < 1) blocks = 1;
  if (blocks > cap) blocks = cap;
  return static_cast<unsigned>(blocks);
}

inline const char* last_error() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

#define FL_DISPATCH(DTYPE, ...)                                      \
  switch (DTYPE) {                                                   \
    case kFloat32: { using scalar_t = float; __VA_ARGS__; break; }   \
    case kFloat64: { using scalar_t = double; __VA_ARGS__; break; }  \
    case kFloat16: { using scalar_t = __half; __VA_ARGS__; break; }  \
    case kBFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return "fedlatent_ops: unsupported dtype";              \
  }

// ---------------------------------------------------------------------------------------------
// bias + leaky ReLU + gain
// ---------------------------------------------------------------------------------------------
template <typename T, typename I>
__global__ void bias_act_fwd_kernel(const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ y, I n, I inner,
                                    I channels, typename AccT<T>::type alpha, typename AccT<T>::type gain) {
  using A = typename AccT<T>::type;
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += I(blockDim.x) * gridDim.x) {
    A v = to_acc(x[i]);
    if (b != nullptr) v += to_acc(b[(i / inner) % channels]);
    v = v > A(0) ? v : v * alpha;
    y[i] = from_acc<T>(v * gain);
  }
}

template <typename T, typename I>
__global__ void bias_act_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, I n,
                                    typename AccT<T>::type alpha, typename AccT<T>::type gain) {
  using A = typename AccT<T>::type;
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += I(blockDim.x) * gridDim.x) {
    const A g = to_acc(dy[i]) * gain;
    dx[i] = from_acc<T>(to_acc(y[i]) > A(0) ? g : g * alpha);
  }
}

// ---------------------------------------------------------------------------------------------
// flat-parameter SGD step
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void sgd_step_kernel(const T* __restrict__ theta, const T* __restrict__ g, const T* __restrict__ lr_ptr,
                                typename AccT<T>::type lr, T* __restrict__ out, int64_t n) {
  using A = typename AccT<T>::type;
  const A a = lr_ptr != nullptr ? to_acc(lr_ptr[0]) : lr;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x)
    out[i] = from_acc<T>(to_acc(theta[i]) - a * to_acc(g[i]));
}

// ---------------------------------------------------------------------------------------------
// trajectory loss (MTT eq. 2)
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void traj_partial_kernel(const T* __restrict__ e, const T* __restrict__ s, const T* __restrict__ t,
                                    int64_t n, double* __restrict__ partials) {
  double num = 0.0, den = 0.0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    const double tv = static_cast<double>(to_acc(t[i]));
    const double de = static_cast<double>(to_acc(e[i])) - tv;
    const double ds = static_cast<double>(to_acc(s[i])) - tv;
    num += de * de;
    den += ds * ds;
  }
  num = block_sum(num);
  den = block_sum(den);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = num;
    partials[2 * blockIdx.x + 1] = den;
  }
}

template <typename T>
__global__ void traj_final_kernel(const double* __restrict__ partials, int nblocks, T* __restrict__ loss,
                                  double* __restrict__ stats) {
  double num = 0.0, den = 0.0;
  for (int k = threadIdx.x; k < nblocks; k += blockDim.x) {
    num += partials[2 * k];
    den += partials[2 * k + 1];
  }
  num = block_sum(num);
  den = block_sum(den);
  if (threadIdx.x == 0) {
    stats[0] = num;
    stats[1] = den;
    loss[0] = from_acc<T>(static_cast<typename AccT<T>::type>(num / den));
  }
}

template <typename T>
__global__ void traj_bwd_kernel(const T* __restrict__ go_ptr, const double* __restrict__ stats,
                                const T* __restrict__ e, const T* __restrict__ s, const T* __restrict__ t,
                                T* __restrict__ d_e, T* __restrict__ d_s, T* __restrict__ d_t, int64_t n) {
  using A = typename AccT<T>::type;
  const double go = go_ptr != nullptr ? static_cast<double>(to_acc(go_ptr[0])) : 1.0;
  const double num = stats[0], den = stats[1];
  const A ce = static_cast<A>(2.0 * go / den);
  const A cs = static_cast<A>(-2.0 * go * num / (den * den));
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    const A tv = to_acc(t[i]);
    const A ge = ce * (to_acc(e[i]) - tv);
    const A gs = (d_s != nullptr || d_t != nullptr) ? cs * (to_acc(s[i]) - tv) : A(0);
    if (d_e != nullptr) d_e[i] = from_acc<T>(ge);
    if (d_s != nullptr) d_s[i] = from_acc<T>(gs);
    if (d_t != nullptr) d_t[i] = from_acc<T>(-(ge + gs));
  }
}

// ---------------------------------------------------------------------------------------------
// fused DSA pass: colour -> crop (translate, zero fill) -> cutout -> horizontal flip; one block per image
// ---------------------------------------------------------------------------------------------
struct DsaGeom {
  int sh, sw, ct, cl, ch, cw;
  bool cut, flip;
};

__device__ __forceinline__ DsaGeom dsa_geom(const double* p, int flags) {
  DsaGeom g;
  const bool crop = flags & kDsaCrop;
  g.sh = crop ? static_cast<int>(p[3]) : 0;
  g.sw = crop ? static_cast<int>(p[4]) : 0;
  g.cut = flags & kDsaCutout;
  g.ct = static_cast<int>(p[5]);
  g.cl = static_cast<int>(p[6]);
  g.ch = static_cast<int>(p[7]);
  g.cw = static_cast<int>(p[8]);
  g.flip = (flags & kDsaFlip) && p[9] != 0.0;
  return g;
}

// Output pixel (i, j) -> source pixel of the colour-transformed image, or -1 (a zero of crop/cutout).
__device__ __forceinline__ int dsa_source(const DsaGeom& g, int i, int j, int H, int W) {
  const int j1 = g.flip ? W - 1 - j : j;
  if (g.cut && i >= g.ct && i < g.ct + g.ch && j1 >= g.cl && j1 < g.cl + g.cw) return -1;
  const int si = i + g.sh, sj = j1 + g.sw;
  if (si < 0 || si >= H || sj < 0 || sj >= W) return -1;
  return si * W + sj;
}

// Source pixel (si, sj) -> the output pixel that reads it, or -1 (the map is injective).
__device__ __forceinline__ int dsa_target(const DsaGeom& g, int si, int sj, int H, int W) {
  const int i = si - g.sh, j1 = sj - g.sw;
  if (i < 0 || i >= H || j1 < 0 || j1 >= W) return -1;
  if (g.cut && i >= g.ct && i < g.ct + g.ch && j1 >= g.cl && j1 < g.cl + g.cw) return -1;
  return i * W + (g.flip ? W - 1 - j1 : j1);
}

template <typename T>
__global__ void dsa_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, const double* __restrict__ params,
                               int rows, int C, int H, int W, int flags) {
  using A = typename AccT<T>::type;
  const int b = blockIdx.x, HW = H * W;
  const double* p = params + (rows == 1 ? 0 : b) * kDsaParams;
  const int64_t off = int64_t(b) * C * HW;
  const T* xb = x + off;
  T* yb = y + off;
  const bool color = flags & kDsaColor;
  A bright = A(0), sat = A(1), con = A(1), mean_all = A(0);
  if (color) {
    bright = static_cast<A>(p[0]);
    sat = static_cast<A>(p[1]);
    con = static_cast<A>(p[2]);
    A local = A(0);
    for (int k = threadIdx.x; k < C * HW; k += blockDim.x) local += to_acc(xb[k]);
    mean_all = block_sum(local) / static_cast<A>(C * HW);
  }
  const DsaGeom g = dsa_geom(p, flags);
  for (int q = threadIdx.x; q < HW; q += blockDim.x) {
    const int src = dsa_source(g, q / W, q % W, H, W);
    if (src < 0) {
      for (int c = 0; c < C; ++c) yb[c * HW + q] = from_acc<T>(A(0));
    } else if (color) {
      // brightness, saturation, contrast in closed form (see fedlatent/ops/__init__.py)
      A mc = A(0);
      for (int c = 0; c < C; ++c) mc += to_acc(xb[c * HW + src]);
      mc /= static_cast<A>(C);
      for (int c = 0; c < C; ++c) {
        const A v = to_acc(xb[c * HW + src]);
        yb[c * HW + q] = from_acc<T>(((v - mc) * sat + mc - mean_all) * con + mean_all + bright);
      }
    } else {
      for (int c = 0; c < C; ++c) yb[c * HW + q] = xb[c * HW + src];
    }
  }
}

template <typename T>
__global__ void dsa_bwd_kernel(const T* __restrict__ dy, T* __restrict__ dx, const double* __restrict__ params,
                               int rows, int C, int H, int W, int flags) {
  using A = typename AccT<T>::type;
  const int b = blockIdx.x, HW = H * W;
  const double* p = params + (rows == 1 ? 0 : b) * kDsaParams;
  const int64_t off = int64_t(b) * C * HW;
  const T* dyb = dy + off;
  T* dxb = dx + off;
  const bool color = flags & kDsaColor;
  const DsaGeom g = dsa_geom(p, flags);
  A sat = A(1), con = A(1), total = A(0);
  if (color) {
    sat = static_cast<A>(p[1]);
    con = static_cast<A>(p[2]);
    A local = A(0);
    for (int q = threadIdx.x; q < HW; q += blockDim.x) {
      if (dsa_source(g, q / W, q % W, H, W) < 0) continue;
      for (int c = 0; c < C; ++c) local += to_acc(dyb[c * HW + q]);
    }
    total = block_sum(local);
  }
  const A k_self = con * sat, k_pix = con * (A(1) - sat) / static_cast<A>(C);
  const A k_all = (A(1) - con) / static_cast<A>(C * HW) * total;
  for (int sq = threadIdx.x; sq < HW; sq += blockDim.x) {
    const int q = dsa_target(g, sq / W, sq % W, H, W);
    if (!color) {
      for (int c = 0; c < C; ++c) dxb[c * HW + sq] = q < 0 ? from_acc<T>(A(0)) : dyb[c * HW + q];
      continue;
    }
    A sc = A(0);
    if (q >= 0)
      for (int c = 0; c < C; ++c) sc += to_acc(dyb[c * HW + q]);
    for (int c = 0; c < C; ++c) {
      const A dz = q >= 0 ? to_acc(dyb[c * HW + q]) : A(0);
      dxb[c * HW + sq] = from_acc<T>(k_self * dz + k_pix * sc + k_all);
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------------------------
const char* bias_act_fwd(int dtype, const void* x, const void* b, void* y, int64_t n, int64_t inner, int64_t channels,
                         double alpha, double gain, cudaStream_t stream) {
  if (n == 0) return nullptr;
  const unsigned grid = grid_for(n);
  FL_DISPATCH(dtype, {
    using A = typename AccT<scalar_t>::type;
    const auto* xp = static_cast<const scalar_t*>(x);
    const auto* bp = static_cast<const scalar_t*>(b);
    auto* yp = static_cast<scalar_t*>(y);
    if (n < (int64_t(1) << 31))
      bias_act_fwd_kernel<scalar_t, uint32_t><<<grid, kThreads, 0, stream>>>(
          xp, bp, yp, uint32_t(n), uint32_t(inner), uint32_t(channels), A(alpha), A(gain));
    else
      bias_act_fwd_kernel<scalar_t, int64_t><<<grid, kThreads, 0, stream>>>(xp, bp, yp, n, inner, channels, A(alpha),
                                                                            A(gain));
  });
  return last_error();
}

const char* bias_act_bwd(int dtype, const void* dy, const void* y, void* dx, int64_t n, double alpha, double gain,
                         cudaStream_t stream) {
  if (n == 0) return nullptr;
  const unsigned grid = grid_for(n);
  FL_DISPATCH(dtype, {
    using A = typename AccT<scalar_t>::type;
    const auto* dyp = static_cast<const scalar_t*>(dy);
    const auto* yp = static_cast<const scalar_t*>(y);
    auto* dxp = static_cast<scalar_t*>(dx);
    if (n < (int64_t(1) << 31))
      bias_act_bwd_kernel<scalar_t, uint32_t><<<grid, kThreads, 0, stream>>>(dyp, yp, dxp, uint32_t(n), A(alpha),
                                                                             A(gain));
    else
      bias_act_bwd_kernel<scalar_t, int64_t><<<grid, kThreads, 0, stream>>>(dyp, yp, dxp, n, A(alpha), A(gain));
  });
  return last_error();
}

const char* sgd_step(int dtype, const void* theta, const void* g, const void* lr_ptr, double lr, void* out, int64_t n,
                     cudaStream_t stream) {
  if (n == 0) return nullptr;
  FL_DISPATCH(dtype, {
    using A = typename AccT<scalar_t>::type;
    sgd_step_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(theta), static_cast<const scalar_t*>(g), static_cast<const scalar_t*>(lr_ptr),
        A(lr), static_cast<scalar_t*>(out), n);
  });
  return last_error();
}

int traj_num_blocks(int64_t n) {
  const int64_t per_block = int64_t(kThreads) * 8;
  int64_t blocks = (n + per_block - 1) / per_block;
  if (blocks < 1) blocks = 1;
  if (blocks > 1024) blocks = 1024;
  return static_cast<int>(blocks);
}

const char* traj_fwd(int dtype, const void* e, const void* s, const void* t, int64_t n, double* partials, int nblocks,
                     void* loss, double* stats, cudaStream_t stream) {
  FL_DISPATCH(dtype, {
    traj_partial_kernel<scalar_t><<<nblocks, kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(e), static_cast<const scalar_t*>(s), static_cast<const scalar_t*>(t), n,
        partials);
    traj_final_kernel<scalar_t><<<1, kThreads, 0, stream>>>(partials, nblocks, static_cast<scalar_t*>(loss), stats);
  });
  return last_error();
}

const char* traj_bwd(int dtype, const void* go_ptr, const double* stats, const void* e, const void* s, const void* t,
                     void* d_e, void* d_s, void* d_t, int64_t n, cudaStream_t stream) {
  if (n == 0) return nullptr;
  FL_DISPATCH(dtype, {
    traj_bwd_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(go_ptr), stats, static_cast<const scalar_t*>(e),
        static_cast<const scalar_t*>(s), static_cast<const scalar_t*>(t), static_cast<scalar_t*>(d_e),
        static_cast<scalar_t*>(d_s), static_cast<scalar_t*>(d_t), n);
  });
  return last_error();
}

const char* dsa_fwd(int dtype, const void* x, void* y, const double* params, int rows, int B, int C, int H, int W,
                    int flags, cudaStream_t stream) {
  if (B == 0 || C == 0 || H == 0 || W == 0) return nullptr;
  FL_DISPATCH(dtype, {
    dsa_fwd_kernel<scalar_t><<<B, kThreads, 0, stream>>>(static_cast<const scalar_t*>(x), static_cast<scalar_t*>(y),
                                                         params, rows, C, H, W, flags);
  });
  return last_error();
}

const char* dsa_bwd(int dtype, const void* dy, void* dx, const double* params, int rows, int B, int C, int H, int W,
                    int flags, cudaStream_t stream) {
  if (B == 0 || C == 0 || H == 0 || W == 0) return nullptr;
  FL_DISPATCH(dtype, {
    dsa_bwd_kernel<scalar_t><<<B, kThreads, 0, stream>>>(static_cast<const scalar_t*>(dy),
                                                         static_cast<scalar_t*>(dx), params, rows, C, H, W, flags);
  });
  return last_error();
}

}  // namespace fedlatent_ops
