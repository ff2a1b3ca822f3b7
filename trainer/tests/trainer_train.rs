//! End-to-end behaviour of the trainer on a small model and a slice of the corpus:
//! learning, bit-exact resume, refused checkpoints, data-parallel equivalence.

use std::path::{Path, PathBuf};

use hetccl_testkit::Scratch;
use hetccl_trainer::balance;
use hetccl_trainer::checkpoint::{self, CheckpointMeta};
use hetccl_trainer::data::{make_batch, Corpus, Sampler};
use hetccl_trainer::model::{init_params, Model, ModelConfig};
use hetccl_trainer::optim::{AdamW, AdamWConfig};
use hetccl_trainer::sync::NoSync;
use hetccl_trainer::Error;
use hetccl_trainer::{
    train, train_threads, with_threads, Balance, RunOptions, Settings, SingleProcess, TrainConfig,
    WordPiece,
};

/// The repository, where `configs/` and `data/` are (this package is `trainer/` in it).
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("trainer/ sits in the repository")
}

fn scratch(name: &str) -> Scratch {
    Scratch::new(&format!("trainer-{name}"))
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

fn single(cfg: &TrainConfig, run: &RunOptions) -> hetccl_trainer::TrainReport {
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
        |r: &[hetccl_trainer::StepRecord]| r.iter().map(|s| s.loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(losses(&first.steps), losses(&full.steps[..3]));
    assert_eq!(losses(&rest.steps), losses(&full.steps[3..]));
    assert_eq!(rest.steps[0].step, 3);
    let bits = |p: &[f32]| p.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&rest.params), bits(&full.params));
    let a = checkpoint::load(&dir.join("full.ckpt")).unwrap();
    let b = checkpoint::load(&dir.join("resumed.ckpt")).unwrap();
    assert_eq!(a, b);
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
    // two micro-batches of 4 on one rank (which has no rank 1 to slow)
    cfg.grad_accum = 2;
    run.slow_ranks = None;
    run.slowdown = 1.0;
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
}

#[test]
fn the_split_follows_a_rank_slowed_mid_run_and_replays_bit_for_bit() {
    let dir = scratch("follow");
    let (mut cfg, mut run) = setup(&dir, 16, 16);
    // Longer sequences than the other tests: steps of tens of milliseconds, so that the
    // scheduler's time slices on a shared machine blur the speeds less.
    cfg.seq_len = 64;
    cfg.model.max_position = 64;
    run.balance = Balance::Auto;
    run.slowdown = 3.0;
    run.slow_ranks = Some(vec![1]);
    run.slowdown_from = 4;
    run.metrics_out = Some(dir.join("full.jsonl"));
    run.checkpoint = Some(dir.join("full.ckpt"));
    let full = train_threads(&cfg, &run, 2).unwrap();
    let splits = &full[0].splits;
    println!("splits: {splits:?}");
    // Rank 1 at a third of rank 0's speed from step 4: 12 + 4 is the proportional split.
    // Steps of a few milliseconds on a shared machine time noisily, so over the last
    // eight steps rank 1's median share must be 2 to 6 (10 + 6 to 14 + 2); the equal
    // 8 + 8 and its neighbour are not accepted.
    let mut late: Vec<usize> = full[0].steps[8..].iter().map(|s| s.split[1]).collect();
    late.sort_unstable();
    assert!((2..=6).contains(&late[4]), "{splits:?}");
    assert!(
        splits.iter().any(|c| c.step > 4 && c.micro[1] <= 6),
        "{splits:?}"
    );
    assert!(splits.iter().all(|c| c.step < 16), "{splits:?}");
    for s in &full[0].steps {
        assert_eq!(s.split.iter().sum::<usize>(), 16);
        assert_eq!(Some(&s.split[..]), balance::split_at(splits, s.step));
    }
    assert_eq!(
        &checkpoint::load(&dir.join("full.ckpt"))
            .unwrap()
            .meta
            .splits,
        splits
    );
    assert_eq!(full[0].splits, full[1].splits);

    // The recorded splits again, stopped at step 9 and resumed: the same numbers.
    run.balance = Balance::Equal;
    run.slowdown = 1.0;
    run.replay_splits = Some(dir.join("full.jsonl"));
    run.metrics_out = Some(dir.join("replay.jsonl"));
    run.checkpoint = Some(dir.join("part.ckpt"));
    run.stop_after = Some(9);
    let first = train_threads(&cfg, &run, 2).unwrap();
    let meta = checkpoint::load(&dir.join("part.ckpt")).unwrap().meta;
    let until: Vec<_> = splits.iter().filter(|c| c.step <= 9).cloned().collect();
    assert_eq!(meta.splits, until);
    run.stop_after = None;
    run.resume = Some(dir.join("part.ckpt"));
    run.checkpoint = Some(dir.join("rest.ckpt"));
    let rest = train_threads(&cfg, &run, 2).unwrap();
    let losses =
        |r: &[hetccl_trainer::StepRecord]| r.iter().map(|s| s.loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(losses(&first[0].steps), losses(&full[0].steps[..9]));
    assert_eq!(losses(&rest[0].steps), losses(&full[0].steps[9..]));
    let bits = |p: &[f32]| p.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&rest[0].params), bits(&full[0].params));
    assert_eq!(&rest[0].splits, splits);

    // A resume without the replay starts from the split in force at its step.
    run.replay_splits = None;
    run.balance = Balance::Auto;
    run.checkpoint = None;
    let live = train_threads(&cfg, &run, 2).unwrap();
    assert_eq!(
        Some(&live[0].steps[0].split[..]),
        balance::split_at(splits, 9)
    );
}

