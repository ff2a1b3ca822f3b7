//! End-to-end behaviour of the trainer on a small model and a slice of the corpus:
//! learning, bit-exact resume, refused checkpoints, data-parallel equivalence.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use hetccl::trainer::checkpoint::{self, CheckpointMeta};
use hetccl::trainer::data::{make_batch, Corpus, Sampler};
use hetccl::trainer::model::{init_params, Model, ModelConfig};
use hetccl::trainer::optim::{AdamW, AdamWConfig};
use hetccl::trainer::sync::NoSync;
use hetccl::trainer::{
    train, train_threads, with_threads, Balance, RunOptions, Settings, SingleProcess, TrainConfig,
    WordPiece,
};
use hetccl::Error;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh scratch directory under the system temp dir.
fn scratch(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "hetccl-trainer-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The first 40 kB of tinyshakespeare (about 10k tokens).
fn small_corpus(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("data/tinyshakespeare.txt")).unwrap();
    let cut = text.char_indices().nth(40_000).unwrap().0;
    let p = dir.join("corpus.txt");
    std::fs::write(&p, &text[..cut]).unwrap();
    p
}

fn small_model() -> ModelConfig {
    ModelConfig {
        vocab_size: 30522,
        max_position: 32,
        type_vocab_size: 2,
        hidden: 32,
        layers: 2,
        heads: 2,
        ffn: 64,
    }
}

fn setup(dir: &Path, steps: u64, batch: usize) -> (TrainConfig, RunOptions) {
    let (mut cfg, mut run) = Settings::default().resolve(1).unwrap();
    cfg.model = small_model();
    cfg.seq_len = 24;
    cfg.batch_size = batch;
    cfg.steps = steps;
    cfg.warmup_steps = 2;
    cfg.lr = 2e-3;
    cfg.eval_every = 0;
    cfg.val_samples = 8;
    run.data = small_corpus(dir).into();
    run.vocab = repo().join("data/bert-base-uncased-vocab.txt").into();
    run.progress = false;
    run.threads = 1;
    (cfg, run)
}

fn single(cfg: &TrainConfig, run: &RunOptions) -> hetccl::trainer::TrainReport {
    with_threads(run.threads, || train(cfg, run, &SingleProcess))
        .unwrap()
        .unwrap()
}

