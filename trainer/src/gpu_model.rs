//! The BERT masked-LM on the GPU (feature `cuda`): [`crate::model::Model`]'s forward and
//! backward, step for step, from the kernels of [`crate::gpu`] and the products of
//! [`crate::gpu_blas`].
//!
//! Parameters and gradients live in two flat device buffers laid out exactly as the CPU
//! model's ([`ParamLayout`]), so checkpoints and Hugging Face exports go through the host
//! layout unchanged ([`GpuModel::set_params`], [`GpuModel::params_to_host`]). Activations
//! are device buffers of the shapes in [`crate::model`]'s doc, reallocated when the batch
//! shape (B, T, M) changes.
//!
//! Where the GPU departs from the CPU's sequence (same math, other roundings):
//!
//! ```text
//! CPU                                           GPU
//! matmul_forward(fch, .., Some(fcb)); gelu      matmul_forward(fch, .., None); bias_gelu_forward
//! gelu_backward; bias part of matmul_backward   bias_gelu_backward (bitwise on a zero dinp)
//! softmax_crossentropy_forward in forward,      crossentropy_fused in forward (dlosses = 1,
//!   crossentropy_softmax_backward in backward     the loss SUM's gradient), logits → dlogits
//! the attention's scale in its products         the scale in its softmax kernels
//! ```
//!
//! The accuracy count needs the arg-max of each masked row's logits, which the fused
//! cross-entropy overwrites: forward downloads the (M,V) logits first and counts on the
//! host (ops::argmax_lanes over logits; the CPU takes it over the probabilities, the same
//! index but for exact ties).

use hetccl::device::{CudaSlice, Device, Stream};

use crate::error::{Error, Result};
use crate::gpu::Kernels;
use crate::gpu_blas::{Blas, Precision};
use crate::model::{check_batch, Batch, LossStats, ModelConfig, ParamLayout};
use crate::ops::argmax_lanes;

/// Tensors of the embeddings group, in layout order (`ParamLayout::tensors[0..5]`).
const WTE: usize = 0;
const WPE: usize = 1;
const WTT: usize = 2;
const EMB_LNW: usize = 3;
const EMB_LNB: usize = 4;
const EMB_TENSORS: usize = 5;
/// Tensors of one layer, in layout order (12 per layer after the embeddings).
const QKVW: usize = 0;
const QKVB: usize = 1;
const ATTW: usize = 2;
const ATTB: usize = 3;
const LN1W: usize = 4;
const LN1B: usize = 5;
const FCW: usize = 6;
const FCB: usize = 7;
const PROJW: usize = 8;
const PROJB: usize = 9;
const LN2W: usize = 10;
const LN2B: usize = 11;
const LAYER_TENSORS: usize = 12;
/// Tensors of the head, in layout order (after the layers).
const DENSEW: usize = 0;
const DENSEB: usize = 1;
const HEAD_LNW: usize = 2;
const HEAD_LNB: usize = 3;
const DECB: usize = 4;

/// Saved activations of one layer (shapes as [`crate::model`]'s `LayerActs`).
struct LayerActs {
    qkv: CudaSlice<f32>,      // (B,T,3C)
    att: CudaSlice<f32>,      // (B,NH,T,T)
    atty: CudaSlice<f32>,     // (B,T,C)
    attproj: CudaSlice<f32>,  // (B,T,C)
    res1: CudaSlice<f32>,     // (B,T,C)
    ln1: CudaSlice<f32>,      // (B,T,C)
    ln1_mean: CudaSlice<f32>, // (B,T)
    ln1_rstd: CudaSlice<f32>, // (B,T)
    fch: CudaSlice<f32>,      // (B,T,F) pre-activation, bias included
    fch_gelu: CudaSlice<f32>, // (B,T,F)
    fcproj: CudaSlice<f32>,   // (B,T,C)
    res2: CudaSlice<f32>,     // (B,T,C)
    ln2: CudaSlice<f32>,      // (B,T,C)
    ln2_mean: CudaSlice<f32>, // (B,T)
    ln2_rstd: CudaSlice<f32>, // (B,T)
}

