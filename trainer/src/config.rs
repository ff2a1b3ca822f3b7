//! Training settings: built-in defaults, overridden by a TOML file, overridden by flags.
//!
//! [`Settings`] is both the TOML schema (flat keys, snake_case) and the flag set
//! (`--kebab-case`); every field is optional so the three layers merge field by field.
//! [`Settings::resolve`] turns the merged result into a [`TrainConfig`] (everything that
//! decides the numbers, saved in checkpoints) and [`RunOptions`] (where files go, how the
//! run is shown and balanced; free to change between a run and its resume).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use hetccl::compression::WireFormat;
use hetccl::config::CompressMode;

use super::balance::Rebalance;
use super::files::{human_bytes, read_limited, shown, DataFile};
use super::model::ModelConfig;
use super::optim::AdamWConfig;
use crate::error::{Error, Result};

/// Everything that determines the sequence of losses and parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Model shape.
    pub model: ModelConfig,
    /// Tokens per sequence, `[CLS]` and `[SEP]` included.
    pub seq_len: usize,
    /// Global batch: samples per optimizer step, summed over ranks and micro-batches.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (each rank runs this many forward/backward passes).
    pub grad_accum: usize,
    /// Optimizer steps of the whole run (the schedule decays to 0 there).
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f32,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// AdamW constants.
    pub adamw: AdamWConfig,
    /// Global gradient-norm clip (0: off).
    pub grad_clip: f32,
    /// Seed of the init, the data order and the masks.
    pub seed: u64,
    /// Validation every this many steps (0: only at start and end).
    pub eval_every: u64,
    /// Validation samples per evaluation.
    pub val_samples: usize,
}

impl TrainConfig {
    /// Checks values the trainer cannot run with, naming the setting and the accepted
    /// range. Whether the model fits in memory is [`TrainConfig::check_memory`].
    pub fn validate(&self, world_size: usize) -> Result<()> {
        self.model.validate()?;
        let bad = |var: &str, value: String, accepted: &str| {
            Err(Error::Config {
                var: var.into(),
                value,
                accepted: accepted.into(),
            })
        };
        let m = &self.model;
        if !(MIN_VOCAB..=MAX_VOCAB).contains(&m.vocab_size) {
            return bad(
                "vocab_size",
                m.vocab_size.to_string(),
                &format!(
                    "{MIN_VOCAB}..={MAX_VOCAB} (the special tokens take ids up to 103; ids \
                     are 32-bit)"
                ),
            );
        }
        if self.seq_len < 3 || self.seq_len > m.max_position {
            return bad(
                "seq_len",
                self.seq_len.to_string(),
                &format!("3..={} (max_position)", m.max_position),
            );
        }
        if self.batch_size == 0 {
            return bad("batch_size", "0".into(), "at least 1");
        }
        if self.grad_accum == 0 || self.batch_size % self.grad_accum != 0 {
            return bad(
                "grad_accum",
                self.grad_accum.to_string(),
                &format!("a divisor of batch_size {}", self.batch_size),
            );
        }
        if self.batch_size / self.grad_accum < world_size {
            return bad(
                "batch_size",
                self.batch_size.to_string(),
                &format!(
                    "at least grad_accum × world size = {}",
                    self.grad_accum.saturating_mul(world_size)
                ),
            );
        }
        if self.steps == 0 {
            return bad("steps", "0".into(), "at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", self.lr.to_string(), "a positive finite number");
        }
        let w = &self.adamw;
        if !(w.weight_decay.is_finite() && (0.0..=1.0).contains(&w.weight_decay)) {
            return bad(
                "weight_decay",
                w.weight_decay.to_string(),
                "0 to 1 (0: no decay)",
            );
        }
        for (var, beta) in [("beta1", w.beta1), ("beta2", w.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(var, beta.to_string(), "0 ≤ beta < 1");
            }
        }
        if !(w.eps.is_finite() && w.eps > 0.0) {
            return bad("eps", w.eps.to_string(), "a positive finite number");
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            return bad(
                "grad_clip",
                self.grad_clip.to_string(),
                "0 (no clipping) or a positive finite norm",
            );
        }
        if !(1..=MAX_VAL_SAMPLES).contains(&self.val_samples) {
            return bad(
                "val_samples",
                self.val_samples.to_string(),
                &format!("1..={MAX_VAL_SAMPLES}"),
            );
        }
        Ok(())
    }

    /// Samples every rank together processes per micro-step.
    pub fn micro_batch_global(&self) -> usize {
        self.batch_size / self.grad_accum
    }

