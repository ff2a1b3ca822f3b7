//! The model's kernels on the GPU (feature `cuda`): `kernels/bert.cu`, built by the
//! library into its fatbin and found by name through [`Device::function`].
//!
//! Each launcher is named like its CPU twin in [`crate::ops`] or [`crate::optim`] and
//! takes the same arguments in the same order after the stream, as device buffers:
//!
//! ```text
//! ops::layernorm_forward(out, mean, rstd, inp, weight, bias, n, c)                 CPU
//! Kernels::layernorm_forward(&stream, out, mean, rstd, inp, weight, bias, n, c)    GPU
//! ```
//!
//! Token ids, row indices and targets are `u32` on the device (`usize` rows on the CPU).
//! Launches are asynchronous; results are there after a download or
//! [`Stream::synchronize`]. Which kernels match their twin bit for bit, and the stated
//! tolerance of the others, are in `kernels/bert.cu` and `tests/gpu_bert_kernels.rs`.
//! Not here: the matrix products (cuBLAS) and the model's forward and backward on the GPU.

use hetccl::device::{
    CudaFunction, Device, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg, Stream,
};

use crate::error::{Error, Result};
use crate::optim::{AdamWConfig, NORM_CHUNK};

/// Threads per block of every kernel (`BERT_BLOCK` in kernels/bert.cu).
const BLOCK: u32 = 256;
/// Rows per block of the warp-per-row kernels.
const ROWS_PER_BLOCK: usize = BLOCK as usize / 32;
/// Blocks of a grid-stride elementwise kernel, at most.
const MAX_BLOCKS: usize = 4096;
/// Owner groups of `encoder_backward`: block `g` adds into the table rows `r ≡ g (mod
/// OWNERS)`.
const OWNERS: u32 = 128;

/// The kernels of kernels/bert.cu, in the order of [`Kernels`]' functions.
const NAMES: [&str; 16] = [
    "bias_gelu_forward",
    "bias_gelu_backward",
    "layernorm_forward",
    "layernorm_backward_rows",
    "layernorm_backward_params",
    "softmax_forward",
    "softmax_backward",
    "encoder_forward",
    "encoder_backward",
    "gather_rows",
    "scatter_add_rows",
    "crossentropy_fused",
    "bias_backward",
    "adamw_update",
    "scaled_norm_chunks",
    "scaled_norm_finish",
];

/// Index of each kernel in [`NAMES`].
#[derive(Clone, Copy)]
enum K {
    BiasGeluForward = 0,
    BiasGeluBackward,
    LayernormForward,
    LayernormBackwardRows,
    LayernormBackwardParams,
    SoftmaxForward,
    SoftmaxBackward,
    EncoderForward,
    EncoderBackward,
    GatherRows,
    ScatterAddRows,
    CrossentropyFused,
    BiasBackward,
    AdamwUpdate,
    ScaledNormChunks,
    ScaledNormFinish,
}

/// Number of f64 partial sums [`Kernels::scaled_norm`] needs for `n` gradients.
pub fn scaled_norm_chunks(n: usize) -> usize {
    n.div_ceil(NORM_CHUNK)
}

/// The trainer's kernels, looked up once on a [`Device`].
pub struct Kernels {
    funcs: Vec<CudaFunction>,
}

/// A shape as the kernels' `int`.
fn dim(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::invalid(
            op,
            format!(
                "{what} = {v} does not fit the kernels' int (at most {})",
                i32::MAX
            ),
        )
    })
}

/// A buffer must hold at least what the shapes address (the CPU twins slice `[..n]` the
/// same way).
pub(crate) fn need(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got >= want {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!("{what} has {got} elements, needs at least {want}"),
        ))
    }
}

