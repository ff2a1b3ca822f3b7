//! Forward and backward of every operation in the model, on flat row-major slices.
//!
//! Conventions (as in llm.c): `B` batch, `T` sequence length, `C` channels, `OC` output
//! channels, `NH` heads, `V` vocabulary; `N` is a row count (`B*T`, or the number of masked
//! positions in the MLM head). Forward functions overwrite their outputs. Backward functions
//! ACCUMULATE (`+=`) into every gradient they write, so gradients flowing into one tensor from
//! several consumers (residuals, tied embeddings, gradient accumulation) simply add up;
//! scratch outputs that are only intermediate (`datt`, `dpreatt`) are overwritten.
//!
//! Every op is generic over [`Real`] (f32 for training, f64 for finite-difference checks).
//! Rows are split over the current rayon pool; each output element is computed by one task
//! with a fixed summation order, so results do not depend on timing.

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

use rayon::prelude::*;

/// Layer-norm epsilon of the original BERT.
pub const LAYERNORM_EPS: f64 = 1e-12;

/// A floating-point element the model can run in (f32 to train, f64 to check gradients).
pub trait Real:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + Debug
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    /// Conversion from f64 (rounds for f32).
    fn from_f64(v: f64) -> Self;
    /// Exact widening to f64.
    fn to_f64(self) -> f64;
    /// Square root.
    fn sqrt(self) -> Self;
    /// e^x.
    fn exp(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// Hyperbolic tangent.
    fn tanh(self) -> Self;

    /// `C ← alpha·A·B + beta·C` with arbitrary strides (matrixmultiply's `sgemm`/`dgemm`).
    ///
    /// # Safety
    /// Every element addressed through the pointers and strides must lie inside live
    /// allocations, and `c` must not alias `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );

    /// 0
    fn zero() -> Self {
        Self::from_f64(0.0)
    }
    /// 1
    fn one() -> Self {
        Self::from_f64(1.0)
    }
}

macro_rules! real_impl {
    ($t:ty, $gemm:path, $exp:path, $tanh:path) => {
        impl Real for $t {
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                $tanh(self)
            }
            unsafe fn gemm_raw(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: *const Self,
                rsa: isize,
                csa: isize,
                b: *const Self,
                rsb: isize,
                csb: isize,
                beta: Self,
                c: *mut Self,
                rsc: isize,
                csc: isize,
            ) {
                // SAFETY: the caller upholds the bounds and aliasing contract above.
                unsafe { $gemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc) }
            }
        }
    };
}
real_impl!(f32, matrixmultiply::sgemm, exp_f32, tanh_f32);
real_impl!(f64, matrixmultiply::dgemm, f64::exp, f64::tanh);

/// e^x in f32 without a library call, so loops over it vectorize: a call to libm's
/// `expf`/`tanhf` per element keeps the softmax and GELU loops scalar, and they run over
/// every activation of every step. Relative error below 3e-7 (tested against f64).
///
/// x = n·ln2 + r with |r| ≤ ln2/2; e^r by its Taylor polynomial to degree 7 (truncation
/// below 1.1e-8 there); 2^n written straight into the exponent bits. The input is clamped
/// to [-87, 88] so 2^n stays a normal number: e^-87 ≈ 1.6e-38 stands in for anything
/// smaller, e^88 ≈ 1.7e38 for anything larger.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO with LN2_HI = 355/512 (9 significant bits), so n·LN2_HI is
    // exact for |n| ≤ 2^14 and the reduction loses nothing (Cody and Waite's split).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer (SSE2 has no round).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    // The integer n also sits in the low mantissa bits of `shifted` (whose exponent is
    // fixed by ROUND): reading it there avoids a float-to-int conversion.
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let bits = (n_int.wrapping_add(127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// tanh in f32 through [`exp_f32`]: `1 - 2/(e^{2x} + 1)`, absolute error below 3e-7.
#[inline(always)]
pub fn tanh_f32(x: f32) -> f32 {
    1.0 - 2.0 / (exp_f32(2.0 * x) + 1.0)
}

/// Reductions over a row run in `LANES` interleaved partial results combined in a fixed
/// tree: the order is fixed (results are reproducible) but the additions no longer wait for
/// each other one by one, so they pipeline and vectorize.
const LANES: usize = 8;

/// Σ v, in `LANES` partial sums.
pub fn sum_lanes<T: Real>(v: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] += c[k];
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for &x in rest {
        s += x;
    }
    s
}

/// Σ v in f64, in `LANES` partial sums (the same order as [`sum_lanes`], so for f64 input
/// the same result).
///
/// For the softmax denominator over the vocabulary: on a confident row one term is 1 and
/// thirty thousand others sit below half an f32 ulp of it, so an f32 total holding the 1
/// drops them whole (6e-5 of the log-sum-exp on such rows). Widening costs one conversion
/// per term, next to the C multiply-adds each logit took to compute.
pub fn sum_lanes_f64<T: Real>(v: &[T]) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] += c[k].to_f64();
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for &x in rest {
        s += x.to_f64();
    }
    s
}

