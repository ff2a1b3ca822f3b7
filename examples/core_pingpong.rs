//! How far apart two CPUs are now: two threads, pinned to the first two CPUs this
//! process may use (or the two given), pass a counter back and forth through one cache
//! line 20,000 times, and the mean round trip is printed in ns.
//!
//! ```text
//! cargo run --release --example core_pingpong [CPU_A CPU_B]           # e.g. 71
//! cargo run --release --example core_pingpong -- --least [CPU_A CPU_B]
//! ```
//!
//! With `--least` it prints what a host that runs more ranks than CPUs measures at
//! start-up instead (`topology::distance::round_trip_ns`: the least mean of 32 batches
//! of 16 round trips), which reads a little below the mean.
//!
//! On the 2-vCPU guest of `docs/PERFORMANCE.md` it reads about 30 ns while the host runs
//! the two virtual CPUs on one core's two hardware threads, 65–150 ns on two cores that
//! share a last-level cache, and 200–450 ns on different dies, and moves between these
//! within seconds; `scripts/compare-shm-modes.sh` prints it around every launch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hetccl::topology::{distance, place};

const ROUND_TRIPS: u64 = 20_000;

#[repr(align(128))]
struct Line(AtomicU64);

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let least = args.first().is_some_and(|a| a == "--least");
    if least {
        args.remove(0);
    }
    let args: Vec<usize> = args
        .into_iter()
        .map(|a| {
            a.parse().unwrap_or_else(|_| {
                eprintln!("core_pingpong: CPU numbers expected, got {a:?}");
                std::process::exit(2)
            })
        })
        .collect();
    let cpus = match args.as_slice() {
        [a, b] => vec![*a, *b],
        [] => place::allowed_cpus().unwrap_or_default(),
        _ => {
            eprintln!("usage: core_pingpong [--least] [CPU_A CPU_B]");
            std::process::exit(2)
        }
    };
    if cpus.len() < 2 {
        eprintln!("core_pingpong: needs two CPUs, this process may use {cpus:?}");
        std::process::exit(2);
    }
    if least {
        match distance::round_trip_ns(cpus[0], cpus[1]) {
            Some(ns) => println!("{ns}"),
            None => {
                eprintln!(
                    "core_pingpong: no round trip between CPUs {} and {}",
                    cpus[0], cpus[1]
                );
                std::process::exit(1)
            }
        }
        return;
    }
    let line = Arc::new(Line(AtomicU64::new(0)));
    let threads: Vec<_> = (0..2u64)
        .map(|me| {
            let (line, cpu) = (line.clone(), cpus[me as usize]);
            std::thread::spawn(move || {
                if place::set_affinity(&place::cpu_set(&[cpu])).is_err() {
                    eprintln!("core_pingpong: cannot run on CPU {cpu}");
                    std::process::exit(1);
                }
                let t0 = Instant::now();
                for k in 0..ROUND_TRIPS {
                    let want = 2 * k + me;
                    while line.0.load(Ordering::Acquire) != want {
                        std::hint::spin_loop();
                    }
                    line.0.store(want + 1, Ordering::Release);
                }
                t0.elapsed().as_nanos() as f64 / ROUND_TRIPS as f64
            })
        })
        .collect();
    let ns: Vec<f64> = threads
        .into_iter()
        .map(|t| t.join().expect("ping-pong thread"))
        .collect();
    println!("{:.0}", ns[0]);
}
