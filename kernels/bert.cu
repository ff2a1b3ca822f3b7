// The BERT trainer's kernels (launched by trainer/src/gpu.rs). Each is the twin of the
// function of the same name in trainer/src/ops.rs or trainer/src/optim.rs, with the same
// argument order; shapes as there: N rows, C (or OC) channels, T sequence length, V
// vocabulary, all row-major f32.
//
// Where the CPU's order of operations can be followed, it is, with explicit __fmul_rn /
// __fadd_rn / __fdiv_rn / __fsqrt_rn (nvcc would otherwise contract a*b+c into an FMA,
// which rounds once where the CPU rounds twice), so the result is the CPU's bit for bit:
// elementwise ops, the softmax over an attention row (its 8-lane sums replayed), every
// reduction over rows (one thread per column walks the rows in order, as the CPU does),
// AdamW, the gradient norm. Where a row is reduced by a warp or a block (layernorm's
// row statistics, the cross-entropy's log-sum-exp) the order differs and the trainer's
// tests state a tolerance.
//
// Every kernel runs 256-thread blocks (BERT_BLOCK; the launchers use the same number).
#pragma once

#include "common.cuh"

#define BERT_BLOCK 256

namespace bert {

// ---------------------------------------------------------------------------------------
// ops.rs's exp_f32 and tanh_f32, operation for operation (see there for the method).

__device__ __forceinline__ float exp_f32(float x) {
    const float LOG2E = 1.44269504088896340736f;
    const float LN2_HI = 0.6933594f;
    const float LN2_LO = -2.1219444e-4f;
    const float ROUND = 12582912.0f;
    // f32::clamp: below the low end -> low end, then above the high end -> high end.
    if (x < -87.0f) x = -87.0f;
    if (x > 88.0f) x = 88.0f;
    float shifted = __fadd_rn(__fmul_rn(x, LOG2E), ROUND);
    float n = __fsub_rn(shifted, ROUND);
    int n_int = (int)(__float_as_uint(shifted) - __float_as_uint(ROUND));
    float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, LN2_HI)), __fmul_rn(n, LN2_LO));
    // Horner from the innermost term, as the Rust expression nests.
    float p = __fmul_rn(r, 1.0f / 5040.0f);
    p = __fmul_rn(r, __fadd_rn(1.0f / 720.0f, p));
    p = __fmul_rn(r, __fadd_rn(1.0f / 120.0f, p));
    p = __fmul_rn(r, __fadd_rn(1.0f / 24.0f, p));
    p = __fmul_rn(r, __fadd_rn(1.0f / 6.0f, p));
    p = __fmul_rn(r, __fadd_rn(0.5f, p));
    p = __fmul_rn(r, __fadd_rn(1.0f, p));
    p = __fadd_rn(1.0f, p);
    unsigned bits = ((unsigned)(n_int + 127)) << 23;
    return __fmul_rn(p, __uint_as_float(bits));
}

__device__ __forceinline__ float tanh_f32(float x) {
    return __fsub_rn(1.0f, __fdiv_rn(2.0f, __fadd_rn(exp_f32(__fmul_rn(2.0f, x)), 1.0f)));
}

// GELU's constants as ops.rs makes them: f64 values rounded once to f32.
#define GELU_S ((float)0.7978845608028654)
#define GELU_K ((float)0.044715)
#define GELU_K3 ((float)(3.0 * 0.044715))

// 0.5·x·(1 + tanh(s·(x + k·x³))), evaluated left to right as gelu_forward does.
__device__ __forceinline__ float gelu(float x) {
    float cube = __fmul_rn(__fmul_rn(__fmul_rn(GELU_K, x), x), x);
    float th = tanh_f32(__fmul_rn(GELU_S, __fadd_rn(x, cube)));
    return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.0f, th));
}

// gelu'(x), evaluated as gelu_backward does.
__device__ __forceinline__ float gelu_grad(float x) {
    float cube = __fmul_rn(__fmul_rn(__fmul_rn(GELU_K, x), x), x);
    float th = tanh_f32(__fmul_rn(GELU_S, __fadd_rn(x, cube)));
    float sech2 = __fsub_rn(1.0f, __fmul_rn(th, th));
    float poly = __fadd_rn(1.0f, __fmul_rn(__fmul_rn(GELU_K3, x), x));
    float right = __fmul_rn(__fmul_rn(__fmul_rn(__fmul_rn(0.5f, x), sech2), GELU_S), poly);
    return __fadd_rn(__fmul_rn(0.5f, __fadd_rn(1.0f, th)), right);
}

