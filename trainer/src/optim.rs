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

    /// The step's whole update from the summed gradient in one pass over memory:
    /// bitwise [`AdamW::update`] after `*g *= inv` and then `*g *= clip` (the scaling
    /// [`clip_grad_norm`] does, `clip` being [`clip_factor`] of [`scaled_norm`]`(grads,
    /// inv)`), and `grads` left zero for the next step.
    ///
    /// The separate passes read and wrote the 4-byte gradient four more times (scale,
    /// norm, clip, zero); here each element is scaled where it is used, with the same
    /// f32 operations in the same order, in blocks the compiler vectorizes.
    pub fn update_fused(
        &mut self,
        params: &mut [f32],
        grads: &mut [f32],
        inv: f32,
        clip: f32,
        lr: f32,
    ) {
        const BLOCK: usize = 8192;
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (range, decay) in &self.groups {
            let wd = if *decay { c.weight_decay } else { 0.0 };
            params[range.clone()]
                .par_chunks_mut(BLOCK)
                .zip(grads[range.clone()].par_chunks_mut(BLOCK))
                .zip(self.m[range.clone()].par_chunks_mut(BLOCK))
                .zip(self.v[range.clone()].par_chunks_mut(BLOCK))
                .for_each(|(((p, g), m), v)| {
                    adamw_update(p, g, m, v, c, bc1, bc2, lr, wd, inv, clip)
                });
        }
    }

    /// The bias corrections `(1 - β1^t, 1 - β2^t)` the next update uses (t counted after it).
    pub fn next_bias_corrections(&self) -> (f32, f32) {
        let t = (self.t + 1) as i32;
        (1.0 - self.cfg.beta1.powi(t), 1.0 - self.cfg.beta2.powi(t))
    }

    /// The parameter ranges and whether each decays, consecutive tensors of one class
    /// merged: the launches a device update needs.
    pub fn decay_ranges(&self) -> Vec<(std::ops::Range<usize>, bool)> {
        let mut out: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
        for (r, d) in &self.groups {
            match out.last_mut() {
                Some((last, ld)) if *ld == *d && last.end == r.start => last.end = r.end,
                _ => out.push((r.clone(), *d)),
            }
        }
        out
    }
}

/// [`AdamW::update_fused`] on one range of one decay class (`wd` 0 for no decay), with
/// the step's bias corrections `bc1`, `bc2`: the gradient is scaled by `inv` then `clip`,
/// used, and zeroed. kernels/bert.cu's `adamw_update` is its twin.
#[allow(clippy::too_many_arguments)]
pub fn adamw_update(
    params: &mut [f32],
    grads: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    cfg: AdamWConfig,
    bc1: f32,
    bc2: f32,
    lr: f32,
    wd: f32,
    inv: f32,
    clip: f32,
) {
    let k = Coefs {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        bc1,
        bc2,
        lr,
        wd,
        scale: (inv, clip),
    };
    adamw_apply(params, grads, m, v, k)
}

/// Everything one element's update needs besides its own four values.
#[derive(Clone, Copy)]
struct Coefs {
    beta1: f32,
    beta2: f32,
    eps: f32,
    bc1: f32,
    bc2: f32,
    lr: f32,
    wd: f32,
    /// The gradient's two factors, applied in this order: 1/#masked, then the clip.
    scale: (f32, f32),
}

