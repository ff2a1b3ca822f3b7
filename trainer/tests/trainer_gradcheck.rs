//! Finite-difference checks of every backward function and of the whole model, in f64.
//!
//! For an op `out = f(x, w, ...)` the scalar checked is `L = Σ out ⊙ r` with fixed random
//! `r`; the analytic gradient is the op's backward with `dout = r`, the numeric one the
//! central difference `(L(x+h) - L(x-h)) / 2h`, h = 1e-6. Error per element:
//! `|a - n| / max(|a|, |n|, 1e-6)`; the maximum over all elements is printed and must stay
//! below 1e-5 (f64 central differences reach ~1e-8 on these smooth functions).

use hetccl_trainer::model::{init_params, Batch, Model, ModelConfig};
use hetccl_trainer::ops::*;
use hetccl_trainer::rng::{normal, Stream};
use hetccl_trainer::sync::NoSync;

const H: f64 = 1e-6;
const TOL: f64 = 1e-5;

fn randn(n: usize, key: u64) -> Vec<f64> {
    (0..n)
        .map(|i| normal(99, Stream::Init, key, i as u64))
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Max relative error between `analytic[k]` and the central difference of `loss` w.r.t.
/// every element of `inputs[k]`.
fn max_rel_err(
    inputs: &mut [Vec<f64>],
    analytic: &[Vec<f64>],
    loss: &dyn Fn(&[Vec<f64>]) -> f64,
) -> f64 {
    let mut worst: f64 = 0.0;
    for k in 0..inputs.len() {
        for j in 0..inputs[k].len() {
            let orig = inputs[k][j];
            inputs[k][j] = orig + H;
            let up = loss(inputs);
            inputs[k][j] = orig - H;
            let down = loss(inputs);
            inputs[k][j] = orig;
            let num = (up - down) / (2.0 * H);
            let a = analytic[k][j];
            let err = (a - num).abs() / a.abs().max(num.abs()).max(1e-6);
            worst = worst.max(err);
        }
    }
    worst
}

fn report(name: &str, err: f64) {
    println!("{name:<28} max rel error {err:.2e}");
    assert!(err < TOL, "{name}: max rel error {err:.3e} ≥ {TOL:e}");
}

#[test]
fn matmul_backward_matches_finite_differences() {
    let (n, c, oc) = (5, 4, 3);
    let r = randn(n * oc, 1);
    let fwd = |x: &[Vec<f64>]| {
        let mut out = vec![0.0; n * oc];
        matmul_forward(&mut out, &x[0], &x[1], Some(&x[2]), n, c, oc);
        dot(&out, &r)
    };
    let mut x = vec![randn(n * c, 2), randn(oc * c, 3), randn(oc, 4)];
    let mut g = vec![vec![0.0; n * c], vec![0.0; oc * c], vec![0.0; oc]];
    let [gi, gw, gb] = &mut g[..] else {
        unreachable!()
    };
    matmul_backward(gi, gw, Some(gb), &r, &x[0], &x[1], n, c, oc);
    report("matmul", max_rel_err(&mut x, &g, &fwd));
}

#[test]
fn layernorm_backward_matches_finite_differences() {
    let (n, c) = (4, 6);
    let r = randn(n * c, 5);
    let fwd = |x: &[Vec<f64>]| {
        let (mut out, mut m, mut s) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut out, &mut m, &mut s, &x[0], &x[1], &x[2], n, c);
        dot(&out, &r)
    };
    let mut x = vec![randn(n * c, 6), randn(c, 7), randn(c, 8)];
    let (mut out, mut m, mut s) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    layernorm_forward(&mut out, &mut m, &mut s, &x[0], &x[1], &x[2], n, c);
    let mut g = vec![vec![0.0; n * c], vec![0.0; c], vec![0.0; c]];
    let [gi, gw, gb] = &mut g[..] else {
        unreachable!()
    };
    layernorm_backward(gi, gw, gb, &r, &x[0], &x[1], &m, &s, n, c);
    report("layernorm", max_rel_err(&mut x, &g, &fwd));
}