__device__ __forceinline__ float warp_sum_f(float v) {
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xFFFFFFFFu, v, d));
    return v;
}

__device__ __forceinline__ float warp_max_f(float v) {
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, d));
    return v;
}

// ops.rs's 8-lane reductions over one row of a warp: lane k < 8 has summed the elements
// k, k+8, ... below `whole` (= len/8*8) in order; every lane gets the same tree of the
// eight partial sums.
__device__ __forceinline__ float lanes8_tree(float acc) {
    float a[8];
#pragma unroll
    for (int k = 0; k < 8; k++) a[k] = __shfl_sync(0xFFFFFFFFu, acc, k);
    return __fadd_rn(__fadd_rn(__fadd_rn(a[0], a[1]), __fadd_rn(a[2], a[3])),
                     __fadd_rn(__fadd_rn(a[4], a[5]), __fadd_rn(a[6], a[7])));
}

}  // namespace bert

// ---------------------------------------------------------------------------------------
// bias + GELU

// inp (N,OC) += bias (OC) broadcast over rows, in place (kept for the backward pass);
// out (N,OC) = gelu(inp). One thread per element, grid-stride.
extern "C" __global__ void __launch_bounds__(BERT_BLOCK)
    bias_gelu_forward(float* out, float* inp, const float* bias, int n, int oc) {
    size_t total = (size_t)n * oc;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        float x = __fadd_rn(inp[i], bias[i % oc]);
        inp[i] = x;
        out[i] = bert::gelu(x);
    }
}

// g = gelu'(inp)·dout; dinp (N,OC) += g; dbias (OC) += Σ_rows g. One thread per column j
// walks the rows in order (the CPU's order for the bias sum, so no two threads share an
// element); a warp's 32 columns make each row's loads coalesced.
extern "C" __global__ void __launch_bounds__(BERT_BLOCK)
    bias_gelu_backward(float* dinp, float* dbias, const float* inp, const float* dout, int n,
                       int oc) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= oc) return;
    float acc = dbias[j];
    for (int i = 0; i < n; i++) {
        size_t at = (size_t)i * oc + j;
        float g = __fmul_rn(bert::gelu_grad(inp[at]), dout[at]);
        dinp[at] = __fadd_rn(dinp[at], g);
        acc = __fadd_rn(acc, g);
    }
    dbias[j] = acc;
}

// ---------------------------------------------------------------------------------------
// layer norm (post-LN: the model normalises the residual sum)

// One warp per row: out (N,C) = (inp - mean)·rstd·weight + bias; mean, rstd (N).
// The row's sums are a warp's (lane-strided, then a butterfly), not the CPU's sequential
// ones: equal to f32 rounding, not bitwise.
extern "C" __global__ void __launch_bounds__(BERT_BLOCK)
    layernorm_forward(float* out, float* mean, float* rstd, const float* inp,
                      const float* weight, const float* bias, int n, int c) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= n) return;  // whole warps leave together: blockDim is a multiple of 32
    const float* x = inp + (size_t)row * c;
    float inv_c = __fdiv_rn(1.0f, (float)c);
    float s = 0.0f;
    for (int i = lane; i < c; i += 32) s = __fadd_rn(s, x[i]);
    float m = __fmul_rn(bert::warp_sum_f(s), inv_c);
    float v = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float d = __fsub_rn(x[i], m);
        v = __fadd_rn(v, __fmul_rn(d, d));
    }
    float var = __fmul_rn(bert::warp_sum_f(v), inv_c);
    float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, (float)1e-12)));
    float* o = out + (size_t)row * c;
    for (int i = lane; i < c; i += 32) {
        float norm = __fmul_rn(__fsub_rn(x[i], m), r);
        o[i] = __fadd_rn(__fmul_rn(norm, weight[i]), bias[i]);
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

// The row part of layernorm_backward, one warp per row: dinp (N,C) += (dnorm -
// mean(dnorm) - norm·mean(dnorm·norm))·rstd with dnorm = weight·dout. Warp sums: not
// bitwise (see layernorm_forward).
extern "C" __global__ void __launch_bounds__(BERT_BLOCK)
    layernorm_backward_rows(float* dinp, const float* dout, const float* inp,
                            const float* weight, const float* mean, const float* rstd, int n,
                            int c) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= n) return;
    const float* x = inp + (size_t)row * c;
    const float* d = dout + (size_t)row * c;
    float m = mean[row], s = rstd[row];
    float inv_c = __fdiv_rn(1.0f, (float)c);
    float a = 0.0f, b = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float norm = __fmul_rn(__fsub_rn(x[i], m), s);
        float dnorm = __fmul_rn(weight[i], d[i]);
        a = __fadd_rn(a, dnorm);
        b = __fadd_rn(b, __fmul_rn(dnorm, norm));
    }
    float dnorm_mean = __fmul_rn(bert::warp_sum_f(a), inv_c);
    float dnorm_norm_mean = __fmul_rn(bert::warp_sum_f(b), inv_c);
    float* g = dinp + (size_t)row * c;
    for (int i = lane; i < c; i += 32) {
        float norm = __fmul_rn(__fsub_rn(x[i], m), s);
        float dnorm = __fmul_rn(weight[i], d[i]);
        float t = __fsub_rn(__fsub_rn(dnorm, dnorm_mean), __fmul_rn(norm, dnorm_norm_mean));
        g[i] = __fadd_rn(g[i], __fmul_rn(t, s));
    }
}