/// Σ a⊙b, in `LANES` partial sums.
pub fn dot_lanes<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let n = a.len().min(b.len());
    let whole = n / LANES * LANES;
    for (ca, cb) in a[..whole]
        .chunks_exact(LANES)
        .zip(b[..whole].chunks_exact(LANES))
    {
        for k in 0..LANES {
            acc[k] += ca[k] * cb[k];
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for k in whole..n {
        s += a[k] * b[k];
    }
    s
}

/// max v (v non-empty; NaN-free input assumed, as everywhere in the model).
pub fn max_lanes<T: Real>(v: &[T]) -> T {
    let mut acc = [v[0]; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    let mut m = acc[0];
    for &x in acc[1..].iter().chain(rest) {
        m = if x > m { x } else { m };
    }
    m
}

/// Index of the first maximum of `v` (non-empty).
pub fn argmax_lanes<T: Real>(v: &[T]) -> usize {
    let mut best = [v[0]; LANES];
    let mut at = [0usize; LANES];
    let whole = v.len() / LANES * LANES;
    for (j, c) in v[..whole].chunks_exact(LANES).enumerate() {
        for k in 0..LANES {
            if c[k] > best[k] {
                best[k] = c[k];
                at[k] = j * LANES + k;
            }
        }
    }
    // Each lane holds the first occurrence of its maximum; across lanes, ties go to the
    // smaller index, which is then the first occurrence overall.
    let (mut m, mut i) = (v[0], 0);
    for k in 0..LANES {
        if best[k] > m || (best[k] == m && at[k] < i) {
            m = best[k];
            i = at[k];
        }
    }
    for (j, &x) in v.iter().enumerate().skip(whole) {
        if x > m {
            m = x;
            i = j;
        }
    }
    i
}

/// A read-only strided matrix view: element (i, j) is `data[i*rs + j*cs]`.
#[derive(Clone, Copy)]
struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Row-major `rows × cols` starting at `data[0]` with row stride `rs`.
    fn rows(data: &'a [T], rows: usize, cols: usize, rs: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }
    /// The transpose of a row-major `cols × rows` matrix with row stride `rs`.
    fn transposed(data: &'a [T], rows: usize, cols: usize, rs: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: 1,
            cs: rs,
        }
    }
    /// Number of elements from the first to one past the last addressed element.
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// `C (m×n, row stride rsc) ← alpha·A·B + beta·C`. Slices shorter than the matrices they
/// describe are a bug in the caller and stop at the bounds check of the slicing below.
fn gemm<T: Real>(alpha: T, a: Mat<T>, b: Mat<T>, beta: T, c: &mut [T], rsc: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    debug_assert_eq!(b.rows, k);
    if m == 0 || n == 0 {
        return;
    }
    let a_data = &a.data[..a.extent()];
    let b_data = &b.data[..b.extent()];
    let c_data = &mut c[..(m - 1) * rsc + n];
    // SAFETY: the three slicings above bound-check every element the strides address
    // (A and B: (rows-1)·rs + (cols-1)·cs; C: (m-1)·rsc + n-1, column stride 1), and `c`
    // is a `&mut` borrow, so it aliases neither input.
    unsafe {
        T::gemm_raw(
            m,
            k,
            n,
            alpha,
            a_data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b_data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c_data.as_mut_ptr(),
            rsc as isize,
            1,
        )
    }
}

/// Rows per parallel task: enough tasks to feed every thread of the pool, never tiny ones.
fn rows_per_task(rows: usize, min_rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    rows.div_ceil(threads).max(min_rows).max(1)
}

// ----------------------------------------------------------------------------------------
// embeddings

/// `out[b,t,:] = wte[inp[b,t],:] + wpe[t,:] + wtt[token_types[b,t],:]`.
///
/// out (B,T,C); inp, token_types (B,T); wte (V,C); wpe (maxT,C); wtt (2,C).
#[allow(clippy::too_many_arguments)]
pub fn encoder_forward<T: Real>(
    out: &mut [T],
    inp: &[u32],
    token_types: &[u32],
    wte: &[T],
    wpe: &[T],
    wtt: &[T],
    b: usize,
    t: usize,
    c: usize,
) {
    out[..b * t * c]
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(bt, out_bt)| {
            let (ix, pos, tt) = (inp[bt] as usize, bt % t, token_types[bt] as usize);
            let (we, pe, te) = (
                &wte[ix * c..][..c],
                &wpe[pos * c..][..c],
                &wtt[tt * c..][..c],
            );
            for i in 0..c {
                out_bt[i] = we[i] + pe[i] + te[i];
            }
        });
}

/// Backward of [`encoder_forward`]: scatter-adds `dout` rows into the three tables.
///
/// Sequential: two positions may hold the same token id.
#[allow(clippy::too_many_arguments)]
pub fn encoder_backward<T: Real>(
    dwte: &mut [T],
    dwpe: &mut [T],
    dwtt: &mut [T],
    dout: &[T],
    inp: &[u32],
    token_types: &[u32],
    b: usize,
    t: usize,
    c: usize,
) {
    for bt in 0..b * t {
        let d = &dout[bt * c..][..c];
        let (ix, pos, tt) = (inp[bt] as usize, bt % t, token_types[bt] as usize);
        for (g, &x) in dwte[ix * c..][..c].iter_mut().zip(d) {
            *g += x;
        }
        for (g, &x) in dwpe[pos * c..][..c].iter_mut().zip(d) {
            *g += x;
        }
        for (g, &x) in dwtt[tt * c..][..c].iter_mut().zip(d) {
            *g += x;
        }
    }
}

// ----------------------------------------------------------------------------------------
// layer norm

/// Per-row layer norm: `out = (inp - mean)·rstd·weight + bias`, saving mean and rstd.
///
/// out, inp (N,C); mean, rstd (N); weight, bias (C).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<T: Real>(
    out: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    inp: &[T],
    weight: &[T],
    bias: &[T],
    n: usize,
    c: usize,
) {
    let eps = T::from_f64(LAYERNORM_EPS);
    let inv_c = T::one() / T::from_f64(c as f64);
    out[..n * c]
        .par_chunks_mut(c)
        .zip(mean[..n].par_iter_mut())
        .zip(rstd[..n].par_iter_mut())
        .enumerate()
        .with_min_len(16)
        .for_each(|(row, ((out_r, mean_r), rstd_r))| {
            let x = &inp[row * c..][..c];
            let mut m = T::zero();
            for &v in x {
                m += v;
            }
            m *= inv_c;
            let mut var = T::zero();
            for &v in x {
                let d = v - m;
                var += d * d;
            }
            var *= inv_c;
            let s = T::one() / (var + eps).sqrt();
            for i in 0..c {
                out_r[i] = (x[i] - m) * s * weight[i] + bias[i];
            }
            *mean_r = m;
            *rstd_r = s;
        });
}