#[test]
fn loss_on_a_fixed_batch_falls_by_a_third_in_50_steps() {
    let cfg = small_model();
    let tok = WordPiece::from_file(&repo().join("data/bert-base-uncased-vocab.txt")).unwrap();
    let text = std::fs::read_to_string(repo().join("data/tinyshakespeare.txt")).unwrap();
    let corpus = std::sync::Arc::new(Corpus::from_tokens(tok.encode(&text[..20_000])));
    let mut sampler = Sampler::new(corpus, 24, 1, &tok).unwrap();
    let samples: Vec<_> = (0..8).map(|g| sampler.train_sample(g)).collect();
    let batch = make_batch(&samples, 24);
    let mut model = Model::<f32>::new(cfg).unwrap();
    let layout = model.layout().clone();
    let mut params: Vec<f32> = init_params(&layout, 7);
    let mut opt = AdamW::new(AdamWConfig::default(), &layout);
    let mut grads = vec![0.0f32; layout.total];
    let mut losses = Vec::new();
    for _ in 0..50 {
        let stats = model.forward(&params, &batch).unwrap();
        losses.push(stats.mean_loss());
        grads.fill(0.0);
        model.backward(&params, &mut grads, &mut NoSync).unwrap();
        let inv = 1.0 / stats.masked as f32;
        grads.iter_mut().for_each(|g| *g *= inv);
        opt.update(&mut params, &grads, 3e-3);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    println!("fixed batch: loss {first:.3} -> {last:.3}");
    // uniform over 30522 ids: ln 30522 = 10.33
    assert!((first - 30522f64.ln()).abs() < 0.2, "{first}");
    assert!(last < 0.7 * first, "{first} -> {last}");
}

#[test]
fn resume_continues_bit_for_bit() {
    let dir = scratch("resume");
    let (cfg, mut run) = setup(&dir, 6, 4);
    run.checkpoint = Some(dir.join("full.ckpt"));
    let full = single(&cfg, &run);
    assert_eq!(full.steps.len(), 6);

    run.checkpoint = Some(dir.join("part.ckpt"));
    run.stop_after = Some(3);
    let first = single(&cfg, &run);
    assert_eq!(first.steps.len(), 3);
    let meta = checkpoint::load(&dir.join("part.ckpt")).unwrap().meta;
    assert_eq!((meta.step, meta.samples_seen, meta.adam_t), (3, 12, 3));

    run.stop_after = None;
    run.resume = Some(dir.join("part.ckpt"));
    run.checkpoint = Some(dir.join("resumed.ckpt"));
    let rest = single(&cfg, &run);
    let losses =
        |r: &[hetccl::trainer::StepRecord]| r.iter().map(|s| s.loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(losses(&first.steps), losses(&full.steps[..3]));
    assert_eq!(losses(&rest.steps), losses(&full.steps[3..]));
    assert_eq!(rest.steps[0].step, 3);
    let bits = |p: &[f32]| p.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&rest.params), bits(&full.params));
    let a = checkpoint::load(&dir.join("full.ckpt")).unwrap();
    let b = checkpoint::load(&dir.join("resumed.ckpt")).unwrap();
    assert_eq!(a, b);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn checkpoint_from_one_rank_resumes_on_two() {
    let dir = scratch("reshard");
    let (cfg, mut run) = setup(&dir, 4, 4);
    run.checkpoint = Some(dir.join("one.ckpt"));
    let full = single(&cfg, &run);
    run.stop_after = Some(2);
    run.checkpoint = Some(dir.join("part.ckpt"));
    single(&cfg, &run);
    run.stop_after = None;
    run.checkpoint = None;
    run.resume = Some(dir.join("part.ckpt"));
    let two = train_threads(&cfg, &run, 2).unwrap();
    assert_eq!(two[0].micro_batches, [2, 2]);
    for (a, b) in full.steps[2..].iter().zip(&two[0].steps) {
        assert_eq!(a.step, b.step);
        assert!(
            (a.loss - b.loss).abs() < 1e-4 * a.loss,
            "{} vs {}",
            a.loss,
            b.loss
        );
    }
    // both ranks hold the same parameters, bit for bit
    assert_eq!(two[0].params, two[1].params);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_ranks_with_half_batches_make_the_one_rank_update() {
    let dir = scratch("dp");
    let (cfg, run) = setup(&dir, 3, 6);
    let one = single(&cfg, &run);
    let two = train_threads(&cfg, &run, 2).unwrap();
    assert_eq!(two[0].micro_batches, [3, 3]);
    let mut worst: f64 = 0.0;
    for (a, b) in one.steps.iter().zip(&two[0].steps) {
        worst = worst.max((a.loss - b.loss).abs() / a.loss);
        assert_eq!(a.accuracy, b.accuracy);
    }
    let pdiff = one
        .params
        .iter()
        .zip(&two[0].params)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    println!("1 rank vs 2 ranks: max rel loss diff {worst:.2e}, max param diff {pdiff:.2e}");
    assert!(worst < 1e-5);
    assert!(pdiff < 1e-5);
    assert_eq!(two[0].params, two[1].params);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn uneven_split_and_accumulation_keep_the_update() {
    let dir = scratch("uneven");
    let (mut cfg, mut run) = setup(&dir, 2, 8);
    let one = single(&cfg, &run);
    // auto balance with rank 1 slowed: a different split, the same math
    run.balance = Balance::Auto;
    run.slowdown = 3.0;
    run.slow_ranks = Some(vec![1]);
    let two = train_threads(&cfg, &run, 2).unwrap();
    assert_eq!(two[0].micro_batches.iter().sum::<usize>(), 8);
    assert!(two[0].micro_batches.iter().all(|&b| b >= 1));
    // two micro-batches of 4 on one rank
    cfg.grad_accum = 2;
    let accum = single(&cfg, &run);
    for ((a, b), c) in one.steps.iter().zip(&two[0].steps).zip(&accum.steps) {
        assert!(
            (a.loss - b.loss).abs() < 1e-5 * a.loss,
            "{} vs {}",
            a.loss,
            b.loss
        );
        assert!(
            (a.loss - c.loss).abs() < 1e-5 * a.loss,
            "{} vs {}",
            a.loss,
            c.loss
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tiny_meta() -> CheckpointMeta {
    let (cfg, _) = Settings::default().resolve(1).unwrap();
    CheckpointMeta {
        step: 5,
        samples_seen: 80,
        adam_t: 5,
        world_size: 2,
        config: cfg,
        corpus_digest: "00".into(),
        num_params: 3,
    }
}

fn reason(e: Error) -> String {
    match e {
        Error::Checkpoint { reason, .. } => reason,
        other => panic!("not a checkpoint error: {other}"),
    }
}

#[test]
fn checkpoints_round_trip_and_refuse_damage() {
    let dir = scratch("ckpt");
    let path = dir.join("c.ckpt");
    checkpoint::save(
        &path,
        &tiny_meta(),
        &[1.0, 2.0, 3.0],
        &[0.1, 0.2, 0.3],
        &[4.0, 5.0, 6.0],
    )
    .unwrap();
    let ck = checkpoint::load(&path).unwrap();
    assert_eq!(ck.meta, tiny_meta());
    assert_eq!(
        (ck.params, ck.m, ck.v),
        (
            vec![1.0, 2.0, 3.0],
            vec![0.1, 0.2, 0.3],
            vec![4.0, 5.0, 6.0]
        )
    );
    // no temporary file left behind
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);

    let good = std::fs::read(&path).unwrap();
    let bad = dir.join("bad.ckpt");
    let try_load = |bytes: &[u8]| {
        std::fs::write(&bad, bytes).unwrap();
        reason(checkpoint::load(&bad).unwrap_err())
    };
    // one flipped bit in the last parameter
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 0x01;
    assert_eq!(try_load(&flipped), "checksum mismatch: the file is corrupt");
    // cut in the payload
    let n = good.len();
    assert_eq!(
        try_load(&good[..n - 5]),
        format!("truncated: header promises {n} bytes, file has {}", n - 5)
    );
    // cut in the header
    assert_eq!(
        try_load(&good[..20]),
        "truncated: 20 bytes, the header alone needs 64"
    );
    let mut magic = good.clone();
    magic[0] = b'X';
    assert_eq!(try_load(&magic), "bad magic: not a hetccl-bert checkpoint");
    let mut version = good.clone();
    version[8] = 9;
    assert_eq!(
        try_load(&version),
        "unsupported version 9 (this build reads 1)"
    );
    let mut longer = good.clone();
    longer.push(0);
    assert!(try_load(&longer).starts_with("size mismatch"));
    assert!(matches!(
        checkpoint::load(&dir.join("missing.ckpt")),
        Err(Error::Io { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rank_state_files_round_trip_and_refuse_damage() {
    let dir = scratch("rankstate");
    let ckpt = dir.join("c.ckpt");
    let path = checkpoint::rank_state_path(&ckpt, 3);
    assert_eq!(path, dir.join("c.ckpt.rank3"));
    let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
    checkpoint::save_rank_state(&path, 40, 4, 3, &payload).unwrap();
    assert_eq!(
        checkpoint::load_rank_state(&path, 40, 4, 3).unwrap(),
        Ok(payload.clone())
    );
    // Intact but for another step or world: set aside with the reason, not an error.
    assert_eq!(
        checkpoint::load_rank_state(&path, 50, 4, 3).unwrap(),
        Err(format!(
            "{} was written for step 40 by rank 3 of 4, this is step 50, rank 3 of 4",
            path.display()
        ))
    );
    let good = std::fs::read(&path).unwrap();
    let try_load = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        reason(checkpoint::load_rank_state(&path, 40, 4, 3).unwrap_err())
    };
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 0x01;
    assert_eq!(try_load(&flipped), "checksum mismatch (corrupt file)");
    let n = good.len();
    assert_eq!(
        try_load(&good[..n - 10]),
        "payload is 990 bytes, header says 1000 (truncated?)"
    );
    let mut magic = good.clone();
    magic[0] = b'X';
    assert_eq!(
        try_load(&magic),
        "not a hetccl rank state file (bad magic or too short)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resume_refuses_another_corpus() {
    let dir = scratch("corpus");
    let (cfg, mut run) = setup(&dir, 1, 2);
    run.checkpoint = Some(dir.join("a.ckpt"));
    single(&cfg, &run);
    let other = dir.join("other.txt");
    std::fs::write(
        &other,
        "to be or not to be, that is the question. ".repeat(200),
    )
    .unwrap();
    run.data = other.into();
    run.resume = Some(dir.join("a.ckpt"));
    let err = with_threads(1, || train(&cfg, &run, &SingleProcess))
        .unwrap()
        .unwrap_err();
    assert!(reason(err).starts_with("corpus mismatch"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn metrics_and_plot_are_written() {
    let dir = scratch("outputs");
    let (mut cfg, mut run) = setup(&dir, 4, 2);
    cfg.eval_every = 2;
    run.metrics_out = Some(dir.join("m.jsonl"));
    run.plot_out = Some(dir.join("loss.png"));
    let rep = single(&cfg, &run);
    // evaluations at steps 0, 2, 4
    assert_eq!(
        rep.evals.iter().map(|e| e.step).collect::<Vec<_>>(),
        [0, 2, 4]
    );
    let text = std::fs::read_to_string(dir.join("m.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.iter().filter(|l| l["kind"] == "train").count(), 4);
    assert_eq!(lines.iter().filter(|l| l["kind"] == "eval").count(), 3);
    assert_eq!(lines[1]["step"], 0);
    assert!(lines[1]["loss"].as_f64().unwrap() > 9.0);
    let png = std::fs::read(dir.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn metrics_continue_across_a_resume_and_restart_with_a_fresh_run() {
    let dir = scratch("metrics-resume");
    let (cfg, mut run) = setup(&dir, 4, 2);
    let metrics = dir.join("m.jsonl");
    run.metrics_out = Some(metrics.clone());
    run.plot_out = Some(dir.join("loss.png"));
    run.checkpoint = Some(dir.join("c.ckpt"));
    run.stop_after = Some(2);
    single(&cfg, &run);
    run.stop_after = None;
    run.resume = Some(dir.join("c.ckpt"));
    single(&cfg, &run);
    let count = |kind: &str| {
        std::fs::read_to_string(&metrics)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] == kind)
            .map(|v| v["step"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(count("train"), [0, 1, 2, 3]);
    // evaluations: start, end of the first part, end of the run
    assert_eq!(count("eval"), [0, 2, 4]);
    run.resume = None;
    run.stop_after = Some(1);
    single(&cfg, &run);
    assert_eq!(count("train"), [0]);
    let _ = std::fs::remove_dir_all(&dir);
}
