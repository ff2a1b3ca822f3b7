//! Times in-place f32 all-reduce on buffers from `alloc_shared` against plain `Vec`s,
//! alternating the two so machine noise hits both alike, and prints medians with
//! nccl-tests' bus bandwidth (`algbw * 2(n-1)/n`) next to a single-thread memcpy of the
//! same size, and how busy rank 0's process was meanwhile (CPU time / wall time: below
//! 100% it waited for peers, e.g. when other jobs took the cores). Start it on every rank:
//!
//! ```text
//! hetccl run -n 2 -- target/release/examples/shared_all_reduce --sizes 1M,16M,64M,256M --reps 7
//! ```

use std::time::Instant;

use hetccl::{Communicator, ReduceOp};

fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, mul) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>().ok().map(|v| v * mul)
}

/// A one-element all-reduce: unlike `barrier` (whose empty messages carry no
/// dependencies in its schedule) it cannot complete before every rank has arrived.
fn sync(comm: &Communicator) -> hetccl::Result<()> {
    comm.all_reduce(&mut [0u8], ReduceOp::Sum)
}

/// CPU seconds used by this process so far (all threads).
fn cpu_seconds() -> f64 {
    // SAFETY: rusage is plain data; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> hetccl::Result<()> {
    let mut sizes = vec![1 << 20, 16 << 20, 64 << 20];
    let mut reps = 7usize;
    let mut modes = vec!["shared".to_string(), "vec".to_string()];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        match a.as_str() {
            "--sizes" => sizes = v.split(',').filter_map(parse_size).collect(),
            "--reps" => reps = v.parse().unwrap_or(reps),
            "--modes" => modes = v.split(',').map(String::from).collect(),
            _ => {
                eprintln!(
                    "usage: shared_all_reduce [--sizes 1M,64M] [--reps N] [--modes shared,vec]"
                );
                std::process::exit(2);
            }
        }
    }
    let comm = Communicator::init_from_env()?;
    let n = comm.world_size();
    let factor = 2.0 * (n as f64 - 1.0) / n as f64;
    if comm.rank() == 0 {
        println!(
            "# {n} ranks, f32 sum in place, {reps} reps alternating {modes:?}, median per mode"
        );
        println!(
            "{:>10} {:>8} {:>10} {:>9} {:>9} {:>12} {:>8}",
            "bytes", "mode", "time_us", "algbw", "busbw", "memcpy_GB/s", "rank0_cpu"
        );
    }
    for &bytes in &sizes {
        let count = bytes / 4;
        // Fewer iterations for big sizes; at least 3 per repetition.
        let iters = ((256usize << 20) / bytes.max(1)).clamp(3, 200);
        let mut shared = comm.alloc_shared::<f32>(count)?;
        shared.fill(1.0);
        let mut plain = vec![1.0f32; count];
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        let mut busy: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        // Warm up both paths once.
        comm.all_reduce(&mut shared[..], ReduceOp::Sum)?;
        comm.all_reduce(&mut plain, ReduceOp::Sum)?;
        for _ in 0..reps {
            for (m, mode) in modes.iter().enumerate() {
                sync(&comm)?;
                let t = Instant::now();
                let c0 = cpu_seconds();
                for _ in 0..iters {
                    if mode == "shared" {
                        comm.all_reduce(&mut shared[..], ReduceOp::Sum)?;
                    } else {
                        comm.all_reduce(&mut plain, ReduceOp::Sum)?;
                    }
                }
                let wall = t.elapsed().as_secs_f64();
                times[m].push(wall / iters as f64);
                busy[m].push((cpu_seconds() - c0) / wall);
            }
        }
        // Single-thread memcpy of the same size, measured by rank 0 alone while the
        // others wait.
        let mut cp = Vec::new();
        if comm.rank() == 0 {
            let src = vec![1u8; bytes];
            let mut dst = vec![0u8; bytes];
            dst.copy_from_slice(&src);
            for _ in 0..reps {
                let t = Instant::now();
                for _ in 0..iters {
                    dst.copy_from_slice(std::hint::black_box(&src));
                }
                cp.push(bytes as f64 * iters as f64 / t.elapsed().as_secs_f64() / 1e9);
            }
        }
        sync(&comm)?;
        if comm.rank() == 0 {
            let cpm = median(&mut cp);
            for (m, mode) in modes.iter().enumerate() {
                let t = median(&mut times[m]);
                let algbw = bytes as f64 / t / 1e9;
                println!(
                    "{:>10} {:>8} {:>10.1} {:>9.2} {:>9.2} {:>12.2} {:>7.0}%",
                    bytes,
                    mode,
                    t * 1e6,
                    algbw,
                    algbw * factor,
                    cpm,
                    median(&mut busy[m]) * 100.0
                );
            }
        }
    }
    Ok(())
}