// The parameter part of layernorm_backward: dweight (C) += Σ_rows (inp - mean)·rstd·dout,
// dbias (C) += Σ_rows dout. One thread per column walks the rows in order: the CPU's sums.
extern "C" __global__ void __launch_bounds__(BERT_BLOCK)
    layernorm_backward_params(float* dweight, float* dbias, const float* dout,
                              const float* inp, const float* mean, const float* rstd, int n,
                              int c) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float w = dweight[j], b = dbias[j];
    for (int row = 0; row < n; row++) {
        size_t at = (size_t)row * c + j;
        float norm = __fmul_rn(__fsub_rn(inp[at], mean[row]), rstd[row]);
        w = __fadd_rn(w, __fmul_rn(norm, dout[at]));
        b = __fadd_rn(b, dout[at]);
    }
    dweight[j] = w;
    dbias[j] = b;
}

// ---------------------------------------------------------------------------------------
// attention softmax (bidirectional: no mask, as the CPU model)

// In place over N rows of T scores (N = B·NH·T): att = softmax(scale·att). One warp per
// row; the sum replays sum_lanes' 8 lanes and tree, so the row is the CPU's bit for bit.
extern "C" __global__ void __launch_bounds__(BERT_BLOCK)
    softmax_forward(float* att, float scale, int n, int t) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= n) return;
    float* a = att + (size_t)row * t;
    float mx = __fmul_rn(a[0], scale);
    for (int j = lane; j < t; j += 32) mx = fmaxf(mx, __fmul_rn(a[j], scale));
    mx = bert::warp_max_f(mx);
    for (int j = lane; j < t; j += 32) a[j] = bert::exp_f32(__fsub_rn(__fmul_rn(a[j], scale), mx));
    __syncwarp();  // the exponentials are visible to the lanes that sum them
    int whole = t / 8 * 8;
    float acc = 0.0f;
    if (lane < 8)
        for (int j = lane; j < whole; j += 8) acc = __fadd_rn(acc, a[j]);
    float sum = bert::lanes8_tree(acc);
    for (int j = whole; j < t; j++) sum = __fadd_rn(sum, a[j]);
    float inv = __fdiv_rn(1.0f, sum);
    __syncwarp();  // every lane has read the tail before it is scaled
    for (int j = lane; j < t; j += 32) a[j] = __fmul_rn(a[j], inv);
}

// dpreatt (N,T) = scale·att ⊙ (datt - Σ_k att·datt), overwritten; one warp per row, the
// dot product as dot_lanes (bitwise).
extern "C" __global__ void __launch_bounds__(BERT_BLOCK)
    softmax_backward(float* dpreatt, const float* datt, const float* att, float scale, int n,
                     int t) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= n) return;
    const float* a = att + (size_t)row * t;
    const float* d = datt + (size_t)row * t;
    int whole = t / 8 * 8;
    float acc = 0.0f;
    if (lane < 8)
        for (int j = lane; j < whole; j += 8) acc = __fadd_rn(acc, __fmul_rn(a[j], d[j]));
    float dot = bert::lanes8_tree(acc);
    for (int j = whole; j < t; j++) dot = __fadd_rn(dot, __fmul_rn(a[j], d[j]));
    float* dp = dpreatt + (size_t)row * t;
    for (int j = lane; j < t; j += 32)
        dp[j] = __fmul_rn(__fmul_rn(a[j], __fsub_rn(d[j], dot)), scale);
}