#[test]
fn replaying_splits_refuses_a_file_without_them() {
    let dir = scratch("noreplay");
    let (cfg, mut run) = setup(&dir, 2, 4);
    std::fs::write(dir.join("m.jsonl"), "{\"kind\":\"eval\",\"step\":0}\n").unwrap();
    run.replay_splits = Some(dir.join("m.jsonl"));
    let e = train_threads(&cfg, &run, 2).unwrap_err().to_string();
    assert!(
        e.contains("m.jsonl has no train records with a split"),
        "{e}"
    );
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
        splits: Vec::new(),
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
}

#[test]
fn metrics_carry_every_ranks_times_and_a_second_plot_shows_them() {
    let dir = scratch("ranks");
    let (cfg, mut run) = setup(&dir, 6, 8);
    run.slowdown = 3.0;
    run.slow_ranks = Some(vec![1]);
    run.metrics_out = Some(dir.join("m.jsonl"));
    run.plot_out = Some(dir.join("loss.png"));
    let reps = train_threads(&cfg, &run, 2).unwrap();
    let text = std::fs::read_to_string(dir.join("m.jsonl")).unwrap();
    let train: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["kind"] == "train")
        .collect();
    assert_eq!(train.len(), 6);
    let nums = |v: &serde_json::Value, k: &str| -> Vec<f64> {
        v[k].as_array()
            .unwrap_or_else(|| panic!("no {k} in {v}"))
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let mut ratios = Vec::new();
    for (line, rec) in train.iter().zip(&reps[0].steps) {
        assert_eq!(line["split"], serde_json::json!([4, 4]));
        let (compute, comm, wait) = (
            nums(line, "rank_ms_compute"),
            nums(line, "rank_ms_comm"),
            nums(line, "rank_ms_wait"),
        );
        assert_eq!(compute.len(), 2);
        assert!(compute.iter().all(|&c| c > 0.0 && c < 60_000.0), "{line}");
        assert!(comm.iter().all(|&c| (0.0..60_000.0).contains(&c)), "{line}");
        // Waiting is the slowest compute less one's own: zero for the slowest rank.
        let slowest = compute.iter().copied().fold(0.0, f64::max);
        // (JSON's decimals are read back to within a few ulps.)
        for r in 0..2 {
            assert!((wait[r] - (slowest - compute[r])).abs() < 1e-9, "{line}");
        }
        assert!(wait.contains(&0.0), "{line}");
        // Rank 0's own figure is its slot of the gathered ones, bit for bit.
        assert_eq!(rec.ms_compute, rec.rank_ms_compute[0]);
        assert_eq!(
            rec.rank_ms_wait[rec.rank_ms_wait.len() - 1].min(rec.rank_ms_wait[0]),
            0.0
        );
        ratios.push(compute[1] / compute[0]);
    }
    // Rank 1 sleeps twice its compute: about three times rank 0's in the median step on a
    // quiet machine. Steps here take milliseconds, so a rank preempted by the other tests
    // of this file moves single ratios a lot (1.3-2.1 seen under load); swapped or copied
    // slots would give 1/3 or exactly 1.
    ratios.sort_by(f64::total_cmp);
    assert!(ratios[3] > 1.2, "rank 1 / rank 0 compute: {ratios:?}");
    // Word frequencies of this slice of tinyshakespeare: 6.45 nats (ln 30522 = 10.33 for
    // a model that knows nothing).
    assert!(
        (reps[0].unigram_loss - 6.448).abs() < 0.01,
        "{}",
        reps[0].unigram_loss
    );
    let png = std::fs::read(dir.join("loss-ranks.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_ne!(png, std::fs::read(dir.join("loss.png")).unwrap());
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
}

/// (kind, step) of every record in a metrics file.
fn records(path: &Path) -> Vec<(String, u64)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| {
            (
                v["kind"].as_str().unwrap().to_string(),
                v["step"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn resume_cuts_metrics_back_to_the_resumed_step() {
    let dir = scratch("metrics-cut");
    let (cfg, mut run) = setup(&dir, 5, 2);
    let metrics = dir.join("m.jsonl");
    run.metrics_out = Some(metrics.clone());
    run.plot_out = Some(dir.join("loss.png"));
    run.checkpoint = Some(dir.join("c.ckpt"));
    // A checkpoint at step 2, then a run that went on to step 4 and died before its next
    // checkpoint (its records of steps 2 and 3 are in the file).
    run.stop_after = Some(2);
    single(&cfg, &run);
    std::fs::copy(dir.join("c.ckpt"), dir.join("at2.ckpt")).unwrap();
    run.resume = Some(dir.join("c.ckpt"));
    run.stop_after = Some(4);
    single(&cfg, &run);
    // A torn last line, as a kill mid-write leaves.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"step\": 4, \"kin").unwrap();
    drop(f);
    run.resume = Some(dir.join("at2.ckpt"));
    run.stop_after = None;
    single(&cfg, &run);
    let rec = |k: &str, s: u64| (k.to_string(), s);
    assert_eq!(
        records(&metrics),
        [
            rec("eval", 0),
            rec("train", 0),
            rec("train", 1),
            rec("eval", 2),
            rec("train", 2),
            rec("train", 3),
            rec("train", 4),
            rec("eval", 5),
        ]
    );
    // The loss plot is drawn from the same records.
    let (steps, evals) = hetccl_trainer::train::read_metrics(&metrics, 5).unwrap();
    assert_eq!(
        steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    assert_eq!(evals.iter().map(|e| e.step).collect::<Vec<_>>(), [0, 2, 5]);
}

/// A process that has exited and been waited for: its pid names nobody (until reused).
fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[test]
fn temporaries_of_dead_writers_are_removed_and_live_ones_kept() {
    let dir = scratch("stale");
    let target = dir.join("c.ckpt");
    let tmp = |pid: u32| checkpoint::temp_path(&target, pid);
    assert_eq!(tmp(12), dir.join(".c.ckpt.tmp.12"));
    let touch = |p: &Path| std::fs::write(p, b"half a checkpoint").unwrap();
    // A writer that died; one that exited but was not reaped (a zombie); one alive.
    let dead = dead_pid();
    let mut zombie = std::process::Command::new("true").spawn().unwrap();
    let mut live = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let zombie_state = format!("/proc/{}/stat", zombie.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_to_string(&zombie_state).is_ok_and(|s| s.contains(") Z ")) {
        assert!(std::time::Instant::now() < deadline, "no zombie after 20 s");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    for pid in [dead, zombie.id(), live.id()] {
        touch(&tmp(pid));
    }
    // This process's pid on a file older than the process: a previous owner of the pid.
    let reused = tmp(std::process::id());
    touch(&reused);
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&reused)
        .unwrap()
        .set_modified(hour_ago)
        .unwrap();
    // Not temporaries of this target: left alone whatever their pid.
    let others = [
        dir.join(format!(".other.ckpt.tmp.{dead}")),
        dir.join(format!(".c.ckpt.tmp.{dead}x")),
        dir.join("c.ckpt.tmp.1"),
    ];
    for p in &others {
        touch(p);
    }
    let mut removed = checkpoint::remove_stale_temps(&target);
    removed.sort();
    let mut want = vec![tmp(dead), tmp(zombie.id()), reused];
    want.sort();
    assert_eq!(removed, want);
    assert!(tmp(live.id()).exists());
    assert!(others.iter().all(|p| p.exists()));
    // Saving cleans up too, and keeps the live writer's file.
    touch(&tmp(dead));
    checkpoint::save(&target, &tiny_meta(), &[1.0; 3], &[0.0; 3], &[0.0; 3]).unwrap();
    assert!(!tmp(dead).exists());
    assert!(tmp(live.id()).exists());
    let _ = live.kill();
    let _ = live.wait();
    let _ = zombie.wait();
}

#[test]
fn a_run_starts_by_removing_temporaries_its_dead_predecessor_left() {
    let dir = scratch("stale-run");
    let (cfg, mut run) = setup(&dir, 1, 2);
    let target = dir.join("c.ckpt");
    run.checkpoint = Some(target.clone());
    run.stop_after = Some(0);
    let stale = checkpoint::temp_path(&target, dead_pid());
    std::fs::write(&stale, b"torn").unwrap();
    single(&cfg, &run);
    assert!(!stale.exists());
}

#[test]
fn a_damaged_newest_checkpoint_never_replaces_the_previous_good_one() {
    let dir = scratch("prev");
    let path = dir.join("c.ckpt");
    let prev = checkpoint::previous_path(&path);
    assert_eq!(prev, dir.join("c.ckpt.prev"));
    let meta = |step| CheckpointMeta {
        step,
        ..tiny_meta()
    };
    let save = |step, x: f32| checkpoint::save(&path, &meta(step), &[x; 3], &[x; 3], &[x; 3]);
    save(2, 2.0).unwrap();
    assert!(!prev.exists());
    save(4, 4.0).unwrap();
    assert_eq!(checkpoint::load(&prev).unwrap().meta.step, 2);
    assert_eq!(checkpoint::load(&path).unwrap().meta.step, 4);
    // The newest is damaged on disk: loading says so and names the good one before it.
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let err = checkpoint::load(&path).unwrap_err();
    assert_eq!(
        reason(err),
        format!(
            "checksum mismatch: the file is corrupt (the checkpoint before it is {}, untouched)",
            prev.display()
        )
    );
    // Saving over the damaged one does not make it the previous one.
    save(6, 6.0).unwrap();
    assert_eq!(checkpoint::load(&path).unwrap().meta.step, 6);
    assert_eq!(checkpoint::load(&prev).unwrap().meta.step, 2);
    save(8, 8.0).unwrap();
    assert_eq!(checkpoint::load(&prev).unwrap().meta.step, 6);
    // Only the two checkpoints: no temporaries, no links left over.
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["c.ckpt", "c.ckpt.prev"]);
}

#[test]
fn resuming_a_damaged_checkpoint_fails_and_touches_nothing() {
    let dir = scratch("resume-damaged");
    let (cfg, mut run) = setup(&dir, 4, 2);
    let path = dir.join("c.ckpt");
    run.checkpoint = Some(path.clone());
    run.stop_after = Some(1);
    single(&cfg, &run);
    run.resume = Some(path.clone());
    run.stop_after = Some(2);
    single(&cfg, &run);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let before_prev = std::fs::read(checkpoint::previous_path(&path)).unwrap();
    run.stop_after = None;
    let err = with_threads(1, || train(&cfg, &run, &SingleProcess))
        .unwrap()
        .unwrap_err();
    assert!(reason(err).starts_with("checksum mismatch"));
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(
        std::fs::read(checkpoint::previous_path(&path)).unwrap(),
        before_prev
    );
    assert_eq!(
        checkpoint::load(&checkpoint::previous_path(&path))
            .unwrap()
            .meta
            .step,
        1
    );
}

#[test]
fn checkpoint_reads_are_bounded_before_allocating() {
    let dir = scratch("ckpt-bounds");
    let path = dir.join("c.ckpt");
    checkpoint::save(&path, &tiny_meta(), &[1.0; 3], &[2.0; 3], &[3.0; 3]).unwrap();
    let good = std::fs::read(&path).unwrap();
    let bad = dir.join("bad.ckpt");
    let try_load = |bytes: &[u8]| {
        std::fs::write(&bad, bytes).unwrap();
        reason(checkpoint::load(&bad).unwrap_err())
    };
    assert_eq!(
        reason(checkpoint::load(Path::new("/dev/zero")).unwrap_err()),
        "bad magic: not a hetccl-bert checkpoint"
    );
    // A payload length of 2^60 bytes: refused from the header.
    let mut huge = good.clone();
    huge[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert_eq!(
        try_load(&huge),
        "header says 1152921504606846976 bytes of tensors, more than the 64 GiB limit \
         (corrupt header?)"
    );
    let mut meta = good.clone();
    meta[16..24].copy_from_slice(&(u64::MAX).to_le_bytes());
    assert_eq!(
        try_load(&meta),
        "header says 18446744073709551615 bytes of metadata, more than the 1 MiB limit \
         (corrupt header?)"
    );
    // Below the limit but more than the file holds: refused by the file's size.
    let mut big = good.clone();
    big[24..32].copy_from_slice(&(12u64 << 30).to_le_bytes());
    let meta_len = u64::from_le_bytes(good[16..24].try_into().unwrap());
    assert_eq!(
        try_load(&big),
        format!(
            "truncated: header promises {} bytes, file has {}",
            64 + meta_len + (12 << 30),
            good.len()
        )
    );
    // The same through a pipe, where the size is unknown until it ends.
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let writer = {
        let (fifo, big) = (fifo.clone(), big.clone());
        std::thread::spawn(move || std::fs::write(fifo, big))
    };
    let err = reason(checkpoint::load(&fifo).unwrap_err());
    writer.join().unwrap().unwrap();
    assert_eq!(
        err,
        format!(
            "truncated: header promises {} bytes, file has {}",
            64 + meta_len + (12 << 30),
            good.len()
        )
    );
    // Rank state files: the same limits.
    let rs = dir.join("c.ckpt.rank0");
    checkpoint::save_rank_state(&rs, 1, 1, 0, &[7; 10]).unwrap();
    let mut claim = std::fs::read(&rs).unwrap();
    claim[40..48].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(&rs, &claim).unwrap();
    assert_eq!(
        reason(checkpoint::load_rank_state(&rs, 1, 1, 0).unwrap_err()),
        "header says 1152921504606846976 bytes of payload, more than the 21.3 GiB limit \
         (corrupt header?)"
    );
    assert_eq!(
        reason(checkpoint::load_rank_state(Path::new("/dev/zero"), 1, 1, 0).unwrap_err()),
        "not a hetccl rank state file (bad magic or too short)"
    );
}

#[test]
fn a_flipped_bit_in_the_reserved_header_field_is_refused() {
    let dir = scratch("reserved");
    let path = dir.join("c.ckpt");
    checkpoint::save(&path, &tiny_meta(), &[1.0; 3], &[2.0; 3], &[3.0; 3]).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[13] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(
        reason(checkpoint::load(&path).unwrap_err()),
        "reserved header field is 0x400, not 0 (corrupt header?)"
    );
    let rs = dir.join("c.ckpt.rank0");
    checkpoint::save_rank_state(&rs, 1, 1, 0, &[7; 10]).unwrap();
    let mut bytes = std::fs::read(&rs).unwrap();
    bytes[15] ^= 0x80;
    std::fs::write(&rs, &bytes).unwrap();
    assert_eq!(
        reason(checkpoint::load_rank_state(&rs, 1, 1, 0).unwrap_err()),
        "reserved header field is 0x80000000, not 0 (corrupt header?)"
    );
}