/// Activations and activation gradients for one batch shape.
struct Acts {
    shape: (usize, usize, usize), // (B, T, M)
    emb: CudaSlice<f32>,          // (B,T,C)
    embln: CudaSlice<f32>,        // (B,T,C)
    embln_mean: CudaSlice<f32>,   // (B,T)
    embln_rstd: CudaSlice<f32>,   // (B,T)
    layers: Vec<LayerActs>,
    hm: CudaSlice<f32>,      // (M,C)
    hd: CudaSlice<f32>,      // (M,C) pre-activation, bias included
    hg: CudaSlice<f32>,      // (M,C)
    hl: CudaSlice<f32>,      // (M,C)
    hl_mean: CudaSlice<f32>, // (M)
    hl_rstd: CudaSlice<f32>, // (M)
    logits: CudaSlice<f32>,  // (M,V), dlogits after forward
    losses: CudaSlice<f32>,  // (M)
    dlosses: CudaSlice<f32>, // (M) ones: the loss is a SUM
    // gradients, reused by every layer
    dout: CudaSlice<f32>,      // (B,T,C)
    dx: CudaSlice<f32>,        // (B,T,C)
    dres2: CudaSlice<f32>,     // (B,T,C)
    dh1: CudaSlice<f32>,       // (B,T,C)
    dfch_gelu: CudaSlice<f32>, // (B,T,F)
    dfch: CudaSlice<f32>,      // (B,T,F)
    dres1: CudaSlice<f32>,     // (B,T,C)
    datty: CudaSlice<f32>,     // (B,T,C)
    dqkv: CudaSlice<f32>,      // (B,T,3C)
    datt: CudaSlice<f32>,      // (B,NH,T,T)
    dpreatt: CudaSlice<f32>,   // (B,NH,T,T)
    demb: CudaSlice<f32>,      // (B,T,C)
    dhm: CudaSlice<f32>,       // (M,C)
    dhd: CudaSlice<f32>,       // (M,C)
    dhg: CudaSlice<f32>,       // (M,C)
    dhl: CudaSlice<f32>,       // (M,C)
}

/// A batch's ids on the device (the host checked them against the model's shape).
struct DevBatch {
    b: usize,
    t: usize,
    ids: CudaSlice<u32>,   // (B,T)
    types: CudaSlice<u32>, // (B,T)
    /// Masked rows and their targets (M), absent when M = 0.
    masked: Option<(CudaSlice<u32>, CudaSlice<u32>)>,
}

/// Zeros of `n` elements (at least one: cudarc refuses empty allocations).
fn buf(stream: &Stream, n: usize) -> Result<CudaSlice<f32>> {
    Ok(stream.alloc_zeros(n.max(1))?)
}