#[test]
fn attention_backward_matches_finite_differences() {
    let (b, t, c, nh) = (2, 4, 6, 2);
    let r = randn(b * t * c, 9);
    let fwd = |x: &[Vec<f64>]| {
        let (mut out, mut att) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
        attention_forward(&mut out, &mut att, &x[0], b, t, c, nh);
        dot(&out, &r)
    };
    let mut x = vec![randn(b * t * 3 * c, 10)];
    let (mut out, mut att) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
    attention_forward(&mut out, &mut att, &x[0], b, t, c, nh);
    // each softmax row sums to one
    for row in att.chunks(t) {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
    let mut g = vec![vec![0.0; b * t * 3 * c]];
    let (mut datt, mut dpre) = (vec![0.0; b * nh * t * t], vec![0.0; b * nh * t * t]);
    attention_backward(
        &mut g[0], &mut datt, &mut dpre, &r, &x[0], &att, b, t, c, nh,
    );
    report("attention", max_rel_err(&mut x, &g, &fwd));
}

#[test]
fn gelu_backward_matches_finite_differences() {
    let n = 20;
    let r = randn(n, 11);
    let fwd = |x: &[Vec<f64>]| {
        let mut out = vec![0.0; n];
        gelu_forward(&mut out, &x[0], n);
        dot(&out, &r)
    };
    let mut x = vec![randn(n, 12).iter().map(|v| 3.0 * v).collect::<Vec<f64>>()];
    let mut g = vec![vec![0.0; n]];
    gelu_backward(&mut g[0], &x[0], &r, n);
    report("gelu", max_rel_err(&mut x, &g, &fwd));
    // closed forms: gelu(0) = 0, gelu'(0) = 1/2
    let (mut y, mut d) = ([1.0f64], [0.0f64]);
    gelu_forward(&mut y, &[0.0], 1);
    gelu_backward(&mut d, &[0.0], &[1.0], 1);
    assert_eq!((y[0], d[0]), (0.0, 0.5));
}

#[test]
fn softmax_crossentropy_backward_matches_finite_differences() {
    let (n, v) = (3, 7);
    let targets = [2u32, 0, 6];
    let dl = randn(n, 13);
    let fwd = |x: &[Vec<f64>]| {
        let (mut losses, mut probs) = (vec![0.0; n], vec![0.0; n * v]);
        softmax_crossentropy_forward(&mut losses, &mut probs, &x[0], &targets, n, v);
        dot(&losses, &dl)
    };
    let mut x = vec![randn(n * v, 14)];
    let (mut losses, mut probs) = (vec![0.0; n], vec![0.0; n * v]);
    softmax_crossentropy_forward(&mut losses, &mut probs, &x[0], &targets, n, v);
    let mut g = vec![vec![0.0; n * v]];
    crossentropy_softmax_backward(&mut g[0], &dl, &probs, &targets, n, v);
    report("softmax+crossentropy", max_rel_err(&mut x, &g, &fwd));
    // equal logits: loss is ln V exactly
    let (mut l, mut p) = (vec![0.0; 1], vec![0.0; v]);
    softmax_crossentropy_forward(&mut l, &mut p, &vec![0.5; v], &[3], 1, v);
    assert!((l[0] - (v as f64).ln()).abs() < 1e-15);
}

#[test]
fn encoder_backward_matches_finite_differences() {
    let (b, t, c, vocab, maxt) = (2, 3, 4, 5, 4);
    let inp = [1u32, 4, 1, 0, 2, 4];
    let tt = [0u32, 1, 1, 0, 0, 1];
    let r = randn(b * t * c, 15);
    let fwd = |x: &[Vec<f64>]| {
        let mut out = vec![0.0; b * t * c];
        encoder_forward(&mut out, &inp, &tt, &x[0], &x[1], &x[2], b, t, c);
        dot(&out, &r)
    };
    let mut x = vec![randn(vocab * c, 16), randn(maxt * c, 17), randn(2 * c, 18)];
    let mut g = vec![vec![0.0; vocab * c], vec![0.0; maxt * c], vec![0.0; 2 * c]];
    let [gw, gp, gt] = &mut g[..] else {
        unreachable!()
    };
    encoder_backward(gw, gp, gt, &r, &inp, &tt, b, t, c);
    report("encoder", max_rel_err(&mut x, &g, &fwd));
}

fn tiny_config(layers: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 50,
        max_position: 8,
        type_vocab_size: 2,
        hidden: 16,
        layers,
        heads: 2,
        ffn: 32,
    }
}

