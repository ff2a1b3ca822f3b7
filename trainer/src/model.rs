//! The BERT encoder with its masked-LM head: parameter layout, forward and backward.
//!
//! All parameters live in ONE flat vector, gradients in another with the same layout, in
//! this order (so each group is one contiguous range, and backward finishes them from the
//! last range to the first):
//!
//! ```text
//! embeddings   word (V,C)  position (P,C)  token_type (2,C)  ln.weight (C)  ln.bias (C)
//! layer l      qkv.weight (3C,C) qkv.bias (3C)  attn_out.weight (C,C) attn_out.bias (C)
//!              ln1.weight (C) ln1.bias (C)  ffn_in.weight (F,C) ffn_in.bias (F)
//!              ffn_out.weight (C,F) ffn_out.bias (C)  ln2.weight (C) ln2.bias (C)
//! head         dense.weight (C,C) dense.bias (C)  ln.weight (C) ln.bias (C)  decoder.bias (V)
//! ```
//!
//! The decoder's weight is the word embedding (tied), so its gradient lands in the
//! embeddings range, which is the last range backward finishes.
//!
//! A layer (post-LN, as in the original BERT):
//!
//! ```text
//! qkv   = x·Wqkvᵀ + b                 (B,T,3C)
//! atty  = attention(qkv)              (B,T,C)
//! res1  = x + atty·Woᵀ + bo           (B,T,C)
//! h1    = LN1(res1)                   (B,T,C)
//! res2  = h1 + gelu(h1·Winᵀ + bin)·Woutᵀ + bout
//! out   = LN2(res2)                   (B,T,C)
//! ```
//!
//! The head runs on the M masked positions only: `LN(gelu(h·Wdᵀ + bd))·wteᵀ + bias` (M,V).

use std::ops::Range;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::ops::*;
use super::rng::{self, Stream};
use super::sync::BucketSink;
use crate::error::{Error, Result};

/// Shape of a BERT model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Longest sequence the position table covers (P).
    pub max_position: usize,
    /// Number of token types (segments); BERT uses 2.
    pub type_vocab_size: usize,
    /// Channels C.
    pub hidden: usize,
    /// Encoder layers L.
    pub layers: usize,
    /// Attention heads NH (C must be divisible by NH).
    pub heads: usize,
    /// Feed-forward width F.
    pub ffn: usize,
}

impl ModelConfig {
    fn sized(layers: usize, hidden: usize, heads: usize) -> Self {
        ModelConfig {
            vocab_size: 30522,
            max_position: 512,
            type_vocab_size: 2,
            hidden,
            layers,
            heads,
            ffn: 4 * hidden,
        }
    }

    /// L=2, C=128, NH=2, F=512 (4.4M parameters, 3.9M of them the word embedding).
    pub fn bert_tiny() -> Self {
        Self::sized(2, 128, 2)
    }
    /// L=4, C=256, NH=4, F=1024.
    pub fn bert_mini() -> Self {
        Self::sized(4, 256, 4)
    }
    /// L=4, C=512, NH=8, F=2048.
    pub fn bert_small() -> Self {
        Self::sized(4, 512, 8)
    }
    /// L=12, C=768, NH=12, F=3072 (110M parameters).
    pub fn bert_base() -> Self {
        Self::sized(12, 768, 12)
    }

    /// A named preset: `bert-tiny`, `bert-mini`, `bert-small`, `bert-base`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "bert-tiny" => Ok(Self::bert_tiny()),
            "bert-mini" => Ok(Self::bert_mini()),
            "bert-small" => Ok(Self::bert_small()),
            "bert-base" => Ok(Self::bert_base()),
            _ => Err(Error::Config {
                var: "model".into(),
                value: name.into(),
                accepted: "bert-tiny, bert-mini, bert-small, bert-base".into(),
            }),
        }
    }

    /// Refuses shapes the kernels cannot run.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::invalid("ModelConfig::validate", reason));
        if self.hidden == 0 || self.heads == 0 || self.layers == 0 || self.ffn == 0 {
            return bad(format!(
                "hidden, heads, layers and ffn must be > 0: {self:?}"
            ));
        }
        if self.hidden % self.heads != 0 {
            return bad(format!(
                "hidden {} is not divisible by heads {}",
                self.hidden, self.heads
            ));
        }
        if self.vocab_size == 0 {
            return bad("vocab_size must be > 0".into());
        }
        if self.max_position < 2 || self.type_vocab_size == 0 {
            return bad(format!(
                "max_position {} / type_vocab_size {} too small",
                self.max_position, self.type_vocab_size
            ));
        }
        Ok(())
    }

    fn embedding_sizes(&self) -> [usize; 5] {
        let (v, p, tt, c) = (
            self.vocab_size,
            self.max_position,
            self.type_vocab_size,
            self.hidden,
        );
        [v * c, p * c, tt * c, c, c]
    }

    fn layer_sizes(&self) -> [usize; 12] {
        let (c, f) = (self.hidden, self.ffn);
        [3 * c * c, 3 * c, c * c, c, c, c, f * c, f, c * f, c, c, c]
    }

    fn head_sizes(&self) -> [usize; 5] {
        let (c, v) = (self.hidden, self.vocab_size);
        [c * c, c, c, c, v]
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        let sum = |s: &[usize]| s.iter().sum::<usize>();
        sum(&self.embedding_sizes())
            + self.layers * sum(&self.layer_sizes())
            + sum(&self.head_sizes())
    }
}