// ---------------------------------------------------------------------------------------
// embeddings

// out (B·T,C) = wte[inp] + wpe[position] + wtt[token_type], one thread per element.
extern "C" __global__ void __launch_bounds__(BERT_BLOCK)
    encoder_forward(float* out, const unsigned* inp, const unsigned* token_types,
                    const float* wte, const float* wpe, const float* wtt, int b, int t, int c) {
    size_t total = (size_t)b * t * c;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t bt = i / c, k = i % c;
        size_t pos = bt % t;
        float v = __fadd_rn(__fadd_rn(wte[(size_t)inp[bt] * c + k], wpe[pos * c + k]),
                            wtt[(size_t)token_types[bt] * c + k]);
        out[i] = v;
    }
}

// Scatter-add of dout (B·T,C) into the three tables without atomics: block (g, y) owns
// the rows r ≡ g (mod gridDim.x) of every table and channels y·blockDim.x + threadIdx.x;
// its threads walk the B·T tokens in order and add those whose row they own. Each table
// element is then summed in token order by one thread: the CPU's order, bit for bit.
extern "C" __global__ void __launch_bounds__(BERT_BLOCK)
    encoder_backward(float* dwte, float* dwpe, float* dwtt, const float* dout,
                     const unsigned* inp, const unsigned* token_types, int b, int t, int c) {
    unsigned owner = blockIdx.x, owners = gridDim.x;
    int k = blockIdx.y * blockDim.x + threadIdx.x;
    if (k >= c) return;
    for (int bt = 0; bt < b * t; bt++) {
        // Ownership is the same for every thread of the block: the branches do not diverge.
        float d = dout[(size_t)bt * c + k];
        unsigned ix = inp[bt], pos = bt % t, tt = token_types[bt];
        if (ix % owners == owner) {
            float* g = dwte + (size_t)ix * c + k;
            *g = __fadd_rn(*g, d);
        }
        if (pos % owners == owner) {
            float* g = dwpe + (size_t)pos * c + k;
            *g = __fadd_rn(*g, d);
        }
        if (tt % owners == owner) {
            float* g = dwtt + (size_t)tt * c + k;
            *g = __fadd_rn(*g, d);
        }
    }
}

// ---------------------------------------------------------------------------------------
// masked rows

// out (M,C) = inp[rows[i]] (inp (N,C)), one thread per element.
extern "C" __global__ void __launch_bounds__(BERT_BLOCK)
    gather_rows(float* out, const float* inp, const unsigned* rows, int m, int c) {
    size_t total = (size_t)m * c;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = inp[(size_t)rows[i / c] * c + i % c];
}

// dinp[rows[i]] += dout[i] (dout (M,C)): one thread per column walks the M rows in order,
// so repeated rows add in the CPU's order and no element has two writers.
extern "C" __global__ void __launch_bounds__(BERT_BLOCK)
    scatter_add_rows(float* dinp, const float* dout, const unsigned* rows, int m, int c) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= c) return;
    for (int i = 0; i < m; i++) {
        float* g = dinp + (size_t)rows[i] * c + k;
        *g = __fadd_rn(*g, dout[(size_t)i * c + k]);
    }
}

// ---------------------------------------------------------------------------------------
// MLM cross-entropy over the vocabulary (the M masked rows only)

