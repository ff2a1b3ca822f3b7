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
//! A last column runs the least a 2-rank all-reduce of private buffers through shared
//! memory has to do, with nothing else around it: the two threads exchange 512 KiB
//! pieces through two single-producer rings of 4 slots (one per direction, the depth
//! and chunk hetccl uses), each piece of the half a thread owns reduced straight into
//! its outgoing slot and copied from there into its output, the other half copied in
//! from the peer's slots (streaming copies into the output from 32 MiB on, as hetccl
//! does). It measures what the copies through slots cost when the peer's core wrote
//! them, which the floor leaves out.
//!
//! ```text
//! cargo run --release --example memory_floor [SIZE_MIB ...]   # default 16 64 256
//! ```

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// The median over rounds of the slower thread's time, each thread having returned its
/// `REPEATS` round times.
fn median_of_slowest(handles: Vec<std::thread::JoinHandle<Vec<f64>>>) -> f64 {
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
    median_of_slowest(handles)
}

/// Slots per ring and bytes per slot: hetccl's pipeline depth and chunk.
const SLOTS: u64 = 4;
const SLOT_BYTES: usize = 512 << 10;

/// A counter alone on its cache line.
#[repr(align(64))]
struct Counter(AtomicU64);

/// One direction between the two threads: `SLOTS` slots, the producer's count of
/// published slots and the consumer's count of released ones.
struct Ring {
    data: Box<[UnsafeCell<u8>]>,
    published: Counter,
    released: Counter,
}

// SAFETY: a slot is written only by the producer between its release and its
// publication, and read only by the consumer (and the producer) after its publication;
// the counters order those accesses (Release on publish and release, Acquire on wait).
unsafe impl Sync for Ring {}

impl Ring {
    fn new() -> Ring {
        Ring {
            data: (0..SLOTS as usize * SLOT_BYTES)
                .map(|_| UnsafeCell::new(0))
                .collect(),
            published: Counter(AtomicU64::new(0)),
            released: Counter(AtomicU64::new(0)),
        }
    }

    fn slot(&self, seq: u64) -> *mut u8 {
        self.data[(seq % SLOTS) as usize * SLOT_BYTES].get()
    }

    /// The producer's next slot, once the consumer has released it.
    fn room(&self, seq: u64) -> *mut u8 {
        while seq - self.released.0.load(Ordering::Acquire) >= SLOTS {
            std::hint::spin_loop();
        }
        self.slot(seq)
    }

    fn publish(&self, seq: u64) {
        self.published.0.store(seq + 1, Ordering::Release);
    }

    /// The consumer's next slot, once the producer has published it.
    fn arrived(&self, seq: u64) -> *const u8 {
        while self.published.0.load(Ordering::Acquire) <= seq {
            std::hint::spin_loop();
        }
        self.slot(seq)
    }

    fn release(&self, seq: u64) {
        self.released.0.store(seq + 1, Ordering::Release);
    }
}

/// One timed round of the all-reduce through slots on thread `me` (0 or 1); `sent` and
/// `got` count the pieces this thread has put into `out` and taken from `inn` so far.
fn ring_pass(
    me: usize,
    input: &[f32],
    out_buf: &mut [f32],
    rings: &[Ring; 2],
    seqs: &mut (u64, u64),
) {
    let (out, inn) = (&rings[me], &rings[1 - me]);
    let n = input.len();
    let h = n / 2;
    let (mine, theirs) = if me == 0 { (0, h) } else { (h, 0) };
    let piece = SLOT_BYTES / 4;
    let streaming = n * 4 >= 32 << 20;
    let (sent, got) = seqs;
    let (src, dst) = (input.as_ptr(), out_buf.as_mut_ptr());
    let mut a = 0;
    // SAFETY: every range below lies inside `input` or `out_buf` (n elements each), or
    // inside one slot (SLOT_BYTES); the rings order the slot accesses (see Ring).
    unsafe {
        while a < h {
            let m = piece.min(h - a);
            // Reduce-scatter: the peer's half of this piece goes out as it is.
            let slot = out.room(*sent);
            copy_bytes(slot, src.add(theirs + a).cast(), m * 4, false);
            out.publish(*sent);
            *sent += 1;
            // The peer's copy of this thread's half arrives: sum it into the next
            // outgoing slot (the all-gather's first send), then into the output.
            let peer = inn.arrived(*got).cast::<f32>();
            let slot = out.room(*sent).cast::<f32>();
            reduce_n(ReduceOp::Sum, slot, &[src.add(mine + a), peer], m, 2);
            inn.release(*got);
            *got += 1;
            out.publish(*sent);
            *sent += 1;
            copy_bytes(dst.add(mine + a).cast(), slot.cast(), m * 4, streaming);
            // All-gather: the peer's reduced piece lands in the output.
            let reduced = inn.arrived(*got);
            copy_bytes(dst.add(theirs + a).cast(), reduced, m * 4, streaming);
            inn.release(*got);
            *got += 1;
            a += m;
        }
    }
}

/// Median seconds of the slower thread over `REPEATS` rounds of the all-reduce through
/// slots.
fn time_ring(bytes: usize) -> f64 {
    let rings = Arc::new([Ring::new(), Ring::new()]);
    let barrier = Arc::new(Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|me| {
            let (rings, barrier) = (Arc::clone(&rings), Arc::clone(&barrier));
            std::thread::spawn(move || {
                pin(me);
                let n = bytes / 4;
                let input: Vec<f32> = (0..n).map(|i| (i % 13) as f32).collect();
                let mut out = vec![1.0f32; n];
                let mut seqs = (0, 0);
                ring_pass(me, &input, &mut out, &rings, &mut seqs);
                let want = |i: usize| 2.0 * (i % 13) as f32;
                assert!(
                    out.iter().enumerate().all(|(i, &x)| x == want(i)),
                    "the all-reduce through slots summed wrongly"
                );
                let mut times = Vec::with_capacity(REPEATS);
                for _ in 0..REPEATS {
                    barrier.wait();
                    let t = Instant::now();
                    ring_pass(me, &input, &mut out, &rings, &mut seqs);
                    times.push(t.elapsed().as_secs_f64());
                    barrier.wait();
                }
                times
            })
        })
        .collect();
    median_of_slowest(handles)
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
    println!(
        "| size (B) | all_reduce busbw | reduce_scatter busbw | all_gather busbw | \
         all_reduce through slots |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for bytes in sizes {
        let s = bytes as f64;
        let best = |p| time(p, false, bytes).min(time(p, true, bytes));
        let ar = s / best(Pattern::AllReduce) / 1e9;
        let rs = s / 2.0 / best(Pattern::ReduceScatter) / 1e9;
        let ag = s / 2.0 / best(Pattern::AllGather) / 1e9;
        let slots = s / time_ring(bytes) / 1e9;
        println!(
            "| {bytes} | {ar:.2} | {rs:.2} ({:.0} %) | {ag:.2} ({:.0} %) | {slots:.2} ({:.0} %) |",
            100.0 * rs / ar,
            100.0 * ag / ar,
            100.0 * slots / ar
        );
    }
}