/// What kind of values a parameter tensor holds (decides init and weight decay).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Matrices and embedding tables: N(0, 0.02²) init, weight decay.
    Weight,
    /// Biases: zero init, no decay.
    Bias,
    /// LayerNorm gain: one init, no decay.
    NormGain,
    /// LayerNorm shift: zero init, no decay.
    NormBias,
}

/// One named tensor inside the flat parameter vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamTensor {
    /// Dotted name, e.g. `layer.1.ffn_in.weight`.
    pub name: String,
    /// Shape, row-major.
    pub shape: Vec<usize>,
    /// Where it lives in the flat vector.
    pub range: Range<usize>,
    /// Init and weight-decay class.
    pub kind: ParamKind,
}

/// The flat layout: every tensor's range, and the contiguous range of each group.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    /// Every tensor, in memory order.
    pub tensors: Vec<ParamTensor>,
    /// Embeddings group (also holds the tied decoder weight).
    pub embeddings: Range<usize>,
    /// One range per encoder layer.
    pub layers: Vec<Range<usize>>,
    /// MLM head group.
    pub head: Range<usize>,
    /// Total parameter count.
    pub total: usize,
}

impl ParamLayout {
    /// Lays out the parameters of `cfg`.
    pub fn new(cfg: &ModelConfig) -> Self {
        let (v, p, tt, c, f) = (
            cfg.vocab_size,
            cfg.max_position,
            cfg.type_vocab_size,
            cfg.hidden,
            cfg.ffn,
        );
        use ParamKind::*;
        let mut tensors = Vec::new();
        let mut off = 0;
        let mut push = |name: String, shape: Vec<usize>, kind: ParamKind| {
            let n: usize = shape.iter().product();
            tensors.push(ParamTensor {
                name,
                shape,
                range: off..off + n,
                kind,
            });
            off += n;
            off
        };
        push("embeddings.word".into(), vec![v, c], Weight);
        push("embeddings.position".into(), vec![p, c], Weight);
        push("embeddings.token_type".into(), vec![tt, c], Weight);
        push("embeddings.ln.weight".into(), vec![c], NormGain);
        let emb_end = push("embeddings.ln.bias".into(), vec![c], NormBias);
        let mut layers = Vec::new();
        let mut start = emb_end;
        for l in 0..cfg.layers {
            let n = |s: &str| format!("layer.{l}.{s}");
            push(n("qkv.weight"), vec![3 * c, c], Weight);
            push(n("qkv.bias"), vec![3 * c], Bias);
            push(n("attn_out.weight"), vec![c, c], Weight);
            push(n("attn_out.bias"), vec![c], Bias);
            push(n("ln1.weight"), vec![c], NormGain);
            push(n("ln1.bias"), vec![c], NormBias);
            push(n("ffn_in.weight"), vec![f, c], Weight);
            push(n("ffn_in.bias"), vec![f], Bias);
            push(n("ffn_out.weight"), vec![c, f], Weight);
            push(n("ffn_out.bias"), vec![c], Bias);
            push(n("ln2.weight"), vec![c], NormGain);
            let end = push(n("ln2.bias"), vec![c], NormBias);
            layers.push(start..end);
            start = end;
        }
        push("head.dense.weight".into(), vec![c, c], Weight);
        push("head.dense.bias".into(), vec![c], Bias);
        push("head.ln.weight".into(), vec![c], NormGain);
        push("head.ln.bias".into(), vec![c], NormBias);
        let total = push("head.decoder.bias".into(), vec![v], Bias);
        ParamLayout {
            tensors,
            embeddings: 0..emb_end,
            layers,
            head: start..total,
            total,
        }
    }