/// Backward of [`layernorm_forward`].
///
/// dinp, dout, inp (N,C); dweight, dbias, weight (C); mean, rstd (N).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<T: Real>(
    dinp: &mut [T],
    dweight: &mut [T],
    dbias: &mut [T],
    dout: &[T],
    inp: &[T],
    weight: &[T],
    mean: &[T],
    rstd: &[T],
    n: usize,
    c: usize,
) {
    let inv_c = T::one() / T::from_f64(c as f64);
    dinp[..n * c]
        .par_chunks_mut(c)
        .enumerate()
        .with_min_len(16)
        .for_each(|(row, dinp_r)| {
            let (x, d) = (&inp[row * c..][..c], &dout[row * c..][..c]);
            let (m, s) = (mean[row], rstd[row]);
            // Two reductions: mean of dnorm and mean of dnorm·norm.
            let mut dnorm_mean = T::zero();
            let mut dnorm_norm_mean = T::zero();
            for i in 0..c {
                let norm = (x[i] - m) * s;
                let dnorm = weight[i] * d[i];
                dnorm_mean += dnorm;
                dnorm_norm_mean += dnorm * norm;
            }
            dnorm_mean *= inv_c;
            dnorm_norm_mean *= inv_c;
            for i in 0..c {
                let norm = (x[i] - m) * s;
                let dnorm = weight[i] * d[i];
                dinp_r[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
            }
        });
    for row in 0..n {
        let (x, d) = (&inp[row * c..][..c], &dout[row * c..][..c]);
        let (m, s) = (mean[row], rstd[row]);
        for i in 0..c {
            dweight[i] += (x[i] - m) * s * d[i];
            dbias[i] += d[i];
        }
    }
}

// ----------------------------------------------------------------------------------------
// matmul

/// `out = inp · weightᵀ + bias`.
///
/// out (N,OC); inp (N,C); weight (OC,C); bias (OC).
#[allow(clippy::too_many_arguments)]
pub fn matmul_forward<T: Real>(
    out: &mut [T],
    inp: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    n: usize,
    c: usize,
    oc: usize,
) {
    if n == 0 {
        return;
    }
    let rows = rows_per_task(n, 32);
    out[..n * oc]
        .par_chunks_mut(rows * oc)
        .enumerate()
        .for_each(|(task, out_chunk)| {
            let r0 = task * rows;
            let nr = out_chunk.len() / oc;
            let beta = match bias {
                Some(bias) => {
                    for row in out_chunk.chunks_mut(oc) {
                        row.copy_from_slice(&bias[..oc]);
                    }
                    T::one()
                }
                None => T::zero(),
            };
            let a = Mat::rows(&inp[r0 * c..], nr, c, c);
            let b = Mat::transposed(weight, c, oc, c);
            gemm(T::one(), a, b, beta, out_chunk, oc);
        });
}

/// Backward of [`matmul_forward`].
///
/// dinp (N,C) += dout·weight; dweight (OC,C) += doutᵀ·inp; dbias (OC) += Σ_rows dout.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward<T: Real>(
    dinp: &mut [T],
    dweight: &mut [T],
    dbias: Option<&mut [T]>,
    dout: &[T],
    inp: &[T],
    weight: &[T],
    n: usize,
    c: usize,
    oc: usize,
) {
    if n == 0 {
        return;
    }
    let rows = rows_per_task(n, 32);
    dinp[..n * c]
        .par_chunks_mut(rows * c)
        .enumerate()
        .for_each(|(task, dinp_chunk)| {
            let r0 = task * rows;
            let nr = dinp_chunk.len() / c;
            let a = Mat::rows(&dout[r0 * oc..], nr, oc, oc);
            let b = Mat::rows(weight, oc, c, c);
            gemm(T::one(), a, b, T::one(), dinp_chunk, c);
        });
    let orows = rows_per_task(oc, 16);
    dweight[..oc * c]
        .par_chunks_mut(orows * c)
        .enumerate()
        .for_each(|(task, dw_chunk)| {
            let o0 = task * orows;
            let no = dw_chunk.len() / c;
            // doutᵀ restricted to output channels o0..o0+no: (no × N).
            let a = Mat::transposed(&dout[o0..], no, n, oc);
            let b = Mat::rows(inp, n, c, c);
            gemm(T::one(), a, b, T::one(), dw_chunk, c);
        });
    if let Some(dbias) = dbias {
        bias_backward(dbias, dout, n, oc);
    }
}