/// [`AdamW::update`]'s element update on a scaled gradient, which it zeroes.
#[inline(always)]
fn adamw_portable(p: &mut [f32], g: &mut [f32], m: &mut [f32], v: &mut [f32], k: Coefs) {
    for (((p, g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
        let g = std::mem::take(g) * k.scale.0 * k.scale.1;
        *m = k.beta1 * *m + (1.0 - k.beta1) * g;
        *v = k.beta2 * *v + (1.0 - k.beta2) * g * g;
        let mhat = *m / k.bc1;
        let vhat = *v / k.bc2;
        *p -= k.lr * (mhat / (vhat.sqrt() + k.eps) + k.wd * *p);
    }
}

/// The update compiled for AVX2, picked at run time: the crate is built for baseline
/// x86-64 (4 f32 a vector) and the update is bound by its three divisions and square
/// root, which take about as long per vector at 8 lanes as at 4. Division and square
/// root are correctly rounded at any width and nothing is contracted into a fused
/// multiply-add, so the bits are those of the portable loop.
#[cfg(target_arch = "x86_64")]
mod wide {
    pub(super) fn available() -> bool {
        std::is_x86_feature_detected!("avx2")
    }

    /// # Safety
    /// The CPU must have AVX2 ([`available`]).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn adamw(
        p: &mut [f32],
        g: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        k: super::Coefs,
    ) {
        super::adamw_portable(p, g, m, v, k)
    }
}

#[inline(always)]
fn adamw_apply(p: &mut [f32], g: &mut [f32], m: &mut [f32], v: &mut [f32], k: Coefs) {
    #[cfg(target_arch = "x86_64")]
    if wide::available() {
        // SAFETY: the CPU has AVX2.
        return unsafe { wide::adamw(p, g, m, v, k) };
    }
    adamw_portable(p, g, m, v, k)
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

/// Elements per partial sum of the gradient norm: each chunk's squares are summed in f64
/// in element order, then the chunks' sums in chunk order, whatever the threads.
pub const NORM_CHUNK: usize = 1 << 16;

/// L2 norm of the whole gradient vector (accumulated in f64, fixed order).
pub fn global_norm(grads: &[f32]) -> f32 {
    scaled_norm(grads, 1.0)
}

/// [`global_norm`] of `grads` each multiplied by `inv` (in f32, as `*g *= inv` would
/// leave it), bitwise the same, without writing the products.
///
/// A chunk's sum is one chain of dependent f64 additions; summing eight chunks side by
/// side keeps every chain's order (so the bits) and hides the adder's latency.
pub fn scaled_norm(grads: &[f32], inv: f32) -> f32 {
    const LANES: usize = 8;
    let sq = |g: f32| {
        let x = g * inv;
        x as f64 * x as f64
    };
    grads
        .par_chunks(LANES * NORM_CHUNK)
        .flat_map_iter(|block| {
            let mut sums = Vec::with_capacity(LANES);
            if block.len() == LANES * NORM_CHUNK {
                let mut acc = [0.0f64; LANES];
                let lanes: Vec<&[f32]> = block.chunks_exact(NORM_CHUNK).collect();
                for i in 0..NORM_CHUNK {
                    for (a, lane) in acc.iter_mut().zip(&lanes) {
                        *a += sq(lane[i]);
                    }
                }
                sums.extend(acc);
            } else {
                sums.extend(
                    block
                        .chunks(NORM_CHUNK)
                        .map(|c| c.iter().fold(0.0f64, |a, &g| a + sq(g))),
                );
            }
            sums
        })
        .collect::<Vec<f64>>()
        .iter()
        .sum::<f64>()
        .sqrt() as f32
}

/// The factor [`clip_grad_norm`] scales by for a gradient of norm `norm` (1 when it does
/// not clip: `x * 1.0 == x` for every f32).
pub fn clip_factor(norm: f32, max_norm: f32) -> f32 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Scales `grads` so their global norm is at most `max_norm` (≤ 0: no clipping); returns
/// the norm before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = global_norm(grads);
    if max_norm > 0.0 && norm > max_norm {
        let s = clip_factor(norm, max_norm);
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

    /// Values with every kind of spread: exponents from 2^-30 to 2^8, both signs, some
    /// exact zeros.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x % 97 == 0 {
                    return 0.0;
                }
                let mant = (x >> 40) as f32 / (1u64 << 24) as f32 + 0.5;
                let exp = ((x >> 8) % 39) as i32 - 30;
                let sign = if x & 1 == 0 { 1.0 } else { -1.0 };
                sign * mant * 2f32.powi(exp)
            })
            .collect()
    }

    #[test]
    fn scaled_norm_is_bitwise_the_norm_of_the_scaled_gradient() {
        // Around the chunk and eight-chunk block edges, where the two paths split work.
        let c = NORM_CHUNK;
        for (k, n) in [
            0,
            1,
            c - 1,
            c,
            c + 1,
            8 * c - 1,
            8 * c,
            8 * c + 1,
            17 * c + 5,
        ]
        .into_iter()
        .enumerate()
        {
            let g = values(n, 11 + k as u64);
            for inv in [1.0f32, 1.0 / 3.0, 1.0 / 1234.0] {
                let mut scaled = g.clone();
                scaled.iter_mut().for_each(|x| *x *= inv);
                // The norm as it was computed before the fused step, word for word.
                let want = scaled
                    .par_chunks(1 << 16)
                    .map(|c| c.iter().map(|&g| g as f64 * g as f64).sum::<f64>())
                    .collect::<Vec<f64>>()
                    .iter()
                    .sum::<f64>()
                    .sqrt() as f32;
                assert_eq!(
                    scaled_norm(&g, inv).to_bits(),
                    want.to_bits(),
                    "n {n}, inv {inv}"
                );
            }
        }
        assert_eq!(global_norm(&[3.0, 4.0]), 5.0);
        assert_eq!(
            clip_factor(5.0, 1.0),
            1.0 / (5.0 + 1e-6),
            "clips above the limit"
        );
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert_eq!(clip_factor(5.0, 0.0), 1.0, "0 turns clipping off");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]
        /// Three steps of the fused update against the separate passes (scale, clip to
        /// the norm, update) on a model whose embedding spans several eight-chunk blocks
        /// of the norm: parameters, moments, norms and step count bitwise equal, and the
        /// gradient left zero.
        #[test]
        fn fused_update_is_bitwise_the_separate_passes(
            seed in 1u64..u64::MAX,
            masked in 1u32..5000,
            max_norm in proptest::prop_oneof![proptest::strategy::Just(0.0f32), 1e-3f32..10.0],
            lr in 1e-5f32..1e-1,
            threads in 1usize..4,
        ) {
            let cfg = ModelConfig {
                vocab_size: 9000,
                max_position: 16,
                type_vocab_size: 2,
                hidden: 64,
                layers: 1,
                heads: 2,
                ffn: 128,
            };
            let layout = ParamLayout::new(&cfg);
            proptest::prop_assert!(layout.total > 8 * NORM_CHUNK);
            let mut want_p = values(layout.total, seed);
            let mut got_p = want_p.clone();
            let mut want = AdamW::new(AdamWConfig::default(), &layout);
            let mut got = want.clone();
            let inv = 1.0 / masked as f32;
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| -> Result<(), proptest::test_runner::TestCaseError> {
                for step in 0..3u64 {
                    let g = values(layout.total, seed.wrapping_add(step + 1));
                    let mut sep = g.clone();
                    sep.iter_mut().for_each(|x| *x *= inv);
                    let want_norm = clip_grad_norm(&mut sep, max_norm);
                    want.update(&mut want_p, &sep, lr);
                    let mut fused = g;
                    let norm = scaled_norm(&fused, inv);
                    got.update_fused(&mut got_p, &mut fused, inv, clip_factor(norm, max_norm), lr);
                    proptest::prop_assert_eq!(norm.to_bits(), want_norm.to_bits());
                    proptest::prop_assert!(fused.iter().all(|&x| x.to_bits() == 0));
                }
                Ok(())
            })?;
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            proptest::prop_assert_eq!(got.t, want.t);
            proptest::prop_assert!(bits(&got_p) == bits(&want_p), "parameters differ");
            proptest::prop_assert!(bits(&got.m) == bits(&want.m), "first moments differ");
            proptest::prop_assert!(bits(&got.v) == bits(&want.v), "second moments differ");
        }
    }
}