    /// The ranges backward completes, in the order it completes them: head, layer L-1, ...,
    /// layer 0, embeddings. These are the gradient buckets.
    pub fn buckets_in_backward_order(&self) -> Vec<Range<usize>> {
        let mut b = vec![self.head.clone()];
        b.extend(self.layers.iter().rev().cloned());
        b.push(self.embeddings.clone());
        b
    }
}

/// Initial parameters: weights N(0, 0.02²), biases 0, LayerNorm gains 1 (as BERT).
///
/// Each value is a pure function of (seed, index), so the init does not depend on threads.
pub fn init_params<T: Real>(layout: &ParamLayout, seed: u64) -> Vec<T> {
    let mut p = vec![T::zero(); layout.total];
    for t in &layout.tensors {
        for i in t.range.clone() {
            p[i] = match t.kind {
                ParamKind::Weight => {
                    T::from_f64(0.02 * rng::normal(seed, Stream::Init, 0, i as u64))
                }
                ParamKind::Bias | ParamKind::NormBias => T::zero(),
                ParamKind::NormGain => T::one(),
            };
        }
    }
    p
}

/// Splits `s` into consecutive pieces of the given sizes (a slice shorter than their sum
/// stops at the bounds check of `split_at`).
fn carve<'a, T, const N: usize>(mut s: &'a [T], sizes: &[usize; N]) -> [&'a [T]; N] {
    std::array::from_fn(|i| {
        let (head, tail) = s.split_at(sizes[i]);
        s = tail;
        head
    })
}

/// Mutable twin of [`carve`].
fn carve_mut<'a, T, const N: usize>(mut s: &'a mut [T], sizes: &[usize; N]) -> [&'a mut [T]; N] {
    std::array::from_fn(|i| {
        let (head, tail) = std::mem::take(&mut s).split_at_mut(sizes[i]);
        s = tail;
        head
    })
}

/// Views of the embeddings group (`S` = `&[T]` or `&mut [T]`).
struct Embeddings<S> {
    wte: S, // (V,C)
    wpe: S, // (P,C)
    wtt: S, // (2,C)
    lnw: S, // (C)
    lnb: S, // (C)
}

/// Views of one layer's group.
struct Layer<S> {
    qkvw: S,  // (3C,C)
    qkvb: S,  // (3C)
    attw: S,  // (C,C)
    attb: S,  // (C)
    ln1w: S,  // (C)
    ln1b: S,  // (C)
    fcw: S,   // (F,C)
    fcb: S,   // (F)
    projw: S, // (C,F)
    projb: S, // (C)
    ln2w: S,  // (C)
    ln2b: S,  // (C)
}

/// Views of the head group.
struct Head<S> {
    densew: S, // (C,C)
    denseb: S, // (C)
    lnw: S,    // (C)
    lnb: S,    // (C)
    decb: S,   // (V)
}

/// The read-only (`new`) and mutable (`new_mut`) views of one parameter group: its
/// tensors carved, in declaration order, from a slice laid out by `sizes`.
macro_rules! views {
    ($group:ident, $sizes:ident, [$($f:ident),*]) => {
        impl<'a, T> $group<&'a [T]> {
            fn new(s: &'a [T], cfg: &ModelConfig) -> Self {
                let [$($f),*] = carve(s, &cfg.$sizes());
                $group { $($f),* }
            }
        }
        impl<'a, T> $group<&'a mut [T]> {
            fn new_mut(s: &'a mut [T], cfg: &ModelConfig) -> Self {
                let [$($f),*] = carve_mut(s, &cfg.$sizes());
                $group { $($f),* }
            }
        }
    };
}

views!(Embeddings, embedding_sizes, [wte, wpe, wtt, lnw, lnb]);
views!(
    Layer,
    layer_sizes,
    [qkvw, qkvb, attw, attb, ln1w, ln1b, fcw, fcb, projw, projb, ln2w, ln2b]
);
views!(Head, head_sizes, [densew, denseb, lnw, lnb, decb]);

/// One micro-batch of masked-LM inputs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Sequences B.
    pub batch: usize,
    /// Tokens per sequence T (including `[CLS]` and `[SEP]`).
    pub seq_len: usize,
    /// Input ids after masking (B,T).
    pub input_ids: Vec<u32>,
    /// Segment ids (B,T); all 0 for single-segment pretraining.
    pub token_types: Vec<u32>,
    /// Flat positions `b*T + t` whose token is predicted (M), ascending.
    pub masked_positions: Vec<usize>,
    /// The original ids at those positions (M).
    pub masked_targets: Vec<u32>,
}

/// Sums over the masked positions of one forward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossStats {
    /// Σ cross-entropy (nats).
    pub loss_sum: f64,
    /// Number of masked positions.
    pub masked: usize,
    /// Positions where the arg-max prediction equals the target.
    pub correct: usize,
}