// One block per row of logits (N,V), in place: losses[i] = ln Σ_j e^(l_j - max) -
// (l_target - max), the sum in f64; then the row becomes its gradient dlosses[i]·(softmax
// - onehot(target)). The f64 sum is a block tree (not the CPU's 8 lanes): the loss and
// the 1/sum scaling agree with the CPU's to f64 rounding before their f32 rounding.
extern "C" __global__ void __launch_bounds__(BERT_BLOCK)
    crossentropy_fused(float* losses, float* logits, const float* dlosses,
                       const unsigned* targets, int n, int v) {
    __shared__ float smax[BERT_BLOCK];
    __shared__ double ssum[BERT_BLOCK];
    int row = blockIdx.x;
    if (row >= n) return;  // the whole block leaves together
    float* l = logits + (size_t)row * v;
    unsigned tgt = targets[row];
    float lt = l[tgt];  // read before any thread overwrites the row
    float mx = l[0];
    for (int j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, l[j]);
    smax[threadIdx.x] = mx;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) smax[threadIdx.x] = fmaxf(smax[threadIdx.x], smax[threadIdx.x + s]);
        __syncthreads();
    }
    mx = smax[0];
    double acc = 0.0;
    for (int j = threadIdx.x; j < v; j += blockDim.x)
        acc = __dadd_rn(acc, (double)bert::exp_f32(__fsub_rn(l[j], mx)));
    ssum[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) ssum[threadIdx.x] = __dadd_rn(ssum[threadIdx.x], ssum[threadIdx.x + s]);
        __syncthreads();
    }
    double sum = ssum[0];
    if (threadIdx.x == 0) losses[row] = (float)(log(sum) - (double)__fsub_rn(lt, mx));
    float inv = (float)(1.0 / sum);
    float d = dlosses[row];
    // Each element is read and written by the same thread, after every read above.
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float p = __fmul_rn(bert::exp_f32(__fsub_rn(l[j], mx)), inv);
        float ind = (unsigned)j == tgt ? 1.0f : 0.0f;
        l[j] = __fmul_rn(__fsub_rn(p, ind), d);
    }
}

// ---------------------------------------------------------------------------------------
// bias gradient

// dbias (OC) += Σ_rows dout (N,OC): one thread per column, rows in order (bitwise).
extern "C" __global__ void __launch_bounds__(BERT_BLOCK)
    bias_backward(float* dbias, const float* dout, int n, int oc) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= oc) return;
    float acc = dbias[j];
    for (int i = 0; i < n; i++) acc = __fadd_rn(acc, dout[(size_t)i * oc + j]);
    dbias[j] = acc;
}

// ---------------------------------------------------------------------------------------
// optimizer

// AdamW on n elements of one decay class (optim.rs's adamw_update): g = grads·inv·clip
// (then zeroed), moments, bias correction by bc1/bc2, decoupled decay wd·p.
extern "C" __global__ void __launch_bounds__(BERT_BLOCK)
    adamw_update(float* params, float* grads, float* m, float* v, unsigned long long n,
                 float beta1, float beta2, float eps, float bc1, float bc2, float lr, float wd,
                 float inv, float clip) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float g = __fmul_rn(__fmul_rn(grads[i], inv), clip);
        grads[i] = 0.0f;
        float mi = __fadd_rn(__fmul_rn(beta1, m[i]), __fmul_rn(__fsub_rn(1.0f, beta1), g));
        float vi = __fadd_rn(__fmul_rn(beta2, v[i]),
                             __fmul_rn(__fmul_rn(__fsub_rn(1.0f, beta2), g), g));
        m[i] = mi;
        v[i] = vi;
        float mhat = __fdiv_rn(mi, bc1);
        float vhat = __fdiv_rn(vi, bc2);
        float p = params[i];
        float step = __fadd_rn(__fdiv_rn(mhat, __fadd_rn(__fsqrt_rn(vhat), eps)), __fmul_rn(wd, p));
        params[i] = __fsub_rn(p, __fmul_rn(lr, step));
    }
}

// The first half of scaled_norm: partial[k] = Σ (grads[i]·inv)² over chunk k (the
// `chunk` elements from k·chunk), in f64 and element order, one thread per chunk.
extern "C" __global__ void __launch_bounds__(BERT_BLOCK)
    scaled_norm_chunks(double* partial, const float* grads, float inv, unsigned long long n,
                       unsigned long long chunk) {
    unsigned long long k = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    unsigned long long start = k * chunk;
    if (start >= n) return;
    unsigned long long end = start + chunk < n ? start + chunk : n;
    double acc = 0.0;
    for (unsigned long long i = start; i < end; i++) {
        double x = (double)__fmul_rn(grads[i], inv);
        acc = __dadd_rn(acc, __dmul_rn(x, x));
    }
    partial[k] = acc;
}

// The second half: out[0] = √(Σ_k partial[k]) in chunk order, rounded to f32; one thread.
extern "C" __global__ void __launch_bounds__(BERT_BLOCK)
    scaled_norm_finish(float* out, const double* partial, unsigned long long chunks) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = 0.0;
    for (unsigned long long k = 0; k < chunks; k++) s = __dadd_rn(s, partial[k]);
    out[0] = (float)__dsqrt_rn(s);
}
