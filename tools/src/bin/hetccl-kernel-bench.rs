//! `hetccl-kernel-bench`: bandwidth of the GPU kernels against a device-to-device memcpy
//! measured in the same run (feature `cuda`).
//!
//! ```text
//! hetccl-kernel-bench [--device N] [--sizes 64,256] [--iters 30] [--warmup 3]
//! ```
//!
//! For each size (MiB of f32 input, at least 64) every kernel runs `--iters` times after
//! `--warmup` runs, each timed by its own pair of CUDA events; the median is reported.
//! Runs rotate over several buffer sets totalling at least 512 MiB, so no run finds its
//! inputs in L2 (50 MiB on an H100). Bandwidth counts the bytes the kernel reads plus
//! writes; the memcpy row copies the f32 buffer (4 bytes read + 4 written per element).
//! The last lines are a compact table for scripts/gpu-check.sh.

use std::process::ExitCode;

use half::{bf16, f16};
use hetccl::device::{self, CudaSlice, Device, Stream};
use hetccl::{ReduceOp, Result};

struct Args {
    device: usize,
    sizes_mib: Vec<usize>,
    iters: usize,
    warmup: usize,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        device: 0,
        sizes_mib: vec![64, 256],
        iters: 30,
        warmup: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |s: String| s.parse::<usize>().map_err(|e| format!("{flag} {s}: {e}"));
        match flag.as_str() {
            "--device" => a.device = num(value()?)?,
            "--iters" => a.iters = num(value()?)?.max(1),
            "--warmup" => a.warmup = num(value()?)?,
            "--sizes" => {
                a.sizes_mib = value()?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>().map_err(|e| format!("--sizes {s}: {e}")))
                    .collect::<std::result::Result<_, _>>()?;
            }
            "-h" | "--help" => {
                return Err("usage: hetccl-kernel-bench [--device N] [--sizes 64,256] [--iters 30] [--warmup 3]".into())
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if let Some(s) = a.sizes_mib.iter().find(|&&s| s < 64) {
        return Err(format!(
            "size {s} MiB is below 64 MiB; small sizes measure L2, not memory"
        ));
    }
    Ok(a)
}

/// One set of buffers, n elements each.
struct Set {
    a: CudaSlice<f32>,
    b: CudaSlice<f32>,
    res: CudaSlice<f32>,
    h_in: CudaSlice<f16>,
    h_out: CudaSlice<f16>,
    z_in: CudaSlice<bf16>,
    z_out: CudaSlice<bf16>,
}

const SET_BYTES_PER_ELEM: usize = 4 + 4 + 4 + 2 + 2 + 2 + 2;

fn make_set(stream: &mut Stream, n: usize, seed: u32) -> Result<Set> {
    // A cheap deterministic pattern in [-1, 1): generating 64M random numbers on the host
    // would dominate the run.
    let host: Vec<f32> = (0..n as u32)
        .map(|i| {
            ((i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1u32 << 23) as f32)
                - 1.0
        })
        .collect();
    let a = stream.upload(&host)?;
    let b = stream.upload(&host)?;
    let res = stream.alloc_zeros::<f32>(n)?;
    let mut h_in = stream.alloc_zeros::<f16>(n)?;
    let h_out = stream.alloc_zeros::<f16>(n)?;
    let mut z_in = stream.alloc_zeros::<bf16>(n)?;
    let z_out = stream.alloc_zeros::<bf16>(n)?;
    device::fp16_compress(stream, &a, 1.0, None, &mut h_in)?;
    device::bf16_compress(stream, &a, 1.0, None, &mut z_in)?;
    stream.synchronize()?;
    stream.take_overflow_stats()?;
    Ok(Set {
        a,
        b,
        res,
        h_in,
        h_out,
        z_in,
        z_out,
    })
}

type Launch = fn(&Stream, &mut Set) -> Result<()>;

/// (name, bytes read + written per element, launch)
const KERNELS: &[(&str, usize, Launch)] = &[
    ("memcpy_dtod f32", 8, |s, x| s.copy(&x.a, &mut x.b)),
    ("fp16_compress+residual", 14, |s, x| {
        device::fp16_compress(s, &x.a, 0.25, Some(&mut x.res), &mut x.h_out)
    }),
    ("fp16_compress", 6, |s, x| {
        device::fp16_compress(s, &x.a, 0.25, None, &mut x.h_out)
    }),
    ("fp16_decompress", 6, |s, x| {
        device::fp16_decompress(s, &x.h_in, &mut x.b)
    }),
    ("fp16_decompress_add", 10, |s, x| {
        device::fp16_decompress_add(s, &x.h_in, &mut x.b)
    }),
    ("fp16_decompress_add_compress+res", 16, |s, x| {
        device::fp16_decompress_add_compress(s, &x.h_in, &x.a, 0.25, Some(&mut x.res), &mut x.h_out)
    }),
    ("bf16_compress+residual", 14, |s, x| {
        device::bf16_compress(s, &x.a, 0.25, Some(&mut x.res), &mut x.z_out)
    }),
    ("bf16_decompress_add_compress+res", 16, |s, x| {
        device::bf16_decompress_add_compress(s, &x.z_in, &x.a, 0.25, Some(&mut x.res), &mut x.z_out)
    }),
    ("reduce_inplace_sum_f32", 12, |s, x| {
        device::reduce_inplace(s, ReduceOp::Sum, &mut x.b, &x.a)
    }),
    ("reduce_from_sum_f32", 12, |s, x| {
        device::reduce_from(s, ReduceOp::Sum, &mut x.res, &x.a, &x.b)
    }),
    ("reduce_inplace_sum_f16", 6, |s, x| {
        device::reduce_inplace(s, ReduceOp::Sum, &mut x.h_out, &x.h_in)
    }),
    ("reduce_inplace_sum_bf16", 6, |s, x| {
        device::reduce_inplace(s, ReduceOp::Sum, &mut x.z_out, &x.z_in)
    }),
];

fn median_ms(
    stream: &Stream,
    sets: &mut [Set],
    warmup: usize,
    iters: usize,
    f: Launch,
) -> Result<f64> {
    let mut times = Vec::with_capacity(iters);
    for run in 0..warmup + iters {
        let k = run % sets.len();
        let set = &mut sets[k];
        let ms = stream.time(|s| f(s, set))?;
        if run >= warmup {
            times.push(ms as f64);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

struct Row {
    name: &'static str,
    mib: usize,
    us: f64,
    gbs: f64,
    vs_memcpy: f64,
}

fn run(args: &Args) -> Result<Vec<Row>> {
    let dev = Device::open(args.device)?;
    let mut stream = dev.new_stream()?;
    let (major, minor) = dev.compute_capability();
    println!(
        "device {}: {} (sm_{major}{minor}, {} SMs); median of {} runs after {} warm-up, CUDA events",
        dev.ordinal(),
        dev.name(),
        dev.sm_count(),
        args.iters,
        args.warmup
    );
    let mut rows = Vec::new();
    for &mib in &args.sizes_mib {
        let n = mib << 18; // f32 elements in `mib` MiB
        let set_bytes = n * SET_BYTES_PER_ELEM;
        let nsets = (512usize << 20).div_ceil(set_bytes).max(2);
        let mut sets = Vec::with_capacity(nsets);
        for k in 0..nsets {
            sets.push(make_set(&mut stream, n, k as u32)?);
        }
        println!(
            "\n{mib} MiB of f32 ({n} elements), {nsets} buffer sets rotated ({} MiB in all)",
            (nsets * set_bytes) >> 20
        );
        println!(
            "{:<34} {:>11} {:>9} {:>9}",
            "kernel", "median_us", "GB/s", "vs_memcpy"
        );
        let mut memcpy_gbs = f64::NAN;
        for &(name, bytes_per_elem, f) in KERNELS {
            let ms = median_ms(&stream, &mut sets, args.warmup, args.iters, f)?;
            let gbs = (bytes_per_elem * n) as f64 / (ms * 1e-3) / 1e9;
            if name.starts_with("memcpy") {
                memcpy_gbs = gbs;
            }
            let row = Row {
                name,
                mib,
                us: ms * 1e3,
                gbs,
                vs_memcpy: gbs / memcpy_gbs,
            };
            println!(
                "{:<34} {:>11.1} {:>9.1} {:>8.0}%",
                row.name,
                row.us,
                row.gbs,
                100.0 * row.vs_memcpy
            );
            rows.push(row);
        }
        // Counters were accumulating through the runs; read them so the next size starts clean.
        stream.take_overflow_stats()?;
    }
    Ok(rows)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Err(why) = device::available() {
        eprintln!("hetccl-kernel-bench: no GPU: {why}");
        return ExitCode::from(3);
    }
    match run(&args) {
        Ok(rows) => {
            println!("\nSUMMARY kernel MiB GB/s %memcpy");
            for r in rows {
                println!(
                    "SUMMARY {} {} {:.1} {:.0}",
                    r.name.replace(' ', "_"),
                    r.mib,
                    r.gbs,
                    100.0 * r.vs_memcpy
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hetccl-kernel-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