impl LossStats {
    /// Adds another batch's sums.
    pub fn add(&mut self, o: &LossStats) {
        self.loss_sum += o.loss_sum;
        self.masked += o.masked;
        self.correct += o.correct;
    }
    /// Mean loss per masked token (0 when nothing is masked).
    pub fn mean_loss(&self) -> f64 {
        if self.masked == 0 {
            0.0
        } else {
            self.loss_sum / self.masked as f64
        }
    }
    /// Fraction of masked tokens predicted right.
    pub fn accuracy(&self) -> f64 {
        if self.masked == 0 {
            0.0
        } else {
            self.correct as f64 / self.masked as f64
        }
    }
}

/// Saved activations of one layer.
#[derive(Default)]
struct LayerActs<T> {
    qkv: Vec<T>,      // (B,T,3C)
    att: Vec<T>,      // (B,NH,T,T)
    atty: Vec<T>,     // (B,T,C)
    attproj: Vec<T>,  // (B,T,C)
    res1: Vec<T>,     // (B,T,C)
    ln1: Vec<T>,      // (B,T,C)
    ln1_mean: Vec<T>, // (B,T)
    ln1_rstd: Vec<T>, // (B,T)
    fch: Vec<T>,      // (B,T,F)
    fch_gelu: Vec<T>, // (B,T,F)
    fcproj: Vec<T>,   // (B,T,C)
    res2: Vec<T>,     // (B,T,C)
    ln2: Vec<T>,      // (B,T,C)
    ln2_mean: Vec<T>, // (B,T)
    ln2_rstd: Vec<T>, // (B,T)
}

/// Saved activations of the whole model for one micro-batch.
#[derive(Default)]
struct Acts<T> {
    emb: Vec<T>,        // (B,T,C)
    embln: Vec<T>,      // (B,T,C)
    embln_mean: Vec<T>, // (B,T)
    embln_rstd: Vec<T>, // (B,T)
    layers: Vec<LayerActs<T>>,
    hm: Vec<T>,      // (M,C) last layer's output at the masked positions
    hd: Vec<T>,      // (M,C)
    hg: Vec<T>,      // (M,C)
    hl: Vec<T>,      // (M,C)
    hl_mean: Vec<T>, // (M)
    hl_rstd: Vec<T>, // (M)
    logits: Vec<T>,  // (M,V), reused as dlogits in backward
    probs: Vec<T>,   // (M,V)
    losses: Vec<T>,  // (M)
}

/// Activation gradients, reused by every layer.
#[derive(Default)]
struct GradActs<T> {
    dout: Vec<T>,      // (B,T,C) gradient of the current layer's output
    dx: Vec<T>,        // (B,T,C) gradient of its input
    dres2: Vec<T>,     // (B,T,C)
    dh1: Vec<T>,       // (B,T,C)
    dfch_gelu: Vec<T>, // (B,T,F)
    dfch: Vec<T>,      // (B,T,F)
    dres1: Vec<T>,     // (B,T,C)
    datty: Vec<T>,     // (B,T,C)
    dqkv: Vec<T>,      // (B,T,3C)
    datt: Vec<T>,      // (B,NH,T,T)
    dpreatt: Vec<T>,   // (B,NH,T,T)
    demb: Vec<T>,      // (B,T,C)
    dhm: Vec<T>,       // (M,C)
    dhd: Vec<T>,       // (M,C)
    dhg: Vec<T>,       // (M,C)
    dhl: Vec<T>,       // (M,C)
    dlosses: Vec<T>,   // (M)
}

/// Sets the length of `v` to `n` without clearing it: for outputs that the next op
/// overwrites entirely.
fn sized<T: Real>(v: &mut Vec<T>, n: usize) {
    v.resize(n, T::zero());
}

/// Sets `v` to `n` zeros, keeping its allocation.
fn zeroed<T: Real>(v: &mut Vec<T>, n: usize) {
    v.clear();
    v.resize(n, T::zero());
}

