//! The `hetccl-bert` command line.

use std::path::PathBuf;

use super::checkpoint;
use super::config::{RunOptions, Settings, TrainConfig};
use super::files::{shown, DataFile, Origin};
use super::hf;
use super::tokenizer::VOCAB_MAX_BYTES;
use crate::error::{Error, Result};

/// Most ranks `--sim-ranks` runs as threads.
pub const MAX_SIM_RANKS: usize = 1024;

/// Pretrain a BERT masked-LM on a text corpus, data-parallel over hetccl ranks.
#[derive(Debug, clap::Parser)]
#[command(
    name = "hetccl-bert",
    version,
    allow_negative_numbers = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Something else than training.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML settings file (keys as the flags, snake_case; paths in it are relative to
    /// it); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Settings (model, optimizer, data, balance).
    #[command(flatten)]
    pub settings: Settings,
    /// Checkpoint file, replaced atomically (the one before it kept as FILE.prev).
    #[arg(long, default_value = "runs/hetccl-bert.ckpt")]
    pub checkpoint: PathBuf,
    /// Write no checkpoint.
    #[arg(long)]
    pub no_checkpoint: bool,
    /// Continue from a checkpoint (its settings win over the flags).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Start from the weights of a Hugging Face BertForMaskedLM directory
    /// (model.safetensors, config.json; its vocab.txt unless --vocab is given). The model's
    /// shape is the directory's.
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    pub init_from: Option<PathBuf>,
    /// Metrics as JSON lines.
    #[arg(long, default_value = "runs/metrics.jsonl")]
    pub metrics_out: PathBuf,
    /// Loss-curve PNG written at the end.
    #[arg(long, default_value = "runs/loss.png")]
    pub plot_out: PathBuf,
    /// Stop after this step (checkpoint written), as a job hitting its time limit would.
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Run this many ranks as threads of this process (no communicator needed), 1 to 1024.
    #[arg(long, default_value_t = 1)]
    pub sim_ranks: usize,
}

/// The subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Write a checkpoint's model in a format other programs read.
    Export(ExportArgs),
}

/// `hetccl-bert export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Write a Hugging Face BertForMaskedLM directory (model.safetensors, config.json,
    /// vocab.txt), created if needed.
    #[arg(long, value_name = "DIR")]
    pub hf: PathBuf,
    /// The checkpoint to export.
    #[arg(long, default_value = "runs/hetccl-bert.ckpt")]
    pub checkpoint: PathBuf,
    /// The vocabulary the model was trained with (default: data/bert-base-uncased-vocab.txt,
    /// built in).
    #[arg(long)]
    pub vocab: Option<PathBuf>,
}

impl ExportArgs {
    /// Writes the checkpoint's parameters as a Hugging Face directory; returns what to
    /// tell the user.
    pub fn run(&self) -> Result<String> {
        let ck = checkpoint::load(&self.checkpoint)?;
        let vocab = self
            .vocab
            .clone()
            .map_or_else(DataFile::builtin_vocab, |p| {
                DataFile::from(p).with_origin(Origin::Flag("--vocab"))
            });
        let text = vocab.read_text("vocabulary", VOCAB_MAX_BYTES)?;
        let model = &ck.meta.config.model;
        hf::export(&self.hf, model, &ck.params, &text).map_err(|e| match e {
            Error::InvalidArgument { reason, .. } => Error::invalid(
                "hetccl-bert export",
                format!(
                    "{} with {vocab}: {reason}",
                    shown(&self.checkpoint).display()
                ),
            ),
            e => e,
        })?;
        Ok(format!(
            "wrote {} ({}, {}, {}): step {} of {}, {} parameters",
            shown(&self.hf).display(),
            hf::WEIGHTS_FILE,
            hf::CONFIG_FILE,
            hf::VOCAB_FILE,
            ck.meta.step,
            shown(&self.checkpoint).display(),
            ck.meta.num_params
        ))
    }
}

