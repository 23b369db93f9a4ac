// silu(gate) * up over rows of [gate | up], computed in f32 and rounded once.
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

// One block per row; `x` is (rows, 2 * d) contiguous, `out` is (rows, d).
template <typename T>
__device__ void silu_and_mul(const T* __restrict__ x, T* __restrict__ out, uint32_t d) {
    const uint64_t row = blockIdx.x;
    const T* gate = x + row * 2 * d;
    const T* up = gate + d;
    T* dst = out + row * d;
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) {
        const float g = to_f32(gate[i]);
        const float u = to_f32(up[i]);
        dst[i] = from_f32<T>(g / (1.0f + __expf(-g)) * u);
    }
}

#define SILU_AND_MUL(NAME, T) \
    extern "C" __global__ void NAME(const T* x, T* out, uint32_t d) { silu_and_mul<T>(x, out, d); }

SILU_AND_MUL(silu_and_mul_f32, float)
SILU_AND_MUL(silu_and_mul_bf16, __nv_bfloat16)
SILU_AND_MUL(silu_and_mul_f16, __half)