/// Refuses a batch `cfg` cannot run (ids, types or masked positions out of range, wrong
/// lengths), or a parameter vector not of the layout's length; `op` names the caller.
pub(crate) fn check_batch(
    op: &'static str,
    cfg: &ModelConfig,
    layout: &ParamLayout,
    params: usize,
    batch: &Batch,
) -> Result<()> {
    let bad = |reason: String| Err(Error::invalid(op, reason));
    let (b, t) = (batch.batch, batch.seq_len);
    if params != layout.total {
        return bad(format!(
            "{} parameters, layout has {}",
            params, layout.total
        ));
    }
    if b == 0 || t == 0 || t > cfg.max_position {
        return bad(format!(
            "batch {b} × seq_len {t} (max_position {})",
            cfg.max_position
        ));
    }
    if batch.input_ids.len() != b * t || batch.token_types.len() != b * t {
        return bad(format!(
            "{} ids / {} token types for {b}×{t}",
            batch.input_ids.len(),
            batch.token_types.len()
        ));
    }
    if let Some(&id) = batch
        .input_ids
        .iter()
        .find(|&&id| id as usize >= cfg.vocab_size)
    {
        return bad(format!("token id {id} ≥ vocab_size {}", cfg.vocab_size));
    }
    if batch
        .token_types
        .iter()
        .any(|&tt| tt as usize >= cfg.type_vocab_size)
    {
        return bad("token type out of range".into());
    }
    if batch.masked_positions.len() != batch.masked_targets.len()
        || batch.masked_positions.iter().any(|&p| p >= b * t)
        || batch
            .masked_targets
            .iter()
            .any(|&id| id as usize >= cfg.vocab_size)
    {
        return bad("masked positions/targets inconsistent with the batch".into());
    }
    Ok(())
}

/// A BERT masked-LM: its shape, layout and activation buffers. Parameters and gradients
/// are owned by the caller (flat vectors of [`ParamLayout::total`] elements), so that the
/// gradient vector can be handed to the communicator while the model keeps working.
pub struct Model<T> {
    cfg: ModelConfig,
    layout: ParamLayout,
    acts: Acts<T>,
    grads: GradActs<T>,
    /// The batch of the last forward pass (backward reuses it).
    batch: Batch,
    forward_done: bool,
}

