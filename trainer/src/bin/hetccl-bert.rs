//! `hetccl-bert`: BERT masked-LM pretraining, data-parallel over hetccl.
//!
//! ```text
//! hetccl run -n 2 -- hetccl-bert --config configs/bert-tiny.toml     # two local ranks
//! hetccl-bert --config configs/bert-tiny.toml --sim-ranks 2          # two ranks as threads
//! hetccl-bert --resume runs/hetccl-bert.ckpt                         # continue exactly
//! hetccl-bert export --hf runs/hf                                    # for transformers
//! hetccl-bert --init-from runs/hf --steps 100                        # start from HF weights
//! ```
//!
//! Without `--sim-ranks`, ranks are found the way every hetccl program finds them
//! (launcher, torchrun-style `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT`, MPI); a
//! plain start, with none of those set, is a world of one.
//!
//! The default corpus and vocabulary are built in, so it runs from any directory. Bad
//! values, a model too large for the machine's memory and an unwritable checkpoint path
//! are refused before any work; a closed standard output (`| head`) ends the run with an
//! error, as it ends other programs.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use hetccl::config::{CompressMode, InitMethod};
use hetccl::{Communicator, Config};
use hetccl_trainer::cli::{Cli, Command};
use hetccl_trainer::{
    train, train_threads, with_threads, CompressedSync, Error, Result, SingleProcess,
};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(hetccl::log::stderr)
        .init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Nothing more to say where stderr is closed too.
            let _ = writeln!(std::io::stderr(), "hetccl-bert: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The last line of a run, on rank 0; a closed stdout is an error like any other.
fn summary(samples_per_s: f64) -> Result<()> {
    writeln!(
        std::io::stdout(),
        "{samples_per_s:.1} samples/s over the run"
    )
    .map_err(|e| Error::io("writing progress to standard output", e))
}

fn run(cli: &Cli) -> Result<()> {
    if let Some(Command::Export(export)) = &cli.command {
        let done = export.run()?;
        return writeln!(std::io::stdout(), "{done}")
            .map_err(|e| Error::io("writing to standard output", e));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cli.sim_ranks > 1 {
        let (cfg, run) = cli.options((cores / cli.sim_ranks).max(1), cli.sim_ranks)?;
        let report = train_threads(&cfg, &run, cli.sim_ranks)?.swap_remove(0);
        return summary(report.samples_per_s);
    }
    let comm_cfg = Config::from_env()?;
    let launched = comm_cfg.launch.world_size.is_some() || comm_cfg.init != InitMethod::Env;
    let local = comm_cfg.launch.local_world_size.unwrap_or(1).max(1);
    let (cfg, run) = cli.options((cores / local).max(1), local)?;
    if !launched {
        // Started by hand, not by a launcher: a world of one, no communicator needed.
        let report = with_threads(run.threads, || train(&cfg, &run, &SingleProcess))??;
        return summary(report.samples_per_s);
    }
    let report = with_threads(run.threads, || {
        let comm = Communicator::init(comm_cfg)?;
        let report = if run.compress == CompressMode::Off {
            train(&cfg, &run, &comm)?
        } else {
            let sync = CompressedSync::new(&comm, run.compress, run.compress_format);
            train(&cfg, &run, &sync)?
        };
        Ok::<_, Error>((comm.rank(), report))
    })??;
    if report.0 == 0 {
        summary(report.1.samples_per_s)?;
    }
    Ok(())
}
