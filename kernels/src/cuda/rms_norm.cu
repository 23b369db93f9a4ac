// RMSNorm over rows, and the fused residual add + RMSNorm of a pre-norm decoder, as the CPU
// kernels (kernels/src/rms_norm.rs) compute them: the sum of squares in f32, the normalized
// value rounded to the activation dtype, then times the weight in f32 and rounded once.
// add_rms_norm first rounds x + h to the dtype (the residual stream the next layer adds to)
// and normalizes that rounded sum, exactly as an unfused add followed by rms_norm would.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

template <typename T>
__device__ __forceinline__ float to_f32(T x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x) { return static_cast<T>(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float warp_sums[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    const int warps = blockDim.x / 32;
    v = lane < warps ? warp_sums[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One block per row of d. With `h` non-null, the row is x + h rounded to T, written to `sum`.
template <typename T>
__device__ void norm_row(const T* __restrict__ x, const T* __restrict__ h, const T* __restrict__ w,
                         T* __restrict__ sum, T* __restrict__ out, uint32_t d, float eps) {
    const uint64_t base = static_cast<uint64_t>(blockIdx.x) * d;
    float squares = 0.0f;
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) {
        float v = to_f32(x[base + i]);
        if (h != nullptr) {
            const T s = from_f32<T>(v + to_f32(h[base + i]));
            sum[base + i] = s;
            v = to_f32(s);
        }
        squares += v * v;
    }
    const float inv = rsqrtf(block_sum(squares) / static_cast<float>(d) + eps);
    // Each thread reads back only the elements it wrote to `sum` (same i), so no barrier.
    const T* src = h != nullptr ? sum : x;
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) {
        const float normed = to_f32(from_f32<T>(to_f32(src[base + i]) * inv));
        out[base + i] = from_f32<T>(normed * to_f32(w[i]));
    }
}

#define RMS_NORM(NAME, ADD_NAME, T)                                                          \
    extern "C" __global__ void NAME(const T* x, const T* w, T* out, uint32_t d, float eps) {   \
        norm_row<T>(x, nullptr, w, nullptr, out, d, eps);                                      \
    }                                                                                          \
    extern "C" __global__ void ADD_NAME(const T* x, const T* h, const T* w, T* sum, T* out,   \
                                        uint32_t d, float eps) {                               \
        norm_row<T>(x, h, w, sum, out, d, eps);                                                \
    }

RMS_NORM(rms_norm_f32, add_rms_norm_f32, float)
RMS_NORM(rms_norm_bf16, add_rms_norm_bf16, __nv_bfloat16)
RMS_NORM(rms_norm_f16, add_rms_norm_f16, __half)
