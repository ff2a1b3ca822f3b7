//! AdamW, the learning-rate schedule, and gradient clipping.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::model::{ParamKind, ParamLayout};

/// AdamW hyper-parameters (defaults: BERT's β1 0.9, β2 0.999, ε 1e-8, decay 0.01).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator guard.
    pub eps: f32,
    /// Decoupled weight decay, applied to weights only (not biases, not LayerNorm).
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW state: one first and one second moment per parameter, and the step count.
///
/// The state has the parameters' layout and no per-rank part: every rank holds the same
/// state, so a checkpoint written by any world size loads into any other.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// First moments.
    pub m: Vec<f32>,
    /// Second moments.
    pub v: Vec<f32>,
    /// Updates applied so far (bias correction uses t+1 for the next one).
    pub t: u64,
    /// (range, decays?) for every tensor.
    groups: Vec<(std::ops::Range<usize>, bool)>,
}

impl AdamW {
    /// Zero moments for `layout`.
    pub fn new(cfg: AdamWConfig, layout: &ParamLayout) -> AdamW {
        AdamW {
            cfg,
            m: vec![0.0; layout.total],
            v: vec![0.0; layout.total],
            t: 0,
            groups: layout
                .tensors
                .iter()
                .map(|t| (t.range.clone(), t.kind == ParamKind::Weight))
                .collect(),
        }
    }

    /// One update with learning rate `lr`:
    /// `m = β1 m + (1-β1) g; v = β2 v + (1-β2) g²;
    ///  p -= lr (m̂ / (√v̂ + ε) + wd·p)` with `m̂ = m/(1-β1^t)`, `v̂ = v/(1-β2^t)`.
    pub fn update(&mut self, params: &mut [f32], grads: &[f32], lr: f32) {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (range, decay) in &self.groups {
            let wd = if *decay { c.weight_decay } else { 0.0 };
            params[range.clone()]
                .par_iter_mut()
                .zip(grads[range.clone()].par_iter())
                .zip(self.m[range.clone()].par_iter_mut())
                .zip(self.v[range.clone()].par_iter_mut())
                .with_min_len(8192)
                .for_each(|(((p, &g), m), v)| {
                    *m = c.beta1 * *m + (1.0 - c.beta1) * g;
                    *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
                    let mhat = *m / bc1;
                    let vhat = *v / bc2;
                    *p -= lr * (mhat / (vhat.sqrt() + c.eps) + wd * *p);
                });
        }
    }
}

/// Linear warm-up from 0 to `peak` over `warmup` steps, then linear decay to 0 at `total`.
///
/// `step` counts from 0; the first update uses `peak / warmup`.
pub fn learning_rate(step: u64, peak: f32, warmup: u64, total: u64) -> f32 {
    if step < warmup {
        return peak * (step + 1) as f32 / warmup as f32;
    }
    if total <= warmup {
        return peak;
    }
    let left = total.saturating_sub(step) as f32 / (total - warmup) as f32;
    peak * left.clamp(0.0, 1.0)
}

/// L2 norm of the whole gradient vector (accumulated in f64, fixed order).
pub fn global_norm(grads: &[f32]) -> f32 {
    grads
        .par_chunks(1 << 16)
        .map(|c| c.iter().map(|&g| g as f64 * g as f64).sum::<f64>())
        .collect::<Vec<f64>>()
        .iter()
        .sum::<f64>()
        .sqrt() as f32
}

/// Scales `grads` so their global norm is at most `max_norm` (≤ 0: no clipping); returns
/// the norm before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = global_norm(grads);
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        grads.par_iter_mut().for_each(|g| *g *= s);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert_eq!(learning_rate(0, 1.0, 4, 10), 0.25);
        assert_eq!(learning_rate(3, 1.0, 4, 10), 1.0);
        assert_eq!(learning_rate(4, 1.0, 4, 10), 1.0);
        assert_eq!(learning_rate(7, 1.0, 4, 10), 0.5);
        assert_eq!(learning_rate(10, 1.0, 4, 10), 0.0);
        assert_eq!(learning_rate(5, 2.0, 0, 0), 2.0);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = vec![3.0, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!(
            (g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6,
            "{g:?}"
        );
        let mut small = vec![0.3, 0.4];
        assert_eq!(clip_grad_norm(&mut small, 1.0), 0.5);
        assert_eq!(small, [0.3, 0.4]);
    }

    #[test]
    fn first_adamw_step_moves_by_lr_and_decays_weights_only() {
        let cfg = ModelConfig {
            vocab_size: 110,
            max_position: 4,
            type_vocab_size: 2,
            hidden: 2,
            layers: 1,
            heads: 1,
            ffn: 4,
        };
        let layout = ParamLayout::new(&cfg);
        let mut opt = AdamW::new(AdamWConfig::default(), &layout);
        let mut p = vec![1.0f32; layout.total];
        let g = vec![0.5f32; layout.total];
        opt.update(&mut p, &g, 0.1);
        // Step 1: m̂ = g, v̂ = g², so the Adam part is lr·g/(|g|+ε) ≈ lr.
        let weight = layout
            .tensors
            .iter()
            .find(|t| t.name == "layer.0.qkv.weight")
            .unwrap();
        let bias = layout
            .tensors
            .iter()
            .find(|t| t.name == "layer.0.qkv.bias")
            .unwrap();
        let lnw = layout
            .tensors
            .iter()
            .find(|t| t.name == "layer.0.ln1.weight")
            .unwrap();
        let adam = 0.1 * 0.5 / (0.5 + 1e-8);
        assert!((p[weight.range.start] - (1.0 - adam - 0.1 * 0.01)).abs() < 1e-6);
        assert!((p[bias.range.start] - (1.0 - adam)).abs() < 1e-6);
        assert!((p[lnw.range.start] - (1.0 - adam)).abs() < 1e-6);
        assert_eq!(opt.t, 1);
    }
}
