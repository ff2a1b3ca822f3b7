//! `hetccl-check`: runs every collective, reduction and element type on the given
//! counts and checks each result against a closed form. Exits non-zero on the first
//! wrong element or error. Start it on every rank (launcher, mpirun or env vars):
//!
//! ```text
//! hetccl run -n 4 -- hetccl-check --counts 0,1,7,1000
//! ```
//!
//! The checks and their closed forms are hetccl-testkit's (`check`, `oracle`), which
//! tests run on their own executables too; `--shared`, `--soak`, `--determinism`,
//! `--compressed` and `--split` are described there. A long soak:
//!
//! ```text
//! hetccl run -n 4 -- hetccl-check --soak 200000 --seed 7
//! ```
//!
//! Fault flags, this tool's own, make one rank misbehave on purpose, for the failure
//! tests: after one all-reduce that works, rank `--fault-rank` exits (`exit`, status 17),
//! dies by `SIGKILL` (`kill`), stops itself with `SIGSTOP` (`stop`), never calls the
//! next collective (`skip`: sleeps for ten minutes instead), or calls a
//! collective that differs from the others' (`count`, `dtype`, `op`, `private`).

use std::process::ExitCode;
use std::time::Instant;

use hetccl::{errln, outln, Communicator, ReduceOp};
use hetccl_testkit::check::{self, Options};
use hetccl_testkit::oracle::make_buf;

struct Args {
    check: Options,
    fault: String,
    fault_rank: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        check: Options::default(),
        fault: "none".into(),
        fault_rank: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--fault" => a.fault = val()?,
            "--fault-rank" => {
                a.fault_rank = val()?.parse().map_err(|e| format!("--fault-rank: {e}"))?
            }
            "-h" | "--help" => {
                outln!(
                    "usage: hetccl-check [--counts 0,1,7,1000] [--iters N] [--mixed N] [--big-f32 COUNT]\n\
                     \x20                   [--fault none|exit|kill|stop|skip|count|dtype|op|private --fault-rank R] [--seed S]\n\
                     \x20                   [--determinism COUNT]  (prints a hash of an inexact f32 sum)\n\
                     \x20                   [--compressed COUNT]   (fp16/bf16 all-reduce within bounds, same bits everywhere)\n\
                     \x20                   [--shared]  (buffers from alloc_shared)\n\
                     \x20                   [--soak STEPS]  (random collectives, memory and descriptors flat)\n\
                     \x20                   [--split]  (new communicators by colour, checked in each)"
                );
                std::process::exit(0);
            }
            other => {
                if !a.check.flag(other, val)? {
                    return Err(format!("unknown flag {other}"));
                }
            }
        }
    }
    Ok(a)
}

fn fault(comm: &Communicator, a: &Args) -> Result<(), String> {
    let (r, n) = (comm.rank(), comm.world_size());
    let count = a.check.counts.iter().copied().max().unwrap_or(1000).max(1);
    let mut buf = make_buf(comm, a.check.shared, 0, vec![1.0f32; count])?;
    // One collective that works, so every link is known good before the fault.
    comm.all_reduce(&mut buf, ReduceOp::Sum)
        .map_err(|e| e.to_string())?;
    if r == a.fault_rank {
        match a.fault.as_str() {
            "exit" => {
                errln!("rank {r}: exiting on purpose");
                std::process::exit(17);
            }
            "kill" => {
                errln!("rank {r}: killing itself on purpose (SIGKILL)");
                // SAFETY: raising SIGKILL on ourselves has no memory-safety impact.
                unsafe { libc::raise(libc::SIGKILL) };
            }
            "skip" => {
                errln!("rank {r}: not calling the collective on purpose");
                // In compute, as far as the others can tell, until the launcher stops it.
                std::thread::sleep(std::time::Duration::from_secs(600));
                return Ok(());
            }
            "stop" => {
                errln!("rank {r}: stopping on purpose");
                // SAFETY: raising SIGSTOP on ourselves has no memory-safety impact.
                unsafe { libc::raise(libc::SIGSTOP) };
            }
            "count" => {
                return comm
                    .all_reduce(&mut buf[..count - 1], ReduceOp::Sum)
                    .map_err(|e| e.to_string());
            }
            "private" => {
                // Shared buffers everywhere else, a private one here.
                let mut other = vec![1.0f32; count];
                return comm
                    .all_reduce(&mut other, ReduceOp::Sum)
                    .map_err(|e| e.to_string());
            }
            "dtype" => {
                let mut other = vec![1.0f64; count];
                return comm
                    .all_reduce(&mut other, ReduceOp::Sum)
                    .map_err(|e| e.to_string());
            }
            "op" => {
                let mut other = vec![1.0f32; count];
                return comm.broadcast(&mut other, 0).map_err(|e| e.to_string());
            }
            other => return Err(format!("unknown fault {other}")),
        }
    }
    let t = Instant::now();
    let r2 = comm
        .all_reduce(&mut buf, ReduceOp::Sum)
        .map_err(|e| e.to_string());
    errln!(
        "rank {r}: faulty collective returned after {:.2}s: {r2:?}",
        t.elapsed().as_secs_f64()
    );
    let _ = n;
    r2
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            errln!("hetccl-check: {e}");
            return ExitCode::from(2);
        }
    };
    ExitCode::from(check::main("hetccl-check", &args.check, |comm| {
        (args.fault != "none").then(|| fault(comm, &args))
    }))
}
