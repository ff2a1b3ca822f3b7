//! The model's matrix products on the GPU (feature `cuda`), through cuBLAS loaded at run
//! time: each named like its CPU twin in [`crate::ops`], with the same arguments in the
//! same order after the stream, as device buffers, row-major like the CPU's:
//!
//! ```text
//! ops::matmul_forward(out, inp, weight, bias, n, c, oc)                  CPU
//! Blas::matmul_forward(&stream, out, inp, weight, bias, n, c, oc)        GPU
//! ```
//!
//! Twins: [`Blas::matmul_forward`], [`Blas::matmul_backward`] (its bias part is
//! [`Kernels::bias_backward`]), [`Blas::attention_forward`] and
//! [`Blas::attention_backward`] (their softmax is [`Kernels::softmax_forward`] /
//! [`Kernels::softmax_backward`], which carry the `1/√hs` scale that the CPU puts into its
//! products), and [`Blas::residual_forward`].
//!
//! Row-major through column-major cuBLAS: a row-major `X (r×c)` with row stride `ld` is
//! the column-major `Xᵀ (c×r)` with the same `ld`, so the row-major `C = op(A)·op(B)` is
//! issued as the column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`: operands swapped, each keeping its own
//! transposition flag, m and n swapped ([`Blas::gemm`]).
//!
//! Precision policy: parameters, activations and gradients are fp32, and so is every
//! product's accumulation. By default ([`Precision::Fp32`]) cuBLAS runs fp32 FMA
//! (`CUBLAS_DEFAULT_MATH`), so a product differs from the CPU's only by summation order
//! (about `k·2⁻²⁴` relative to `Σ|a·b|`). [`Precision::Tf32`] (opt-in) lets the products
//! round their inputs to TF32 (10-bit mantissa, `CUBLAS_TF32_TENSOR_OP_MATH`) on tensor
//! cores, about `2⁻¹¹` relative per input; the bias broadcast and the residual sums stay
//! exact fp32 either way. (The driver's `NVIDIA_TF32_OVERRIDE=1` can still turn TF32 on
//! behind the default, as for any cuBLAS user.)

use std::sync::Arc;

use hetccl::device::cublas::{result::CublasError, sys, CudaBlas};
use hetccl::device::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, Stream};

use crate::error::{Error, Result};
use crate::gpu::{need, Kernels};

/// How the products may round their inputs (the module doc states the policy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// fp32 inputs, fp32 FMA accumulation (the default).
    #[default]
    Fp32,
    /// Inputs rounded to TF32 on tensor cores, fp32 accumulation.
    Tf32,
}

/// One operand of [`Blas::gemm`]: a row-major matrix (or a batch of them) inside a device
/// buffer, starting `off` elements in, row stride `ld`, `stride` elements between the
/// matrices of a batch.
#[derive(Clone, Copy)]
struct Operand {
    off: usize,
    ld: usize,
    stride: usize,
}

impl Operand {
    fn at(off: usize, ld: usize) -> Operand {
        Operand { off, ld, stride: 0 }
    }
    fn batched(off: usize, ld: usize, stride: usize) -> Operand {
        Operand { off, ld, stride }
    }
    /// One past the last element a batch of `rows × cols` matrices addresses.
    fn end(&self, rows: usize, cols: usize, batch: usize) -> usize {
        if rows == 0 || cols == 0 || batch == 0 {
            self.off
        } else {
            self.off + (batch - 1) * self.stride + (rows - 1) * self.ld + cols
        }
    }
}

/// cuBLAS on one [`Stream`], with the trainer's kernels for the non-product parts.
pub struct Blas {
    handle: CudaBlas,
    stream: Arc<CudaStream>,
    precision: Precision,
    /// `ONES (N)`: the left factor of the bias broadcast `out = ONES (N,1) · bias (1,OC)`;
    /// grown to the largest N seen.
    ones: CudaSlice<f32>,
}