    /// The memory one rank of a `world_size`-rank run needs at least (a valid config):
    /// parameters, gradients and AdamW's two moments (4 bytes each per parameter), and the
    /// activations of its share of a micro-batch with their gradients (see `model`'s
    /// `Acts` and `GradActs`). Computed in `u128` with saturation, so absurd shapes give
    /// absurd numbers, not overflows.
    pub fn memory_estimate(&self, world_size: usize) -> MemoryEstimate {
        let m = &self.model;
        let [v, p, tt, c, f, l, nh] = [
            m.vocab_size,
            m.max_position,
            m.type_vocab_size,
            m.hidden,
            m.ffn,
            m.layers,
            m.heads,
        ]
        .map(|x| x as u128);
        let mul = |xs: &[u128]| xs.iter().fold(1u128, |a, &x| a.saturating_mul(x));
        let sum = |xs: &[u128]| xs.iter().fold(0u128, |a, &x| a.saturating_add(x));
        // Layout of `model`: embeddings, L layers, head (the decoder weight is tied).
        let embeddings = sum(&[mul(&[v, c]), mul(&[p, c]), mul(&[tt, c]), mul(&[2, c])]);
        let layer = sum(&[mul(&[4, c, c]), mul(&[2, f, c]), f, mul(&[9, c])]);
        let head = sum(&[mul(&[c, c]), mul(&[3, c]), v]);
        let params = sum(&[embeddings, mul(&[l, layer]), head]);
        // This rank's share of a micro-batch (B,T) and its masked positions M (15%).
        let b = (self.micro_batch_global().div_ceil(world_size.max(1))).max(1) as u128;
        let t = self.seq_len as u128;
        let bt = mul(&[b, t]);
        let masked = (mul(&[bt.saturating_sub(2 * b), 15]).div_ceil(100)).max(b);
        let att = mul(&[b, nh, t, t]);
        let acts = sum(&[
            mul(&[2, bt, c]),
            mul(&[2, bt]),
            mul(&[
                l,
                sum(&[mul(&[10, bt, c]), mul(&[2, bt, f]), att, mul(&[4, bt])]),
            ]),
            mul(&[masked, sum(&[mul(&[4, c]), mul(&[2, v]), 3])]),
        ]);
        let grad_acts = sum(&[
            mul(&[10, bt, c]),
            mul(&[2, bt, f]),
            mul(&[2, att]),
            mul(&[masked, sum(&[mul(&[4, c]), 1])]),
        ]);
        MemoryEstimate {
            params,
            state_bytes: mul(&[params, 16]),
            activation_bytes: mul(&[sum(&[acts, grad_acts]), 4]),
            sequences: b,
            seq_len: t,
        }
    }

    /// Refuses a model whose [`TrainConfig::memory_estimate`], times the `local_ranks`
    /// ranks that share this machine, exceeds `limit` bytes (see [`memory_limit`]),
    /// saying how much it would need and which settings drive it.
    pub fn check_memory(&self, world_size: usize, local_ranks: usize, limit: u64) -> Result<()> {
        let est = self.memory_estimate(world_size);
        let need = est.total().saturating_mul(local_ranks.max(1) as u128);
        if need <= limit as u128 {
            return Ok(());
        }
        let m = &self.model;
        let ranks = match local_ranks {
            0 | 1 => String::new(),
            n => format!(" for its {n} ranks ({} each)", human_bytes(est.total())),
        };
        Err(Error::invalid(
            "train",
            format!(
                "the model needs at least {} of memory{ranks}: {} parameters × 16 bytes \
                 (weights, gradients, AdamW moments) = {}, plus {} of activations for {} \
                 sequences × {} tokens per rank; this machine has {}. Lower hidden ({}), \
                 ffn ({}), layers ({}), vocab_size ({}), max_position ({}), batch_size ({}) \
                 or seq_len ({})",
                human_bytes(need),
                est.params,
                human_bytes(est.state_bytes),
                human_bytes(est.activation_bytes),
                est.sequences,
                est.seq_len,
                human_bytes(limit.into()),
                m.hidden,
                m.ffn,
                m.layers,
                m.vocab_size,
                m.max_position,
                self.batch_size,
                self.seq_len,
            ),
        ))
    }
}

/// Smallest vocabulary: BERT's special tokens sit at ids 0 to 103.
pub const MIN_VOCAB: usize = 104;
/// Largest vocabulary: token ids are `u32`.
pub const MAX_VOCAB: usize = u32::MAX as usize;
/// Most validation samples per evaluation (their indices are listed up front).
pub const MAX_VAL_SAMPLES: usize = 1 << 24;
/// Most compute threads per rank.
pub const MAX_THREADS: usize = 4096;
/// Largest `slowdown` factor (a slow rank sleeps `factor - 1` times its compute time).
pub const MAX_SLOWDOWN: f64 = 1000.0;