fn grid(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One thread per element, grid-stride.
fn elementwise(items: usize) -> LaunchConfig {
    grid(items.div_ceil(BLOCK as usize).min(MAX_BLOCKS))
}

/// One warp per row.
fn warp_rows(rows: usize) -> LaunchConfig {
    grid(rows.div_ceil(ROWS_PER_BLOCK))
}

/// One thread per column.
fn columns(cols: usize) -> LaunchConfig {
    grid(cols.div_ceil(BLOCK as usize))
}

/// Launches `$k` on `$stream` with `$cfg`, pushing each argument in order; the device
/// pointers' guards must be alive around it (they order the stream after earlier writers).
macro_rules! launch {
    ($self:ident, $stream:ident, $k:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        let k: K = $k;
        let mut b = $stream.cuda().launch_builder(&$self.funcs[k as usize]);
        $(b.arg(&$arg);)*
        // SAFETY: the arguments are the kernel's parameter list in kernels/bert.cu, in
        // order and of its types; the launcher checked that every buffer holds what the
        // shapes address (and its caller vouches for the ids, where it is unsafe).
        unsafe { b.launch($cfg) }.map(|_| ()).map_err(|e| {
            Error::from(hetccl::Error::Device {
                op: format!("launch {}", NAMES[k as usize]),
                detail: e.to_string(),
            })
        })
    }};
}

impl Kernels {
    /// Finds every kernel of kernels/bert.cu in `device`'s module.
    pub fn load(device: &Device) -> Result<Kernels> {
        let funcs = NAMES
            .iter()
            .map(|n| device.function(n))
            .collect::<hetccl::Result<Vec<_>>>()?;
        Ok(Kernels { funcs })
    }

    /// [`crate::ops::bias_gelu_forward`]: `inp += bias` (in place), `out = gelu(inp)`.
    /// out, inp (N,OC); bias (OC). Bitwise.
    pub fn bias_gelu_forward(
        &self,
        stream: &Stream,
        out: &mut impl DevicePtrMut<f32>,
        inp: &mut impl DevicePtrMut<f32>,
        bias: &impl DevicePtr<f32>,
        n: usize,
        oc: usize,
    ) -> Result<()> {
        const OP: &str = "gpu::bias_gelu_forward";
        let (ni, oci) = (dim(OP, "n", n)?, dim(OP, "oc", oc)?);
        need(OP, "out", out.len(), n * oc)?;
        need(OP, "inp", inp.len(), n * oc)?;
        need(OP, "bias", bias.len(), oc)?;
        if n * oc == 0 {
            return Ok(());
        }
        let s = stream.cuda();
        let (o, _o) = out.device_ptr_mut(s);
        let (i, _i) = inp.device_ptr_mut(s);
        let (b, _b) = bias.device_ptr(s);
        launch!(
            self,
            stream,
            K::BiasGeluForward,
            elementwise(n * oc),
            [o, i, b, ni, oci]
        )
    }

    /// [`crate::ops::bias_gelu_backward`]: `g = gelu'(inp)·dout`, `dinp += g`, `dbias +=
    /// Σ_rows g`. dinp, inp, dout (N,OC); dbias (OC). Bitwise.
    #[allow(clippy::too_many_arguments)]
    pub fn bias_gelu_backward(
        &self,
        stream: &Stream,
        dinp: &mut impl DevicePtrMut<f32>,
        dbias: &mut impl DevicePtrMut<f32>,
        inp: &impl DevicePtr<f32>,
        dout: &impl DevicePtr<f32>,
        n: usize,
        oc: usize,
    ) -> Result<()> {
        const OP: &str = "gpu::bias_gelu_backward";
        let (ni, oci) = (dim(OP, "n", n)?, dim(OP, "oc", oc)?);
        need(OP, "dinp", dinp.len(), n * oc)?;
        need(OP, "dbias", dbias.len(), oc)?;
        need(OP, "inp", inp.len(), n * oc)?;
        need(OP, "dout", dout.len(), n * oc)?;
        if oc == 0 {
            return Ok(());
        }
        let s = stream.cuda();
        let (di, _di) = dinp.device_ptr_mut(s);
        let (db, _db) = dbias.device_ptr_mut(s);
        let (i, _i) = inp.device_ptr(s);
        let (d, _d) = dout.device_ptr(s);
        launch!(
            self,
            stream,
            K::BiasGeluBackward,
            columns(oc),
            [di, db, i, d, ni, oci]
        )
    }