/// The bias part of [`matmul_backward`]: `dbias (OC) += Σ_rows dout (N,OC)`, each column
/// summed over the rows in order.
pub fn bias_backward<T: Real>(dbias: &mut [T], dout: &[T], n: usize, oc: usize) {
    let orows = rows_per_task(oc, 16);
    dbias[..oc]
        .par_chunks_mut(orows)
        .enumerate()
        .for_each(|(task, db_chunk)| {
            let o0 = task * orows;
            for row in 0..n {
                let d = &dout[row * oc + o0..][..db_chunk.len()];
                for (g, &x) in db_chunk.iter_mut().zip(d) {
                    *g += x;
                }
            }
        });
}

// ----------------------------------------------------------------------------------------
// attention (bidirectional: every position attends to every position)

/// Multi-head self-attention.
///
/// inp (B,T,3C) holds q|k|v for every position; out (B,T,C); att (B,NH,T,T) receives the
/// softmax probabilities `softmax(q·kᵀ/√hs)`, kept for the backward pass.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<T: Real>(
    out: &mut [T],
    att: &mut [T],
    inp: &[T],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    let hs = c / nh;
    let c3 = 3 * c;
    let scale = T::one() / T::from_f64(hs as f64).sqrt();
    out[..b * t * c]
        .par_chunks_mut(t * c)
        .zip(att[..b * nh * t * t].par_chunks_mut(nh * t * t))
        .enumerate()
        .for_each(|(bi, (out_b, att_b))| {
            let inp_b = &inp[bi * t * c3..][..t * c3];
            for h in 0..nh {
                let att_h = &mut att_b[h * t * t..][..t * t];
                // (T,T) = scale · Q (T,hs) · Kᵀ (hs,T)
                let q = Mat::rows(&inp_b[h * hs..], t, hs, c3);
                let kt = Mat::transposed(&inp_b[c + h * hs..], hs, t, c3);
                gemm(scale, q, kt, T::zero(), att_h, t);
                // the product carries the scale already
                softmax_forward(att_h, T::one(), t, t);
                // (T,hs) = att (T,T) · V (T,hs), written into the head's columns of out.
                let a = Mat::rows(&att_h[..], t, t, t);
                let v = Mat::rows(&inp_b[2 * c + h * hs..], t, hs, c3);
                gemm(T::one(), a, v, T::zero(), &mut out_b[h * hs..], c);
            }
        });
}

/// Attention's softmax in place over N rows of T scores: `att = softmax(scale·att)` row by
/// row (a GPU product may leave the scale to it; the CPU's carries it and passes 1, by which
/// a multiplication is exact). No mask: every position attends to every position.
///
/// att (N,T), N = B·NH·T.
pub fn softmax_forward<T: Real>(att: &mut [T], scale: T, n: usize, t: usize) {
    let scaled = scale != T::one();
    for row in att[..n * t].chunks_mut(t) {
        if scaled {
            for v in row.iter_mut() {
                *v *= scale;
            }
        }
        softmax_row(row);
    }
}

/// Backward of [`softmax_forward`]: `dpreatt = scale·att ⊙ (datt - Σ_k att·datt)` row by
/// row (overwritten).
///
/// dpreatt, datt, att (N,T).
pub fn softmax_backward<T: Real>(
    dpreatt: &mut [T],
    datt: &[T],
    att: &[T],
    scale: T,
    n: usize,
    t: usize,
) {
    for (i, dp) in dpreatt[..n * t].chunks_mut(t).enumerate() {
        let (a, d) = (&att[i * t..][..t], &datt[i * t..][..t]);
        let dot = dot_lanes(a, d);
        for j in 0..t {
            dp[j] = a[j] * (d[j] - dot) * scale;
        }
    }
}

