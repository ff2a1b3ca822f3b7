//! The whole model on the GPU (`gpu_model`) against the CPU model on the same batch and
//! parameters: the loss sum, the masked count, the accuracy count and every gradient
//! tensor of the flat layout. Skipped, with the reason, without a CUDA driver, a device
//! or cuBLAS.
//!
//! Tolerances (both sides f32, fp32 products; they differ in summation orders, in where
//! the attention's scale and the biases are applied, and in the warp-wise LayerNorm
//! statistics, each a few ulps per op, compounded over two layers forward and back):
//! the loss sum within 1e-5 relative; each gradient tensor `g` against the CPU's `c`
//! within `‖g - c‖₂ ≤ 1e-3·‖c‖₂ + 1e-7·√n` (n its elements; the absolute part covers
//! tensors whose gradient is zero or nearly so).

use hetccl::device::{available, cublas_available, Device};
use hetccl_testkit::skip;
use hetccl_trainer::gpu_blas::Precision;
use hetccl_trainer::gpu_model::GpuModel;
use hetccl_trainer::model::init_params;
use hetccl_trainer::{Batch, Model, ModelConfig, NoSync};

fn device() -> Option<Device> {
    if let Err(reason) = available() {
        skip(&reason);
        return None;
    }
    if let Err(reason) = cublas_available() {
        skip(&reason);
        return None;
    }
    Some(Device::open(0).expect("open device 0"))
}

/// V, P, C, F not multiples of 32; hs = 8 with 3 heads; 2 layers.
fn tiny() -> ModelConfig {
    ModelConfig {
        vocab_size: 97,
        max_position: 24,
        type_vocab_size: 2,
        hidden: 24,
        layers: 2,
        heads: 3,
        ffn: 40,
    }
}

/// B = 3 sequences of T = 17, both token types, 9 masked positions (one per sequence at
/// least, a repeated target).
fn batch() -> Batch {
    let (b, t) = (3, 17);
    let input_ids: Vec<u32> = (0..b * t).map(|i| ((i * 37 + 11) % 97) as u32).collect();
    let token_types: Vec<u32> = (0..b * t).map(|i| u32::from(i % t >= 9)).collect();
    let masked_positions = vec![1, 4, 5, 16, 18, 30, 34, 40, 50];
    let masked_targets = vec![3, 96, 3, 0, 45, 12, 77, 8, 60];
    Batch {
        batch: b,
        seq_len: t,
        input_ids,
        token_types,
        masked_positions,
        masked_targets,
    }
}

#[test]
fn loss_and_every_gradient_match_the_cpu_model() {
    let Some(dev) = device() else { return };
    let cfg = tiny();
    let mut cpu = Model::<f32>::new(cfg.clone()).unwrap();
    // larger weights than the 0.02 init, so attention and GELU leave their linear parts
    let params: Vec<f32> = init_params::<f32>(cpu.layout(), 7)
        .iter()
        .map(|x| x * 10.0)
        .collect();
    let batch = batch();
    let want = cpu.forward(&params, &batch).unwrap();
    let mut cpu_grads = vec![0.0f32; params.len()];
    cpu.backward(&params, &mut cpu_grads, &mut NoSync).unwrap();

    let mut gpu = GpuModel::new(&dev, cfg, Precision::Fp32).unwrap();
    gpu.set_params(&params).unwrap();
    assert_eq!(
        gpu.params_to_host().unwrap(),
        params,
        "parameters round-trip"
    );
    gpu.zero_grads().unwrap();
    let got = gpu.forward(&batch).unwrap();
    gpu.backward().unwrap();
    let gpu_grads = gpu.grads_to_host().unwrap();

    assert_eq!(got.masked, want.masked);
    assert_eq!(got.correct, want.correct, "accuracy count");
    let rel = (got.loss_sum - want.loss_sum).abs() / want.loss_sum.abs();
    assert!(
        rel <= 1e-5,
        "loss sum: GPU {} CPU {} (relative {rel:e})",
        got.loss_sum,
        want.loss_sum
    );
    for tensor in &cpu.layout().tensors {
        let (g, c) = (
            &gpu_grads[tensor.range.clone()],
            &cpu_grads[tensor.range.clone()],
        );
        let diff = g
            .iter()
            .zip(c)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm = c.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let tol = 1e-3 * norm + 1e-7 * (c.len() as f64).sqrt();
        assert!(
            diff <= tol,
            "{}: ‖GPU - CPU‖ = {diff:e} over {tol:e} (‖CPU‖ = {norm:e})",
            tensor.name
        );
        eprintln!("{}: relative {:e}", tensor.name, diff / norm.max(1e-30));
    }

    // backward adds: a second pass on the same batch doubles every gradient
    gpu.forward(&batch).unwrap();
    gpu.backward().unwrap();
    let twice = gpu.grads_to_host().unwrap();
    let (num, den) = twice
        .iter()
        .zip(&gpu_grads)
        .fold((0.0f64, 0.0f64), |(n, d), (t, g)| {
            (
                n + ((t - 2.0 * g) as f64).powi(2),
                d + ((2.0 * g) as f64).powi(2),
            )
        });
    assert!(
        num.sqrt() <= 1e-6 * den.sqrt(),
        "gradients do not accumulate"
    );
}

#[test]
fn bad_batches_and_a_missing_forward_are_refused() {
    let Some(dev) = device() else { return };
    let mut gpu = GpuModel::new(&dev, tiny(), Precision::Fp32).unwrap();
    let err = gpu.backward().unwrap_err();
    assert!(err.to_string().contains("no forward pass"), "{err}");
    let mut bad = batch();
    bad.input_ids[2] = 97;
    let err = gpu.forward(&bad).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid argument to GpuModel::forward: token id 97 ≥ vocab_size 97"
    );
    let err = gpu.set_params(&[0.0; 5]).unwrap_err();
    assert!(
        err.to_string().contains("5 values, the layout has"),
        "{err}"
    );
    // no masked position: the loss is zero and backward still runs
    let mut none = batch();
    none.masked_positions.clear();
    none.masked_targets.clear();
    let stats = gpu.forward(&none).unwrap();
    assert_eq!((stats.masked, stats.correct, stats.loss_sum), (0, 0, 0.0));
    gpu.backward().unwrap();
}