impl Acts {
    fn new(stream: &Stream, cfg: &ModelConfig, (b, t, m): (usize, usize, usize)) -> Result<Acts> {
        let (c, f, nh, v) = (cfg.hidden, cfg.ffn, cfg.heads, cfg.vocab_size);
        let bt = b * t;
        let z = |n: usize| buf(stream, n);
        let layers = (0..cfg.layers)
            .map(|_| {
                Ok(LayerActs {
                    qkv: z(bt * 3 * c)?,
                    att: z(b * nh * t * t)?,
                    atty: z(bt * c)?,
                    attproj: z(bt * c)?,
                    res1: z(bt * c)?,
                    ln1: z(bt * c)?,
                    ln1_mean: z(bt)?,
                    ln1_rstd: z(bt)?,
                    fch: z(bt * f)?,
                    fch_gelu: z(bt * f)?,
                    fcproj: z(bt * c)?,
                    res2: z(bt * c)?,
                    ln2: z(bt * c)?,
                    ln2_mean: z(bt)?,
                    ln2_rstd: z(bt)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Acts {
            shape: (b, t, m),
            emb: z(bt * c)?,
            embln: z(bt * c)?,
            embln_mean: z(bt)?,
            embln_rstd: z(bt)?,
            layers,
            hm: z(m * c)?,
            hd: z(m * c)?,
            hg: z(m * c)?,
            hl: z(m * c)?,
            hl_mean: z(m)?,
            hl_rstd: z(m)?,
            logits: z(m * v)?,
            losses: z(m)?,
            dlosses: stream.upload(&vec![1.0f32; m.max(1)])?,
            dout: z(bt * c)?,
            dx: z(bt * c)?,
            dres2: z(bt * c)?,
            dh1: z(bt * c)?,
            dfch_gelu: z(bt * f)?,
            dfch: z(bt * f)?,
            dres1: z(bt * c)?,
            datty: z(bt * c)?,
            dqkv: z(bt * 3 * c)?,
            datt: z(b * nh * t * t)?,
            dpreatt: z(b * nh * t * t)?,
            demb: z(bt * c)?,
            dhm: z(m * c)?,
            dhd: z(m * c)?,
            dhg: z(m * c)?,
            dhl: z(m * c)?,
        })
    }
}

/// Mutable views of two disjoint ranges of one device buffer, `$r1` before `$r2`, bound
/// to `$a` and `$b` in the caller's scope.
macro_rules! two_mut {
    ($buf:expr; $a:ident = $r1:expr, $b:ident = $r2:expr) => {
        let (r1, r2) = ($r1, $r2);
        debug_assert!(r1.end <= r2.start);
        let (mut lo, mut hi) = $buf.split_at_mut(r2.start);
        let mut $a = lo.slice_mut(r1);
        let mut $b = hi.slice_mut(..r2.len());
    };
}

fn zero(stream: &Stream, b: &mut CudaSlice<f32>) -> Result<()> {
    stream.cuda().memset_zeros(b).map_err(|e| {
        Error::from(hetccl::Error::Device {
            op: "zero a device buffer".into(),
            detail: e.to_string(),
        })
    })
}

/// The BERT masked-LM on one GPU: parameters, gradients and activations on the device.
pub struct GpuModel {
    cfg: ModelConfig,
    layout: ParamLayout,
    stream: Stream,
    kernels: Kernels,
    blas: Blas,
    params: CudaSlice<f32>,
    grads: CudaSlice<f32>,
    acts: Option<Acts>,
    batch: Option<DevBatch>,
    forward_done: bool,
}

impl GpuModel {
    /// A model of shape `cfg` (validated) on `device`, its parameters and gradients zero;
    /// products in `precision`.
    pub fn new(device: &Device, cfg: ModelConfig, precision: Precision) -> Result<GpuModel> {
        cfg.validate()?;
        let layout = ParamLayout::new(&cfg);
        let stream = device.new_stream()?;
        let kernels = Kernels::load(device)?;
        let blas = Blas::new(&stream, precision)?;
        let params = buf(&stream, layout.total)?;
        let grads = buf(&stream, layout.total)?;
        Ok(GpuModel {
            cfg,
            layout,
            stream,
            kernels,
            blas,
            params,
            grads,
            acts: None,
            batch: None,
            forward_done: false,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The parameter layout (the CPU model's).
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// The stream everything of this model runs on.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    fn check_len(&self, op: &'static str, n: usize) -> Result<()> {
        if n == self.layout.total {
            Ok(())
        } else {
            Err(Error::invalid(
                op,
                format!("{n} values, the layout has {}", self.layout.total),
            ))
        }
    }

    /// Copies parameters in the host layout (a checkpoint's, `init_params`') to the device.
    pub fn set_params(&mut self, host: &[f32]) -> Result<()> {
        self.check_len("GpuModel::set_params", host.len())?;
        self.stream
            .cuda()
            .memcpy_htod(host, &mut self.params.slice_mut(..host.len()))
            .map_err(|e| {
                Error::from(hetccl::Error::Device {
                    op: "GpuModel::set_params".into(),
                    detail: e.to_string(),
                })
            })
    }

    /// The parameters in the host layout (waits for the stream).
    pub fn params_to_host(&self) -> Result<Vec<f32>> {
        Ok(self
            .stream
            .download(&self.params.slice(..self.layout.total))?)
    }

    /// The gradients in the host layout (waits for the stream).
    pub fn grads_to_host(&self) -> Result<Vec<f32>> {
        Ok(self
            .stream
            .download(&self.grads.slice(..self.layout.total))?)
    }

    /// Sets every gradient to zero (backward adds).
    pub fn zero_grads(&mut self) -> Result<()> {
        zero(&self.stream, &mut self.grads)
    }

    /// Range of tensor `i` of the layout.
    fn r(&self, i: usize) -> std::ops::Range<usize> {
        self.layout.tensors[i].range.clone()
    }

    /// Index of tensor `i` of layer `l`.
    fn li(l: usize, i: usize) -> usize {
        EMB_TENSORS + l * LAYER_TENSORS + i
    }

    /// Index of tensor `i` of the head.
    fn hi(&self, i: usize) -> usize {
        EMB_TENSORS + self.cfg.layers * LAYER_TENSORS + i
    }

    /// Runs the model on `batch` (checked on the host, then uploaded), keeping the
    /// activations and the loss sum's logit gradients for [`GpuModel::backward`]; returns
    /// the loss sums over the masked positions.
    pub fn forward(&mut self, batch: &Batch) -> Result<LossStats> {
        const OP: &str = "GpuModel::forward";
        check_batch(OP, &self.cfg, &self.layout, self.layout.total, batch)?;
        self.forward_done = false;
        let (b, t) = (batch.batch, batch.seq_len);
        let m = batch.masked_positions.len();
        let (c, nh, f, v) = (
            self.cfg.hidden,
            self.cfg.heads,
            self.cfg.ffn,
            self.cfg.vocab_size,
        );
        let bt = b * t;
        let rows = batch
            .masked_positions
            .iter()
            .map(|&p| u32::try_from(p))
            .collect::<std::result::Result<Vec<u32>, _>>()
            .map_err(|_| Error::invalid(OP, format!("B·T = {bt} does not fit u32 rows")))?;
        let s = &self.stream;
        let masked = if m > 0 {
            Some((s.upload(&rows)?, s.upload(&batch.masked_targets)?))
        } else {
            None
        };
        let dev = DevBatch {
            b,
            t,
            ids: s.upload(&batch.input_ids)?,
            types: s.upload(&batch.token_types)?,
            masked,
        };
        if self.acts.as_ref().map(|a| a.shape) != Some((b, t, m)) {
            self.acts = None; // free the old shape's buffers first
            self.acts = Some(Acts::new(s, &self.cfg, (b, t, m))?);
        }
        let ranges: Vec<_> = self
            .layout
            .tensors
            .iter()
            .map(|x| x.range.clone())
            .collect();
        let head0 = self.hi(0);
        let GpuModel {
            stream: s,
            kernels: k,
            blas,
            params,
            acts,
            ..
        } = self;
        let Some(a) = acts.as_mut() else {
            return Err(Error::invalid(OP, "activations missing"));
        };
        let p = |i: usize| params.slice(ranges[i].clone());

        // SAFETY (encoder_forward): every id and token type was checked against the
        // tables' rows by check_batch.
        unsafe {
            k.encoder_forward(
                s,
                &mut a.emb,
                &dev.ids,
                &dev.types,
                &p(WTE),
                &p(WPE),
                &p(WTT),
                b,
                t,
                c,
            )?;
        }
        k.layernorm_forward(
            s,
            &mut a.embln,
            &mut a.embln_mean,
            &mut a.embln_rstd,
            &a.emb,
            &p(EMB_LNW),
            &p(EMB_LNB),
            bt,
            c,
        )?;
        for l in 0..self.cfg.layers {
            let w = |i: usize| p(Self::li(l, i));
            let (before, rest) = a.layers.split_at_mut(l);
            let la = &mut rest[0];
            let x = if l == 0 { &a.embln } else { &before[l - 1].ln2 };
            blas.matmul_forward(s, &mut la.qkv, x, &w(QKVW), Some(&w(QKVB)), bt, c, 3 * c)?;
            blas.attention_forward(s, k, &mut la.atty, &mut la.att, &la.qkv, b, t, c, nh)?;
            blas.matmul_forward(
                s,
                &mut la.attproj,
                &la.atty,
                &w(ATTW),
                Some(&w(ATTB)),
                bt,
                c,
                c,
            )?;
            blas.residual_forward(s, &mut la.res1, x, &la.attproj, bt * c)?;
            k.layernorm_forward(
                s,
                &mut la.ln1,
                &mut la.ln1_mean,
                &mut la.ln1_rstd,
                &la.res1,
                &w(LN1W),
                &w(LN1B),
                bt,
                c,
            )?;
            // fch = ln1·Wfcᵀ, then fch += bfc (kept) and fch_gelu = gelu(fch)
            blas.matmul_forward(
                s,
                &mut la.fch,
                &la.ln1,
                &w(FCW),
                None::<&CudaSlice<f32>>,
                bt,
                c,
                f,
            )?;
            k.bias_gelu_forward(s, &mut la.fch_gelu, &mut la.fch, &w(FCB), bt, f)?;
            blas.matmul_forward(
                s,
                &mut la.fcproj,
                &la.fch_gelu,
                &w(PROJW),
                Some(&w(PROJB)),
                bt,
                f,
                c,
            )?;
            blas.residual_forward(s, &mut la.res2, &la.ln1, &la.fcproj, bt * c)?;
            k.layernorm_forward(
                s,
                &mut la.ln2,
                &mut la.ln2_mean,
                &mut la.ln2_rstd,
                &la.res2,
                &w(LN2W),
                &w(LN2B),
                bt,
                c,
            )?;
        }

        let mut stats = LossStats {
            masked: m,
            ..LossStats::default()
        };
        if let Some((rows, targets)) = &dev.masked {
            let h = |i: usize| p(head0 + i);
            let last = match a.layers.last() {
                Some(la) => &la.ln2,
                None => &a.embln,
            };
            // SAFETY: every masked position is below B·T (check_batch), a row of `last`.
            unsafe { k.gather_rows(s, &mut a.hm, last, rows, c)? };
            blas.matmul_forward(
                s,
                &mut a.hd,
                &a.hm,
                &h(DENSEW),
                None::<&CudaSlice<f32>>,
                m,
                c,
                c,
            )?;
            k.bias_gelu_forward(s, &mut a.hg, &mut a.hd, &h(DENSEB), m, c)?;
            k.layernorm_forward(
                s,
                &mut a.hl,
                &mut a.hl_mean,
                &mut a.hl_rstd,
                &a.hg,
                &h(HEAD_LNW),
                &h(HEAD_LNB),
                m,
                c,
            )?;
            // the decoder's weight is the word embedding (tied)
            blas.matmul_forward(s, &mut a.logits, &a.hl, &p(WTE), Some(&h(DECB)), m, c, v)?;
            let logits = s.download(&a.logits.slice(..m * v))?;
            stats.correct = logits
                .chunks(v)
                .zip(&batch.masked_targets)
                .filter(|(row, &target)| argmax_lanes(row) == target as usize)
                .count();
            // SAFETY: every target is below V (check_batch).
            unsafe {
                k.crossentropy_fused(s, &mut a.losses, &mut a.logits, &a.dlosses, targets, m, v)?;
            }
            let losses = s.download(&a.losses.slice(..m))?;
            stats.loss_sum = losses.iter().map(|&x| x as f64).sum();
        }
        self.batch = Some(dev);
        self.forward_done = true;
        Ok(stats)
    }

    /// Backward of the last [`GpuModel::forward`] for the loss `Σ over masked positions of
    /// cross-entropy` (a SUM: the caller divides by the global count). Gradients are ADDED
    /// to the device gradients, head first, then layer L-1 … 0, then the embeddings.
    pub fn backward(&mut self) -> Result<()> {
        const OP: &str = "GpuModel::backward";
        if !self.forward_done {
            return Err(Error::invalid(OP, "no forward pass to differentiate"));
        }
        self.forward_done = false;
        let (c, nh, f, v) = (
            self.cfg.hidden,
            self.cfg.heads,
            self.cfg.ffn,
            self.cfg.vocab_size,
        );
        let ranges: Vec<_> = (0..self.layout.tensors.len()).map(|i| self.r(i)).collect();
        let head0 = self.hi(0);
        let layers = self.cfg.layers;
        let GpuModel {
            stream: s,
            kernels: k,
            blas,
            params,
            grads,
            acts,
            batch,
            ..
        } = self;
        let (Some(a), Some(dev)) = (acts.as_mut(), batch.as_ref()) else {
            return Err(Error::invalid(OP, "no forward pass to differentiate"));
        };
        let (b, t) = (dev.b, dev.t);
        let m = a.shape.2;
        let bt = b * t;
        let p = |i: usize| params.slice(ranges[i].clone());
        let r = |i: usize| ranges[i].clone();

        // ---- head (M masked rows); a.logits holds dlogits = probs - onehot
        zero(s, &mut a.dout)?;
        if let Some((rows, _)) = &dev.masked {
            let h = |i: usize| head0 + i;
            for g in [&mut a.dhl, &mut a.dhg, &mut a.dhd, &mut a.dhm] {
                zero(s, g)?;
            }
            {
                // the decoder weight is wte: its gradient goes to the embeddings group
                two_mut!(grads; dwte = r(WTE), ddecb = r(h(DECB)));
                blas.matmul_backward(
                    s,
                    k,
                    &mut a.dhl,
                    &mut dwte,
                    Some(&mut ddecb),
                    &a.logits,
                    &a.hl,
                    &p(WTE),
                    m,
                    c,
                    v,
                )?;
            }
            {
                two_mut!(grads; dlnw = r(h(HEAD_LNW)), dlnb = r(h(HEAD_LNB)));
                k.layernorm_backward(
                    s,
                    &mut a.dhg,
                    &mut dlnw,
                    &mut dlnb,
                    &a.dhl,
                    &a.hg,
                    &p(h(HEAD_LNW)),
                    &a.hl_mean,
                    &a.hl_rstd,
                    m,
                    c,
                )?;
            }
            {
                two_mut!(grads; ddensew = r(h(DENSEW)), ddenseb = r(h(DENSEB)));
                k.bias_gelu_backward(s, &mut a.dhd, &mut ddenseb, &a.hd, &a.dhg, m, c)?;
                blas.matmul_backward(
                    s,
                    k,
                    &mut a.dhm,
                    &mut ddensew,
                    None::<&mut CudaSlice<f32>>,
                    &a.dhd,
                    &a.hm,
                    &p(h(DENSEW)),
                    m,
                    c,
                    c,
                )?;
            }
            // SAFETY: every masked position is a row of dout (B·T rows, check_batch).
            unsafe { k.scatter_add_rows(s, &mut a.dout, &a.dhm, rows, c)? };
        }

        // ---- layers, last to first; a.dout holds the gradient of the layer's output
        for l in (0..layers).rev() {
            let w = |i: usize| p(Self::li(l, i));
            let wr = |i: usize| r(Self::li(l, i));
            let la = &a.layers[l];
            let x = if l == 0 {
                &a.embln
            } else {
                &a.layers[l - 1].ln2
            };
            for g in [
                &mut a.dres2,
                &mut a.dh1,
                &mut a.dfch_gelu,
                &mut a.dfch,
                &mut a.dres1,
                &mut a.datty,
                &mut a.dqkv,
            ] {
                zero(s, g)?;
            }
            {
                two_mut!(grads; dlnw = wr(LN2W), dlnb = wr(LN2B));
                k.layernorm_backward(
                    s,
                    &mut a.dres2,
                    &mut dlnw,
                    &mut dlnb,
                    &a.dout,
                    &la.res2,
                    &w(LN2W),
                    &la.ln2_mean,
                    &la.ln2_rstd,
                    bt,
                    c,
                )?;
            }
            // res2 = ln1 + fcproj: both receive dres2
            s.copy(&a.dres2, &mut a.dh1)?;
            {
                two_mut!(grads; dprojw = wr(PROJW), dprojb = wr(PROJB));
                blas.matmul_backward(
                    s,
                    k,
                    &mut a.dfch_gelu,
                    &mut dprojw,
                    Some(&mut dprojb),
                    &a.dres2,
                    &la.fch_gelu,
                    &w(PROJW),
                    bt,
                    f,
                    c,
                )?;
            }
            {
                two_mut!(grads; dfcw = wr(FCW), dfcb = wr(FCB));
                k.bias_gelu_backward(s, &mut a.dfch, &mut dfcb, &la.fch, &a.dfch_gelu, bt, f)?;
                blas.matmul_backward(
                    s,
                    k,
                    &mut a.dh1,
                    &mut dfcw,
                    None::<&mut CudaSlice<f32>>,
                    &a.dfch,
                    &la.ln1,
                    &w(FCW),
                    bt,
                    c,
                    f,
                )?;
            }
            {
                two_mut!(grads; dlnw = wr(LN1W), dlnb = wr(LN1B));
                k.layernorm_backward(
                    s,
                    &mut a.dres1,
                    &mut dlnw,
                    &mut dlnb,
                    &a.dh1,
                    &la.res1,
                    &w(LN1W),
                    &la.ln1_mean,
                    &la.ln1_rstd,
                    bt,
                    c,
                )?;
            }
            // res1 = x + attproj: both receive dres1
            s.copy(&a.dres1, &mut a.dx)?;
            {
                two_mut!(grads; dattw = wr(ATTW), dattb = wr(ATTB));
                blas.matmul_backward(
                    s,
                    k,
                    &mut a.datty,
                    &mut dattw,
                    Some(&mut dattb),
                    &a.dres1,
                    &la.atty,
                    &w(ATTW),
                    bt,
                    c,
                    c,
                )?;
            }
            blas.attention_backward(
                s,
                k,
                &mut a.dqkv,
                &mut a.datt,
                &mut a.dpreatt,
                &a.datty,
                &la.qkv,
                &la.att,
                b,
                t,
                c,
                nh,
            )?;
            {
                two_mut!(grads; dqkvw = wr(QKVW), dqkvb = wr(QKVB));
                blas.matmul_backward(
                    s,
                    k,
                    &mut a.dx,
                    &mut dqkvw,
                    Some(&mut dqkvb),
                    &a.dqkv,
                    x,
                    &w(QKVW),
                    bt,
                    c,
                    3 * c,
                )?;
            }
            std::mem::swap(&mut a.dout, &mut a.dx);
        }

        // ---- embeddings (a.dout is the gradient of the embedding LayerNorm's output)
        zero(s, &mut a.demb)?;
        {
            two_mut!(grads; dlnw = r(EMB_LNW), dlnb = r(EMB_LNB));
            k.layernorm_backward(
                s,
                &mut a.demb,
                &mut dlnw,
                &mut dlnb,
                &a.dout,
                &a.emb,
                &p(EMB_LNW),
                &a.embln_mean,
                &a.embln_rstd,
                bt,
                c,
            )?;
        }
        {
            // wte, wpe, wtt are adjacent, in this order, from 0
            let (wpe, wtt) = (r(WPE), r(WTT));
            let (mut dwte, mut rest) = grads.split_at_mut(wpe.start);
            let (mut dwpe, mut rest) = rest.split_at_mut(wpe.len());
            let mut dwtt = rest.slice_mut(..wtt.len());
            // SAFETY: every id and token type was checked against the tables' rows by
            // check_batch in forward.
            unsafe {
                k.encoder_backward(
                    s, &mut dwte, &mut dwpe, &mut dwtt, &a.demb, &dev.ids, &dev.types, b, t, c,
                )?;
            }
        }
        Ok(())
    }
}