    /// [`crate::ops::layernorm_forward`]. out, inp (N,C); mean, rstd (N); weight, bias (C).
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward(
        &self,
        stream: &Stream,
        out: &mut impl DevicePtrMut<f32>,
        mean: &mut impl DevicePtrMut<f32>,
        rstd: &mut impl DevicePtrMut<f32>,
        inp: &impl DevicePtr<f32>,
        weight: &impl DevicePtr<f32>,
        bias: &impl DevicePtr<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "gpu::layernorm_forward";
        let (ni, ci) = (dim(OP, "n", n)?, dim(OP, "c", c)?);
        need(OP, "out", out.len(), n * c)?;
        need(OP, "mean", mean.len(), n)?;
        need(OP, "rstd", rstd.len(), n)?;
        need(OP, "inp", inp.len(), n * c)?;
        need(OP, "weight", weight.len(), c)?;
        need(OP, "bias", bias.len(), c)?;
        if n * c == 0 {
            return Ok(());
        }
        let s = stream.cuda();
        let (o, _o) = out.device_ptr_mut(s);
        let (m, _m) = mean.device_ptr_mut(s);
        let (r, _r) = rstd.device_ptr_mut(s);
        let (i, _i) = inp.device_ptr(s);
        let (w, _w) = weight.device_ptr(s);
        let (b, _b) = bias.device_ptr(s);
        launch!(
            self,
            stream,
            K::LayernormForward,
            warp_rows(n),
            [o, m, r, i, w, b, ni, ci]
        )
    }

    /// [`crate::ops::layernorm_backward`]: dinp (N,C) += (one warp per row); dweight,
    /// dbias (C) += (one thread per column, rows in order, bitwise given mean and rstd).
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward(
        &self,
        stream: &Stream,
        dinp: &mut impl DevicePtrMut<f32>,
        dweight: &mut impl DevicePtrMut<f32>,
        dbias: &mut impl DevicePtrMut<f32>,
        dout: &impl DevicePtr<f32>,
        inp: &impl DevicePtr<f32>,
        weight: &impl DevicePtr<f32>,
        mean: &impl DevicePtr<f32>,
        rstd: &impl DevicePtr<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "gpu::layernorm_backward";
        let (ni, ci) = (dim(OP, "n", n)?, dim(OP, "c", c)?);
        need(OP, "dinp", dinp.len(), n * c)?;
        need(OP, "dweight", dweight.len(), c)?;
        need(OP, "dbias", dbias.len(), c)?;
        need(OP, "dout", dout.len(), n * c)?;
        need(OP, "inp", inp.len(), n * c)?;
        need(OP, "weight", weight.len(), c)?;
        need(OP, "mean", mean.len(), n)?;
        need(OP, "rstd", rstd.len(), n)?;
        if n * c == 0 {
            return Ok(());
        }
        let s = stream.cuda();
        let (di, _di) = dinp.device_ptr_mut(s);
        let (dw, _dw) = dweight.device_ptr_mut(s);
        let (db, _db) = dbias.device_ptr_mut(s);
        let (d, _d) = dout.device_ptr(s);
        let (i, _i) = inp.device_ptr(s);
        let (w, _w) = weight.device_ptr(s);
        let (m, _m) = mean.device_ptr(s);
        let (r, _r) = rstd.device_ptr(s);
        launch!(
            self,
            stream,
            K::LayernormBackwardRows,
            warp_rows(n),
            [di, d, i, w, m, r, ni, ci]
        )?;
        launch!(
            self,
            stream,
            K::LayernormBackwardParams,
            columns(c),
            [dw, db, d, i, m, r, ni, ci]
        )
    }

    /// [`crate::ops::softmax_forward`]: `att = softmax(scale·att)` in place over N rows of
    /// T (a warp per row, T at most what a row of scores holds). Bitwise.
    pub fn softmax_forward(
        &self,
        stream: &Stream,
        att: &mut impl DevicePtrMut<f32>,
        scale: f32,
        n: usize,
        t: usize,
    ) -> Result<()> {
        const OP: &str = "gpu::softmax_forward";
        let (ni, ti) = (dim(OP, "n", n)?, dim(OP, "t", t)?);
        need(OP, "att", att.len(), n * t)?;
        if n * t == 0 {
            return Ok(());
        }
        let s = stream.cuda();
        let (a, _a) = att.device_ptr_mut(s);
        launch!(
            self,
            stream,
            K::SoftmaxForward,
            warp_rows(n),
            [a, scale, ni, ti]
        )
    }

