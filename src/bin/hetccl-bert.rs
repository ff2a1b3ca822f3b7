//! `hetccl-bert`: BERT masked-LM pretraining, data-parallel over hetccl.
//!
//! ```text
//! hetccl run -n 2 -- hetccl-bert --config configs/bert-tiny.toml     # two local ranks
//! hetccl-bert --config configs/bert-tiny.toml --sim-ranks 2          # two ranks as threads
//! hetccl-bert --resume runs/hetccl-bert.ckpt                         # continue exactly
//! ```
//!
//! Without `--sim-ranks`, ranks are found the way every hetccl program finds them
//! (launcher, torchrun-style `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT`, MPI); a
//! plain start, with none of those set, is a world of one.

use std::process::ExitCode;

use clap::Parser;
use hetccl::config::{CompressMode, InitMethod};
use hetccl::trainer::cli::Cli;
use hetccl::trainer::{train, train_threads, with_threads, CompressedSync, SingleProcess};
use hetccl::{Communicator, Config};

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
    if cli.sim_ranks > 1 {
        let (cfg, run) = cli.options((cores / cli.sim_ranks).max(1), cli.sim_ranks)?;
        let report = train_threads(&cfg, &run, cli.sim_ranks)?.swap_remove(0);
        println!("{:.1} samples/s over the run", report.samples_per_s);
        return Ok(());
    }
    let comm_cfg = Config::from_env()?;
    let launched = comm_cfg.launch.world_size.is_some() || comm_cfg.init != InitMethod::Env;
    let local = comm_cfg.launch.local_world_size.unwrap_or(1).max(1);
    let (cfg, run) = cli.options((cores / local).max(1), local)?;
    if !launched {
        // Started by hand, not by a launcher: a world of one, no communicator needed.
        let report = with_threads(run.threads, || train(&cfg, &run, &SingleProcess))??;
        println!("{:.1} samples/s over the run", report.samples_per_s);
        return Ok(());
    }
    let report = with_threads(run.threads, || {
        let comm = Communicator::init(comm_cfg)?;
        let report = if run.compress == CompressMode::Off {
            train(&cfg, &run, &comm)?
        } else {
            let sync = CompressedSync::new(&comm, run.compress, run.compress_format);
            train(&cfg, &run, &sync)?
        };
        Ok::<_, hetccl::Error>((comm.rank(), report))
    })??;
    if report.0 == 0 {
        println!("{:.1} samples/s over the run", report.1.samples_per_s);
    }
    Ok(())
}