impl<T: Real> Model<T> {
    /// A model of shape `cfg` (validated).
    pub fn new(cfg: ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let layout = ParamLayout::new(&cfg);
        let acts = Acts {
            layers: (0..cfg.layers).map(|_| LayerActs::default()).collect(),
            ..Acts::default()
        };
        Ok(Model {
            cfg,
            layout,
            acts,
            grads: GradActs::default(),
            batch: Batch::default(),
            forward_done: false,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The parameter layout.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// The cross-entropy of each masked position in the last forward pass (M), in the
    /// batch's order.
    pub fn losses(&self) -> &[T] {
        &self.acts.losses
    }

    fn check_batch(&self, params: &[T], batch: &Batch) -> Result<()> {
        check_batch(
            "Model::forward",
            &self.cfg,
            &self.layout,
            params.len(),
            batch,
        )
    }

    /// Runs the model on `batch`, keeping the activations for [`Model::backward`], and
    /// returns the loss sums over its masked positions.
    pub fn forward(&mut self, params: &[T], batch: &Batch) -> Result<LossStats> {
        self.check_batch(params, batch)?;
        self.forward_done = false;
        self.batch.clone_from(batch);
        let cfg = &self.cfg;
        let (b, t, c, nh, f, v) = (
            batch.batch,
            batch.seq_len,
            cfg.hidden,
            cfg.heads,
            cfg.ffn,
            cfg.vocab_size,
        );
        let bt = b * t;
        let m = batch.masked_positions.len();
        let l_len = self.layout.layers.first().map_or(0, |r| r.len());
        let emb = Embeddings::new(&params[self.layout.embeddings.clone()], cfg);
        let head = Head::new(&params[self.layout.head.clone()], cfg);
        let a = &mut self.acts;

        sized(&mut a.emb, bt * c);
        sized(&mut a.embln, bt * c);
        sized(&mut a.embln_mean, bt);
        sized(&mut a.embln_rstd, bt);
        encoder_forward(
            &mut a.emb,
            &batch.input_ids,
            &batch.token_types,
            emb.wte,
            emb.wpe,
            emb.wtt,
            b,
            t,
            c,
        );
        layernorm_forward(
            &mut a.embln,
            &mut a.embln_mean,
            &mut a.embln_rstd,
            &a.emb,
            emb.lnw,
            emb.lnb,
            bt,
            c,
        );

        for l in 0..cfg.layers {
            let p = Layer::new(
                &params[self.layout.embeddings.end + l * l_len..][..l_len],
                cfg,
            );
            let (before, rest) = a.layers.split_at_mut(l);
            let la = &mut rest[0];
            let x: &[T] = if l == 0 { &a.embln } else { &before[l - 1].ln2 };
            sized(&mut la.qkv, bt * 3 * c);
            sized(&mut la.att, b * nh * t * t);
            sized(&mut la.atty, bt * c);
            sized(&mut la.attproj, bt * c);
            sized(&mut la.res1, bt * c);
            sized(&mut la.ln1, bt * c);
            sized(&mut la.ln1_mean, bt);
            sized(&mut la.ln1_rstd, bt);
            sized(&mut la.fch, bt * f);
            sized(&mut la.fch_gelu, bt * f);
            sized(&mut la.fcproj, bt * c);
            sized(&mut la.res2, bt * c);
            sized(&mut la.ln2, bt * c);
            sized(&mut la.ln2_mean, bt);
            sized(&mut la.ln2_rstd, bt);
            matmul_forward(&mut la.qkv, x, p.qkvw, Some(p.qkvb), bt, c, 3 * c);
            attention_forward(&mut la.atty, &mut la.att, &la.qkv, b, t, c, nh);
            matmul_forward(&mut la.attproj, &la.atty, p.attw, Some(p.attb), bt, c, c);
            residual_forward(&mut la.res1, x, &la.attproj, bt * c);
            layernorm_forward(
                &mut la.ln1,
                &mut la.ln1_mean,
                &mut la.ln1_rstd,
                &la.res1,
                p.ln1w,
                p.ln1b,
                bt,
                c,
            );
            matmul_forward(&mut la.fch, &la.ln1, p.fcw, Some(p.fcb), bt, c, f);
            gelu_forward(&mut la.fch_gelu, &la.fch, bt * f);
            matmul_forward(
                &mut la.fcproj,
                &la.fch_gelu,
                p.projw,
                Some(p.projb),
                bt,
                f,
                c,
            );
            residual_forward(&mut la.res2, &la.ln1, &la.fcproj, bt * c);
            layernorm_forward(
                &mut la.ln2,
                &mut la.ln2_mean,
                &mut la.ln2_rstd,
                &la.res2,
                p.ln2w,
                p.ln2b,
                bt,
                c,
            );
        }

        let last: &[T] = match a.layers.last() {
            Some(la) => &la.ln2,
            None => &a.embln,
        };
        sized(&mut a.hm, m * c);
        sized(&mut a.hd, m * c);
        sized(&mut a.hg, m * c);
        sized(&mut a.hl, m * c);
        sized(&mut a.hl_mean, m);
        sized(&mut a.hl_rstd, m);
        sized(&mut a.logits, m * v);
        sized(&mut a.probs, m * v);
        sized(&mut a.losses, m);
        gather_rows(&mut a.hm, last, &batch.masked_positions, c);
        matmul_forward(&mut a.hd, &a.hm, head.densew, Some(head.denseb), m, c, c);
        gelu_forward(&mut a.hg, &a.hd, m * c);
        layernorm_forward(
            &mut a.hl,
            &mut a.hl_mean,
            &mut a.hl_rstd,
            &a.hg,
            head.lnw,
            head.lnb,
            m,
            c,
        );
        matmul_forward(&mut a.logits, &a.hl, emb.wte, Some(head.decb), m, c, v);
        softmax_crossentropy_forward(
            &mut a.losses,
            &mut a.probs,
            &a.logits,
            &batch.masked_targets,
            m,
            v,
        );

        let mut stats = LossStats {
            masked: m,
            ..LossStats::default()
        };
        for i in 0..m {
            stats.loss_sum += a.losses[i].to_f64();
        }
        stats.correct = a.probs[..m * v]
            .par_chunks(v)
            .zip(batch.masked_targets.par_iter())
            .filter(|(row, &target)| argmax_lanes(row) == target as usize)
            .count();
        self.forward_done = true;
        Ok(stats)
    }

    /// Backward of the last [`Model::forward`] for the loss `Σ over masked positions of
    /// cross-entropy` (a SUM, not a mean: the caller divides by the global count).
    ///
    /// Gradients are ADDED to `grads` (same layout as the parameters). Each group is handed
    /// to `sink` as soon as backward is done with it — head, layer L-1, ..., layer 0,
    /// embeddings — so a communicator can reduce it while backward goes on.
    pub fn backward<'g>(
        &mut self,
        params: &[T],
        grads: &'g mut [T],
        sink: &mut dyn BucketSink<'g, T>,
    ) -> Result<()> {
        if !self.forward_done {
            return Err(Error::invalid(
                "Model::backward",
                "no forward pass to differentiate",
            ));
        }
        if grads.len() != self.layout.total || params.len() != self.layout.total {
            return Err(Error::invalid(
                "Model::backward",
                format!(
                    "{} gradients / {} parameters, layout has {}",
                    grads.len(),
                    params.len(),
                    self.layout.total
                ),
            ));
        }
        self.forward_done = false;
        let Model {
            cfg,
            layout,
            acts: a,
            grads: g,
            batch,
            ..
        } = self;
        let (b, t, c, nh, f, v) = (
            batch.batch,
            batch.seq_len,
            cfg.hidden,
            cfg.heads,
            cfg.ffn,
            cfg.vocab_size,
        );
        let bt = b * t;
        let m = batch.masked_positions.len();
        let l_len = layout.layers.first().map_or(0, |r| r.len());

        let (g_emb, rest) = grads.split_at_mut(layout.embeddings.end);
        let (g_layers, g_head) = rest.split_at_mut(cfg.layers * l_len);
        let emb = Embeddings::new(&params[layout.embeddings.clone()], cfg);
        let head = Head::new(&params[layout.head.clone()], cfg);
        let demb = Embeddings::new_mut(&mut *g_emb, cfg);

        // ---- head (M masked rows), backward of the loss sum: dloss = 1 per row
        {
            let dh = Head::new_mut(&mut *g_head, cfg);
            zeroed(&mut g.dlosses, m);
            g.dlosses.fill(T::one());
            let dlogits = &mut a.logits; // logits are no longer needed
            dlogits.fill(T::zero());
            crossentropy_softmax_backward(
                dlogits,
                &g.dlosses,
                &a.probs,
                &batch.masked_targets,
                m,
                v,
            );
            zeroed(&mut g.dhl, m * c);
            zeroed(&mut g.dhg, m * c);
            zeroed(&mut g.dhd, m * c);
            zeroed(&mut g.dhm, m * c);
            // the decoder weight is wte: its gradient goes to the embeddings group
            matmul_backward(
                &mut g.dhl,
                demb.wte,
                Some(&mut *dh.decb),
                dlogits,
                &a.hl,
                emb.wte,
                m,
                c,
                v,
            );
            layernorm_backward(
                &mut g.dhg, dh.lnw, dh.lnb, &g.dhl, &a.hg, head.lnw, &a.hl_mean, &a.hl_rstd, m, c,
            );
            gelu_backward(&mut g.dhd, &a.hd, &g.dhg, m * c);
            matmul_backward(
                &mut g.dhm,
                dh.densew,
                Some(&mut *dh.denseb),
                &g.dhd,
                &a.hm,
                head.densew,
                m,
                c,
                c,
            );
            zeroed(&mut g.dout, bt * c);
            scatter_add_rows(&mut g.dout, &g.dhm, &batch.masked_positions, c);
        }
        sink.bucket_ready(g_head)?;

        // ---- layers, last to first; g.dout holds the gradient of the layer's output
        zeroed(&mut g.dx, bt * c);
        zeroed(&mut g.dres2, bt * c);
        zeroed(&mut g.dh1, bt * c);
        zeroed(&mut g.dfch_gelu, bt * f);
        zeroed(&mut g.dfch, bt * f);
        zeroed(&mut g.dres1, bt * c);
        zeroed(&mut g.datty, bt * c);
        zeroed(&mut g.dqkv, bt * 3 * c);
        zeroed(&mut g.datt, b * nh * t * t);
        zeroed(&mut g.dpreatt, b * nh * t * t);
        let mut g_layers = g_layers;
        for l in (0..cfg.layers).rev() {
            let (lower, this) = std::mem::take(&mut g_layers).split_at_mut(l * l_len);
            g_layers = lower;
            let p = Layer::new(&params[layout.embeddings.end + l * l_len..][..l_len], cfg);
            let dp = Layer::new_mut(&mut *this, cfg);
            let la = &a.layers[l];
            let x: &[T] = if l == 0 {
                &a.embln
            } else {
                &a.layers[l - 1].ln2
            };
            for buf in [&mut g.dres2, &mut g.dh1, &mut g.dres1, &mut g.datty] {
                buf.fill(T::zero());
            }
            g.dfch_gelu.fill(T::zero());
            g.dfch.fill(T::zero());
            g.dqkv.fill(T::zero());
            layernorm_backward(
                &mut g.dres2,
                dp.ln2w,
                dp.ln2b,
                &g.dout,
                &la.res2,
                p.ln2w,
                &la.ln2_mean,
                &la.ln2_rstd,
                bt,
                c,
            );
            // res2 = ln1 + fcproj: both receive dres2
            g.dh1.copy_from_slice(&g.dres2);
            matmul_backward(
                &mut g.dfch_gelu,
                dp.projw,
                Some(&mut *dp.projb),
                &g.dres2,
                &la.fch_gelu,
                p.projw,
                bt,
                f,
                c,
            );
            gelu_backward(&mut g.dfch, &la.fch, &g.dfch_gelu, bt * f);
            matmul_backward(
                &mut g.dh1,
                dp.fcw,
                Some(&mut *dp.fcb),
                &g.dfch,
                &la.ln1,
                p.fcw,
                bt,
                c,
                f,
            );
            layernorm_backward(
                &mut g.dres1,
                dp.ln1w,
                dp.ln1b,
                &g.dh1,
                &la.res1,
                p.ln1w,
                &la.ln1_mean,
                &la.ln1_rstd,
                bt,
                c,
            );
            // res1 = x + attproj: both receive dres1
            g.dx.copy_from_slice(&g.dres1);
            matmul_backward(
                &mut g.datty,
                dp.attw,
                Some(&mut *dp.attb),
                &g.dres1,
                &la.atty,
                p.attw,
                bt,
                c,
                c,
            );
            attention_backward(
                &mut g.dqkv,
                &mut g.datt,
                &mut g.dpreatt,
                &g.datty,
                &la.qkv,
                &la.att,
                b,
                t,
                c,
                nh,
            );
            matmul_backward(
                &mut g.dx,
                dp.qkvw,
                Some(&mut *dp.qkvb),
                &g.dqkv,
                x,
                p.qkvw,
                bt,
                c,
                3 * c,
            );
            sink.bucket_ready(this)?;
            std::mem::swap(&mut g.dout, &mut g.dx);
        }

        // ---- embeddings (g.dout is now the gradient of the embedding LayerNorm's output)
        zeroed(&mut g.demb, bt * c);
        layernorm_backward(
            &mut g.demb,
            demb.lnw,
            demb.lnb,
            &g.dout,
            &a.emb,
            emb.lnw,
            &a.embln_mean,
            &a.embln_rstd,
            bt,
            c,
        );
        encoder_backward(
            demb.wte,
            demb.wpe,
            demb.wtt,
            &g.demb,
            &batch.input_ids,
            &batch.token_types,
            b,
            t,
            c,
        );
        sink.bucket_ready(g_emb)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_bert() {
        // BertModel (with pooler) has 109,482,240 parameters; the MLM head instead of the
        // pooler gives 109,514,298 (= Hugging Face's BertForMaskedLM count).
        assert_eq!(ModelConfig::bert_base().num_params(), 109_514_298);
        assert_eq!(ModelConfig::bert_tiny().num_params(), 4_416_698);
        for cfg in [ModelConfig::bert_tiny(), ModelConfig::bert_mini()] {
            assert_eq!(ParamLayout::new(&cfg).total, cfg.num_params());
        }
    }

    #[test]
    fn groups_are_contiguous_and_buckets_run_backwards() {
        let cfg = ModelConfig::bert_tiny();
        let l = ParamLayout::new(&cfg);
        let buckets = l.buckets_in_backward_order();
        assert_eq!(buckets.len(), cfg.layers + 2);
        assert_eq!(buckets[0], l.head);
        assert_eq!(buckets[1], l.layers[1]);
        assert_eq!(*buckets.last().unwrap(), 0..l.embeddings.end);
        // consecutive buckets abut: together they cover 0..total exactly once
        for w in buckets.windows(2) {
            assert_eq!(w[1].end, w[0].start);
        }
        assert_eq!(l.head.end, l.total);
        let wte = &l.tensors[0];
        assert_eq!(
            (wte.name.as_str(), wte.range.clone()),
            ("embeddings.word", 0..30522 * 128)
        );
        let decoder_bias = l.tensors.last().unwrap();
        assert_eq!(decoder_bias.name, "head.decoder.bias");
        assert_eq!(decoder_bias.kind, ParamKind::Bias);
    }

    #[test]
    fn forward_refuses_bad_batches() {
        let cfg = ModelConfig {
            vocab_size: 10,
            max_position: 4,
            type_vocab_size: 2,
            hidden: 4,
            layers: 1,
            heads: 2,
            ffn: 8,
        };
        let mut m = Model::<f32>::new(cfg).unwrap();
        let p: Vec<f32> = init_params(m.layout(), 1);
        let batch = Batch {
            batch: 1,
            seq_len: 3,
            input_ids: vec![1, 10, 2],
            token_types: vec![0; 3],
            masked_positions: vec![1],
            masked_targets: vec![4],
        };
        let err = m.forward(&p, &batch).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid argument to Model::forward: token id 10 ≥ vocab_size 10"
        );
        let mut g = vec![0.0; p.len()];
        let err = m
            .backward(&p, &mut g, &mut crate::sync::NoSync)
            .unwrap_err();
        assert!(err.to_string().contains("no forward pass"), "{err}");
        let err = ModelConfig {
            heads: 3,
            ..ModelConfig::bert_tiny()
        }
        .validate()
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("hidden 128 is not divisible by heads 3"),
            "{err}"
        );
    }
}