/// In-place numerically stable softmax of one row.
fn softmax_row<T: Real>(row: &mut [T]) {
    let max = max_lanes(row);
    for v in row.iter_mut() {
        *v = (*v - max).exp();
    }
    let sum = sum_lanes(row);
    let inv = T::one() / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Backward of [`attention_forward`].
///
/// dinp (B,T,3C) += gradients of q|k|v; datt, dpreatt (B,NH,T,T) are scratch (overwritten);
/// dout (B,T,C); inp (B,T,3C); att (B,NH,T,T) as saved by the forward pass.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Real>(
    dinp: &mut [T],
    datt: &mut [T],
    dpreatt: &mut [T],
    dout: &[T],
    inp: &[T],
    att: &[T],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    let hs = c / nh;
    let c3 = 3 * c;
    let scale = T::one() / T::from_f64(hs as f64).sqrt();
    dinp[..b * t * c3]
        .par_chunks_mut(t * c3)
        .zip(datt[..b * nh * t * t].par_chunks_mut(nh * t * t))
        .zip(dpreatt[..b * nh * t * t].par_chunks_mut(nh * t * t))
        .enumerate()
        .for_each(|(bi, ((dinp_b, datt_b), dpreatt_b))| {
            let inp_b = &inp[bi * t * c3..][..t * c3];
            let dout_b = &dout[bi * t * c..][..t * c];
            for h in 0..nh {
                let att_h = &att[(bi * nh + h) * t * t..][..t * t];
                let datt_h = &mut datt_b[h * t * t..][..t * t];
                let dpre_h = &mut dpreatt_b[h * t * t..][..t * t];
                let dout_h = Mat::rows(&dout_b[h * hs..], t, hs, c);
                // datt (T,T) = dout (T,hs) · Vᵀ (hs,T)
                let vt = Mat::transposed(&inp_b[2 * c + h * hs..], hs, t, c3);
                gemm(T::one(), dout_h, vt, T::zero(), datt_h, t);
                // dV (T,hs) += attᵀ (T,T) · dout (T,hs)
                let at = Mat::transposed(att_h, t, t, t);
                gemm(
                    T::one(),
                    at,
                    dout_h,
                    T::one(),
                    &mut dinp_b[2 * c + h * hs..],
                    c3,
                );
                // dpre = att ⊙ (datt - Σ_k att·datt); the scale is in the products below
                softmax_backward(dpre_h, datt_h, att_h, T::one(), t, t);
                // dQ (T,hs) += scale · dpre (T,T) · K (T,hs)
                let dpre = Mat::rows(&dpre_h[..], t, t, t);
                let k = Mat::rows(&inp_b[c + h * hs..], t, hs, c3);
                gemm(scale, dpre, k, T::one(), &mut dinp_b[h * hs..], c3);
                // dK (T,hs) += scale · dpreᵀ (T,T) · Q (T,hs)
                let dpre_t = Mat::transposed(&dpre_h[..], t, t, t);
                let q = Mat::rows(&inp_b[h * hs..], t, hs, c3);
                gemm(scale, dpre_t, q, T::one(), &mut dinp_b[c + h * hs..], c3);
            }
        });
}

// ----------------------------------------------------------------------------------------
// GELU (tanh approximation, as in GPT-2 / llm.c; BERT's original uses erf)

const GELU_SCALE: f64 = 0.797_884_560_802_865_4; // sqrt(2/pi)

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, the one expression every GELU here
/// evaluates (kernels/bert.cu's `gelu` follows it operation for operation).
#[inline(always)]
fn gelu<T: Real>(x: T) -> T {
    let (s, k, half) = (
        T::from_f64(GELU_SCALE),
        T::from_f64(0.044715),
        T::from_f64(0.5),
    );
    let cube = k * x * x * x;
    half * x * (T::one() + (s * (x + cube)).tanh())
}

/// gelu'(x) (kernels/bert.cu's `gelu_grad`).
#[inline(always)]
fn gelu_grad<T: Real>(x: T) -> T {
    let (s, k, half) = (
        T::from_f64(GELU_SCALE),
        T::from_f64(0.044715),
        T::from_f64(0.5),
    );
    let k3 = T::from_f64(3.0 * 0.044715);
    let th = (s * (x + k * x * x * x)).tanh();
    let sech2 = T::one() - th * th;
    half * (T::one() + th) + half * x * sech2 * s * (T::one() + k3 * x * x)
}

/// `out = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, elementwise over N values.
pub fn gelu_forward<T: Real>(out: &mut [T], inp: &[T], n: usize) {
    // Fixed-size chunks with a plain inner loop: it vectorizes.
    out[..n]
        .par_chunks_mut(4096)
        .zip(inp[..n].par_chunks(4096))
        .for_each(|(o, i)| {
            for (o, &x) in o.iter_mut().zip(i) {
                *o = gelu(x);
            }
        });
}

