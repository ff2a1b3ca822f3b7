// fp16 / bf16 wire-format kernels; CPU twins in src/compression/ (same names, same
// argument order, bitwise the same results). Grid-stride loops over warp tiles of 256
// elements (common.cuh, tile_first) when every pointer is 16-byte aligned, then a scalar
// tail. Launch with blockDim.x a multiple of 32.
//
// Arguments after the CPU twin's: n (elements) and stats (2 x u64: overflow, nonfinite;
// added to, never reset here).
#include "common.cuh"

namespace hetccl {

// dst = W(src*scale + residual); residual = what rounding left.   src, residual, dst: (n,)
template <typename W, bool RES, bool VEC>
__device__ __forceinline__ void compress_impl(const float* __restrict__ src, float scale,
                                              float* __restrict__ res, uint16_t* __restrict__ dst,
                                              size_t n, Counts& c) {
    size_t done = 0;
    if (VEC) {
        const size_t groups = n / TILE * 32;
        for (size_t g = global_thread(); g < groups; g += grid_threads()) {
            float s[8], r[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            uint16_t o[8];
            const size_t i = tile_first(g);
            load8(src + i, s);
            if (RES) load8(res + i, r);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const float v = RES ? __fadd_rn(__fmul_rn(s[k], scale), r[k]) : __fmul_rn(s[k], scale);
                const bool fin = isfinite(s[k]) && (!RES || isfinite(r[k]));
                o[k] = encode<W>(v, fin, r[k], c);
            }
            store8(dst + i, o);
            if (RES) store8(res + i, r);
        }
        done = n / TILE * TILE;
    }
    for (size_t i = done + global_thread(); i < n; i += grid_threads()) {
        const float s = src[i];
        float r = RES ? res[i] : 0.0f;
        const float v = RES ? __fadd_rn(__fmul_rn(s, scale), r) : __fmul_rn(s, scale);
        dst[i] = encode<W>(v, isfinite(s) && (!RES || isfinite(r)), r, c);
        if (RES) res[i] = r;
    }
}

template <typename W>
__device__ __forceinline__ void compress(const float* src, float scale, float* res, uint16_t* dst,
                                         size_t n, unsigned long long* stats) {
    Counts c;
    const bool vec = aligned16(src) && aligned16(dst) && (res == nullptr || aligned16(res));
    if (res != nullptr) {
        if (vec) compress_impl<W, true, true>(src, scale, res, dst, n, c);
        else compress_impl<W, true, false>(src, scale, res, dst, n, c);
    } else {
        if (vec) compress_impl<W, false, true>(src, scale, nullptr, dst, n, c);
        else compress_impl<W, false, false>(src, scale, nullptr, dst, n, c);
    }
    flush_counts(c, stats);
}

// dst = f32(src) (ADD: dst += f32(src)).   src, dst: (n,)
template <typename W, bool ADD>
__device__ __forceinline__ void decompress(const uint16_t* __restrict__ src, float* __restrict__ dst,
                                           size_t n) {
    size_t done = 0;
    if (aligned16(src) && aligned16(dst)) {
        const size_t groups = n / TILE * 32;
        for (size_t g = global_thread(); g < groups; g += grid_threads()) {
            uint16_t h[8];
            float d[8];
            const size_t i = tile_first(g);
            load8(src + i, h);
            if (ADD) load8(dst + i, d);
#pragma unroll
            for (int k = 0; k < 8; ++k) d[k] = ADD ? __fadd_rn(d[k], W::load(h[k])) : W::load(h[k]);
            store8(dst + i, d);
        }
        done = n / TILE * TILE;
    }
    for (size_t i = done + global_thread(); i < n; i += grid_threads()) {
        dst[i] = ADD ? __fadd_rn(dst[i], W::load(src[i])) : W::load(src[i]);
    }
}

// The ring's reduce step, one rounding: dst = W(f32(incoming) + (local*scale + residual)).
// incoming, local, residual, dst: (n,). incoming and dst may be the same buffer (each
// element is read before it is written, by the same thread), so they are not __restrict__.
template <typename W, bool RES, bool VEC>
__device__ __forceinline__ void fused_impl(const uint16_t* incoming, const float* __restrict__ local,
                                           float scale, float* __restrict__ res, uint16_t* dst,
                                           size_t n, Counts& c) {
    size_t done = 0;
    if (VEC) {
        const size_t groups = n / TILE * 32;
        for (size_t g = global_thread(); g < groups; g += grid_threads()) {
            uint16_t h[8], o[8];
            float l[8], r[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            const size_t i = tile_first(g);
            load8(incoming + i, h);
            load8(local + i, l);
            if (RES) load8(res + i, r);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const float x = W::load(h[k]);
                const float t = RES ? __fadd_rn(__fmul_rn(l[k], scale), r[k]) : __fmul_rn(l[k], scale);
                const bool fin = isfinite(x) && isfinite(l[k]) && (!RES || isfinite(r[k]));
                o[k] = encode<W>(__fadd_rn(x, t), fin, r[k], c);
            }
            store8(dst + i, o);
            if (RES) store8(res + i, r);
        }
        done = n / TILE * TILE;
    }
    for (size_t i = done + global_thread(); i < n; i += grid_threads()) {
        const float x = W::load(incoming[i]);
        const float l = local[i];
        float r = RES ? res[i] : 0.0f;
        const float t = RES ? __fadd_rn(__fmul_rn(l, scale), r) : __fmul_rn(l, scale);
        const bool fin = isfinite(x) && isfinite(l) && (!RES || isfinite(r));
        dst[i] = encode<W>(__fadd_rn(x, t), fin, r, c);
        if (RES) res[i] = r;
    }
}

template <typename W>
__device__ __forceinline__ void decompress_add_compress(const uint16_t* incoming, const float* local,
                                                        float scale, float* res, uint16_t* dst,
                                                        size_t n, unsigned long long* stats) {
    Counts c;
    const bool vec = aligned16(incoming) && aligned16(local) && aligned16(dst) &&
                     (res == nullptr || aligned16(res));
    if (res != nullptr) {
        if (vec) fused_impl<W, true, true>(incoming, local, scale, res, dst, n, c);
        else fused_impl<W, true, false>(incoming, local, scale, res, dst, n, c);
    } else {
        if (vec) fused_impl<W, false, true>(incoming, local, scale, nullptr, dst, n, c);
        else fused_impl<W, false, false>(incoming, local, scale, nullptr, dst, n, c);
    }
    flush_counts(c, stats);
}

}  // namespace hetccl

#define HETCCL_WIRE_KERNELS(PREFIX, W)                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                              \
        PREFIX##_compress(const float* src, float scale, float* residual, uint16_t* dst, size_t n, \
                          unsigned long long* stats) {                                             \
        hetccl::compress<hetccl::W>(src, scale, residual, dst, n, stats);                          \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                              \
        PREFIX##_decompress(const uint16_t* src, float* dst, size_t n) {                           \
        hetccl::decompress<hetccl::W, false>(src, dst, n);                                         \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                              \
        PREFIX##_decompress_add(const uint16_t* src, float* dst, size_t n) {                       \
        hetccl::decompress<hetccl::W, true>(src, dst, n);                                          \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) PREFIX##_decompress_add_compress(            \
        const uint16_t* incoming, const float* local, float scale, float* residual, uint16_t* dst, \
        size_t n, unsigned long long* stats) {                                                     \
        hetccl::decompress_add_compress<hetccl::W>(incoming, local, scale, residual, dst, n,       \
                                                   stats);                                         \
    }

HETCCL_WIRE_KERNELS(fp16, F16)
HETCCL_WIRE_KERNELS(bf16, BF16)