fn tiny_batch() -> Batch {
    let (b, t) = (2, 6);
    Batch {
        batch: b,
        seq_len: t,
        input_ids: vec![1, 7, 3, 49, 3, 2, 1, 11, 3, 22, 33, 2],
        token_types: vec![0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        masked_positions: vec![2, 3, 7, 10],
        masked_targets: vec![5, 49, 12, 0],
    }
}

fn model_check(layers: usize) {
    let cfg = tiny_config(layers);
    let mut model = Model::<f64>::new(cfg).unwrap();
    let layout = model.layout().clone();
    // Larger than BERT's 0.02 init so every path carries gradient well above noise.
    let mut params: Vec<f64> = init_params(&layout, 3);
    for (p, r) in params.iter_mut().zip(randn(layout.total, 20)) {
        *p += 0.3 * r;
    }
    let batch = tiny_batch();
    let stats = model.forward(&params, &batch).unwrap();
    assert_eq!(stats.masked, 4);
    let mut grads = vec![0.0; layout.total];
    model.backward(&params, &mut grads, &mut NoSync).unwrap();

    // Adding the same vector to every key shifts each score row by a constant, which
    // softmax ignores: the key bias gets exactly no gradient.
    let c = 16;
    for t in layout
        .tensors
        .iter()
        .filter(|t| t.name.ends_with("qkv.bias"))
    {
        let key_bias = &grads[t.range.start + c..t.range.start + 2 * c];
        assert!(key_bias.iter().all(|g| g.abs() < 1e-12), "{key_bias:?}");
    }
    let mut worst: f64 = 0.0;
    let mut worst_name = String::new();
    for t in &layout.tensors {
        let mut err: f64 = 0.0;
        for j in t.range.clone() {
            let orig = params[j];
            // h = 1e-5: with L ≈ 15 the rounding in the quotient is ~15·1e-16/2h ≈ 1e-10,
            // the truncation error O(h²) no larger. Floor 1e-4 on the denominator: only
            // gradients that are (analytically) zero come near it.
            let h = 1e-5;
            params[j] = orig + h;
            let up = model.forward(&params, &batch).unwrap().loss_sum;
            params[j] = orig - h;
            let down = model.forward(&params, &batch).unwrap().loss_sum;
            params[j] = orig;
            let num = (up - down) / (2.0 * h);
            let e = (grads[j] - num).abs() / grads[j].abs().max(num.abs()).max(1e-4);
            err = err.max(e);
        }
        if err > worst {
            worst = err;
            worst_name = t.name.clone();
        }
    }
    println!(
        "model L={layers}: {} parameters, max rel error {worst:.2e} (in {worst_name})",
        layout.total
    );
    assert!(worst < TOL, "worst tensor {worst_name}: {worst:.3e}");
}

#[test]
fn whole_model_gradient_one_layer() {
    model_check(1);
}

#[test]
fn whole_model_gradient_two_layers() {
    model_check(2);
}

#[test]
fn f32_model_matches_f64_model() {
    let cfg = tiny_config(2);
    let mut m32 = Model::<f32>::new(cfg.clone()).unwrap();
    let mut m64 = Model::<f64>::new(cfg).unwrap();
    let layout = m64.layout().clone();
    let p64: Vec<f64> = init_params(&layout, 3);
    let p32: Vec<f32> = p64.iter().map(|&x| x as f32).collect();
    let batch = tiny_batch();
    let l64 = m64.forward(&p64, &batch).unwrap().loss_sum;
    let l32 = m32.forward(&p32, &batch).unwrap().loss_sum;
    // 4 tokens at ln 50 = 3.91 each with a near-uniform init
    assert!((l64 - 4.0 * 50f64.ln()).abs() < 0.5, "{l64}");
    assert!((l32 - l64).abs() < 1e-4, "{l32} vs {l64}");
    let mut g64 = vec![0.0; layout.total];
    let mut g32 = vec![0.0f32; layout.total];
    m64.backward(&p64, &mut g64, &mut NoSync).unwrap();
    m32.backward(&p32, &mut g32, &mut NoSync).unwrap();
    let scale = g64.iter().fold(0.0f64, |a, g| a.max(g.abs()));
    let diff = g64
        .iter()
        .zip(&g32)
        .fold(0.0f64, |a, (x, y)| a.max((x - *y as f64).abs()));
    println!("f32 vs f64 gradients: max abs diff {diff:.2e} (max |g| {scale:.2e})");
    assert!(diff < 1e-4 * scale);
}

/// Records each bucket's length and a copy of its values when backward hands it over.
struct Recorder(Vec<Vec<f64>>);

impl<'g> hetccl_trainer::BucketSink<'g, f64> for Recorder {
    fn bucket_ready(&mut self, grads: &'g mut [f64]) -> hetccl_trainer::Result<()> {
        self.0.push(grads.to_vec());
        Ok(())
    }
}

#[test]
fn buckets_arrive_last_layer_first_and_final() {
    let mut model = Model::<f64>::new(tiny_config(2)).unwrap();
    let layout = model.layout().clone();
    let params: Vec<f64> = init_params(&layout, 3);
    model.forward(&params, &tiny_batch()).unwrap();
    let mut grads = vec![0.0; layout.total];
    let mut rec = Recorder(Vec::new());
    model.backward(&params, &mut grads, &mut rec).unwrap();
    let order = layout.buckets_in_backward_order();
    assert_eq!(rec.0.len(), 4);
    for (seen, range) in rec.0.iter().zip(&order) {
        // what the communicator would have sent is what backward ended with
        assert_eq!(seen[..], grads[range.clone()]);
    }
    assert_eq!(order[0], layout.head);
    assert_eq!(order[1], layout.layers[1]);
    assert_eq!(order[2], layout.layers[0]);
    assert_eq!(order[3], layout.embeddings);
}

#[test]
fn batch_gradient_is_the_sum_of_per_rank_gradients() {
    // "rank 0" takes sequence 0, "rank 1" sequence 1; their summed gradients must equal
    // the gradient of the whole batch (the loss is a sum over masked tokens).
    let mut model = Model::<f64>::new(tiny_config(2)).unwrap();
    let layout = model.layout().clone();
    let params: Vec<f64> = init_params(&layout, 3);
    let whole = tiny_batch();
    model.forward(&params, &whole).unwrap();
    let mut g_whole = vec![0.0; layout.total];
    model.backward(&params, &mut g_whole, &mut NoSync).unwrap();

    let t = whole.seq_len;
    let mut g_sum = vec![0.0; layout.total];
    let mut masked = 0;
    for r in 0..2 {
        let keep: Vec<usize> = (0..whole.masked_positions.len())
            .filter(|&i| whole.masked_positions[i] / t == r)
            .collect();
        let part = Batch {
            batch: 1,
            seq_len: t,
            input_ids: whole.input_ids[r * t..(r + 1) * t].to_vec(),
            token_types: whole.token_types[r * t..(r + 1) * t].to_vec(),
            masked_positions: keep
                .iter()
                .map(|&i| whole.masked_positions[i] - r * t)
                .collect(),
            masked_targets: keep.iter().map(|&i| whole.masked_targets[i]).collect(),
        };
        masked += model.forward(&params, &part).unwrap().masked;
        let mut g = vec![0.0; layout.total];
        model.backward(&params, &mut g, &mut NoSync).unwrap();
        g_sum.iter_mut().zip(&g).for_each(|(s, x)| *s += x);
    }
    assert_eq!(masked, 4);
    let diff = g_whole
        .iter()
        .zip(&g_sum)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    println!("whole batch vs sum of two halves: max abs diff {diff:.2e}");
    assert!(diff < 1e-12);
}