/// Backward of [`gelu_forward`]: `dinp += gelu'(inp)·dout`.
pub fn gelu_backward<T: Real>(dinp: &mut [T], inp: &[T], dout: &[T], n: usize) {
    dinp[..n]
        .par_chunks_mut(4096)
        .zip(inp[..n].par_chunks(4096).zip(dout[..n].par_chunks(4096)))
        .for_each(|(di, (i, d))| {
            for ((di, &x), &d) in di.iter_mut().zip(i).zip(d) {
                *di += gelu_grad(x) * d;
            }
        });
}

/// The bias and the GELU after a product that left the bias out (a GPU product with no
/// bias epilogue): `inp += bias` in place (kept for the backward pass), `out =
/// gelu(inp)`; bitwise [`gelu_forward`] of `inp + bias`.
///
/// The CPU model does not call it: its [`matmul_forward`] starts the product's
/// accumulator at the bias, which rounds differently from adding the bias afterwards.
///
/// out, inp (N,OC); bias (OC).
pub fn bias_gelu_forward<T: Real>(out: &mut [T], inp: &mut [T], bias: &[T], n: usize, oc: usize) {
    out[..n * oc]
        .par_chunks_mut(oc)
        .zip(inp[..n * oc].par_chunks_mut(oc))
        .for_each(|(o, x)| {
            for ((o, x), &b) in o.iter_mut().zip(x.iter_mut()).zip(&bias[..oc]) {
                *x += b;
                *o = gelu(*x);
            }
        });
}

/// Backward of [`bias_gelu_forward`]: with `g = gelu'(inp)·dout`, `dinp += g` and `dbias
/// += Σ_rows g`, the rows summed in order. On a zero `dinp` this is bitwise what the CPU
/// model does with [`gelu_backward`] and the bias part of [`matmul_backward`].
///
/// dinp, inp, dout (N,OC); dbias (OC).
pub fn bias_gelu_backward<T: Real>(
    dinp: &mut [T],
    dbias: &mut [T],
    inp: &[T],
    dout: &[T],
    n: usize,
    oc: usize,
) {
    for row in 0..n {
        let (x, d) = (&inp[row * oc..][..oc], &dout[row * oc..][..oc]);
        let di = &mut dinp[row * oc..][..oc];
        for j in 0..oc {
            let g = gelu_grad(x[j]) * d[j];
            di[j] += g;
            dbias[j] += g;
        }
    }
}

// ----------------------------------------------------------------------------------------
// softmax + cross-entropy over the vocabulary

/// Row-wise softmax of `logits` into `probs`, and `losses[i] = -ln probs[i, targets[i]]`
/// computed from the log-sum-exp (never `ln 0`).
///
/// The denominator and its logarithm are taken in f64 whatever `T` is (see
/// [`sum_lanes_f64`]): in f32 the loss is then within f32 rounding of the exponentials,
/// confident rows included; in f64 nothing changes.
///
/// losses (N); probs, logits (N,V); targets (N).
pub fn softmax_crossentropy_forward<T: Real>(
    losses: &mut [T],
    probs: &mut [T],
    logits: &[T],
    targets: &[u32],
    n: usize,
    v: usize,
) {
    probs[..n * v]
        .par_chunks_mut(v)
        .zip(losses[..n].par_iter_mut())
        .enumerate()
        .for_each(|(i, (p, loss))| {
            let l = &logits[i * v..][..v];
            let max = max_lanes(l);
            for (pj, &x) in p.iter_mut().zip(l) {
                *pj = (x - max).exp();
            }
            let sum = sum_lanes_f64(p);
            let inv = T::from_f64(1.0 / sum);
            for pj in p.iter_mut() {
                *pj *= inv;
            }
            *loss = T::from_f64(sum.ln() - (l[targets[i] as usize] - max).to_f64());
        });
}

/// Backward of [`softmax_crossentropy_forward`]: `dlogits += dlosses[i]·(probs - onehot)`.
pub fn crossentropy_softmax_backward<T: Real>(
    dlogits: &mut [T],
    dlosses: &[T],
    probs: &[T],
    targets: &[u32],
    n: usize,
    v: usize,
) {
    dlogits[..n * v]
        .par_chunks_mut(v)
        .enumerate()
        .for_each(|(i, dl)| {
            let (p, d, tgt) = (&probs[i * v..][..v], dlosses[i], targets[i] as usize);
            for (j, g) in dl.iter_mut().enumerate() {
                let ind = if j == tgt { T::one() } else { T::zero() };
                *g += (p[j] - ind) * d;
            }
        });
}

