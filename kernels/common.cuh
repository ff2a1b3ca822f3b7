// Shared pieces of the hetccl kernels: element types, the wire-format numeric policy,
// 16-byte vector access, and the overflow counters.
//
// Every kernel has a CPU twin in src/ with the same name and argument order; results
// must match bit for bit. Hence explicit __fmul_rn / __fadd_rn everywhere: nvcc would
// otherwise contract a*b+c into an FMA, which rounds once where the CPU rounds twice.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifdef __CUDACC_RTC__
// NVRTC (the Volta build: scripts/nvrtc-compile.py) has no C library headers.
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef unsigned long long uintptr_t;
#else
#include <stdint.h>
#endif

namespace hetccl {

// Element types as stored in memory; all arithmetic is done in f32.
struct F32 {
    using storage = float;
    static __device__ __forceinline__ float load(float x) { return x; }
    static __device__ __forceinline__ float store(float v) { return v; }
    static __device__ __forceinline__ float nan() { return __uint_as_float(0x7FC00000u); }
};

struct F16 {
    using storage = uint16_t;
    static constexpr float MAX = 65504.0f;
    static constexpr uint16_t MAX_BITS = 0x7BFF, INF_BITS = 0x7C00, NAN_BITS = 0x7E00;
    static __device__ __forceinline__ float load(uint16_t b) { return __half2float(__ushort_as_half(b)); }
    // cvt.rn.f16.f32: round-to-nearest-even, subnormals kept (no -ftz for these files).
    static __device__ __forceinline__ uint16_t store(float v) { return __half_as_ushort(__float2half_rn(v)); }
    static __device__ __forceinline__ uint16_t nan() { return NAN_BITS; }
};

struct BF16 {
    using storage = uint16_t;
    static constexpr float MAX = 3.3895313892515355e38f;
    static constexpr uint16_t MAX_BITS = 0x7F7F, INF_BITS = 0x7F80, NAN_BITS = 0x7FC0;
    // A plain shift, NaN payload included, as the CPU twin does.
    static __device__ __forceinline__ float load(uint16_t b) { return __uint_as_float(uint32_t(b) << 16); }
    static __device__ __forceinline__ uint16_t store(float v) {
        return __bfloat16_as_ushort(__float2bfloat16_rn(v));
    }
    static __device__ __forceinline__ uint16_t nan() { return NAN_BITS; }
};

// Per-thread counts, summed per warp and added to stats[0] (overflow), stats[1] (nonfinite).
struct Counts {
    unsigned overflow = 0;
    unsigned nonfinite = 0;
};

// The sum of v over the warp, in every lane. __reduce_add_sync is one instruction from
// sm_80 on; Turing and Volta (sm_75, sm_70) lack it and take five shuffles instead. Both
// give the same integer, so the counts do not depend on the architecture.
__device__ __forceinline__ unsigned warp_sum(unsigned v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return __reduce_add_sync(0xFFFFFFFFu, v);
#else
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, d);
    return v;
#endif
}

// Call from every thread of the block (warp-synchronous; blockDim is a multiple of 32).
__device__ __forceinline__ void flush_counts(const Counts& c, unsigned long long* stats) {
    unsigned o = warp_sum(c.overflow);
    unsigned f = warp_sum(c.nonfinite);
    if ((threadIdx.x & 31) == 0 && stats != nullptr) {
        if (o) atomicAdd(&stats[0], (unsigned long long)o);
        if (f) atomicAdd(&stats[1], (unsigned long long)f);
    }
}

// The wire-format policy (src/compression/mod.rs documents it): returns the wire bits of
// v and sets res to what is left for the next step.
template <typename W>
__device__ __forceinline__ uint16_t encode(float v, bool inputs_finite, float& res, Counts& c) {
    const uint16_t sign = uint16_t((__float_as_uint(v) >> 16) & 0x8000u);
    if (isnan(v)) {
        c.nonfinite++;
        res = 0.0f;
        return W::NAN_BITS;
    }
    if (isinf(v)) {
        res = 0.0f;
        if (inputs_finite) {
            c.overflow++;
            return W::MAX_BITS | sign;
        }
        c.nonfinite++;
        return W::INF_BITS | sign;
    }
    if (fabsf(v) > W::MAX) {
        c.overflow++;
        res = __fsub_rn(v, copysignf(W::MAX, v));
        return W::MAX_BITS | sign;
    }
    const uint16_t w = W::store(v);
    res = __fsub_rn(v, W::load(w));
    return w;
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Kernels that mix 2- and 4-byte elements (the wire-format ones) walk the data in warp
// tiles of 256 elements: item g of the grid-stride loop is lane g % 32 of tile g / 32 and
// takes 8 elements, 4 at tile_first(g) and 4 more at tile_first(g) + 128. Each load or
// store instruction of a warp then covers 512 (f32) or 256 (u16) contiguous bytes, whole
// 32-byte sectors. Eight contiguous elements per thread would instead make every f32
// access instruction write half of each sector it touches, which costs the write-heavy
// f16 -> f32 expansion about a fifth of its bandwidth on an H100.
constexpr size_t TILE = 256;
__device__ __forceinline__ size_t tile_first(size_t g) { return (g / 32) * TILE + (g % 32) * 4; }

// x[0..4] = p[0..4], x[4..8] = p[128..132]: two 16-byte (f32) or 8-byte (u16) accesses;
// p is 16-byte aligned for f32 and 8-byte aligned for u16.
__device__ __forceinline__ void load8(const float* p, float (&x)[8]) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + TILE / 2);
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
    x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
}
__device__ __forceinline__ void store8(float* p, const float (&x)[8]) {
    *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
    *reinterpret_cast<float4*>(p + TILE / 2) = make_float4(x[4], x[5], x[6], x[7]);
}
__device__ __forceinline__ void load8(const uint16_t* p, uint16_t (&x)[8]) {
    const uint2 a = *reinterpret_cast<const uint2*>(p);
    const uint2 b = *reinterpret_cast<const uint2*>(p + TILE / 2);
    const uint32_t w[4] = {a.x, a.y, b.x, b.y};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        x[2 * k] = uint16_t(w[k] & 0xFFFFu);
        x[2 * k + 1] = uint16_t(w[k] >> 16);
    }
}
__device__ __forceinline__ void store8(uint16_t* p, const uint16_t (&x)[8]) {
    uint2 a, b;
    a.x = uint32_t(x[0]) | (uint32_t(x[1]) << 16);
    a.y = uint32_t(x[2]) | (uint32_t(x[3]) << 16);
    b.x = uint32_t(x[4]) | (uint32_t(x[5]) << 16);
    b.y = uint32_t(x[6]) | (uint32_t(x[7]) << 16);
    *reinterpret_cast<uint2*>(p) = a;
    *reinterpret_cast<uint2*>(p + TILE / 2) = b;
}

__device__ __forceinline__ size_t global_thread() { return size_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ size_t grid_threads() { return size_t(gridDim.x) * blockDim.x; }

}  // namespace hetccl