    /// [`crate::ops::softmax_backward`]: `dpreatt = scale·att ⊙ (datt - Σ att·datt)`
    /// (overwritten). dpreatt, datt, att (N,T). Bitwise.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_backward(
        &self,
        stream: &Stream,
        dpreatt: &mut impl DevicePtrMut<f32>,
        datt: &impl DevicePtr<f32>,
        att: &impl DevicePtr<f32>,
        scale: f32,
        n: usize,
        t: usize,
    ) -> Result<()> {
        const OP: &str = "gpu::softmax_backward";
        let (ni, ti) = (dim(OP, "n", n)?, dim(OP, "t", t)?);
        need(OP, "dpreatt", dpreatt.len(), n * t)?;
        need(OP, "datt", datt.len(), n * t)?;
        need(OP, "att", att.len(), n * t)?;
        if n * t == 0 {
            return Ok(());
        }
        let s = stream.cuda();
        let (dp, _dp) = dpreatt.device_ptr_mut(s);
        let (d, _d) = datt.device_ptr(s);
        let (a, _a) = att.device_ptr(s);
        launch!(
            self,
            stream,
            K::SoftmaxBackward,
            warp_rows(n),
            [dp, d, a, scale, ni, ti]
        )
    }

    /// [`crate::ops::encoder_forward`]. out (B,T,C); inp, token_types (B,T); wte (V,C);
    /// wpe (P,C) with P ≥ T; wtt (2,C). Bitwise.
    ///
    /// # Safety
    /// Every id of `inp` must be a row of `wte` and every one of `token_types` a row of
    /// `wtt` (the kernel reads the rows they name); the model checks a batch's ids on the
    /// host before it uploads them.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn encoder_forward(
        &self,
        stream: &Stream,
        out: &mut impl DevicePtrMut<f32>,
        inp: &impl DevicePtr<u32>,
        token_types: &impl DevicePtr<u32>,
        wte: &impl DevicePtr<f32>,
        wpe: &impl DevicePtr<f32>,
        wtt: &impl DevicePtr<f32>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "gpu::encoder_forward";
        let (bi, ti, ci) = (dim(OP, "b", b)?, dim(OP, "t", t)?, dim(OP, "c", c)?);
        dim(OP, "b*t", b * t)?;
        need(OP, "out", out.len(), b * t * c)?;
        need(OP, "inp", inp.len(), b * t)?;
        need(OP, "token_types", token_types.len(), b * t)?;
        need(OP, "wpe", wpe.len(), t * c)?;
        if b * t * c == 0 {
            return Ok(());
        }
        let s = stream.cuda();
        let (o, _o) = out.device_ptr_mut(s);
        let (i, _i) = inp.device_ptr(s);
        let (tt, _tt) = token_types.device_ptr(s);
        let (we, _we) = wte.device_ptr(s);
        let (pe, _pe) = wpe.device_ptr(s);
        let (te, _te) = wtt.device_ptr(s);
        launch!(
            self,
            stream,
            K::EncoderForward,
            elementwise(b * t * c),
            [o, i, tt, we, pe, te, bi, ti, ci]
        )
    }

    /// [`crate::ops::encoder_backward`]: dout's rows scatter-added into the three tables,
    /// each element summed in token order by one thread (no atomics). Bitwise.
    ///
    /// # Safety
    /// As [`Kernels::encoder_forward`]: every id names a row of its table.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn encoder_backward(
        &self,
        stream: &Stream,
        dwte: &mut impl DevicePtrMut<f32>,
        dwpe: &mut impl DevicePtrMut<f32>,
        dwtt: &mut impl DevicePtrMut<f32>,
        dout: &impl DevicePtr<f32>,
        inp: &impl DevicePtr<u32>,
        token_types: &impl DevicePtr<u32>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "gpu::encoder_backward";
        let (bi, ti, ci) = (dim(OP, "b", b)?, dim(OP, "t", t)?, dim(OP, "c", c)?);
        dim(OP, "b*t", b * t)?;
        need(OP, "dwpe", dwpe.len(), t * c)?;
        need(OP, "dout", dout.len(), b * t * c)?;
        need(OP, "inp", inp.len(), b * t)?;
        need(OP, "token_types", token_types.len(), b * t)?;
        if b * t * c == 0 {
            return Ok(());
        }
        let s = stream.cuda();
        let (we, _we) = dwte.device_ptr_mut(s);
        let (pe, _pe) = dwpe.device_ptr_mut(s);
        let (te, _te) = dwtt.device_ptr_mut(s);
        let (d, _d) = dout.device_ptr(s);
        let (i, _i) = inp.device_ptr(s);
        let (tt, _tt) = token_types.device_ptr(s);
        // (OWNERS, channel tiles): see the kernel.
        let cfg = LaunchConfig {
            grid_dim: (OWNERS, c.div_ceil(BLOCK as usize) as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            stream,
            K::EncoderBackward,
            cfg,
            [we, pe, te, d, i, tt, bi, ti, ci]
        )
    }

    /// [`crate::ops::gather_rows`]: `out[i,:] = inp[rows[i],:]`, M = `rows.len()`.
    /// Bitwise.
    ///
    /// # Safety
    /// Every entry of `rows` must be a row of `inp` (below `inp.len() / c`).
    pub unsafe fn gather_rows(
        &self,
        stream: &Stream,
        out: &mut impl DevicePtrMut<f32>,
        inp: &impl DevicePtr<f32>,
        rows: &impl DevicePtr<u32>,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "gpu::gather_rows";
        let m = rows.len();
        let (mi, ci) = (dim(OP, "rows", m)?, dim(OP, "c", c)?);
        need(OP, "out", out.len(), m * c)?;
        if m * c == 0 {
            return Ok(());
        }
        let s = stream.cuda();
        let (o, _o) = out.device_ptr_mut(s);
        let (i, _i) = inp.device_ptr(s);
        let (r, _r) = rows.device_ptr(s);
        launch!(
            self,
            stream,
            K::GatherRows,
            elementwise(m * c),
            [o, i, r, mi, ci]
        )
    }

    /// [`crate::ops::scatter_add_rows`]: `dinp[rows[i],:] += dout[i,:]`, rows in order
    /// (repeats allowed). Bitwise.
    ///
    /// # Safety
    /// Every entry of `rows` must be a row of `dinp` (below `dinp.len() / c`).
    pub unsafe fn scatter_add_rows(
        &self,
        stream: &Stream,
        dinp: &mut impl DevicePtrMut<f32>,
        dout: &impl DevicePtr<f32>,
        rows: &impl DevicePtr<u32>,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "gpu::scatter_add_rows";
        let m = rows.len();
        let (mi, ci) = (dim(OP, "rows", m)?, dim(OP, "c", c)?);
        need(OP, "dout", dout.len(), m * c)?;
        if m * c == 0 {
            return Ok(());
        }
        let s = stream.cuda();
        let (di, _di) = dinp.device_ptr_mut(s);
        let (d, _d) = dout.device_ptr(s);
        let (r, _r) = rows.device_ptr(s);
        launch!(
            self,
            stream,
            K::ScatterAddRows,
            columns(c),
            [di, d, r, mi, ci]
        )
    }

    /// [`crate::ops::crossentropy_fused`]: losses (N), and `logits` (N,V) replaced by
    /// `dlosses[i]·(softmax - onehot)`; one block per row, the log-sum-exp in f64.
    ///
    /// # Safety
    /// Every target must be below `v`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn crossentropy_fused(
        &self,
        stream: &Stream,
        losses: &mut impl DevicePtrMut<f32>,
        logits: &mut impl DevicePtrMut<f32>,
        dlosses: &impl DevicePtr<f32>,
        targets: &impl DevicePtr<u32>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        const OP: &str = "gpu::crossentropy_fused";
        let (ni, vi) = (dim(OP, "n", n)?, dim(OP, "v", v)?);
        need(OP, "losses", losses.len(), n)?;
        need(OP, "logits", logits.len(), n * v)?;
        need(OP, "dlosses", dlosses.len(), n)?;
        need(OP, "targets", targets.len(), n)?;
        if n * v == 0 {
            return Ok(());
        }
        let s = stream.cuda();
        let (lo, _lo) = losses.device_ptr_mut(s);
        let (l, _l) = logits.device_ptr_mut(s);
        let (d, _d) = dlosses.device_ptr(s);
        let (t, _t) = targets.device_ptr(s);
        launch!(
            self,
            stream,
            K::CrossentropyFused,
            grid(n),
            [lo, l, d, t, ni, vi]
        )
    }

    /// [`crate::ops::bias_backward`]: `dbias (OC) += Σ_rows dout (N,OC)`, rows in order.
    /// Bitwise.
    pub fn bias_backward(
        &self,
        stream: &Stream,
        dbias: &mut impl DevicePtrMut<f32>,
        dout: &impl DevicePtr<f32>,
        n: usize,
        oc: usize,
    ) -> Result<()> {
        const OP: &str = "gpu::bias_backward";
        let (ni, oci) = (dim(OP, "n", n)?, dim(OP, "oc", oc)?);
        need(OP, "dbias", dbias.len(), oc)?;
        need(OP, "dout", dout.len(), n * oc)?;
        if oc == 0 {
            return Ok(());
        }
        let s = stream.cuda();
        let (db, _db) = dbias.device_ptr_mut(s);
        let (d, _d) = dout.device_ptr(s);
        launch!(self, stream, K::BiasBackward, columns(oc), [db, d, ni, oci])
    }

    /// [`crate::optim::adamw_update`] on equal-length params, grads, m, v (the gradient
    /// scaled by `inv` then `clip`, used, zeroed). Bitwise.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_update(
        &self,
        stream: &Stream,
        params: &mut impl DevicePtrMut<f32>,
        grads: &mut impl DevicePtrMut<f32>,
        m: &mut impl DevicePtrMut<f32>,
        v: &mut impl DevicePtrMut<f32>,
        cfg: AdamWConfig,
        bc1: f32,
        bc2: f32,
        lr: f32,
        wd: f32,
        inv: f32,
        clip: f32,
    ) -> Result<()> {
        const OP: &str = "gpu::adamw_update";
        let n = params.len();
        for (what, len) in [("grads", grads.len()), ("m", m.len()), ("v", v.len())] {
            if len != n {
                return Err(Error::invalid(
                    OP,
                    format!("{what} has {len} elements, params {n}"),
                ));
            }
        }
        if n == 0 {
            return Ok(());
        }
        let s = stream.cuda();
        let (p, _p) = params.device_ptr_mut(s);
        let (g, _g) = grads.device_ptr_mut(s);
        let (mp, _mp) = m.device_ptr_mut(s);
        let (vp, _vp) = v.device_ptr_mut(s);
        let n64 = n as u64;
        let (b1, b2, eps) = (cfg.beta1, cfg.beta2, cfg.eps);
        launch!(
            self,
            stream,
            K::AdamwUpdate,
            elementwise(n),
            [p, g, mp, vp, n64, b1, b2, eps, bc1, bc2, lr, wd, inv, clip]
        )
    }

    /// [`crate::optim::scaled_norm`]`(grads, inv)` into `out[0]`, on the device (no host
    /// wait): per chunk of [`NORM_CHUNK`] a sum in f64 and element order into `partial`
    /// (at least [`scaled_norm_chunks`] long), then those in chunk order. Bitwise.
    pub fn scaled_norm(
        &self,
        stream: &Stream,
        grads: &impl DevicePtr<f32>,
        inv: f32,
        partial: &mut impl DevicePtrMut<f64>,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        const OP: &str = "gpu::scaled_norm";
        let n = grads.len();
        let chunks = scaled_norm_chunks(n);
        need(OP, "partial", partial.len(), chunks)?;
        need(OP, "out", out.len(), 1)?;
        let s = stream.cuda();
        let (g, _g) = grads.device_ptr(s);
        let (p, _p) = partial.device_ptr_mut(s);
        let (o, _o) = out.device_ptr_mut(s);
        let (n64, chunk64, chunks64) = (n as u64, NORM_CHUNK as u64, chunks as u64);
        if chunks > 0 {
            launch!(
                self,
                stream,
                K::ScaledNormChunks,
                columns(chunks),
                [p, g, inv, n64, chunk64]
            )?;
        }
        launch!(self, stream, K::ScaledNormFinish, grid(1), [o, p, chunks64])
    }
}