/// [`softmax_crossentropy_forward`]'s losses and [`crossentropy_softmax_backward`]'s
/// gradient in one pass, in place: `logits` (N,V) becomes `dlosses[i]·(probs - onehot)`,
/// bitwise what the two give on a zero gradient, without the (N,V) probabilities. The GPU
/// runs the MLM head this way; the CPU model keeps the probabilities for its accuracy
/// count, so it calls the two.
///
/// losses, dlosses, targets (N); logits (N,V).
pub fn crossentropy_fused<T: Real>(
    losses: &mut [T],
    logits: &mut [T],
    dlosses: &[T],
    targets: &[u32],
    n: usize,
    v: usize,
) {
    logits[..n * v]
        .par_chunks_mut(v)
        .zip(losses[..n].par_iter_mut())
        .enumerate()
        .for_each(|(i, (l, loss))| {
            let tgt = targets[i] as usize;
            let max = max_lanes(l);
            let lt = l[tgt];
            for x in l.iter_mut() {
                *x = (*x - max).exp();
            }
            let sum = sum_lanes_f64(l);
            let inv = T::from_f64(1.0 / sum);
            *loss = T::from_f64(sum.ln() - (lt - max).to_f64());
            for (j, x) in l.iter_mut().enumerate() {
                let ind = if j == tgt { T::one() } else { T::zero() };
                *x = (*x * inv - ind) * dlosses[i];
            }
        });
}

// ----------------------------------------------------------------------------------------
// row gather / scatter (the MLM head runs on masked positions only)

/// `out[i,:] = inp[rows[i],:]`. out (M,C); inp (N,C); rows (M).
pub fn gather_rows<T: Real>(out: &mut [T], inp: &[T], rows: &[usize], c: usize) {
    for (o, &r) in out.chunks_mut(c).zip(rows) {
        o.copy_from_slice(&inp[r * c..][..c]);
    }
}

/// Backward of [`gather_rows`]: `dinp[rows[i],:] += dout[i,:]`.
pub fn scatter_add_rows<T: Real>(dinp: &mut [T], dout: &[T], rows: &[usize], c: usize) {
    for (d, &r) in dout.chunks(c).zip(rows) {
        for (g, &x) in dinp[r * c..][..c].iter_mut().zip(d) {
            *g += x;
        }
    }
}

/// `out = inp1 + inp2`, elementwise over N values.
pub fn residual_forward<T: Real>(out: &mut [T], inp1: &[T], inp2: &[T], n: usize) {
    for i in 0..n {
        out[i] = inp1[i] + inp2[i];
    }
}