/// Largest `rebalance_threshold`: a split predicted 10× slower than the best.
pub const MAX_REBALANCE_THRESHOLD: f64 = 9.0;

/// What [`TrainConfig::memory_estimate`] counts, for one rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Parameter count.
    pub params: u128,
    /// Parameters, gradients and AdamW moments: 16 bytes per parameter.
    pub state_bytes: u128,
    /// Activations and their gradients for one micro-batch share.
    pub activation_bytes: u128,
    /// Sequences in that share.
    pub sequences: u128,
    /// Tokens per sequence.
    pub seq_len: u128,
}

impl MemoryEstimate {
    /// Bytes in all.
    pub fn total(&self) -> u128 {
        self.state_bytes.saturating_add(self.activation_bytes)
    }
}

/// The memory this process may use: physical memory, or the container's (cgroup) limit
/// when lower. `None` when neither can be read.
pub fn memory_limit() -> Option<u64> {
    // SAFETY: sysconf has no preconditions; it returns -1 for unknown names.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let phys = (pages > 0 && page > 0).then(|| (pages as u64).saturating_mul(page as u64));
    // cgroup v2, then v1, as mounted for this process's own group (a container's view).
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|p| {
        let text = read_limited(Path::new(p), "cgroup limit", 64).ok()?;
        String::from_utf8(text).ok()?.trim().parse::<u64>().ok()
    });
    match (phys, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// How the global micro-batch is split over ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// Equal shares.
    Equal,
    /// Shares proportional to throughput measured in a short warm-up, then re-split
    /// whenever the steps' own compute times show the shares off (see
    /// [`crate::balance::Follower`]).
    Auto,
    /// Measured in the warm-up only, kept for the whole run.
    Start,
}

/// Settings that do not change the numbers: files, display, balance, speed.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOptions {
    /// Text corpus.
    pub data: DataFile,
    /// WordPiece vocabulary.
    pub vocab: DataFile,
    /// Checkpoint file (atomically replaced); `None`: no checkpoints.
    pub checkpoint: Option<PathBuf>,
    /// Checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Continue from this checkpoint.
    pub resume: Option<PathBuf>,
    /// Start from the weights of this Hugging Face directory instead of a random init.
    pub init_from: Option<PathBuf>,
    /// Metrics, one JSON object per line.
    pub metrics_out: Option<PathBuf>,
    /// Loss-curve PNG.
    pub plot_out: Option<PathBuf>,
    /// Log line every this many steps.
    pub log_every: u64,
    /// Batch split.
    pub balance: Balance,
    /// Forward/backward passes run for `Balance::Auto`'s first split (the first is not
    /// timed; the median of the others decides).
    pub balance_probe_steps: usize,
    /// Slow ranks take this many times their compute time (sleeping the difference).
    pub slowdown: f64,
    /// Which ranks `slowdown` applies to (`None`: every rank but 0, or rank 0 alone).
    pub slow_ranks: Option<Vec<usize>>,
    /// The first step `slowdown` applies to (0: the warm-up too).
    pub slowdown_from: u64,
    /// When `Balance::Auto` re-splits.
    pub rebalance: Rebalance,
    /// Run with the splits a metrics file recorded, step by step, instead of measuring:
    /// the numbers of that run again.
    pub replay_splits: Option<PathBuf>,
    /// Compute threads of this rank.
    pub threads: usize,
    /// Ranks sharing this machine's memory (launched on this host, or threads of this
    /// process): the memory check multiplies one rank's need by it.
    pub local_ranks: usize,
    /// Progress bar on rank 0.
    pub progress: bool,
    /// Stop (with a checkpoint) after this step, as if the job hit its time limit.
    pub stop_after: Option<u64>,
    /// Gradient buckets cross these links as 16-bit values, with error feedback
    /// (residuals kept per rank and saved beside checkpoints).
    pub compress: CompressMode,
    /// The 16-bit format for `compress`.
    pub compress_format: WireFormat,
}

impl RunOptions {
    /// Whether `rank` of `world` is artificially slowed.
    pub fn is_slow(&self, rank: usize, world: usize) -> bool {
        self.slow_factor(rank, world).is_some()
    }

    /// The slow-down of `rank` of `world` at `step` (the warm-up is step 0), if any.
    pub fn slow_at(&self, rank: usize, world: usize, step: u64) -> Option<f64> {
        self.slow_factor(rank, world)
            .filter(|_| step >= self.slowdown_from)
    }

    fn slow_factor(&self, rank: usize, world: usize) -> Option<f64> {
        if self.slowdown <= 1.0 {
            return None;
        }
        let slow = match &self.slow_ranks {
            Some(r) => r.contains(&rank),
            None => world == 1 || rank != 0,
        };
        slow.then_some(self.slowdown)
    }
}

