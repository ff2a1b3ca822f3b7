// Element-wise reductions; CPU twins in src/reduce/ (reduce_inplace, reduce_from,
// reduce_finalize). f32, f16 and bf16 are all computed in f32 and rounded once per
// element, as the CPU's half types do. Kernel names: reduce_inplace_<op>_<dtype>,
// reduce_from_<op>_<dtype>, reduce_finalize_avg_<dtype>; arguments are the CPU twin's
// slices, then n. Avg accumulates as a sum; reduce_finalize_avg divides by world_size.
//
// Results are bitwise the CPU's except NaN payloads of sum/prod (the GPU returns its
// canonical NaN); max/min write the same canonical NaN as the CPU.
#include "common.cuh"

namespace hetccl {

enum class Op { Sum, Prod, Max, Min };

template <Op OP, typename T>
__device__ __forceinline__ typename T::storage apply(typename T::storage a, typename T::storage b) {
    const float x = T::load(a), y = T::load(b);
    switch (OP) {
        case Op::Sum: return T::store(__fadd_rn(x, y));
        case Op::Prod: return T::store(__fmul_rn(x, y));
        // Written as the CPU's `a >= b ? a : b` (not fmaxf): same choice between -0 and +0.
        case Op::Max: return (isnan(x) || isnan(y)) ? T::nan() : T::store(x >= y ? x : y);
        case Op::Min: return (isnan(x) || isnan(y)) ? T::nan() : T::store(x <= y ? x : y);
    }
    return a;
}

// 16 bytes of elements per vector step.
template <typename T>
struct Vec16 {
    static constexpr int N = 16 / sizeof(typename T::storage);
    typename T::storage v[N];
    __device__ __forceinline__ void load(const typename T::storage* p) {
        *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(p);
    }
    __device__ __forceinline__ void store(typename T::storage* p) const {
        *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v);
    }
};

// dst = a (op) b, elementwise; dst may alias a (reduce_inplace passes dst as a).
template <Op OP, typename T>
__device__ __forceinline__ void reduce3(typename T::storage* dst, const typename T::storage* a,
                                        const typename T::storage* b, size_t n) {
    using V = Vec16<T>;
    size_t done = 0;
    if (aligned16(dst) && aligned16(a) && aligned16(b)) {
        const size_t groups = n / V::N;
        for (size_t g = global_thread(); g < groups; g += grid_threads()) {
            alignas(16) V x, y;
            x.load(a + V::N * g);
            y.load(b + V::N * g);
#pragma unroll
            for (int k = 0; k < V::N; ++k) x.v[k] = apply<OP, T>(x.v[k], y.v[k]);
            x.store(dst + V::N * g);
        }
        done = groups * V::N;
    }
    for (size_t i = done + global_thread(); i < n; i += grid_threads()) dst[i] = apply<OP, T>(a[i], b[i]);
}

template <typename T>
__device__ __forceinline__ void finalize_avg(typename T::storage* dst, unsigned long long world_size,
                                             size_t n) {
    const float w = float(world_size);
    for (size_t i = global_thread(); i < n; i += grid_threads()) {
        dst[i] = T::store(__fdiv_rn(T::load(dst[i]), w));
    }
}

}  // namespace hetccl

#define HETCCL_REDUCE_OP(OPNAME, OP, TNAME, T)                                                     \
    extern "C" __global__ void __launch_bounds__(256) reduce_inplace_##OPNAME##_##TNAME(           \
        hetccl::T::storage* dst, const hetccl::T::storage* src, size_t n) {                        \
        hetccl::reduce3<hetccl::Op::OP, hetccl::T>(dst, dst, src, n);                              \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) reduce_from_##OPNAME##_##TNAME(              \
        hetccl::T::storage* dst, const hetccl::T::storage* a, const hetccl::T::storage* b,         \
        size_t n) {                                                                                \
        hetccl::reduce3<hetccl::Op::OP, hetccl::T>(dst, a, b, n);                                  \
    }

// avg accumulates like sum; reduce_finalize_avg_* divides at the end.
#define HETCCL_REDUCE_TYPE(TNAME, T)                                                               \
    HETCCL_REDUCE_OP(sum, Sum, TNAME, T)                                                           \
    HETCCL_REDUCE_OP(avg, Sum, TNAME, T)                                                           \
    HETCCL_REDUCE_OP(prod, Prod, TNAME, T)                                                         \
    HETCCL_REDUCE_OP(max, Max, TNAME, T)                                                           \
    HETCCL_REDUCE_OP(min, Min, TNAME, T)                                                           \
    extern "C" __global__ void __launch_bounds__(256) reduce_finalize_avg_##TNAME(                 \
        hetccl::T::storage* dst, unsigned long long world_size, size_t n) {                        \
        hetccl::finalize_avg<hetccl::T>(dst, world_size, n);                                       \
    }

HETCCL_REDUCE_TYPE(f32, F32)
HETCCL_REDUCE_TYPE(f16, F16)
HETCCL_REDUCE_TYPE(bf16, BF16)
