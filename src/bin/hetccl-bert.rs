//! `hetccl-bert`: BERT masked-LM pretraining, data-parallel over hetccl.
//!
//! ```text
//! hetccl-bert --config configs/bert-tiny.toml --sim-ranks 2      # two ranks as threads
//! hetccl-bert --config configs/bert-tiny.toml --resume runs/hetccl-bert.ckpt
//! ```

use std::process::ExitCode;

use clap::Parser;
use hetccl::trainer::cli::Cli;
use hetccl::trainer::{train, train_threads, with_threads, SingleProcess};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hetccl-bert: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> hetccl::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ranks = cli.sim_ranks.max(1);
    let (cfg, run) = cli.options((cores / ranks).max(1))?;
    let report = if ranks == 1 {
        with_threads(run.threads, || train(&cfg, &run, &SingleProcess))??
    } else {
        train_threads(&cfg, &run, ranks)?.swap_remove(0)
    };
    println!("{:.1} samples/s over the run", report.samples_per_s);
    Ok(())
}