fn blas_error(op: impl Into<String>) -> impl FnOnce(CublasError) -> Error {
    let op = op.into();
    move |e| {
        Error::from(hetccl::Error::Device {
            op,
            detail: format!("{e:?}"),
        })
    }
}

/// A shape as cuBLAS' `int`.
fn int(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::invalid(
            op,
            format!(
                "{what} = {v} does not fit cuBLAS' int (at most {})",
                i32::MAX
            ),
        )
    })
}

fn trans(t: bool) -> sys::cublasOperation_t {
    if t {
        sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        sys::cublasOperation_t::CUBLAS_OP_N
    }
}

impl Blas {
    /// A cuBLAS handle issuing on `stream`; fails with the reason when cuBLAS cannot be
    /// loaded (see [`hetccl::device::cublas_available`]).
    pub fn new(stream: &Stream, precision: Precision) -> Result<Blas> {
        hetccl::device::cublas_available().map_err(|detail| {
            Error::from(hetccl::Error::Device {
                op: "load cuBLAS".into(),
                detail,
            })
        })?;
        let handle =
            CudaBlas::new(stream.cuda().clone()).map_err(blas_error("create cuBLAS handle"))?;
        let ones = stream.upload(&[1.0f32; 1])?;
        Ok(Blas {
            handle,
            stream: stream.cuda().clone(),
            precision,
            ones,
        })
    }

