//! The data-parallel training loop.
//!
//! One optimizer step, on every rank:
//!
//! ```text
//! for each of grad_accum micro-batches:
//!     forward on this rank's share of the global micro-batch      (samples g = s·N + i)
//!     backward, gradients ADDED (loss = Σ over masked tokens, not a mean);
//!     on the last micro-batch the buckets are summed over ranks as backward produces them
//! all-reduce [Σ loss, #masked, #correct]
//! grads /= #masked (GLOBAL count)        → the gradient of the mean loss over the global batch
//! clip to the global norm, AdamW update (identical on every rank; the three in one pass
//! over the parameters, which also zeroes grads for the next step)
//! ```
//!
//! Because the loss is normalised by the global number of masked tokens, and sample `g`
//! is the same sequence with the same masks whoever reads it, N ranks with any split of
//! the batch make the update of one rank with the whole batch (up to float summation order).
//!
//! The counters' all-reduce also carries each rank's compute and exposed communication
//! time (its own slots, zeros elsewhere: a sum that gathers, exact), so every rank sees
//! every rank's speed at no extra exchange. With `--balance auto` every rank feeds those
//! speeds to the same [`Follower`](super::balance::Follower), which may re-split the batch
//! from the next step on; all ranks decide alike because they decide from bitwise the same
//! values. The splits (the step each took effect) go into the metrics and the checkpoint: a
//! resume continues with the split in force, and `--replay-splits` repeats a recorded
//! sequence, so a run's numbers are determined by its settings and its splits.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::balance::{self, Follower, SplitChange};
use super::checkpoint::{self, CheckpointMeta};
use super::config::{memory_limit, Balance, RunOptions, TrainConfig};
use super::data::{make_batch, Corpus, Sampler};
use super::files::{human_bytes, open_limited, shown, too_large};
use super::hf;
use super::model::{init_params, Batch, LossStats, Model};
use super::optim::{clip_factor, learning_rate, scaled_norm, AdamW};
use super::sync::{BucketSink, GradBuf, GradSync, NoSync, ThreadGroup};
use super::tokenizer::WordPiece;
use crate::error::{Error, Result};

const TARGET: &str = "hetccl::trainer";

/// One optimizer step, as logged.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepRecord {
    /// Step index (from 0).
    pub step: u64,
    /// Mean masked-LM loss over the global batch.
    pub loss: f64,
    /// Masked-token accuracy over the global batch.
    pub accuracy: f64,
    /// Learning rate used.
    pub lr: f32,
    /// Gradient norm before clipping.
    pub grad_norm: f32,
    /// This rank's forward + backward time (ms), slow-down included.
    pub ms_compute: f64,
    /// Time this rank waited for communication after its backward (ms).
    pub ms_comm: f64,
    /// Tokens per second over all ranks (global batch tokens / step time).
    pub tokens_per_s: f64,
    /// Samples per micro-batch of every rank at this step.
    pub split: Vec<usize>,
    /// Every rank's forward + backward time (ms), slow-down included.
    pub rank_ms_compute: Vec<f64>,
    /// Every rank's communication time the compute did not hide (ms), less its waiting.
    pub rank_ms_comm: Vec<f64>,
    /// Every rank's time waiting for the slowest rank's compute (ms): the slowest
    /// compute time less its own.
    pub rank_ms_wait: Vec<f64>,
}

/// One validation pass.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalRecord {
    /// Steps done before it.
    pub step: u64,
    /// Mean loss over the validation masked tokens.
    pub val_loss: f64,
    /// Masked-token accuracy.
    pub val_accuracy: f64,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainReport {
    /// Every step run (after a resume: from the resume step on).
    pub steps: Vec<StepRecord>,
    /// Every validation pass.
    pub evals: Vec<EvalRecord>,
    /// Samples per micro-step of every rank at the end.
    pub micro_batches: Vec<usize>,
    /// Every split of the run, from the first step (after a resume: the splits of the
    /// checkpoint, then this run's).
    pub splits: Vec<SplitChange>,
    /// Parameters at the end.
    pub params: Vec<f32>,
    /// Global samples per second over the run (steps only, evaluation excluded).
    pub samples_per_s: f64,
    /// The validation loss of a model that knows only word frequencies
    /// ([`Sampler::unigram_loss`]): the line a model that learns more ends below.
    pub unigram_loss: f64,
}

/// Output for people: a progress bar and log lines on rank 0, nothing elsewhere.
struct Reporter {
    on: bool,
    bar: Option<ProgressBar>,
    metrics: Option<std::io::BufWriter<std::fs::File>>,
}