/// Every setting, optional: the TOML schema and the flag set at once.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Model preset: bert-tiny, bert-mini, bert-small, bert-base.
    #[arg(long)]
    pub model: Option<String>,
    /// Encoder layers (overrides the preset).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Hidden size C.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Feed-forward width (default 4 × hidden).
    #[arg(long)]
    pub ffn: Option<usize>,
    /// Vocabulary size (must match the vocabulary file).
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Position-table length.
    #[arg(long)]
    pub max_position: Option<usize>,
    /// Tokens per sequence, `[CLS]` and `[SEP]` included.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Global batch size (samples per optimizer step over all ranks).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Peak learning rate.
    #[arg(long, allow_hyphen_values = true)]
    pub lr: Option<f32>,
    /// Warm-up steps.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// AdamW weight decay, 0 to 1.
    #[arg(long, allow_hyphen_values = true)]
    pub weight_decay: Option<f32>,
    /// Gradient-norm clip (0: off).
    #[arg(long, allow_hyphen_values = true)]
    pub grad_clip: Option<f32>,
    /// Seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Validation interval in steps.
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Validation samples per evaluation (at least 1).
    #[arg(long)]
    pub val_samples: Option<usize>,
    /// Log interval in steps (at least 1).
    #[arg(long)]
    pub log_every: Option<u64>,
    /// Checkpoint interval in steps.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Text corpus (default: data/tinyshakespeare.txt, built in).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Vocabulary file (default: data/bert-base-uncased-vocab.txt, built in).
    #[arg(long)]
    pub vocab: Option<PathBuf>,
    /// equal | auto (measured at the start, re-split as speeds drift) | start (measured
    /// at the start only).
    #[arg(long, value_enum)]
    pub balance: Option<Balance>,
    /// With --balance auto: re-split when the split's step is predicted this fraction
    /// slower than the best split's (default 0.08).
    #[arg(long, allow_hyphen_values = true)]
    pub rebalance_threshold: Option<f64>,
    /// Split the batch as the train records of this metrics file did, step by step
    /// (repeats a balanced run's numbers).
    #[arg(long)]
    pub replay_splits: Option<PathBuf>,
    /// Slow ranks take F times their compute time (1 to 1000).
    #[arg(long, allow_hyphen_values = true)]
    pub slowdown: Option<f64>,
    /// The first step --slowdown applies to (default 0: from the start).
    #[arg(long)]
    pub slowdown_from: Option<u64>,
    /// Ranks slowed by --slowdown (comma-separated; default every rank but 0).
    #[arg(long, value_delimiter = ',')]
    pub slow_ranks: Option<Vec<usize>>,
    /// Compute threads per rank (default: cores / local ranks).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Gradient compression with error feedback: off | inter (between nodes) | all.
    #[arg(long)]
    pub compress: Option<String>,
    /// Wire format of --compress: fp16 | bf16.
    #[arg(long)]
    pub compress_format: Option<String>,
}

/// Largest settings file read (bytes); the shipped ones are under 1 kB.
pub const CONFIG_MAX_BYTES: u64 = 1 << 20;

macro_rules! merge_fields {
    ($base:ident, $over:ident; $($f:ident),*) => {
        Settings { $($f: $over.$f.or($base.$f)),* }
    };
}

