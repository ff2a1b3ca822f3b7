//! The trainer against Hugging Face transformers' `BertForMaskedLM`, from numbers that
//! library computed (`scripts/hf-fixture.py` wrote `tests/fixtures/hf-bert-tiny/`): the
//! weights come in through the importer, the trainer runs forward and backward on the
//! fixture's batch, and the loss, each position's loss and every gradient tensor must agree.
//!
//! Error measures: `|a - b| / |b|` for losses; for a gradient tensor, the norm of the
//! difference over the reference's norm. Bounds: 1e-5 in f32 (both sides round every
//! operation; seen: about 1e-7), 1e-10 in f64 (seen: about 1e-15).

use std::path::{Path, PathBuf};

use hetccl_testkit::Scratch;
use hetccl_trainer::hf;
use hetccl_trainer::model::{Batch, Model, ModelConfig};
use hetccl_trainer::ops::Real;
use hetccl_trainer::sync::NoSync;
use safetensors::tensor::{Dtype, SafeTensors};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-bert-tiny")
}

fn fixture() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture_dir().join("fixture.json")).unwrap()).unwrap()
}

fn batch(f: &serde_json::Value) -> Batch {
    let b = &f["batch"];
    let list = |k: &str| -> Vec<u64> {
        b[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    Batch {
        batch: b["batch"].as_u64().unwrap() as usize,
        seq_len: b["seq_len"].as_u64().unwrap() as usize,
        input_ids: list("input_ids").iter().map(|&x| x as u32).collect(),
        token_types: list("token_types").iter().map(|&x| x as u32).collect(),
        masked_positions: list("masked_positions")
            .iter()
            .map(|&x| x as usize)
            .collect(),
        masked_targets: list("masked_targets").iter().map(|&x| x as u32).collect(),
    }
}

/// A reference gradient, as f64 (the f32 file's values widen exactly).
fn reference(st: &SafeTensors, name: &str) -> Vec<f64> {
    let t = st.tensor(name).unwrap();
    match t.dtype() {
        Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F64 => t
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        d => panic!("{name}: {d:?}"),
    }
}

/// Runs the trainer in `T` on the fixture and returns the worst relative error of the
/// loss, of the per-position losses, and of the gradient tensors (with the tensor's name).
fn compare<T: Real>(tag: &str) -> (f64, f64, f64, String) {
    let f = fixture();
    let dir = fixture_dir();
    let cfg: ModelConfig = hf::model_config(&dir).unwrap();
    let params32 = hf::import(&dir, &cfg).unwrap();
    let params: Vec<T> = params32.iter().map(|&x| T::from_f64(x as f64)).collect();
    let batch = batch(&f);
    let mut model = Model::<T>::new(cfg).unwrap();
    let stats = model.forward(&params, &batch).unwrap();
    let m = stats.masked as f64;
    let mut grads = vec![T::zero(); params.len()];
    model.backward(&params, &mut grads, &mut NoSync).unwrap();

    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
    let want_loss = f[tag]["loss"].as_f64().unwrap();
    let loss = stats.loss_sum / m;
    let loss_err = rel(loss, want_loss);
    let want_losses: Vec<f64> = f[tag]["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let losses: Vec<f64> = model.losses().iter().map(|x| x.to_f64()).collect();
    assert_eq!(losses.len(), want_losses.len());
    let pos_err = losses
        .iter()
        .zip(&want_losses)
        .map(|(&a, &b)| rel(a, b))
        .fold(0.0, f64::max);
    println!("{tag}: trainer loss {loss:.17e}, transformers {want_loss:.17e}");
    println!("{tag}: trainer per-position losses {losses:?}");

    let bytes = std::fs::read(dir.join(format!("grads-{tag}.safetensors"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let map = hf::tensor_map(model.layout());
    // every tensor of the model is compared, and nothing else is in the file
    assert_eq!(st.len(), map.len());
    let total: f64 = map
        .iter()
        .flat_map(|t| reference(&st, &t.name))
        .map(|b| b * b)
        .sum();
    let (mut worst, mut worst_name) = (0.0f64, String::new());
    for t in &map {
        let want = reference(&st, &t.name);
        // the trainer's backward gives the gradient of the SUM over masked positions
        let ours = grads[t.range.clone()].iter().map(|g| g.to_f64() / m);
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for (a, b) in ours.zip(&want) {
            diff += (a - b) * (a - b);
            norm += b * b;
        }
        // The key bias adds q·b to every score of a query, which the softmax cancels: its
        // gradient is zero but for rounding on both sides, so it is measured against the
        // whole gradient's norm instead of its own.
        let scale = if t.name.ends_with("attention.self.key.bias") {
            total
        } else {
            norm
        };
        assert!(scale > 0.0, "{}: zero reference gradient", t.name);
        let err = (diff / scale).sqrt();
        if err > worst {
            (worst, worst_name) = (err, t.name.clone());
        }
    }
    println!(
        "{tag}: max rel error loss {loss_err:.2e}, per-position {pos_err:.2e}, gradient {worst:.2e} ({worst_name})"
    );
    (loss_err, pos_err, worst, worst_name)
}

#[test]
fn f32_matches_transformers() {
    let (loss, pos, grad, name) = compare::<f32>("f32");
    assert!(loss <= 1e-5, "loss: {loss:e}");
    assert!(pos <= 1e-5, "per-position losses: {pos:e}");
    assert!(grad <= 1e-5, "gradient of {name}: {grad:e}");
}

#[test]
fn f64_matches_transformers() {
    let (loss, pos, grad, name) = compare::<f64>("f64");
    assert!(loss <= 1e-10, "loss: {loss:e}");
    assert!(pos <= 1e-10, "per-position losses: {pos:e}");
    assert!(grad <= 1e-10, "gradient of {name}: {grad:e}");
}

#[test]
fn the_fixture_weights_export_as_they_came_in() {
    let dir = fixture_dir();
    let cfg = hf::model_config(&dir).unwrap();
    let params = hf::import(&dir, &cfg).unwrap();
    let out = Scratch::new("hf-fixture-export");
    let vocab: String = (0..cfg.vocab_size)
        .map(|i| format!("[unused{i}]\n"))
        .collect();
    hf::export(&out, &cfg, &params, &vocab).unwrap();
    let back = hf::import(&out, &cfg).unwrap();
    let bits = |p: &[f32]| p.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&back), bits(&params));
    // transformers' own file and ours hold the same tensors under the same names
    let theirs = std::fs::read(dir.join(hf::WEIGHTS_FILE)).unwrap();
    let ours = std::fs::read(out.join(hf::WEIGHTS_FILE)).unwrap();
    let names = |b: &[u8]| {
        let mut n: Vec<String> = SafeTensors::deserialize(b)
            .unwrap()
            .names()
            .iter()
            .map(|s| s.to_string())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&ours), names(&theirs));
}