/// Backward of [`residual_forward`]: both inputs receive `dout`.
pub fn residual_backward<T: Real>(dinp1: &mut [T], dinp2: &mut [T], dout: &[T], n: usize) {
    for i in 0..n {
        dinp1[i] += dout[i];
        dinp2[i] += dout[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_accurate_over_its_range() {
        let mut worst: f64 = 0.0;
        // [-87, 87.9]: inside the clamp
        for i in 0..=349_800 {
            let x = (-87.0 + i as f64 * 0.0005) as f32;
            let want = (x as f64).exp();
            let err = ((exp_f32(x) as f64 - want) / want).abs();
            worst = worst.max(err);
        }
        assert!(worst < 3e-7, "max rel error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        // clamped ends: finite, never inf or NaN
        assert!(exp_f32(-1000.0) > 0.0 && exp_f32(-1000.0) < 2e-38);
        assert!(exp_f32(1000.0).is_finite());
    }

    #[test]
    fn tanh_f32_is_accurate() {
        let mut worst: f64 = 0.0;
        for i in 0..=200_000 {
            let x = -20.0 + i as f32 * 0.0002;
            worst = worst.max((tanh_f32(x) as f64 - (x as f64).tanh()).abs());
        }
        assert!(worst < 3e-7, "max abs error {worst:e}");
        assert_eq!(
            (tanh_f32(0.0), tanh_f32(50.0), tanh_f32(-50.0)),
            (0.0, 1.0, -1.0)
        );
    }

    #[test]
    fn lane_reductions_match_plain_ones() {
        for n in [1usize, 7, 8, 9, 30, 64, 1001] {
            let v: Vec<f64> = (0..n)
                .map(|i| ((i * 37 % 101) as f64 - 50.0) / 7.0)
                .collect();
            let w: Vec<f64> = (0..n).map(|i| (i % 5) as f64 - 2.0).collect();
            assert!((sum_lanes(&v) - v.iter().sum::<f64>()).abs() < 1e-9);
            let d: f64 = v.iter().zip(&w).map(|(a, b)| a * b).sum();
            assert!((dot_lanes(&v, &w) - d).abs() < 1e-9);
            let max = v.iter().cloned().fold(f64::MIN, f64::max);
            assert_eq!(max_lanes(&v), max);
            assert_eq!(argmax_lanes(&v), v.iter().position(|&x| x == max).unwrap());
        }
        // first occurrence wins, across lanes and in the tail
        assert_eq!(
            argmax_lanes(&[0.0, 3.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]),
            1
        );
        assert_eq!(argmax_lanes(&[1.0; 20]), 0);
        assert_eq!(
            argmax_lanes(&[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0]),
            9
        );
    }

    fn wave(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 + seed * 11) % 101) as f32 / 25.0 - 2.0)
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The GPU's fused ops are bitwise the CPU model's separate ones.
    #[test]
    fn fused_bias_gelu_is_the_separate_ops() {
        let (n, oc) = (5, 11);
        let (x, b, d) = (wave(n * oc, 1), wave(oc, 2), wave(n * oc, 3));
        let pre: Vec<f32> = (0..n * oc).map(|i| x[i] + b[i % oc]).collect();
        let mut want = vec![0.0; n * oc];
        gelu_forward(&mut want, &pre, n * oc);
        let (mut out, mut inp) = (vec![0.0; n * oc], x.clone());
        bias_gelu_forward(&mut out, &mut inp, &b, n, oc);
        assert_eq!((bits(&out), bits(&inp)), (bits(&want), bits(&pre)));

        let (mut dpre, mut dbias) = (vec![0.0; n * oc], vec![0.5; oc]);
        gelu_backward(&mut dpre, &pre, &d, n * oc);
        bias_backward(&mut dbias, &dpre, n, oc);
        let (mut dinp, mut dbias2) = (vec![0.0; n * oc], vec![0.5; oc]);
        bias_gelu_backward(&mut dinp, &mut dbias2, &inp, &d, n, oc);
        assert_eq!((bits(&dinp), bits(&dbias2)), (bits(&dpre), bits(&dbias)));
        assert!(dbias2.iter().any(|&g| g != 0.5), "the bias gradient moved");
    }

    #[test]
    fn fused_cross_entropy_is_forward_then_backward() {
        let (n, v) = (3, 1001);
        let logits = wave(n * v, 4);
        let targets = [0u32, 500, 1000];
        let dlosses = [1.0f32, 0.5, 2.0];
        let (mut losses, mut probs) = (vec![0.0; n], vec![0.0; n * v]);
        softmax_crossentropy_forward(&mut losses, &mut probs, &logits, &targets, n, v);
        let mut dlogits = vec![0.0; n * v];
        crossentropy_softmax_backward(&mut dlogits, &dlosses, &probs, &targets, n, v);
        let (mut losses2, mut grad) = (vec![0.0; n], logits.clone());
        crossentropy_fused(&mut losses2, &mut grad, &dlosses, &targets, n, v);
        assert_eq!(bits(&losses2), bits(&losses));
        assert_eq!(bits(&grad), bits(&dlogits));
        assert!(grad[500 + v] < 0.0, "the target's gradient is p - 1");
    }

    /// A scale folded into the softmax is the scale applied to the scores before it; the
    /// backward's scale multiplies the gradient of the scores.
    #[test]
    fn softmax_scale_is_applied_to_the_scores() {
        let (n, t) = (4, 13);
        let (x, d) = (wave(n * t, 5), wave(n * t, 6));
        let mut scaled: Vec<f32> = x.iter().map(|&v| v * 0.25).collect();
        softmax_forward(&mut scaled, 1.0, n, t);
        let mut att = x.clone();
        softmax_forward(&mut att, 0.25, n, t);
        assert_eq!(bits(&att), bits(&scaled));
        for row in att.chunks(t) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        let (mut d1, mut d4) = (vec![0.0; n * t], vec![0.0; n * t]);
        softmax_backward(&mut d1, &d, &att, 1.0, n, t);
        softmax_backward(&mut d4, &d, &att, 0.25, n, t);
        let quarter: Vec<f32> = d1.iter().map(|&g| g * 0.25).collect();
        assert_eq!(bits(&d4), bits(&quarter));
    }

    /// A confident row over BERT's vocabulary: the target's logit 17 to 19 above the
    /// 30,521 others, so every other term of the softmax denominator is 6e-9 to 4e-8,
    /// below half an f32 ulp of the running total that holds the target's 1. Eight running
    /// f32 totals dropped those terms in the lane holding the 1 (loss off by 5.9e-5, a
    /// tenth of it); the f64 total is off by the f32 rounding of the terms alone.
    #[test]
    fn confident_row_log_sum_exp_is_f32_accurate() {
        let v = 30522;
        let target = 4321;
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let logits: Vec<f32> = (0..v)
            .map(|j| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let u = (state >> 40) as f64 / (1u64 << 24) as f64;
                if j == target {
                    12.0
                } else {
                    (-5.0 - 2.0 * u) as f32
                }
            })
            .collect();
        let max = logits[target] as f64;
        let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
        let want = sum.ln();
        let (mut loss, mut probs) = ([0f32], vec![0f32; v]);
        softmax_crossentropy_forward(&mut loss, &mut probs, &logits, &[target as u32], 1, v);
        let err = (loss[0] as f64 - want).abs();
        assert!(
            want > 4.0e-4 && want < 7.0e-4,
            "the row is as confident as meant: loss {want:e}"
        );
        assert!(
            err < 1e-9,
            "loss {} against f64 {want}: error {err:e}",
            loss[0]
        );
        let p: f64 = probs.iter().map(|&p| p as f64).sum();
        assert!((p - 1.0).abs() < 1e-6, "probabilities sum to {p}");
    }
}