    /// The precision the products run in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    fn check_stream(&self, op: &'static str, stream: &Stream) -> Result<()> {
        if Arc::ptr_eq(stream.cuda(), &self.stream) {
            Ok(())
        } else {
            Err(Error::invalid(
                op,
                "the stream is not the one this cuBLAS handle issues on (Blas::new)",
            ))
        }
    }

    fn set_math(&self, exact: bool) -> Result<()> {
        let mode = if exact || self.precision == Precision::Fp32 {
            sys::cublasMath_t::CUBLAS_DEFAULT_MATH
        } else {
            sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        };
        // SAFETY: the handle is alive (owned by self); setting its math mode touches no
        // device memory.
        unsafe { sys::cublasSetMathMode(*self.handle.handle(), mode) }
            .result()
            .map_err(blas_error("cublasSetMathMode"))
    }

    /// Row-major `C (m×n) = alpha·op(A)·op(B) + beta·C` for each of `batch` matrix triples,
    /// `op(A)` (m×k) and `op(B)` (k×n); `ta`/`tb` say that A is stored (k×m) / B (n×k).
    /// `exact` keeps fp32 math whatever the precision (the bias broadcast). Every operand's
    /// extent is checked against its buffer before the call.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        op: &'static str,
        exact: bool,
        (ta, tb): (bool, bool),
        (m, n, k, batch): (usize, usize, usize, usize),
        alpha: f32,
        (a, ao): (&impl DevicePtr<f32>, Operand),
        (b, bo): (&impl DevicePtr<f32>, Operand),
        beta: f32,
        (c, co): (&mut impl DevicePtrMut<f32>, Operand),
    ) -> Result<()> {
        let (a_rows, a_cols) = if ta { (k, m) } else { (m, k) };
        let (b_rows, b_cols) = if tb { (n, k) } else { (k, n) };
        need(op, "A", a.len(), ao.end(a_rows, a_cols, batch))?;
        need(op, "B", b.len(), bo.end(b_rows, b_cols, batch))?;
        need(op, "C", c.len(), co.end(m, n, batch))?;
        // cuBLAS wants ld ≥ 1 and ≥ the stored rows' length.
        for (what, ld, cols) in [("A", ao.ld, a_cols), ("B", bo.ld, b_cols), ("C", co.ld, n)] {
            if ld < cols.max(1) {
                return Err(Error::invalid(
                    op,
                    format!("{what}'s row stride {ld} is below its {cols} columns"),
                ));
            }
        }
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let (mi, ni, ki, bi) = (
            int(op, "m", m)?,
            int(op, "n", n)?,
            int(op, "k", k)?,
            int(op, "batch", batch)?,
        );
        let (lda, ldb, ldc) = (
            int(op, "lda", ao.ld)?,
            int(op, "ldb", bo.ld)?,
            int(op, "ldc", co.ld)?,
        );
        self.set_math(exact)?;
        let s = &*self.stream;
        let (pa, _ga) = a.device_ptr(s);
        let (pb, _gb) = b.device_ptr(s);
        let (pc, _gc) = c.device_ptr_mut(s);
        let f = std::mem::size_of::<f32>() as u64;
        let (pa, pb, pc) = (
            pa + ao.off as u64 * f,
            pb + bo.off as u64 * f,
            pc + co.off as u64 * f,
        );
        // Column-major Cᵀ (n×m) = op(B)ᵀ (n×k) · op(A)ᵀ (k×m): see the module doc.
        // SAFETY: the extents of A, B and C (offset, batch strides, rows × row stride) were
        // checked against their buffers above, every ld covers its rows, and the guards
        // `_ga`, `_gb`, `_gc` order this stream after the buffers' earlier users. With
        // k = 0 cuBLAS reads neither A nor B and scales C by beta.
        unsafe {
            sys::cublasSgemmStridedBatched(
                *self.handle.handle(),
                trans(tb),
                trans(ta),
                ni,
                mi,
                ki,
                &alpha,
                pb as *const f32,
                ldb,
                bo.stride as i64,
                pa as *const f32,
                lda,
                ao.stride as i64,
                &beta,
                pc as *mut f32,
                ldc,
                co.stride as i64,
                bi,
            )
        }
        .result()
        .map_err(blas_error(format!("{op}: cublasSgemmStridedBatched")))
    }

    /// [`crate::ops::matmul_forward`]: `out = inp · weightᵀ + bias`. out (N,OC); inp (N,C);
    /// weight (OC,C); bias (OC). Like the CPU, `out` starts at the bias (an exact fp32
    /// broadcast, `ONES (N,1) · bias (1,OC)`) and the product is added to it.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_forward(
        &mut self,
        stream: &Stream,
        out: &mut impl DevicePtrMut<f32>,
        inp: &impl DevicePtr<f32>,
        weight: &impl DevicePtr<f32>,
        bias: Option<&impl DevicePtr<f32>>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        const OP: &str = "gpu::matmul_forward";
        self.check_stream(OP, stream)?;
        let beta = match bias {
            Some(bias) => {
                if self.ones.len() < n {
                    self.ones = stream.upload(&vec![1.0f32; n])?;
                }
                self.gemm(
                    OP,
                    true,
                    (false, false),
                    (n, oc, 1, 1),
                    1.0,
                    (&self.ones, Operand::at(0, 1)),
                    (bias, Operand::at(0, oc)),
                    0.0,
                    (&mut *out, Operand::at(0, oc)),
                )?;
                1.0
            }
            None => 0.0,
        };
        // (N,OC) += inp (N,C) · weightᵀ (C,OC)
        self.gemm(
            OP,
            false,
            (false, true),
            (n, oc, c, 1),
            1.0,
            (inp, Operand::at(0, c)),
            (weight, Operand::at(0, c)),
            beta,
            (out, Operand::at(0, oc)),
        )
    }

    /// [`crate::ops::matmul_backward`]: dinp (N,C) += dout·weight; dweight (OC,C) +=
    /// doutᵀ·inp; dbias (OC) += Σ_rows dout ([`Kernels::bias_backward`], rows in order).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_backward(
        &self,
        stream: &Stream,
        kernels: &Kernels,
        dinp: &mut impl DevicePtrMut<f32>,
        dweight: &mut impl DevicePtrMut<f32>,
        dbias: Option<&mut impl DevicePtrMut<f32>>,
        dout: &impl DevicePtr<f32>,
        inp: &impl DevicePtr<f32>,
        weight: &impl DevicePtr<f32>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        const OP: &str = "gpu::matmul_backward";
        self.check_stream(OP, stream)?;
        // dinp (N,C) += dout (N,OC) · weight (OC,C)
        self.gemm(
            OP,
            false,
            (false, false),
            (n, c, oc, 1),
            1.0,
            (dout, Operand::at(0, oc)),
            (weight, Operand::at(0, c)),
            1.0,
            (dinp, Operand::at(0, c)),
        )?;
        // dweight (OC,C) += doutᵀ (OC,N) · inp (N,C)
        self.gemm(
            OP,
            false,
            (true, false),
            (oc, c, n, 1),
            1.0,
            (dout, Operand::at(0, oc)),
            (inp, Operand::at(0, c)),
            1.0,
            (dweight, Operand::at(0, c)),
        )?;
        if let Some(dbias) = dbias {
            kernels.bias_backward(stream, dbias, dout, n, oc)?;
        }
        Ok(())
    }

    /// [`crate::ops::attention_forward`]: inp (B,T,3C) holds q|k|v; out (B,T,C); att
    /// (B,NH,T,T) receives `softmax(q·kᵀ/√hs)`. Per head, one product batched over B; the
    /// scale goes to the softmax kernel, over all B·NH·T rows at once.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_forward(
        &self,
        stream: &Stream,
        kernels: &Kernels,
        out: &mut impl DevicePtrMut<f32>,
        att: &mut (impl DevicePtrMut<f32> + DevicePtr<f32>),
        inp: &impl DevicePtr<f32>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        const OP: &str = "gpu::attention_forward";
        self.check_stream(OP, stream)?;
        let (hs, c3, tt) = attention_shape(OP, c, nh, t)?;
        for h in 0..nh {
            // att[b,h] (T,T) = Q[b,h] (T,hs) · K[b,h]ᵀ (hs,T)
            self.gemm(
                OP,
                false,
                (false, true),
                (t, t, hs, b),
                1.0,
                (inp, Operand::batched(h * hs, c3, t * c3)),
                (inp, Operand::batched(c + h * hs, c3, t * c3)),
                0.0,
                (&mut *att, Operand::batched(h * tt, t, nh * tt)),
            )?;
        }
        let scale = 1.0 / (hs as f32).sqrt();
        kernels.softmax_forward(stream, &mut *att, scale, b * nh * t, t)?;
        for h in 0..nh {
            // out[b,:,h] (T,hs) = att[b,h] (T,T) · V[b,h] (T,hs)
            self.gemm(
                OP,
                false,
                (false, false),
                (t, hs, t, b),
                1.0,
                (&*att, Operand::batched(h * tt, t, nh * tt)),
                (inp, Operand::batched(2 * c + h * hs, c3, t * c3)),
                0.0,
                (&mut *out, Operand::batched(h * hs, c, t * c)),
            )?;
        }
        Ok(())
    }

    /// [`crate::ops::attention_backward`]: dinp (B,T,3C) += gradients of q|k|v; datt,
    /// dpreatt (B,NH,T,T) scratch (overwritten); dout (B,T,C); inp (B,T,3C); att
    /// (B,NH,T,T) as the forward left it.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        stream: &Stream,
        kernels: &Kernels,
        dinp: &mut impl DevicePtrMut<f32>,
        datt: &mut (impl DevicePtrMut<f32> + DevicePtr<f32>),
        dpreatt: &mut (impl DevicePtrMut<f32> + DevicePtr<f32>),
        dout: &impl DevicePtr<f32>,
        inp: &impl DevicePtr<f32>,
        att: &impl DevicePtr<f32>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        const OP: &str = "gpu::attention_backward";
        self.check_stream(OP, stream)?;
        let (hs, c3, tt) = attention_shape(OP, c, nh, t)?;
        for h in 0..nh {
            let dout_h = Operand::batched(h * hs, c, t * c);
            let att_h = Operand::batched(h * tt, t, nh * tt);
            // datt[b,h] (T,T) = dout[b,:,h] (T,hs) · V[b,h]ᵀ (hs,T)
            self.gemm(
                OP,
                false,
                (false, true),
                (t, t, hs, b),
                1.0,
                (dout, dout_h),
                (inp, Operand::batched(2 * c + h * hs, c3, t * c3)),
                0.0,
                (&mut *datt, att_h),
            )?;
            // dV[b,h] (T,hs) += att[b,h]ᵀ (T,T) · dout[b,:,h] (T,hs)
            self.gemm(
                OP,
                false,
                (true, false),
                (t, hs, t, b),
                1.0,
                (att, att_h),
                (dout, dout_h),
                1.0,
                (&mut *dinp, Operand::batched(2 * c + h * hs, c3, t * c3)),
            )?;
        }
        // dpreatt = scale · att ⊙ (datt - Σ att·datt): the scale is here, not in the products
        let scale = 1.0 / (hs as f32).sqrt();
        kernels.softmax_backward(stream, &mut *dpreatt, &*datt, att, scale, b * nh * t, t)?;
        for h in 0..nh {
            let pre_h = Operand::batched(h * tt, t, nh * tt);
            // dQ[b,h] (T,hs) += dpre[b,h] (T,T) · K[b,h] (T,hs)
            self.gemm(
                OP,
                false,
                (false, false),
                (t, hs, t, b),
                1.0,
                (&*dpreatt, pre_h),
                (inp, Operand::batched(c + h * hs, c3, t * c3)),
                1.0,
                (&mut *dinp, Operand::batched(h * hs, c3, t * c3)),
            )?;
            // dK[b,h] (T,hs) += dpre[b,h]ᵀ (T,T) · Q[b,h] (T,hs)
            self.gemm(
                OP,
                false,
                (true, false),
                (t, hs, t, b),
                1.0,
                (&*dpreatt, pre_h),
                (inp, Operand::batched(h * hs, c3, t * c3)),
                1.0,
                (&mut *dinp, Operand::batched(c + h * hs, c3, t * c3)),
            )?;
        }
        Ok(())
    }

    /// [`crate::ops::residual_forward`]: `out = inp1 + inp2` over N values (cublasSgeam,
    /// one fp32 rounding per element: bitwise the CPU's). `out` may not alias an input.
    pub fn residual_forward(
        &self,
        stream: &Stream,
        out: &mut impl DevicePtrMut<f32>,
        inp1: &impl DevicePtr<f32>,
        inp2: &impl DevicePtr<f32>,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "gpu::residual_forward";
        self.check_stream(OP, stream)?;
        need(OP, "out", out.len(), n)?;
        need(OP, "inp1", inp1.len(), n)?;
        need(OP, "inp2", inp2.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let ni = int(OP, "n", n)?;
        let s = &*self.stream;
        let (p1, _g1) = inp1.device_ptr(s);
        let (p2, _g2) = inp2.device_ptr(s);
        let (po, _go) = out.device_ptr_mut(s);
        let one = 1.0f32;
        // As one column-major (N×1) matrix: C = 1·A + 1·B.
        // SAFETY: the three buffers hold at least N elements (checked above), the guards
        // order this stream after their earlier users, and `out` is a distinct `&mut`.
        unsafe {
            sys::cublasSgeam(
                *self.handle.handle(),
                trans(false),
                trans(false),
                ni,
                1,
                &one,
                p1 as *const f32,
                ni,
                &one,
                p2 as *const f32,
                ni,
                po as *mut f32,
                ni,
            )
        }
        .result()
        .map_err(blas_error(format!("{OP}: cublasSgeam")))
    }
}

/// (hs, 3C, T·T) of an attention shape, refusing C not divisible by NH.
fn attention_shape(
    op: &'static str,
    c: usize,
    nh: usize,
    t: usize,
) -> Result<(usize, usize, usize)> {
    if nh == 0 || c % nh != 0 {
        return Err(Error::invalid(
            op,
            format!("c = {c} is not divisible by nh = {nh}"),
        ));
    }
    Ok((c / nh, 3 * c, t * t))
}
