//! The memory floor of each collective on one host: what two ranks' passes over their
//! own buffers cost when nothing is communicated at all, with the crate's own
//! streaming kernels. Each of two threads, pinned to its own CPU, does at once what
//! one rank of a 2-rank collective at least has to do with its private buffers:
//!
//! - all-reduce: read its input (S bytes), write its output (S);
//! - reduce-scatter: read its input (S), write its block (S/2) as the sum of the halves;
//! - all-gather: read its input (S/2), write both blocks of its output (S).
//!
//! Each pattern is timed with ordinary and with streaming stores, and the faster
//! counts. busbw follows nccl-tests (2 ranks: all-reduce S/t, the other two S/2t), so
//! the ratios printed are the best a reduce-scatter or all-gather can reach against an
//! all-reduce that runs at its own floor. Memory is touched before timing; each size
//! is timed `REPEATS` times, the median printed.
//!
//! ```text
//! cargo run --release --example memory_floor [SIZE_MIB ...]   # default 16 64 256
//! ```

use std::sync::{Arc, Barrier};
use std::time::Instant;

use hetccl::reduce::{copy_bytes, reduce_n, reduce_n_streaming};
use hetccl::ReduceOp;

const REPEATS: usize = 7;
/// Piece of the all-gather's two copies: the second reads the input from cache.
const PIECE: usize = 256 << 10;

#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    AllReduce,
    ReduceScatter,
    AllGather,
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the call only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % libc::CPU_SETSIZE as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// One rank's pass over `input` into `out`, with streaming stores or without.
fn pass(p: Pattern, streaming: bool, input: &[f32], out: &mut [f32]) {
    let n = input.len();
    let h = n / 2;
    // SAFETY: every pointer below stays inside `input` (n elements) or `out` (n
    // elements), and the two vectors do not overlap.
    unsafe {
        let (src, dst) = (input.as_ptr(), out.as_mut_ptr());
        match p {
            Pattern::AllReduce => copy_bytes(dst.cast(), src.cast(), n * 4, streaming),
            Pattern::ReduceScatter if streaming => {
                reduce_n_streaming(ReduceOp::Sum, dst, &[src, src.add(h)], h, 2)
            }
            Pattern::ReduceScatter => reduce_n(ReduceOp::Sum, dst, &[src, src.add(h)], h, 2),
            Pattern::AllGather => {
                let piece = PIECE / 4;
                let mut a = 0;
                while a < h {
                    let m = piece.min(h - a);
                    copy_bytes(dst.add(a).cast(), src.add(a).cast(), m * 4, streaming);
                    copy_bytes(dst.add(h + a).cast(), src.add(a).cast(), m * 4, streaming);
                    a += m;
                }
            }
        }
    }
}

/// Median seconds of the slower thread over `REPEATS` timed rounds of `p`.
fn time(p: Pattern, streaming: bool, bytes: usize) -> f64 {
    let threads = 2;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|cpu| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                pin(cpu);
                let n = bytes / 4;
                let input: Vec<f32> = (0..n).map(|i| (i % 13) as f32).collect();
                let mut out = vec![1.0f32; n];
                pass(p, streaming, &input, &mut out);
                let mut times = Vec::with_capacity(REPEATS);
                for _ in 0..REPEATS {
                    barrier.wait();
                    let t = Instant::now();
                    pass(p, streaming, &input, &mut out);
                    times.push(t.elapsed().as_secs_f64());
                    barrier.wait();
                }
                times
            })
        })
        .collect();
    let per_thread: Vec<Vec<f64>> = handles
        .into_iter()
        .map(|h| h.join().expect("a timing thread panicked"))
        .collect();
    let mut slowest: Vec<f64> = (0..REPEATS)
        .map(|k| per_thread.iter().map(|t| t[k]).fold(0.0, f64::max))
        .collect();
    slowest.sort_by(f64::total_cmp);
    slowest[REPEATS / 2]
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>().expect("sizes are MiB, as integers") << 20)
        .collect();
    let sizes = if sizes.is_empty() {
        vec![16 << 20, 64 << 20, 256 << 20]
    } else {
        sizes
    };
    println!("| size (B) | all_reduce busbw | reduce_scatter busbw | all_gather busbw |");
    println!("| ---: | ---: | ---: | ---: |");
    for bytes in sizes {
        let s = bytes as f64;
        let best = |p| time(p, false, bytes).min(time(p, true, bytes));
        let ar = s / best(Pattern::AllReduce) / 1e9;
        let rs = s / 2.0 / best(Pattern::ReduceScatter) / 1e9;
        let ag = s / 2.0 / best(Pattern::AllGather) / 1e9;
        println!(
            "| {bytes} | {ar:.2} | {rs:.2} ({:.0} %) | {ag:.2} ({:.0} %) |",
            100.0 * rs / ar,
            100.0 * ag / ar
        );
    }
}