impl Settings {
    /// Reads a TOML file of settings of at most [`CONFIG_MAX_BYTES`] (unknown keys are
    /// refused). Relative `data` and `vocab` paths in it are made relative to the file.
    pub fn from_toml_file(path: &Path) -> Result<Settings> {
        let bytes = read_limited(path, "config", CONFIG_MAX_BYTES)?;
        let text = String::from_utf8(bytes).map_err(|e| {
            Error::invalid(
                "Settings::from_toml_file",
                format!(
                    "{} is not UTF-8 text (invalid byte at offset {})",
                    shown(path).display(),
                    e.utf8_error().valid_up_to()
                ),
            )
        })?;
        let mut s = Self::from_toml(&text).map_err(|e| match e {
            Error::InvalidArgument { reason, .. } => Error::invalid(
                "Settings::from_toml_file",
                format!("{}: {reason}", shown(path).display()),
            ),
            other => other,
        })?;
        let dir = path.parent().unwrap_or(Path::new(""));
        for p in [&mut s.data, &mut s.vocab].into_iter().flatten() {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(s)
    }

    /// Parses TOML settings.
    pub fn from_toml(text: &str) -> Result<Settings> {
        toml::from_str(text).map_err(|e| Error::invalid("Settings::from_toml", e.to_string()))
    }

    /// Field by field: `over`'s value where it has one, else `self`'s.
    pub fn merge(self, over: Settings) -> Settings {
        let base = self;
        merge_fields!(base, over; model, layers, hidden, heads, ffn, vocab_size, max_position,
            seq_len, batch_size, grad_accum, steps, lr, warmup_steps, weight_decay, grad_clip,
            seed, eval_every, val_samples, log_every, checkpoint_every, data, vocab, balance,
            rebalance_threshold, replay_splits, slowdown, slowdown_from, slow_ranks, threads,
            compress, compress_format)
    }

    /// Fills the defaults and splits into the numeric config and the run options.
    /// `default_threads` is used when `threads` is unset.
    pub fn resolve(&self, default_threads: usize) -> Result<(TrainConfig, RunOptions)> {
        let mut model = ModelConfig::preset(self.model.as_deref().unwrap_or("bert-tiny"))?;
        if let Some(h) = self.hidden {
            model.hidden = h;
            model.ffn = h.saturating_mul(4);
        }
        model.layers = self.layers.unwrap_or(model.layers);
        model.heads = self.heads.unwrap_or(model.heads);
        model.ffn = self.ffn.unwrap_or(model.ffn);
        model.vocab_size = self.vocab_size.unwrap_or(model.vocab_size);
        model.max_position = self.max_position.unwrap_or(model.max_position);
        let steps = self.steps.unwrap_or(1000);
        let adamw = AdamWConfig {
            weight_decay: self.weight_decay.unwrap_or(0.01),
            ..AdamWConfig::default()
        };
        let cfg = TrainConfig {
            model,
            seq_len: self.seq_len.unwrap_or(128),
            batch_size: self.batch_size.unwrap_or(16),
            grad_accum: self.grad_accum.unwrap_or(1),
            steps,
            lr: self.lr.unwrap_or(1e-3),
            warmup_steps: self.warmup_steps.unwrap_or(steps / 10),
            adamw,
            grad_clip: self.grad_clip.unwrap_or(1.0),
            seed: self.seed.unwrap_or(42),
            eval_every: self.eval_every.unwrap_or(100),
            val_samples: self.val_samples.unwrap_or(128),
        };
        let bad = |var: &str, value: String, accepted: String| {
            Err(Error::Config {
                var: var.into(),
                value,
                accepted,
            })
        };
        let slowdown = self.slowdown.unwrap_or(1.0);
        if !(1.0..=MAX_SLOWDOWN).contains(&slowdown) {
            return bad(
                "slowdown",
                slowdown.to_string(),
                format!("a factor from 1 to {MAX_SLOWDOWN}"),
            );
        }
        let threshold = self
            .rebalance_threshold
            .unwrap_or(Rebalance::default().threshold);
        if !(0.0..=MAX_REBALANCE_THRESHOLD).contains(&threshold) {
            return bad(
                "rebalance_threshold",
                threshold.to_string(),
                format!("a fraction from 0 to {MAX_REBALANCE_THRESHOLD}"),
            );
        }
        let log_every = self.log_every.unwrap_or(10);
        if log_every == 0 {
            return bad("log_every", "0".into(), "at least 1".into());
        }
        let threads = self.threads.unwrap_or(default_threads).max(1);
        if let Some(t) = self.threads.filter(|t| !(1..=MAX_THREADS).contains(t)) {
            return bad("threads", t.to_string(), format!("1..={MAX_THREADS}"));
        }
        let compress = pick(
            "compress",
            self.compress.as_deref().unwrap_or("off"),
            CompressMode::ALL,
            CompressMode::name,
        )?;
        let compress_format = pick(
            "compress_format",
            self.compress_format.as_deref().unwrap_or("fp16"),
            WireFormat::ALL,
            WireFormat::name,
        )?;
        let run = RunOptions {
            data: self
                .data
                .clone()
                .map_or_else(DataFile::builtin_corpus, DataFile::from),
            vocab: self
                .vocab
                .clone()
                .map_or_else(DataFile::builtin_vocab, DataFile::from),
            checkpoint: None,
            checkpoint_every: self.checkpoint_every.unwrap_or(0),
            resume: None,
            init_from: None,
            metrics_out: None,
            plot_out: None,
            log_every,
            balance: self.balance.unwrap_or(Balance::Equal),
            balance_probe_steps: 4,
            slowdown,
            slow_ranks: self.slow_ranks.clone(),
            slowdown_from: self.slowdown_from.unwrap_or(0),
            rebalance: Rebalance {
                threshold,
                ..Rebalance::default()
            },
            replay_splits: self.replay_splits.clone(),
            threads,
            local_ranks: 1,
            progress: true,
            stop_after: None,
            compress,
            compress_format,
        };
        Ok((cfg, run))
    }
}

/// The value of `all` whose name is `value`, or an error naming `var` and the choices.
fn pick<T: Copy, const N: usize>(
    var: &str,
    value: &str,
    all: [T; N],
    name: fn(T) -> &'static str,
) -> Result<T> {
    all.into_iter()
        .find(|&t| name(t) == value)
        .ok_or_else(|| Error::Config {
            var: var.into(),
            value: value.into(),
            accepted: all.map(name).join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_then_flags_override_defaults() {
        let file = Settings::from_toml(
            "model = \"bert-mini\"\nsteps = 50\nlr = 2e-4\nbalance = \"auto\"\n",
        )
        .unwrap();
        let flags = Settings {
            steps: Some(70),
            hidden: Some(64),
            ..Settings::default()
        };
        let (cfg, run) = file.merge(flags).resolve(2).unwrap();
        assert_eq!(cfg.model.layers, 4);
        assert_eq!(
            (cfg.model.hidden, cfg.model.ffn, cfg.model.heads),
            (64, 256, 4)
        );
        assert_eq!(cfg.steps, 70);
        assert_eq!(cfg.warmup_steps, 7);
        assert_eq!(cfg.lr, 2e-4);
        assert_eq!(run.balance, Balance::Auto);
        assert_eq!(run.threads, 2);
    }

    #[test]
    fn unknown_keys_and_presets_are_refused() {
        let err = Settings::from_toml("stepz = 3").unwrap_err();
        assert!(err.to_string().contains("unknown field `stepz`"), "{err}");
        let bad = Settings {
            model: Some("bert-huge".into()),
            ..Settings::default()
        };
        let err = bad.resolve(1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value \"bert-huge\" for model: accepted values are bert-tiny, bert-mini, bert-small, bert-base"
        );
    }

    #[test]
    fn compression_settings_parse_and_bad_ones_are_named() {
        let s = Settings::from_toml("compress = \"inter\"\ncompress_format = \"bf16\"").unwrap();
        let (_, run) = s.resolve(1).unwrap();
        assert_eq!(
            (run.compress, run.compress_format),
            (CompressMode::Inter, WireFormat::Bf16)
        );
        let (_, run) = Settings::default().resolve(1).unwrap();
        assert_eq!(
            (run.compress, run.compress_format),
            (CompressMode::Off, WireFormat::F16)
        );
        let bad = Settings {
            compress: Some("zip".into()),
            ..Settings::default()
        };
        assert_eq!(
            bad.resolve(1).unwrap_err().to_string(),
            "invalid value \"zip\" for compress: accepted values are off, inter, all"
        );
        let bad = Settings {
            compress_format: Some("fp8".into()),
            ..Settings::default()
        };
        assert_eq!(
            bad.resolve(1).unwrap_err().to_string(),
            "invalid value \"fp8\" for compress_format: accepted values are fp16, bf16"
        );
    }

    #[test]
    fn validate_names_the_bad_setting() {
        let (mut cfg, _) = Settings::default().resolve(1).unwrap();
        cfg.grad_accum = 3;
        let err = cfg.validate(1).unwrap_err();
        assert!(err.to_string().contains("for grad_accum"), "{err}");
        cfg.grad_accum = 4;
        assert!(cfg.validate(4).is_ok());
        let err = cfg.validate(5).unwrap_err();
        assert!(
            err.to_string()
                .contains("at least grad_accum × world size = 20"),
            "{err}"
        );
    }

    /// The message for `key = value` in a TOML file, or "ok".
    fn outcome(toml: &str) -> String {
        let r = Settings::from_toml(toml)
            .and_then(|s| s.resolve(1))
            .and_then(|(cfg, _)| cfg.validate(1));
        match r {
            Ok(()) => "ok".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn out_of_range_values_are_named_with_the_accepted_range() {
        let cases = [
            (
                "grad_clip = -1.0",
                "invalid value \"-1\" for grad_clip: accepted values are 0 (no clipping) or a \
                 positive finite norm",
            ),
            ("grad_clip = 0.0", "ok"),
            (
                "grad_clip = inf",
                "invalid value \"inf\" for grad_clip: accepted values are 0 (no clipping) or \
                 a positive finite norm",
            ),
            (
                "weight_decay = -0.01",
                "invalid value \"-0.01\" for weight_decay: accepted values are 0 to 1 (0: no \
                 decay)",
            ),
            (
                "weight_decay = 1.5",
                "invalid value \"1.5\" for weight_decay: accepted values are 0 to 1 (0: no \
                 decay)",
            ),
            (
                "weight_decay = nan",
                "invalid value \"NaN\" for weight_decay: accepted values are 0 to 1 (0: no \
                 decay)",
            ),
            (
                "lr = -0.001",
                "invalid value \"-0.001\" for lr: accepted values are a positive finite number",
            ),
            (
                "lr = 0.0",
                "invalid value \"0\" for lr: accepted values are a positive finite number",
            ),
            (
                "steps = 0",
                "invalid value \"0\" for steps: accepted values are at least 1",
            ),
            (
                "batch_size = 0",
                "invalid value \"0\" for batch_size: accepted values are at least 1",
            ),
            (
                "grad_accum = 0",
                "invalid value \"0\" for grad_accum: accepted values are a divisor of \
                 batch_size 16",
            ),
            (
                "seq_len = 2",
                "invalid value \"2\" for seq_len: accepted values are 3..=512 (max_position)",
            ),
            (
                "seq_len = 600",
                "invalid value \"600\" for seq_len: accepted values are 3..=512 (max_position)",
            ),
            (
                "max_position = 100",
                "invalid value \"128\" for seq_len: accepted values are 3..=100 (max_position)",
            ),
            (
                "vocab_size = 50",
                "invalid value \"50\" for vocab_size: accepted values are 104..=4294967295 \
                 (the special tokens take ids up to 103; ids are 32-bit)",
            ),
            (
                "val_samples = 0",
                "invalid value \"0\" for val_samples: accepted values are 1..=16777216",
            ),
            (
                "log_every = 0",
                "invalid value \"0\" for log_every: accepted values are at least 1",
            ),
            (
                "threads = 0",
                "invalid value \"0\" for threads: accepted values are 1..=4096",
            ),
            (
                "threads = 5000",
                "invalid value \"5000\" for threads: accepted values are 1..=4096",
            ),
            (
                "slowdown = 0.5",
                "invalid value \"0.5\" for slowdown: accepted values are a factor from 1 to \
                 1000",
            ),
            (
                "slowdown = 1e4",
                "invalid value \"10000\" for slowdown: accepted values are a factor from 1 to \
                 1000",
            ),
            (
                "rebalance_threshold = -0.1",
                "invalid value \"-0.1\" for rebalance_threshold: accepted values are a \
                 fraction from 0 to 9",
            ),
            (
                "rebalance_threshold = 12",
                "invalid value \"12\" for rebalance_threshold: accepted values are a \
                 fraction from 0 to 9",
            ),
            ("rebalance_threshold = 0.2\nslowdown_from = 40", "ok"),
            ("warmup_steps = 5000", "ok"),
            ("eval_every = 0\ncheckpoint_every = 0\nseed = 0", "ok"),
        ];
        for (toml, want) in cases {
            assert_eq!(outcome(toml), want, "{toml}");
        }
        // Below zero is not a number of the key's type: TOML's own message names the key.
        let e = outcome("hidden = -1");
        assert!(
            e.contains("hidden = -1") && e.contains("expected usize"),
            "{e}"
        );
        let (mut cfg, _) = Settings::default().resolve(1).unwrap();
        cfg.adamw.beta2 = 1.0;
        assert_eq!(
            cfg.validate(1).unwrap_err().to_string(),
            "invalid value \"1\" for beta2: accepted values are 0 ≤ beta < 1"
        );
    }

    #[test]
    fn memory_estimate_counts_the_layout() {
        for name in ["bert-tiny", "bert-mini", "bert-small", "bert-base"] {
            let s = Settings {
                model: Some(name.into()),
                ..Settings::default()
            };
            let (cfg, _) = s.resolve(1).unwrap();
            let est = cfg.memory_estimate(1);
            assert_eq!(est.params, cfg.model.num_params() as u128, "{name}");
            assert_eq!(est.state_bytes, 16 * est.params);
        }
        // bert-tiny by hand: embeddings (30522 + 512 + 2 + 2) × 128, two layers of
        // 4·128² + 2·512·128 + 512 + 9·128, head 128² + 3·128 + 30522.
        let (cfg, _) = Settings::default().resolve(1).unwrap();
        let est = cfg.memory_estimate(2);
        assert_eq!(est.params, 3_972_864 + 2 * 198_272 + 47_290);
        // 16 sequences over 2 ranks: 8 × 128 tokens each; 8·126·15% = 151.2 → 152 masked.
        let (b, t, c, f, nh, v, l, m) = (8u128, 128, 128, 512, 2, 30522, 2, 152);
        let bt = b * t;
        let acts = 2 * bt * c
            + 2 * bt
            + l * (10 * bt * c + 2 * bt * f + b * nh * t * t + 4 * bt)
            + m * (4 * c + 2 * v + 3);
        let grads = 10 * bt * c + 2 * bt * f + 2 * b * nh * t * t + m * (4 * c + 1);
        assert_eq!(est.activation_bytes, 4 * (acts + grads));
        assert_eq!((est.sequences, est.seq_len), (8, 128));
    }

    #[test]
    fn a_model_too_large_for_memory_says_what_it_needs() {
        let s = Settings {
            hidden: Some(1_000_000),
            ..Settings::default()
        };
        let (cfg, _) = s.resolve(1).unwrap();
        cfg.validate(1).unwrap();
        let err = cfg.check_memory(1, 1, 16 << 30).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "invalid argument to train: the model needs at least 364.7 TiB of memory: \
                 25031067030522 parameters × 16 bytes (weights, gradients, AdamW moments) = \
                 364.2 TiB, plus "
            ),
            "{err}"
        );
        assert!(
            err.ends_with(
                "sequences × 128 tokens per rank; this machine has 16 GiB. Lower hidden \
                 (1000000), ffn (4000000), layers (2), vocab_size (30522), max_position (512), \
                 batch_size (16) or seq_len (128)"
            ),
            "{err}"
        );
        // Shapes past usize saturate instead of overflowing.
        let mut huge = cfg.clone();
        huge.model.hidden = usize::MAX;
        huge.model.ffn = usize::MAX;
        assert!(huge.check_memory(1, 1, u64::MAX).is_err());
        // bert-tiny fits 2 GiB once, not 64 times.
        let (tiny, _) = Settings::default().resolve(1).unwrap();
        tiny.check_memory(1, 1, 2 << 30).unwrap();
        let err = tiny.check_memory(1, 64, 2 << 30).unwrap_err().to_string();
        assert!(err.contains("of memory for its 64 ranks ("), "{err}");
    }

    #[test]
    fn paths_in_a_config_file_are_relative_to_it() {
        let dir = std::env::temp_dir().join(format!("hetccl-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "data = \"corpus.txt\"\nvocab = \"/abs/vocab.txt\"\n").unwrap();
        let s = Settings::from_toml_file(&file).unwrap();
        assert_eq!(s.data, Some(dir.join("corpus.txt")));
        assert_eq!(s.vocab, Some(PathBuf::from("/abs/vocab.txt")));
        let (_, run) = Settings::default().resolve(1).unwrap();
        assert_eq!(run.data, DataFile::builtin_corpus());
        assert_eq!(run.vocab, DataFile::builtin_vocab());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn config_files_are_bounded() {
        let err = Settings::from_toml_file(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reading config /dev/zero: larger than the 1 MiB limit for a config"
        );
        let dir = std::env::temp_dir().join(format!("hetccl-config-big-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("big.toml");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(CONFIG_MAX_BYTES + 1)
            .unwrap();
        assert_eq!(
            Settings::from_toml_file(&file).unwrap_err().to_string(),
            format!(
                "reading config {}: 1048577 bytes (1.0 MiB), more than the 1 MiB limit for a \
                 config",
                file.display()
            )
        );
        std::fs::write(&file, b"steps = 3\n\xff").unwrap();
        assert_eq!(
            Settings::from_toml_file(&file).unwrap_err().to_string(),
            format!(
                "invalid argument to Settings::from_toml_file: {} is not UTF-8 text (invalid \
                 byte at offset 10)",
                file.display()
            )
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn shipped_config_files_parse() {
        for (file, name) in [
            ("bert-tiny", "bert-tiny"),
            ("bert-mini", "bert-mini"),
            ("bert-small", "bert-small"),
            ("bert-base", "bert-base"),
            ("demo", "bert-tiny"),
        ] {
            let path =
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../configs/{file}.toml"));
            let s = Settings::from_toml_file(&path).unwrap();
            let (cfg, _) = s.resolve(1).unwrap();
            assert_eq!(cfg.model, ModelConfig::preset(name).unwrap(), "{file}.toml");
            cfg.validate(1).unwrap();
        }
    }

    #[test]
    fn a_slowdown_starts_at_its_step() {
        let s = Settings::from_toml("slowdown = 2.5\nslowdown_from = 5\nslow_ranks = [1]").unwrap();
        let (_, run) = s.resolve(1).unwrap();
        assert_eq!(run.slow_at(1, 2, 4), None);
        assert_eq!(run.slow_at(1, 2, 5), Some(2.5));
        assert_eq!(run.slow_at(1, 2, 900), Some(2.5));
        assert_eq!(run.slow_at(0, 2, 900), None);
        assert!(run.is_slow(1, 2));
        let (_, run) = Settings::from_toml("slowdown = 2.5")
            .unwrap()
            .resolve(1)
            .unwrap();
        assert_eq!(run.slow_at(1, 2, 0), Some(2.5));
        assert_eq!(run.rebalance, Rebalance::default());
    }
}