impl Cli {
    /// Merges defaults, the TOML file and the flags. `default_threads` applies when
    /// `--threads` is not given anywhere; `local_ranks` ranks share this machine.
    ///
    /// Every value is checked here (the world-size dependent checks again in `train`),
    /// so a bad one is refused before any rank starts work.
    pub fn options(
        &self,
        default_threads: usize,
        local_ranks: usize,
    ) -> Result<(TrainConfig, RunOptions)> {
        if !(1..=MAX_SIM_RANKS).contains(&self.sim_ranks) {
            return Err(Error::Config {
                var: "sim_ranks".into(),
                value: self.sim_ranks.to_string(),
                accepted: format!("1..={MAX_SIM_RANKS}"),
            });
        }
        let base = match &self.config {
            Some(p) => Settings::from_toml_file(p)?,
            None => Settings::default(),
        };
        let flags = &self.settings;
        let origin =
            |key: &'static str, flag: &'static str, in_file: bool| match (&self.config, in_file) {
                (Some(file), true) => Origin::ConfigFile {
                    key,
                    file: file.clone(),
                },
                _ => Origin::Flag(flag),
            };
        let data_origin = origin("data", "--data", flags.data.is_none());
        let mut vocab_origin = origin("vocab", "--vocab", flags.vocab.is_none());
        let mut merged = base.merge(flags.clone());
        let hf_shape = match &self.init_from {
            Some(dir) => {
                let shape = hf::model_config(dir)?;
                if merged.vocab.is_none() {
                    if let Some(v) = hf::vocab_path(dir) {
                        merged.vocab = Some(v);
                        vocab_origin = Origin::Flag("--init-from");
                    }
                }
                Some((dir, shape))
            }
            None => None,
        };
        let (mut cfg, mut run) = merged.resolve(default_threads)?;
        if let Some((dir, shape)) = hf_shape {
            // The directory decides the shape; settings that name one must agree with it.
            let m = &merged;
            let asked = m.model.is_some()
                || [
                    m.layers,
                    m.hidden,
                    m.heads,
                    m.ffn,
                    m.vocab_size,
                    m.max_position,
                ]
                .iter()
                .any(Option::is_some);
            if asked {
                hf::check_shape(dir, &shape, &cfg.model).map_err(|e| match e {
                    Error::HfModel { path, reason } => Error::HfModel {
                        path,
                        reason: format!(
                            "{reason} (leave the model settings out to take the directory's shape)"
                        ),
                    },
                    e => e,
                })?;
            }
            cfg.model = shape;
            run.init_from = Some(dir.clone());
        }
        cfg.validate(1)?;
        run.data = run.data.with_origin(data_origin);
        run.vocab = run.vocab.with_origin(vocab_origin);
        run.checkpoint = (!self.no_checkpoint).then(|| self.checkpoint.clone());
        run.resume = self.resume.clone();
        run.metrics_out = Some(self.metrics_out.clone());
        run.plot_out = Some(self.plot_out.clone());
        run.stop_after = self.stop_after;
        run.progress = !self.no_progress;
        run.local_ranks = local_ranks.max(1);
        Ok((cfg, run))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_parse_into_options() {
        let cli = Cli::try_parse_from([
            "hetccl-bert",
            "--model",
            "bert-mini",
            "--steps",
            "5",
            "--balance",
            "auto",
            "--slow-ranks",
            "1,2",
            "--slowdown",
            "2.5",
            "--no-checkpoint",
            "--sim-ranks",
            "3",
        ])
        .unwrap();
        let (cfg, run) = cli.options(4, 3).unwrap();
        assert_eq!(cfg.model.hidden, 256);
        assert_eq!(cfg.steps, 5);
        assert_eq!(run.slow_ranks, Some(vec![1, 2]));
        assert!(run.is_slow(2, 3) && !run.is_slow(0, 3));
        assert_eq!(run.checkpoint, None);
        assert_eq!(cli.sim_ranks, 3);
        assert_eq!(run.threads, 4);
    }
}