impl Reporter {
    fn new(rank: usize, run: &RunOptions, start: u64, total: u64) -> Result<Reporter> {
        let on = rank == 0;
        let bar = (on && run.progress).then(|| {
            let bar = ProgressBar::new(total);
            bar.set_position(start);
            if let Ok(style) =
                ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} ETA {eta}")
            {
                bar.set_style(style);
            }
            bar
        });
        let metrics = match (&run.metrics_out, on) {
            (Some(p), true) => {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
                }
                // A fresh run starts the file over; a resumed one continues it from the
                // step it resumes at (records of later steps came from a run that did not
                // reach its next checkpoint: they are rerun now).
                if start > 0 {
                    truncate_metrics(p, start)?;
                }
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(start > 0)
                    .truncate(start == 0)
                    .open(p)
                    .map_err(|e| Error::io(format!("opening metrics {}", p.display()), e))?;
                Some(std::io::BufWriter::new(f))
            }
            _ => None,
        };
        Ok(Reporter { on, bar, metrics })
    }

    /// A line for people. A closed standard output (`hetccl-bert | head`) ends the run
    /// with an error saying so, as it ends any program whose output nobody reads.
    fn say(&self, line: &str) -> Result<()> {
        if !self.on {
            return Ok(());
        }
        match &self.bar {
            Some(b) if !b.is_hidden() => {
                b.println(line);
                Ok(())
            }
            _ => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")
                    .and_then(|_| out.flush())
                    .map_err(|e| Error::io("writing progress to standard output", e))
            }
        }
    }

    fn metric(&mut self, kind: &str, value: &impl Serialize) -> Result<()> {
        if let Some(w) = &mut self.metrics {
            let mut obj = serde_json::to_value(value)
                .map_err(|e| Error::invalid("metrics", e.to_string()))?;
            if let Some(m) = obj.as_object_mut() {
                m.insert("kind".into(), kind.into());
            }
            writeln!(w, "{obj}")
                .and_then(|_| w.flush())
                .map_err(|e| Error::io("writing metrics", e))?;
        }
        Ok(())
    }

    fn step(&self, r: &StepRecord) {
        if let Some(b) = &self.bar {
            b.set_position(r.step + 1);
            b.set_message(format!("loss {:.4} | {:.0} tok/s", r.loss, r.tokens_per_s));
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Longest metrics line read back (bytes); the trainer writes about 250.
const METRICS_MAX_LINE_BYTES: u64 = 64 << 10;
/// Largest metrics file read back (bytes): some four million steps of records.
const METRICS_MAX_BYTES: u64 = 1 << 30;

/// Calls `f` with every record of a metrics file: the line as written and its JSON.
/// Lines that are not JSON objects (one torn by a kill) are skipped.
fn for_each_metric(
    path: &Path,
    mut f: impl FnMut(&[u8], &serde_json::Value) -> Result<()>,
) -> Result<()> {
    use std::io::{BufRead, Read};
    let mut r = std::io::BufReader::new(open_limited(path, "metrics file", METRICS_MAX_BYTES)?);
    let io = |e| Error::io(format!("reading metrics file {}", shown(path).display()), e);
    let mut line = Vec::new();
    let mut total = 0u64;
    loop {
        line.clear();
        let n = (&mut r)
            .take(METRICS_MAX_LINE_BYTES + 1)
            .read_until(b'\n', &mut line)
            .map_err(io)?;
        if n == 0 {
            return Ok(());
        }
        total += n as u64;
        if total > METRICS_MAX_BYTES {
            return Err(too_large("metrics file", path, None, METRICS_MAX_BYTES));
        }
        if n as u64 > METRICS_MAX_LINE_BYTES {
            return Err(Error::invalid(
                "metrics",
                format!(
                    "metrics file {}: a line longer than {}, not one this trainer wrote",
                    shown(path).display(),
                    human_bytes(METRICS_MAX_LINE_BYTES.into())
                ),
            ));
        }
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) {
            if v.is_object() {
                f(&line, &v)?;
            }
        }
    }
}

/// (kind, step) of a metrics record.
fn record_key(v: &serde_json::Value) -> Option<(&str, u64)> {
    Some((v.get("kind")?.as_str()?, v.get("step")?.as_u64()?))
}

/// Cuts a metrics file back to what a run resumed at step `start` keeps: train records
/// of steps before it and evaluations up to it. Rewritten through a temporary file.
fn truncate_metrics(path: &Path, start: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let name = path
        .file_name()
        .map_or_else(|| "metrics".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
    let werr = |e| Error::io(format!("rewriting metrics file {}", tmp.display()), e);
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(werr)?);
    let kept = for_each_metric(path, |line, v| {
        let keep = match record_key(v) {
            Some(("train", step)) => step < start,
            Some(("eval", step)) => step <= start,
            _ => false,
        };
        if keep {
            out.write_all(line).map_err(werr)?;
            if !line.ends_with(b"\n") {
                out.write_all(b"\n").map_err(werr)?;
            }
        }
        Ok(())
    })
    .and_then(|()| out.flush().map_err(werr));
    drop(out);
    match kept.and_then(|()| {
        std::fs::rename(&tmp, path)
            .map_err(|e| Error::io(format!("replacing metrics file {}", path.display()), e))
    }) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Reads a metrics file back: for every step up to `end`, its last train and eval records.
pub fn read_metrics(path: &Path, end: u64) -> Result<(Vec<StepRecord>, Vec<EvalRecord>)> {
    use std::collections::BTreeMap;
    let mut steps = BTreeMap::new();
    let mut evals = BTreeMap::new();
    for_each_metric(path, |_, v| {
        let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
        let nums = |k: &str| -> Vec<f64> {
            v.get(k)
                .and_then(|x| x.as_array())
                .map_or_else(Vec::new, |a| a.iter().filter_map(|x| x.as_f64()).collect())
        };
        match record_key(v) {
            Some(("train", step)) if step < end => {
                steps.insert(
                    step,
                    StepRecord {
                        step,
                        loss: num("loss").unwrap_or(f64::NAN),
                        accuracy: num("accuracy").unwrap_or(0.0),
                        lr: num("lr").unwrap_or(0.0) as f32,
                        grad_norm: num("grad_norm").unwrap_or(0.0) as f32,
                        ms_compute: num("ms_compute").unwrap_or(0.0),
                        ms_comm: num("ms_comm").unwrap_or(0.0),
                        tokens_per_s: num("tokens_per_s").unwrap_or(0.0),
                        split: v.get("split").and_then(|x| x.as_array()).map_or_else(
                            Vec::new,
                            |a| {
                                a.iter()
                                    .filter_map(|x| x.as_u64().map(|b| b as usize))
                                    .collect()
                            },
                        ),
                        rank_ms_compute: nums("rank_ms_compute"),
                        rank_ms_comm: nums("rank_ms_comm"),
                        rank_ms_wait: nums("rank_ms_wait"),
                    },
                );
            }
            Some(("eval", step)) if step <= end => {
                evals.insert(
                    step,
                    EvalRecord {
                        step,
                        val_loss: num("val_loss").unwrap_or(f64::NAN),
                        val_accuracy: num("val_accuracy").unwrap_or(0.0),
                    },
                );
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok((steps.into_values().collect(), evals.into_values().collect()))
}

/// The splits a metrics file's train records ran with, as changes (one where the split
/// differs from the step before).
pub fn read_splits(path: &Path) -> Result<Vec<SplitChange>> {
    let (steps, _) = read_metrics(path, u64::MAX)?;
    let mut changes: Vec<SplitChange> = Vec::new();
    for s in steps.into_iter().filter(|s| !s.split.is_empty()) {
        if changes.last().is_none_or(|c| c.micro != s.split) {
            changes.push(SplitChange {
                step: s.step,
                micro: s.split,
            });
        }
    }
    if changes.is_empty() {
        return Err(Error::invalid(
            "replay_splits",
            format!(
                "{} has no train records with a split (a metrics file this trainer wrote is \
                 accepted)",
                shown(path).display()
            ),
        ));
    }
    Ok(changes)
}

/// Makes a slow rank slower: sleeps `(factor - 1) ×` the time just spent computing.
fn slow_down(factor: Option<f64>, spent: Duration) {
    if let Some(f) = factor {
        std::thread::sleep(spent.mul_f64(f - 1.0));
    }
}

/// Every rank's samples/s of compute at a step (0 where its compute took no measurable
/// time).
pub fn rank_speeds(rec: &StepRecord, grad_accum: usize) -> Vec<f64> {
    rec.split
        .iter()
        .zip(&rec.rank_ms_compute)
        .map(|(&b, &ms)| {
            if ms > 0.0 {
                (b * grad_accum) as f64 * 1e3 / ms
            } else {
                0.0
            }
        })
        .collect()
}

/// The state of one rank's training run.
struct Run<'a> {
    cfg: TrainConfig,
    run: &'a RunOptions,
    sync: &'a dyn GradSync,
    rank: usize,
    world: usize,
    sampler: Sampler,
    model: Model<f32>,
    params: Vec<f32>,
    grads: GradBuf,
    opt: AdamW,
    corpus_digest: String,
    /// [`TrainReport::unigram_loss`].
    unigram: f64,
    /// Splits from the first step on, the one in force last.
    splits: Vec<SplitChange>,
    /// The recorded splits this run repeats (`--replay-splits`).
    replay: Option<Vec<SplitChange>>,
    /// Re-splits as speeds drift (`--balance auto`).
    follower: Option<Follower>,
    /// This rank's first sample and count within each global micro-batch.
    offset: usize,
    micro: Vec<usize>,
}

/// Runs `f` on a rayon pool of `threads` threads, which every parallel op inside uses.
///
/// Create the communicator inside `f` if it is not `Sync`: nothing else crosses threads.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(move |i| format!("hetccl-bert-{i}"))
        .build()
        .map_err(|e| Error::invalid("with_threads", format!("thread pool: {e}")))?;
    Ok(pool.install(f))
}

/// Runs `world` ranks as threads of this process, linked by a [`ThreadGroup`], each with
/// `run.threads` compute threads; returns every rank's report, rank 0 first. Only rank 0
/// shows progress and writes files.
pub fn train_threads(
    cfg: &TrainConfig,
    run: &RunOptions,
    world: usize,
) -> Result<Vec<TrainReport>> {
    let group = ThreadGroup::new(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|g| {
                let mut opts = run.clone();
                opts.local_ranks = opts.local_ranks.max(world);
                if g.rank() != 0 {
                    opts.progress = false;
                    opts.metrics_out = None;
                    opts.plot_out = None;
                }
                s.spawn(move || {
                    let res = with_threads(opts.threads, || train(cfg, &opts, &g)).and_then(|r| r);
                    if let Err(e) = &res {
                        g.abort(&e.to_string());
                    }
                    res
                })
            })
            .collect();
        let mut reports = Vec::with_capacity(world);
        let mut first_err = None;
        for h in handles {
            match h.join() {
                Ok(Ok(r)) => reports.push(r),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(
                        hetccl::Error::Broken("a rank thread panicked".into()).into(),
                    );
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(reports),
        }
    })
}

/// Gives `sync` back the state this rank saved beside the checkpoint at `path`, when
/// there is one for this step, world size and rank; otherwise its residuals start from
/// zero, with a warning.
fn restore_rank_state(
    sync: &dyn GradSync,
    path: &std::path::Path,
    step: u64,
    rank: usize,
    world: usize,
) -> Result<()> {
    let file = checkpoint::rank_state_path(path, rank);
    if !file.exists() {
        // Only a sync that keeps state misses its file.
        if sync.save_state()?.is_some() {
            tracing::warn!(target: TARGET, rank, "no {}: error-feedback residuals start from zero", file.display());
        }
        return Ok(());
    }
    match checkpoint::load_rank_state(&file, step, world, rank)? {
        Ok(state) => sync.restore_state(&state),
        Err(why) => {
            tracing::warn!(target: TARGET, rank, "{why}: error-feedback residuals start from zero");
            Ok(())
        }
    }
}

/// Trains a BERT masked-LM with `sync` as the link to the other ranks, on the current
/// rayon pool (see [`with_threads`]; `run.threads` is only reported).
///
/// With `run.resume`, the configuration comes from the checkpoint (`cfg` is ignored apart
/// from a warning when it differs), so the continued run is the uninterrupted one.
pub fn train(cfg: &TrainConfig, run: &RunOptions, sync: &dyn GradSync) -> Result<TrainReport> {
    let (rank, world) = (sync.rank(), sync.world_size());
    let resume = match &run.resume {
        Some(p) => Some(checkpoint::load(p)?),
        None => None,
    };
    let cfg = match &resume {
        Some(ck) => {
            if ck.meta.config != *cfg && rank == 0 {
                tracing::warn!(target: TARGET, rank, "resuming: settings come from the checkpoint, not the flags");
            }
            ck.meta.config.clone()
        }
        None => cfg.clone(),
    };
    cfg.validate(world)?;
    if let Some(r) = run.slow_ranks.iter().flatten().find(|&&r| r >= world) {
        return Err(Error::Config {
            var: "slow_ranks".into(),
            value: r.to_string(),
            accepted: format!("ranks 0..={}", world - 1),
        });
    }
    if let Some(limit) = memory_limit() {
        cfg.check_memory(world, run.local_ranks, limit)?;
    }
    // Where results go is checked before any work, not at the first save.
    if let Some(path) = &run.checkpoint {
        if rank == 0 {
            checkpoint::check_writable(path)?;
        }
        if sync.save_state()?.is_some() {
            checkpoint::check_writable(&checkpoint::rank_state_path(path, rank))?;
        }
    }
    let tok = WordPiece::from_data(&run.vocab)?;
    if tok.vocab_size() != cfg.model.vocab_size {
        return Err(Error::invalid(
            "train",
            format!(
                "vocabulary {} has {} entries, model vocab_size is {}",
                run.vocab,
                tok.vocab_size(),
                cfg.model.vocab_size
            ),
        ));
    }
    let corpus = Arc::new(Corpus::from_data(&run.data, &tok)?);
    let sampler = Sampler::new(corpus.clone(), cfg.seq_len, cfg.seed, &tok)?;
    let model = Model::<f32>::new(cfg.model.clone())?;
    let layout = model.layout().clone();
    let mut opt = AdamW::new(cfg.adamw, &layout);
    let (params, start, splits) = match resume {
        Some(ck) => {
            if ck.meta.corpus_digest != corpus.digest {
                return Err(Error::Checkpoint {
                    path: run
                        .resume
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    reason: format!(
                        "corpus mismatch: checkpoint was trained on corpus {}, {} is {}",
                        ck.meta.corpus_digest, run.data, corpus.digest
                    ),
                });
            }
            if ck.meta.num_params != layout.total {
                return Err(Error::Checkpoint {
                    path: run
                        .resume
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    reason: format!(
                        "{} parameters, the model has {}",
                        ck.meta.num_params, layout.total
                    ),
                });
            }
            opt.m = ck.m;
            opt.v = ck.v;
            opt.t = ck.meta.adam_t;
            if let Some(path) = &run.resume {
                restore_rank_state(sync, path, ck.meta.step, rank, world)?;
            }
            (ck.params, ck.meta.step, ck.meta.splits)
        }
        None => match &run.init_from {
            Some(dir) => (hf::import(dir, &cfg.model)?, 0, Vec::new()),
            None => (init_params::<f32>(&layout, cfg.seed), 0, Vec::new()),
        },
    };
    let replay = match &run.replay_splits {
        Some(p) => Some(read_splits(p)?),
        None => None,
    };
    let unigram = sampler.unigram_loss(cfg.val_samples);
    let mut r = Run {
        grads: sync.alloc_grads(layout.total)?,
        micro: balance::split_equal(cfg.micro_batch_global(), world)?,
        cfg,
        run,
        sync,
        rank,
        world,
        sampler,
        model,
        params,
        opt,
        corpus_digest: corpus.digest.clone(),
        unigram,
        splits,
        replay,
        follower: None,
        offset: 0,
    };
    tracing::info!(target: TARGET, rank, world, params = layout.total, threads = run.threads,
        train_tokens = corpus.train.len(), val_tokens = corpus.val.len(), start, "training");
    r.run_steps(start)
}

impl Run<'_> {
    fn samples_for(&mut self, first: u64, count: usize) -> Batch {
        let samples: Vec<_> = (0..count as u64)
            .map(|i| self.sampler.train_sample(first + i))
            .collect();
        make_batch(&samples, self.cfg.seq_len)
    }

    /// Times a few forward/backward passes at the equal share, all-gathers samples/s and
    /// splits the global micro-batch in proportion.
    ///
    /// Every pass starts on all ranks at once, as a step at the equal split does.
    /// Unsynchronised, a fast rank ran its later passes while a slow one was still on its
    /// first, alone on the host's memory and caches, at a speed no step gives it. Ranks
    /// that share a host still compete here for the whole pass, and less at the split
    /// this chooses, so on one host the probe can be a sample off (batch 64 over a rank
    /// slowed 2×: [41, 23] to [45, 19] where [43, 21] is best); the follower's fine rule
    /// corrects that from the steps' own speeds.
    fn balance_auto(&mut self, rep: &Reporter) -> Result<()> {
        let share = self.micro[self.rank];
        let probes = self.run.balance_probe_steps.max(2);
        let mut passes = Vec::with_capacity(probes);
        for i in 0..probes {
            let batch = self.samples_for((i * share) as u64, share);
            self.sync.all_reduce_sum(&mut [0.0])?;
            let t0 = Instant::now();
            self.model.forward(&self.params, &batch)?;
            self.model
                .backward(&self.params, &mut self.grads, &mut NoSync)?;
            let spent = t0.elapsed();
            slow_down(self.run.slow_at(self.rank, self.world, 0), spent);
            // The first pass pays for allocation and cold caches.
            if i > 0 {
                passes.push(t0.elapsed().as_secs_f64().max(1e-9));
            }
        }
        self.grads.fill(0.0);
        // The median pass: one disturbed pass (another job's burst) does not set the split
        // of the whole run.
        passes.sort_by(f64::total_cmp);
        let speed = share as f64 / passes[passes.len() / 2];
        let mut speeds = vec![0.0; self.world];
        self.sync.all_gather(&[speed], &mut speeds)?;
        self.micro = balance::split_batch(self.cfg.micro_batch_global(), &speeds)?;
        rep.say(&format!(
            "balance auto: samples/s per rank {:?} -> micro-batch per rank {:?}",
            speeds
                .iter()
                .map(|s| (s * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
            self.micro
        ))
    }

    /// Makes `micro` the split from `step` on, recorded when it differs from the one in
    /// force.
    fn set_split(&mut self, step: u64, micro: Vec<usize>) {
        self.offset = micro[..self.rank].iter().sum();
        if self.splits.last().is_none_or(|c| c.micro != micro) {
            // A change at the same step (a resume at the step a change was recorded for)
            // replaces it.
            self.splits.retain(|c| c.step < step);
            self.splits.push(SplitChange {
                step,
                micro: micro.clone(),
            });
        }
        self.micro = micro;
    }

    /// The split of the first step: a replayed run's recorded one, a resumed run's split
    /// in force, or else measured (`auto`, `start`) or equal.
    fn first_split(&mut self, start: u64, rep: &Reporter) -> Result<()> {
        let global = self.cfg.micro_batch_global();
        let fits = |m: &[usize]| m.len() == self.world && m.iter().sum::<usize>() == global;
        if let Some(replay) = &self.replay {
            let micro = balance::split_at(replay, start)
                .filter(|m| fits(m))
                .ok_or_else(|| {
                    Error::invalid(
                        "replay_splits",
                        format!(
                            "no recorded split of {global} samples over {} ranks in force at \
                             step {start}; accepted: metrics of a run with this world size \
                             and batch",
                            self.world
                        ),
                    )
                })?
                .to_vec();
            self.set_split(start, micro);
            return Ok(());
        }
        let resumed = balance::split_at(&self.splits, start)
            .filter(|m| fits(m) && self.run.balance != Balance::Equal)
            .map(<[usize]>::to_vec);
        match resumed {
            Some(micro) => self.set_split(start, micro),
            None if self.run.balance != Balance::Equal && self.world > 1 => {
                self.balance_auto(rep)?;
                self.set_split(start, self.micro.clone());
            }
            None => self.set_split(start, balance::split_equal(global, self.world)?),
        }
        if self.run.balance == Balance::Auto && self.world > 1 {
            self.follower = Some(Follower::new(global, self.run.rebalance));
        }
        Ok(())
    }

    /// Takes the replayed split recorded for `step`, if one starts there.
    fn replay_split(&mut self, step: u64) -> Result<()> {
        let next = self
            .replay
            .as_ref()
            .and_then(|r| r.iter().find(|c| c.step == step && c.micro != self.micro))
            .map(|c| c.micro.clone());
        if let Some(micro) = next {
            if micro.len() != self.world
                || micro.iter().sum::<usize>() != self.cfg.micro_batch_global()
            {
                return Err(Error::invalid(
                    "replay_splits",
                    format!(
                        "the split {micro:?} recorded for step {step} is not one of {} \
                         samples over {} ranks",
                        self.cfg.micro_batch_global(),
                        self.world
                    ),
                ));
            }
            self.set_split(step, micro);
        }
        Ok(())
    }

    /// Gives the follower the step's speeds; a new split applies from the next step.
    fn follow(&mut self, rec: &StepRecord, rep: &Reporter) -> Result<()> {
        // After the last step there is nothing left to split.
        let Some(follower) = self
            .follower
            .as_mut()
            .filter(|_| rec.step + 1 < self.cfg.steps)
        else {
            return Ok(());
        };
        let speeds: Vec<f64> = rank_speeds(rec, self.cfg.grad_accum);
        let Some(next) = follower.observe(&rec.split, &speeds) else {
            return Ok(());
        };
        rep.say(&format!(
            "balance auto: step {}: samples/s per rank {:?} -> micro-batch per rank {:?} from step {}",
            rec.step + 1,
            speeds
                .iter()
                .map(|s| (s * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
            next,
            rec.step + 2,
        ))?;
        self.set_split(rec.step + 1, next);
        Ok(())
    }

    fn evaluate(&mut self, step: u64) -> Result<EvalRecord> {
        let _eval = self.sync.span("evaluation").arg("step", step);
        let n = self.cfg.val_samples.max(1);
        let chunk = self.micro.iter().copied().max().unwrap_or(1).max(1);
        let mine: Vec<u64> = (self.rank..n)
            .step_by(self.world)
            .map(|i| i as u64)
            .collect();
        let mut stats = LossStats::default();
        for ids in mine.chunks(chunk) {
            let samples: Vec<_> = ids.iter().map(|&i| self.sampler.val_sample(i)).collect();
            let batch = make_batch(&samples, self.cfg.seq_len);
            stats.add(&self.model.forward(&self.params, &batch)?);
        }
        let mut sums = [stats.loss_sum, stats.masked as f64, stats.correct as f64];
        self.sync.all_reduce_sum(&mut sums)?;
        Ok(EvalRecord {
            step,
            val_loss: sums[0] / sums[1].max(1.0),
            val_accuracy: sums[2] / sums[1].max(1.0),
        })
    }

    fn save(&self, next_step: u64) -> Result<()> {
        let Some(path) = &self.run.checkpoint else {
            return Ok(());
        };
        // Each rank's own state first (error-feedback residuals), then the checkpoint:
        // a job stopped in between resumes from the old checkpoint and finds state
        // files of a later step, which it sets aside (see `load_rank_state`).
        if let Some(state) = self.sync.save_state()? {
            checkpoint::save_rank_state(
                &checkpoint::rank_state_path(path, self.rank),
                next_step,
                self.world,
                self.rank,
                &state,
            )?;
        }
        if self.rank != 0 {
            return Ok(());
        }
        let meta = CheckpointMeta {
            step: next_step,
            samples_seen: next_step * self.cfg.batch_size as u64,
            adam_t: self.opt.t,
            world_size: self.world,
            config: self.cfg.clone(),
            corpus_digest: self.corpus_digest.clone(),
            num_params: self.params.len(),
            splits: self.splits.clone(),
        };
        checkpoint::save(path, &meta, &self.params, &self.opt.m, &self.opt.v)
    }

    fn run_steps(&mut self, start: u64) -> Result<TrainReport> {
        let end = match self.run.stop_after {
            Some(s) => s.min(self.cfg.steps),
            None => self.cfg.steps,
        };
        let mut rep = Reporter::new(self.rank, self.run, start, self.cfg.steps)?;
        let mut report = TrainReport::default();
        self.first_split(start, &rep)?;
        rep.say(&format!(
            "bert: {} layers, hidden {}, {} heads, {:.2}M parameters | {} ranks, global batch {} x {} tokens, micro-batches {:?} x {} | {} threads/rank",
            self.cfg.model.layers,
            self.cfg.model.hidden,
            self.cfg.model.heads,
            self.params.len() as f64 / 1e6,
            self.world,
            self.cfg.batch_size,
            self.cfg.seq_len,
            self.micro,
            self.cfg.grad_accum,
            self.run.threads,
        ))?;
        rep.say(&format!(
            "unigram entropy {:.4} nats: the validation loss of a model that knows only word \
             frequencies",
            self.unigram
        ))?;
        if start == 0 {
            let e = self.evaluate(0)?;
            rep.say(&format!(
                "step 0: val loss {:.4} ({:+.4} against unigram) | val acc {:.3}",
                e.val_loss,
                e.val_loss - self.unigram,
                e.val_accuracy
            ))?;
            rep.metric("eval", &e)?;
            report.evals.push(e);
        }
        let tokens_per_step = (self.cfg.batch_size * self.cfg.seq_len) as f64;
        let mut train_time = Duration::ZERO;
        for step in start..end {
            let rec = self.step(step, tokens_per_step)?;
            // The split of the next step is settled before a checkpoint of this one.
            self.replay_split(step + 1)?;
            self.follow(&rec, &rep)?;
            train_time += Duration::from_secs_f64(tokens_per_step / rec.tokens_per_s.max(1e-9));
            rep.step(&rec);
            rep.metric("train", &rec)?;
            let done = step + 1;
            let mut eval = None;
            if done == end || (self.cfg.eval_every > 0 && done % self.cfg.eval_every == 0) {
                let e = self.evaluate(done)?;
                rep.metric("eval", &e)?;
                eval = Some(e);
            }
            if done % self.run.log_every == 0 || done == end || eval.is_some() {
                let val = eval.as_ref().map_or(String::new(), |e| {
                    format!(
                        " | val loss {:.4} ({:+.4} against unigram) acc {:.3}",
                        e.val_loss,
                        e.val_loss - self.unigram,
                        e.val_accuracy
                    )
                });
                rep.say(&format!(
                    "step {done:>5}/{} | loss {:.4} acc {:.3}{val} | lr {:.2e} | norm {:.3} | {:.0} ms compute {:.0} ms comm | {:.0} tok/s",
                    self.cfg.steps, rec.loss, rec.accuracy, rec.lr, rec.grad_norm, rec.ms_compute, rec.ms_comm, rec.tokens_per_s
                ))?;
            }
            report.evals.extend(eval);
            report.steps.push(rec);
            if self.run.checkpoint_every > 0 && done % self.run.checkpoint_every == 0 && done != end
            {
                self.save(done)?;
            }
        }
        self.save(end)?;
        rep.finish();
        if let (Some(path), 0) = (&self.run.plot_out, self.rank) {
            // After a resume the metrics file holds the whole run (cut back to the
            // resumed step when it started); plot that.
            let records = match (&self.run.metrics_out, start > 0) {
                (Some(m), true) => read_metrics(m, end),
                _ => Ok((report.steps.clone(), report.evals.clone())),
            };
            let (steps, evals) = match records {
                Ok(r) => r,
                Err(e) => {
                    rep.say(&format!("no plots: {e}"))?;
                    (Vec::new(), Vec::new())
                }
            };
            if !steps.is_empty() || !evals.is_empty() {
                match super::plot::plot_losses(path, &steps, &evals, Some(self.unigram)) {
                    Ok(()) => rep.say(&format!("loss curves: {}", path.display()))?,
                    Err(e) => rep.say(&format!("no loss plot: {e}"))?,
                }
                let ranks = super::plot::ranks_path(path);
                match super::plot::plot_ranks(&ranks, &steps, self.cfg.grad_accum) {
                    Ok(()) => rep.say(&format!("ranks' speeds and shares: {}", ranks.display()))?,
                    Err(e) => rep.say(&format!("no ranks plot: {e}"))?,
                }
            }
        }
        let steps_run = end.saturating_sub(start) as f64;
        report.samples_per_s =
            steps_run * self.cfg.batch_size as f64 / train_time.as_secs_f64().max(1e-9);
        report.params = std::mem::take(&mut self.params);
        report.micro_batches = self.micro.clone();
        report.splits = std::mem::take(&mut self.splits);
        report.unigram_loss = self.unigram;
        Ok(report)
    }

    fn step(&mut self, step: u64, tokens_per_step: f64) -> Result<StepRecord> {
        let t_step = Instant::now();
        let lr = learning_rate(step, self.cfg.lr, self.cfg.warmup_steps, self.cfg.steps);
        // `grads` is zero here: allocated so, and left so by the last step's update and by
        // the balance probe.
        let mut stats = LossStats::default();
        let mut compute = Duration::ZERO;
        let mut comm = Duration::ZERO;
        let per_micro = self.cfg.micro_batch_global() as u64;
        let count = self.micro[self.rank];
        let slow = self.run.slow_at(self.rank, self.world, step);
        for a in 0..self.cfg.grad_accum {
            let first =
                step * self.cfg.batch_size as u64 + a as u64 * per_micro + self.offset as u64;
            let data = self.sync.span("data").arg("step", step);
            let batch = self.samples_for(first, count);
            drop(data);
            let t0 = Instant::now();
            let fwd = self.sync.span("forward").arg("step", step);
            stats.add(&self.model.forward(&self.params, &batch)?);
            slow_down(slow, t0.elapsed());
            drop(fwd);
            compute += t0.elapsed();
            let t1 = Instant::now();
            if a + 1 < self.cfg.grad_accum {
                let _bwd = self.sync.span("backward").arg("step", step);
                self.model
                    .backward(&self.params, &mut self.grads, &mut NoSync)?;
                slow_down(slow, t1.elapsed());
                compute += t1.elapsed();
            } else {
                let mut backward_done = None;
                let (model, params) = (&mut self.model, &self.params);
                let sync = self.sync;
                self.sync.reduce_while(&mut self.grads, &mut |g, sink| {
                    // One span per bucket: the backward that produced it, ended where its
                    // all-reduce starts (the collective's own span, on the thread that runs
                    // it, shows how the two overlap).
                    let mut traced = BucketSpans {
                        inner: sink,
                        sync,
                        step,
                        bucket: 0,
                        open: Some(sync.span("backward").arg("step", step).arg("bucket", 0)),
                    };
                    let r = model.backward(params, g, &mut traced);
                    drop(traced);
                    slow_down(slow, t1.elapsed());
                    backward_done = Some(Instant::now());
                    r
                })?;
                let done = backward_done.unwrap_or_else(Instant::now);
                compute += done - t1;
                comm += done.elapsed();
            }
        }
        let t_c = Instant::now();
        // [Σ loss, #masked, #correct, then per rank: compute ms, exposed comm ms].
        let mut sums = vec![0.0; 3 + 2 * self.world];
        sums[..3].copy_from_slice(&[stats.loss_sum, stats.masked as f64, stats.correct as f64]);
        sums[3 + 2 * self.rank] = compute.as_secs_f64() * 1e3;
        sums[4 + 2 * self.rank] = comm.as_secs_f64() * 1e3;
        self.sync.all_reduce_sum(&mut sums)?;
        comm += t_c.elapsed();
        let rank_ms_compute: Vec<f64> = sums[3..].iter().step_by(2).copied().collect();
        let slowest = rank_ms_compute.iter().copied().fold(0.0, f64::max);
        let rank_ms_wait: Vec<f64> = rank_ms_compute.iter().map(|c| slowest - c).collect();
        let rank_ms_comm: Vec<f64> = sums[4..]
            .iter()
            .step_by(2)
            .zip(&rank_ms_wait)
            .map(|(c, w)| (c - w).max(0.0))
            .collect();
        let masked = sums[1];
        if masked < 1.0 {
            return Err(Error::invalid(
                "train",
                format!("step {step}: no masked tokens"),
            ));
        }
        // The gradient of the mean loss is the sum times 1/#masked; the norm, the clip
        // and the update apply that factor as they read each element (see
        // `AdamW::update_fused`), and the update leaves the buffer zero for the next step.
        let inv = (1.0 / masked) as f32;
        let opt = self.sync.span("optimizer").arg("step", step);
        let grad_norm = scaled_norm(&self.grads, inv);
        let clip = clip_factor(grad_norm, self.cfg.grad_clip);
        self.opt
            .update_fused(&mut self.params, &mut self.grads, inv, clip, lr);
        drop(opt);
        let secs = t_step.elapsed().as_secs_f64();
        let loss = sums[0] / masked;
        if !loss.is_finite() {
            return Err(Error::invalid(
                "train",
                format!("step {step}: loss is {loss}"),
            ));
        }
        Ok(StepRecord {
            step,
            loss,
            accuracy: sums[2] / masked,
            lr,
            grad_norm,
            ms_compute: compute.as_secs_f64() * 1e3,
            ms_comm: comm.as_secs_f64() * 1e3,
            tokens_per_s: tokens_per_step / secs.max(1e-9),
            split: self.micro.clone(),
            rank_ms_compute,
            rank_ms_comm,
            rank_ms_wait,
        })
    }
}

/// Hands buckets on to `inner`, with a trace span per bucket of backward: each ends
/// where its bucket is handed over, and the next begins.
struct BucketSpans<'s, 'i, 'g> {
    inner: &'i mut dyn BucketSink<'g, f32>,
    sync: &'s dyn GradSync,
    step: u64,
    bucket: u64,
    open: Option<hetccl::observe::Span<'s>>,
}

impl<'g> BucketSink<'g, f32> for BucketSpans<'_, '_, 'g> {
    fn bucket_ready(&mut self, grads: &'g mut [f32]) -> Result<()> {
        self.open = None;
        self.inner.bucket_ready(grads)?;
        self.bucket += 1;
        let span = self.sync.span("backward").arg("step", self.step);
        self.open = Some(span.arg("bucket", self.bucket));
        Ok(())
    }
}
