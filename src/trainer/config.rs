//! Training settings: built-in defaults, overridden by a TOML file, overridden by flags.
//!
//! [`Settings`] is both the TOML schema (flat keys, snake_case) and the flag set
//! (`--kebab-case`); every field is optional so the three layers merge field by field.
//! [`Settings::resolve`] turns the merged result into a [`TrainConfig`] (everything that
//! decides the numbers, saved in checkpoints) and [`RunOptions`] (where files go, how the
//! run is shown and balanced; free to change between a run and its resume).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::compression::WireFormat;
use crate::config::CompressMode;

use super::files::{read_limited, shown, DataFile};
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
    /// Global gradient-norm clip (≤ 0: off).
    pub grad_clip: f32,
    /// Seed of the init, the data order and the masks.
    pub seed: u64,
    /// Validation every this many steps (0: only at start and end).
    pub eval_every: u64,
    /// Validation samples per evaluation.
    pub val_samples: usize,
}

impl TrainConfig {
    /// Checks values the trainer cannot run with.
    pub fn validate(&self, world_size: usize) -> Result<()> {
        self.model.validate()?;
        let bad = |var: &str, value: String, accepted: &str| {
            Err(Error::Config {
                var: var.into(),
                value,
                accepted: accepted.into(),
            })
        };
        if self.seq_len < 3 || self.seq_len > self.model.max_position {
            return bad(
                "seq_len",
                self.seq_len.to_string(),
                &format!("3..={} (max_position)", self.model.max_position),
            );
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
                    self.grad_accum * world_size
                ),
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", self.lr.to_string(), "a positive number");
        }
        if self.steps == 0 {
            return bad("steps", "0".into(), "at least 1");
        }
        Ok(())
    }

    /// Samples every rank together processes per micro-step.
    pub fn micro_batch_global(&self) -> usize {
        self.batch_size / self.grad_accum
    }
}

/// How the global micro-batch is split over ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// Equal shares.
    Equal,
    /// Shares proportional to throughput measured in a short warm-up.
    Auto,
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
    /// Metrics, one JSON object per line.
    pub metrics_out: Option<PathBuf>,
    /// Loss-curve PNG.
    pub plot_out: Option<PathBuf>,
    /// Log line every this many steps.
    pub log_every: u64,
    /// Batch split.
    pub balance: Balance,
    /// Forward/backward passes timed for `Balance::Auto`.
    pub balance_probe_steps: usize,
    /// Slow ranks take this many times their compute time (sleeping the difference).
    pub slowdown: f64,
    /// Which ranks `slowdown` applies to (`None`: every rank but 0, or rank 0 alone).
    pub slow_ranks: Option<Vec<usize>>,
    /// Compute threads of this rank.
    pub threads: usize,
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
        if self.slowdown <= 1.0 {
            return false;
        }
        match &self.slow_ranks {
            Some(r) => r.contains(&rank),
            None => world == 1 || rank != 0,
        }
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
    #[arg(long)]
    pub lr: Option<f32>,
    /// Warm-up steps.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// AdamW weight decay.
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// Gradient-norm clip (0: off).
    #[arg(long)]
    pub grad_clip: Option<f32>,
    /// Seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Validation interval in steps.
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Validation samples per evaluation.
    #[arg(long)]
    pub val_samples: Option<usize>,
    /// Log interval in steps.
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
    /// equal | auto.
    #[arg(long, value_enum)]
    pub balance: Option<Balance>,
    /// Slow ranks take F times their compute time.
    #[arg(long)]
    pub slowdown: Option<f64>,
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
            slowdown, slow_ranks, threads, compress, compress_format)
    }

    /// Fills the defaults and splits into the numeric config and the run options.
    /// `default_threads` is used when `threads` is unset.
    pub fn resolve(&self, default_threads: usize) -> Result<(TrainConfig, RunOptions)> {
        let mut model = ModelConfig::preset(self.model.as_deref().unwrap_or("bert-tiny"))?;
        if let Some(h) = self.hidden {
            model.hidden = h;
            model.ffn = 4 * h;
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
        let slowdown = self.slowdown.unwrap_or(1.0);
        if !(slowdown.is_finite() && slowdown >= 1.0) {
            return Err(Error::Config {
                var: "slowdown".into(),
                value: slowdown.to_string(),
                accepted: "a factor ≥ 1".into(),
            });
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
            metrics_out: None,
            plot_out: None,
            log_every: self.log_every.unwrap_or(10).max(1),
            balance: self.balance.unwrap_or(Balance::Equal),
            balance_probe_steps: 3,
            slowdown,
            slow_ranks: self.slow_ranks.clone(),
            threads: self.threads.unwrap_or(default_threads).max(1),
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
        for name in ["bert-tiny", "bert-mini", "bert-small", "bert-base"] {
            let path =
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("configs/{name}.toml"));
            let s = Settings::from_toml_file(&path).unwrap();
            let (cfg, _) = s.resolve(1).unwrap();
            assert_eq!(cfg.model, ModelConfig::preset(name).unwrap());
            cfg.validate(1).unwrap();
        }
    }
}
