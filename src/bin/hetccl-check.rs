//! `hetccl-check`: runs every collective, reduction and element type on the given
//! counts and checks each result against a closed form. Exits non-zero on the first
//! wrong element or error. Start it on every rank (launcher, mpirun or env vars):
//!
//! ```text
//! hetccl run -n 4 -- hetccl-check --counts 0,1,7,1000
//! ```
//!
//! Fault flags make one rank misbehave on purpose, for the failure tests: after one
//! all-reduce that works, rank `--fault-rank` exits (`exit`, status 17), dies by
//! `SIGKILL` (`kill`), stops itself with `SIGSTOP` (`stop`), or calls a collective that
//! differs from the others' (`count`, `dtype`, `op`, `private`).
//!
//! `--shared` puts the buffers in memory from `Communicator::alloc_shared` (at odd
//! offsets too), so the checks exercise the direct shared-buffer algorithms.
//!
//! `--soak N` runs N pseudo-random steps instead (the same on every rank, from
//! `--seed`): each a collective, in place or not, blocking or with others in flight,
//! with a random element type, reduction, size, root, algorithm (as `HETCCL_ALGO`
//! would set it) and private or shared buffers, checked bitwise against its closed
//! form. Resident memory (`VmRSS`) and open descriptors are measured after a warm-up
//! that runs every collective at the largest size under every algorithm, and at the
//! end: the soak fails if there are more descriptors than after the warm-up or if the
//! memory grew by more than `SOAK_RSS_SLACK_KIB`. A long soak:
//!
//! ```text
//! hetccl run -n 4 -- hetccl-check --soak 200000 --seed 7
//! ```

use std::process::ExitCode;
use std::time::Instant;

use half::{bf16, f16};
use hetccl::config::AlgoChoice;
use hetccl::{errln, outln, Communicator, Element, ReduceOp, SharedBuf};

/// Resident memory a soak may gain between the end of its warm-up and its end: room for
/// the allocator's own caching, far below what a leak of even a few bytes per step
/// adds over a long soak.
const SOAK_RSS_SLACK_KIB: u64 = 8 << 10;
/// Element counts a soak step picks from (the last is the warm-up's).
const SOAK_COUNTS: [usize; 9] = [0, 1, 3, 7, 64, 1000, 4099, 16_384, 70_000];
/// Kinds of soak step: one collective each, or (the last) several in flight at once.
const SOAK_KINDS: usize = 12;

struct Args {
    counts: Vec<usize>,
    iters: usize,
    mixed: usize,
    big_f32: Option<usize>,
    fault: String,
    fault_rank: usize,
    seed: u64,
    determinism: Option<usize>,
    shared: bool,
    compressed: Option<usize>,
    soak: Option<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        counts: vec![0, 1, 7, 1000],
        iters: 1,
        mixed: 0,
        big_f32: None,
        fault: "none".into(),
        fault_rank: 1,
        seed: 1,
        determinism: None,
        shared: false,
        compressed: None,
        soak: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--counts" => {
                a.counts = val()?
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<usize>()
                            .map_err(|e| format!("--counts: {e}"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--iters" => a.iters = val()?.parse().map_err(|e| format!("--iters: {e}"))?,
            "--mixed" => a.mixed = val()?.parse().map_err(|e| format!("--mixed: {e}"))?,
            "--big-f32" => a.big_f32 = Some(val()?.parse().map_err(|e| format!("--big-f32: {e}"))?),
            "--fault" => a.fault = val()?,
            "--fault-rank" => {
                a.fault_rank = val()?.parse().map_err(|e| format!("--fault-rank: {e}"))?
            }
            "--seed" => a.seed = val()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--shared" => a.shared = true,
            "--soak" => a.soak = Some(val()?.parse().map_err(|e| format!("--soak: {e}"))?),
            "--compressed" => {
                a.compressed = Some(val()?.parse().map_err(|e| format!("--compressed: {e}"))?)
            }
            "--determinism" => {
                a.determinism = Some(val()?.parse().map_err(|e| format!("--determinism: {e}"))?)
            }
            "-h" | "--help" => {
                outln!(
                    "usage: hetccl-check [--counts 0,1,7,1000] [--iters N] [--mixed N] [--big-f32 COUNT]\n\
                     \x20                   [--fault none|exit|kill|stop|count|dtype|op|private --fault-rank R] [--seed S]\n\
                     \x20                   [--determinism COUNT]  (prints a hash of an inexact f32 sum)\n\
                     \x20                   [--compressed COUNT]   (fp16/bf16 all-reduce within bounds, same bits everywhere)\n\
                     \x20                   [--shared]  (buffers from alloc_shared)\n\
                     \x20                   [--soak STEPS]  (random collectives, memory and descriptors flat)"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

/// Rank r's input element i for `op`: small integers whose reduction is exact in
/// every element type (sums stay below 128, products are powers of two).
fn input<T: Element>(op: ReduceOp, r: usize, i: usize, n: usize) -> T {
    let v = match op {
        ReduceOp::Prod => 1 + (r + i) % 2,
        ReduceOp::Max | ReduceOp::Min => (r * 3 + i) % n.max(1) + (i % 5),
        ReduceOp::Sum | ReduceOp::Avg => 1 + r + (i % 7),
    };
    T::from_f64(v as f64)
}

fn expected<T: Element>(op: ReduceOp, i: usize, n: usize) -> T {
    hetccl::reduce::fold(op, (0..n).map(|r| input::<T>(op, r, i, n)), n)
        .expect("a world has at least one rank")
}

struct Checker<'a> {
    comm: &'a Communicator,
    checks: usize,
    shared: bool,
}

/// A buffer in private memory, or a window `[off, off + len)` of a shared one.
enum Buf<T: Element> {
    Private(Vec<T>),
    Shared(SharedBuf<T>, usize, usize),
}

impl<T: Element> std::ops::Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Buf::Private(v) => v,
            Buf::Shared(s, off, len) => &s[*off..*off + *len],
        }
    }
}

impl<T: Element> std::ops::DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            Buf::Private(v) => v,
            Buf::Shared(s, off, len) => &mut s[*off..*off + *len],
        }
    }
}

/// `data` in a private or (collectively allocated) shared buffer; shared ones start at
/// element `off` of a larger allocation, so sub-slices are what the collective sees.
fn make_buf<T: Element>(
    comm: &Communicator,
    shared: bool,
    off: usize,
    data: Vec<T>,
) -> Result<Buf<T>, String> {
    if !shared {
        return Ok(Buf::Private(data));
    }
    let mut s = comm
        .alloc_shared::<T>(off + data.len() + 2)
        .map_err(|e| e.to_string())?;
    s[off..off + data.len()].copy_from_slice(&data);
    Ok(Buf::Shared(s, off, data.len()))
}

fn mismatch<T: Element>(what: &str, got: &[T], want: impl Fn(usize) -> T) -> Result<(), String> {
    for (i, g) in got.iter().enumerate() {
        let w = want(i);
        if *g != w && !(g.to_f64().is_nan() && w.to_f64().is_nan()) {
            let wrong = got
                .iter()
                .enumerate()
                .filter(|(j, x)| **x != want(*j))
                .count();
            return Err(format!(
                "{what}: element {i} is {g:?}, expected {w:?} ({wrong} wrong of {})",
                got.len()
            ));
        }
    }
    Ok(())
}

impl Checker<'_> {
    fn all_ops<T: Element>(&mut self, count: usize) -> Result<(), String> {
        let (r, n) = (self.comm.rank(), self.comm.world_size());
        let name = T::DTYPE.name();
        let (comm, sh) = (self.comm, self.shared);
        for (k, op) in ReduceOp::ALL.into_iter().enumerate() {
            let send_v: Vec<T> = (0..count).map(|i| input(op, r, i, n)).collect();
            let send = make_buf(comm, sh, k % 3, send_v.clone())?;
            // all_reduce in place and out of place
            let mut buf = make_buf(comm, sh, 1 + k % 2, send_v.clone())?;
            self.comm
                .all_reduce(&mut buf, op)
                .map_err(|e| e.to_string())?;
            mismatch(
                &format!("all_reduce {name} {op} count {count}"),
                &buf,
                |i| expected(op, i, n),
            )?;
            let mut out = make_buf(comm, sh, k % 2, vec![T::from_f64(0.0); count])?;
            self.comm
                .all_reduce_into(&send, &mut out, op)
                .map_err(|e| e.to_string())?;
            mismatch(
                &format!("all_reduce_into {name} {op} count {count}"),
                &out,
                |i| expected(op, i, n),
            )?;
            if sh {
                // A private input into a shared output.
                out.fill(T::from_f64(0.0));
                self.comm
                    .all_reduce_into(&send_v, &mut out, op)
                    .map_err(|e| e.to_string())?;
                mismatch(
                    &format!("all_reduce_into private->shared {name} {op} count {count}"),
                    &out,
                    |i| expected(op, i, n),
                )?;
            }

            // reduce_scatter: block b of rank r holds input element b*count + i
            let big = make_buf(
                comm,
                sh,
                k,
                (0..n * count).map(|i| input(op, r, i, n)).collect(),
            )?;
            let mut part = vec![T::from_f64(0.0); count];
            self.comm
                .reduce_scatter(&big, &mut part, op)
                .map_err(|e| e.to_string())?;
            mismatch(
                &format!("reduce_scatter {name} {op} count {count}"),
                &part,
                |i| expected(op, r * count + i, n),
            )?;

            // In place: this rank's block of the one buffer takes the result, the
            // other blocks stay as they were.
            let mut whole = make_buf(comm, sh, 1 + k % 2, big.to_vec())?;
            self.comm
                .reduce_scatter_in_place(&mut whole, op)
                .map_err(|e| e.to_string())?;
            mismatch(
                &format!("reduce_scatter_in_place {name} {op} count {count}"),
                &whole,
                |j| {
                    if j / count.max(1) == r {
                        expected(op, j, n)
                    } else {
                        input(op, r, j, n)
                    }
                },
            )?;

            let root = n - 1;
            let mut red = vec![T::from_f64(0.0); if r == root { count } else { 0 }];
            self.comm
                .reduce(&send, &mut red, op, root)
                .map_err(|e| e.to_string())?;
            if r == root {
                mismatch(&format!("reduce {name} {op} count {count}"), &red, |i| {
                    expected(op, i, n)
                })?;
            }
            // In place: the root's buffer takes the result, the others' are only read.
            let root = k % n;
            let mut red = make_buf(comm, sh, k % 3, send_v.clone())?;
            self.comm
                .reduce_in_place(&mut red, op, root)
                .map_err(|e| e.to_string())?;
            mismatch(
                &format!("reduce_in_place {name} {op} root {root} count {count}"),
                &red,
                |i| {
                    if r == root {
                        expected(op, i, n)
                    } else {
                        input(op, r, i, n)
                    }
                },
            )?;
            self.checks += 6;
        }
        // all_gather: block b = rank b's input
        let send = make_buf(
            comm,
            sh,
            5,
            (0..count)
                .map(|i| input(ReduceOp::Sum, r, i, n))
                .collect::<Vec<T>>(),
        )?;
        let mut all = vec![T::from_f64(0.0); n * count];
        self.comm
            .all_gather(&send, &mut all)
            .map_err(|e| e.to_string())?;
        mismatch(&format!("all_gather {name} count {count}"), &all, |j| {
            input(ReduceOp::Sum, j / count.max(1), j % count.max(1), n)
        })?;
        // In place: this rank's block is already in the buffer; the rest is 0, which no
        // input is.
        let mut all = make_buf(
            comm,
            sh,
            3,
            (0..n * count)
                .map(|j| match j / count.max(1) == r {
                    true => input(ReduceOp::Sum, r, j % count.max(1), n),
                    false => T::from_f64(0.0),
                })
                .collect::<Vec<T>>(),
        )?;
        self.comm
            .all_gather_in_place(&mut all)
            .map_err(|e| e.to_string())?;
        mismatch(
            &format!("all_gather_in_place {name} count {count}"),
            &all,
            |j| input(ReduceOp::Sum, j / count.max(1), j % count.max(1), n),
        )?;
        for root in [0, n / 2] {
            let mut b = make_buf(
                comm,
                sh,
                root,
                (0..count)
                    .map(|i| input(ReduceOp::Sum, r, i, n))
                    .collect::<Vec<T>>(),
            )?;
            self.comm
                .broadcast(&mut b, root)
                .map_err(|e| e.to_string())?;
            mismatch(
                &format!("broadcast {name} root {root} count {count}"),
                &b,
                |i| input(ReduceOp::Sum, root, i, n),
            )?;
        }
        // send/recv around the ring
        if n > 1 {
            let right = (r + 1) % n;
            let left = (r + n - 1) % n;
            let mine: Vec<T> = (0..count).map(|i| input(ReduceOp::Sum, r, i, n)).collect();
            let mut got = vec![T::from_f64(0.0); count];
            if r % 2 == 0 {
                self.comm.send(&mine, right).map_err(|e| e.to_string())?;
                self.comm.recv(&mut got, left).map_err(|e| e.to_string())?;
            } else {
                self.comm.recv(&mut got, left).map_err(|e| e.to_string())?;
                self.comm.send(&mine, right).map_err(|e| e.to_string())?;
            }
            mismatch(&format!("send/recv {name} count {count}"), &got, |i| {
                input(ReduceOp::Sum, left, i, n)
            })?;
        }
        self.comm.barrier().map_err(|e| e.to_string())?;
        self.checks += 5;
        Ok(())
    }

    /// A long pseudo-random sequence of collectives and sizes, the same on every rank,
    /// half of it through the non-blocking scope with several operations in flight.
    fn mixed(&mut self, steps: usize, seed: u64) -> Result<(), String> {
        let (r, n) = (self.comm.rank(), self.comm.world_size());
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for step in 0..steps {
            let count = [0usize, 1, 3, 64, 1000, 4099, 70_000][(next() % 7) as usize];
            match next() % 4 {
                0 => {
                    let (comm, sh) = (self.comm, self.shared);
                    let mut a = make_buf(
                        comm,
                        sh,
                        0,
                        (0..count)
                            .map(|i| input(ReduceOp::Sum, r, i, n))
                            .collect::<Vec<f32>>(),
                    )?;
                    let mut b = make_buf(
                        comm,
                        sh,
                        1,
                        (0..count)
                            .map(|i| input(ReduceOp::Max, r, i, n))
                            .collect::<Vec<i64>>(),
                    )?;
                    let mut c = make_buf(
                        comm,
                        sh,
                        3,
                        (0..count)
                            .map(|i| input(ReduceOp::Sum, r, i, n))
                            .collect::<Vec<bf16>>(),
                    )?;
                    // In place: every rank's blocks for a reduce-scatter, this rank's
                    // block (the rest zero) for an all-gather, one buffer for a reduce.
                    let blocks = (0..n * count).map(|j| input(ReduceOp::Sum, r, j, n));
                    let mut d = make_buf(comm, sh, 2, blocks.collect::<Vec<f32>>())?;
                    let own = |j: usize| match j / count.max(1) == r {
                        true => input(ReduceOp::Sum, r, j % count.max(1), n),
                        false => 0,
                    };
                    let mut e = make_buf(comm, sh, 1, (0..n * count).map(own).collect())?;
                    let mut f = make_buf(comm, sh, 0, a.to_vec())?;
                    let root = (step + 1) % n;
                    self.comm
                        .scope(|s| -> hetccl::Result<()> {
                            let h1 = s.all_reduce(&mut a, ReduceOp::Sum)?;
                            let h2 = s.all_reduce(&mut b, ReduceOp::Max)?;
                            let h3 = s.broadcast(&mut c, step % n)?;
                            let h4 = s.reduce_scatter_in_place(&mut d, ReduceOp::Sum)?;
                            let h5 = s.all_gather_in_place::<i32>(&mut e)?;
                            let h6 = s.reduce_in_place(&mut f, ReduceOp::Sum, root)?;
                            h3.wait()?;
                            h1.wait()?;
                            h5.wait()?;
                            h2.wait()?;
                            h6.wait()?;
                            h4.wait()
                        })
                        .map_err(|e| e.to_string())?;
                    mismatch("mixed async reduce_scatter_in_place f32", &d, |j| {
                        match j / count.max(1) == r {
                            true => expected(ReduceOp::Sum, j, n),
                            false => input(ReduceOp::Sum, r, j, n),
                        }
                    })?;
                    mismatch("mixed async all_gather_in_place i32", &e, |j| {
                        input(ReduceOp::Sum, j / count.max(1), j % count.max(1), n)
                    })?;
                    mismatch("mixed async reduce_in_place f32", &f, |i| match r == root {
                        true => expected(ReduceOp::Sum, i, n),
                        false => input(ReduceOp::Sum, r, i, n),
                    })?;
                    mismatch("mixed async all_reduce f32", &a, |i| {
                        expected(ReduceOp::Sum, i, n)
                    })?;
                    mismatch("mixed async all_reduce i64", &b, |i| {
                        expected(ReduceOp::Max, i, n)
                    })?;
                    mismatch("mixed async broadcast bf16", &c, |i| {
                        input(ReduceOp::Sum, step % n, i, n)
                    })?;
                }
                1 => self.all_ops_one::<f16>(count)?,
                2 => {
                    let send = make_buf(
                        self.comm,
                        self.shared,
                        2,
                        (0..count)
                            .map(|i| input(ReduceOp::Sum, r, i, n))
                            .collect::<Vec<i32>>(),
                    )?;
                    let mut all = vec![0i32; n * count];
                    self.comm
                        .all_gather(&send, &mut all)
                        .map_err(|e| e.to_string())?;
                    mismatch("mixed all_gather i32", &all, |j| {
                        input(ReduceOp::Sum, j / count.max(1), j % count.max(1), n)
                    })?;
                }
                _ => self.comm.barrier().map_err(|e| e.to_string())?,
            }
            self.checks += 1;
        }
        Ok(())
    }

    fn all_ops_one<T: Element>(&mut self, count: usize) -> Result<(), String> {
        let (r, n) = (self.comm.rank(), self.comm.world_size());
        let mut buf = make_buf(
            self.comm,
            self.shared,
            0,
            (0..count)
                .map(|i| input(ReduceOp::Sum, r, i, n))
                .collect::<Vec<T>>(),
        )?;
        self.comm
            .all_reduce(&mut buf, ReduceOp::Sum)
            .map_err(|e| e.to_string())?;
        mismatch("mixed all_reduce", &buf, |i| expected(ReduceOp::Sum, i, n))
    }
}

/// The pseudo-random source of a soak: xorshift64, the same sequence on every rank.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One soak step's collective.
#[derive(Clone, Copy, Debug)]
struct Step {
    kind: usize,
    op: ReduceOp,
    count: usize,
    root: usize,
    shared: bool,
}

impl Checker<'_> {
    /// Runs `st` on buffers of `T` and checks the result bitwise.
    fn soak_step<T: Element>(&mut self, st: Step) -> Result<(), String> {
        let (r, n) = (self.comm.rank(), self.comm.world_size());
        let (comm, sh) = (self.comm, st.shared);
        let Step {
            kind,
            op,
            count,
            root,
            ..
        } = st;
        let what = |name: &str| format!("soak {name} {} {op} count {count} root {root}", T::DTYPE);
        let e = |e: hetccl::Error| e.to_string();
        let mine = |i: usize| input::<T>(op, r, i, n);
        let zero = || T::from_f64(0.0);
        let blocks_in = |j: usize| input::<T>(op, r, j, n);
        match kind {
            0 => {
                let mut b = make_buf(comm, sh, 1, (0..count).map(mine).collect())?;
                comm.all_reduce(&mut b, op).map_err(e)?;
                mismatch(&what("all_reduce"), &b, |i| expected(op, i, n))
            }
            1 => {
                let send = make_buf(comm, sh, 0, (0..count).map(mine).collect())?;
                let mut out = make_buf(comm, sh, 2, vec![zero(); count])?;
                comm.all_reduce_into(&send, &mut out, op).map_err(e)?;
                mismatch(&what("all_reduce_into"), &out, |i| expected(op, i, n))
            }
            2 => {
                let big = make_buf(comm, sh, 3, (0..n * count).map(blocks_in).collect())?;
                let mut part = vec![zero(); count];
                comm.reduce_scatter(&big, &mut part, op).map_err(e)?;
                mismatch(&what("reduce_scatter"), &part, |i| {
                    expected(op, r * count + i, n)
                })
            }
            3 => {
                let mut b = make_buf(comm, sh, 1, (0..n * count).map(blocks_in).collect())?;
                comm.reduce_scatter_in_place(&mut b, op).map_err(e)?;
                mismatch(&what("reduce_scatter_in_place"), &b, |j| {
                    if j / count.max(1) == r {
                        expected(op, j, n)
                    } else {
                        input(op, r, j, n)
                    }
                })
            }
            4 => {
                let send = make_buf(comm, sh, 2, (0..count).map(mine).collect())?;
                let mut all = vec![zero(); n * count];
                comm.all_gather(&send, &mut all).map_err(e)?;
                mismatch(&what("all_gather"), &all, |j| {
                    input(op, j / count.max(1), j % count.max(1), n)
                })
            }
            5 => {
                let own = |j: usize| match j / count.max(1) == r {
                    true => input(op, r, j % count.max(1), n),
                    false => zero(),
                };
                let mut b = make_buf(comm, sh, 3, (0..n * count).map(own).collect())?;
                comm.all_gather_in_place(&mut b).map_err(e)?;
                mismatch(&what("all_gather_in_place"), &b, |j| {
                    input(op, j / count.max(1), j % count.max(1), n)
                })
            }
            6 => {
                let mut b = make_buf(comm, sh, 0, (0..count).map(mine).collect())?;
                comm.broadcast(&mut b, root).map_err(e)?;
                mismatch(&what("broadcast"), &b, |i| input(op, root, i, n))
            }
            7 => {
                let send = make_buf(comm, sh, 1, (0..count).map(mine).collect())?;
                let mut red = vec![zero(); if r == root { count } else { 0 }];
                comm.reduce(&send, &mut red, op, root).map_err(e)?;
                mismatch(&what("reduce"), &red, |i| expected(op, i, n))
            }
            8 => {
                let mut b = make_buf(comm, sh, 2, (0..count).map(mine).collect())?;
                comm.reduce_in_place(&mut b, op, root).map_err(e)?;
                mismatch(&what("reduce_in_place"), &b, |i| match r == root {
                    true => expected(op, i, n),
                    false => input(op, r, i, n),
                })
            }
            9 => {
                let (right, left) = ((r + 1) % n, (r + n - 1) % n);
                let send: Vec<T> = (0..count).map(mine).collect();
                let mut got = vec![zero(); count];
                if r % 2 == 0 {
                    comm.send(&send, right).map_err(e)?;
                    comm.recv(&mut got, left).map_err(e)?;
                } else {
                    comm.recv(&mut got, left).map_err(e)?;
                    comm.send(&send, right).map_err(e)?;
                }
                mismatch(&what("send/recv"), &got, |i| input(op, left, i, n))
            }
            10 => comm.barrier().map_err(e),
            _ => {
                // Three at once through the scope, waited for out of order.
                let mut a = make_buf(comm, sh, 1, (0..count).map(mine).collect())?;
                let mut b = make_buf(comm, sh, 0, (0..count).map(mine).collect())?;
                let mut c = make_buf(comm, sh, 2, (0..n * count).map(blocks_in).collect())?;
                comm.scope(|s| -> hetccl::Result<()> {
                    let h1 = s.all_reduce(&mut a, op)?;
                    let h2 = s.broadcast(&mut b, root)?;
                    let h3 = s.reduce_scatter_in_place(&mut c, op)?;
                    h2.wait()?;
                    h3.wait()?;
                    h1.wait()
                })
                .map_err(e)?;
                mismatch(&what("async all_reduce"), &a, |i| expected(op, i, n))?;
                mismatch(&what("async broadcast"), &b, |i| input(op, root, i, n))?;
                mismatch(&what("async reduce_scatter_in_place"), &c, |j| {
                    if j / count.max(1) == r {
                        expected(op, j, n)
                    } else {
                        input(op, r, j, n)
                    }
                })
            }
        }
    }

    /// `st` on a random element type.
    fn soak_any(&mut self, dtype: usize, st: Step) -> Result<(), String> {
        match dtype {
            0 => self.soak_step::<f32>(st),
            1 => self.soak_step::<f64>(st),
            2 => self.soak_step::<f16>(st),
            3 => self.soak_step::<bf16>(st),
            4 => self.soak_step::<i32>(st),
            5 => self.soak_step::<i64>(st),
            _ => self.soak_step::<u8>(st),
        }
    }
}

/// This process's resident memory (KiB, `VmRSS`) and open descriptors.
fn resources() -> Result<(u64, usize), String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("reading /proc/self/status: {e}"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or("no VmRSS line in /proc/self/status")?;
    let fds = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| format!("listing /proc/self/fd: {e}"))?
        .count();
    Ok((rss, fds))
}

/// Runs the soak (see the module docs); returns what it measured.
fn soak(comm: &mut Communicator, steps: usize, seed: u64, shared: bool) -> Result<String, String> {
    let n = comm.world_size();
    let algo_before = comm.config().algo;
    // Warm-up: every kind at the largest size and the widest type, under every
    // algorithm, so the allocator has seen the largest buffers before the first count.
    let largest = SOAK_COUNTS[SOAK_COUNTS.len() - 1];
    for algo in AlgoChoice::ALL {
        comm.set_algorithm(algo);
        let mut ck = Checker {
            comm,
            checks: 0,
            shared,
        };
        for kind in 0..SOAK_KINDS {
            for sh in [false, true] {
                let st = Step {
                    kind,
                    op: ReduceOp::Sum,
                    count: largest,
                    root: n - 1,
                    shared: sh,
                };
                ck.soak_step::<f64>(st)?;
            }
        }
    }
    let (rss0, fds0) = resources()?;
    let mut rng = Rng::new(seed);
    let t0 = Instant::now();
    for i in 0..steps {
        let algo = AlgoChoice::ALL[rng.below(AlgoChoice::ALL.len())];
        comm.set_algorithm(algo);
        let st = Step {
            kind: rng.below(SOAK_KINDS),
            op: ReduceOp::ALL[rng.below(ReduceOp::ALL.len())],
            count: SOAK_COUNTS[rng.below(SOAK_COUNTS.len())],
            root: rng.below(n),
            // Shared buffers in one step of four (each is a collective allocation).
            shared: shared || rng.below(4) == 0,
        };
        let dtype = rng.below(7);
        let mut ck = Checker {
            comm,
            checks: 0,
            shared,
        };
        ck.soak_any(dtype, st)
            .map_err(|e| format!("soak step {i} ({algo:?} {st:?}, dtype #{dtype}): {e}"))?;
    }
    comm.set_algorithm(algo_before);
    let (rss1, fds1) = resources()?;
    let said = format!(
        "soak of {steps} steps in {:.2}s: resident memory {rss0} -> {rss1} KiB, open \
         descriptors {fds0} -> {fds1}",
        t0.elapsed().as_secs_f64()
    );
    // Fewer is fine: rank 0's store lets go of connections as the others finish with it.
    if fds1 > fds0 {
        return Err(format!("{said}: descriptors are not flat"));
    }
    if rss1 > rss0 + SOAK_RSS_SLACK_KIB {
        return Err(format!(
            "{said}: resident memory grew by more than {SOAK_RSS_SLACK_KIB} KiB"
        ));
    }
    Ok(said)
}

fn fault(comm: &Communicator, a: &Args) -> Result<(), String> {
    let (r, n) = (comm.rank(), comm.world_size());
    let count = a.counts.iter().copied().max().unwrap_or(1000).max(1);
    let mut buf = make_buf(comm, a.shared, 0, vec![1.0f32; count])?;
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

/// All-reduces pseudo-random f32 values whose sum rounds differently in different
/// orders, and prints a hash of the result: equal hashes across ranks and runs show
/// the reduction order is fixed.
fn determinism(comm: &Communicator, count: usize, seed: u64, shared: bool) -> Result<(), String> {
    let mut x = (seed ^ (comm.rank() as u64 + 1)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<f32> = (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 1e3 - 5e2
        })
        .collect();
    let mut buf = make_buf(comm, shared, 0, data)?;
    comm.all_reduce(&mut buf, ReduceOp::Sum)
        .map_err(|e| e.to_string())?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in buf.iter() {
        h = (h ^ v.to_bits() as u64).wrapping_mul(0x100_0000_01b3);
    }
    outln!("determinism hash {h:016x}");
    Ok(())
}

/// Compressed all-reduce of f32 values in [-1, 1): every wire format, mode and both
/// reductions that compress, checked against the exact sum within the format's bound
/// (n terms, each rounded once before the sum and the result rounded once after), and a
/// hash printed so the test can compare ranks.
fn compressed(comm: &Communicator, count: usize) -> Result<usize, String> {
    use hetccl::communicator::Compression;
    use hetccl::compression::{Compressor, ScalePolicy, WireFormat};
    use hetccl::config::CompressMode;
    let (r, n) = (comm.rank(), comm.world_size());
    let val = |rank: usize, i: usize| ((i * 7 + rank * 13) % 1000) as f32 / 500.0 - 1.0;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut checks = 0;
    for format in [WireFormat::F16, WireFormat::Bf16] {
        // Relative precision of the format: 2^-11 (fp16), 2^-8 (bf16).
        let eps = if format == WireFormat::F16 {
            2f64.powi(-11)
        } else {
            2f64.powi(-8)
        };
        let mut comp = Compressor::new(format, ScalePolicy::InverseWorldSize, true)
            .map_err(|e| e.to_string())?;
        for mode in [CompressMode::Inter, CompressMode::All] {
            for op in [ReduceOp::Sum, ReduceOp::Avg] {
                let mut buf: Vec<f32> = (0..count).map(|i| val(r, i)).collect();
                let stats = comm
                    .all_reduce_compressed(
                        &mut buf,
                        op,
                        Compression {
                            mode,
                            compressor: &mut comp,
                            buffer: 1,
                        },
                    )
                    .map_err(|e| e.to_string())?;
                if !stats.is_clean() {
                    return Err(format!(
                        "compressed {format} {op}: unexpected overflow {stats:?}"
                    ));
                }
                for (i, got) in buf.iter().enumerate() {
                    let mut exact: f64 = (0..n).map(|k| val(k, i) as f64).sum();
                    if op == ReduceOp::Avg {
                        exact /= n as f64;
                    }
                    // Each hop may round a partial sum once more: n + 2 roundings of
                    // values no larger than the sum of magnitudes.
                    let mag: f64 = (0..n).map(|k| val(k, i).abs() as f64).sum::<f64>()
                        / if op == ReduceOp::Avg { n as f64 } else { 1.0 };
                    let bound = (n as f64 + 2.0) * eps * mag.max(1e-3) + 1e-6;
                    if (*got as f64 - exact).abs() > bound {
                        return Err(format!(
                            "compressed {format} {mode:?} {op} element {i}: {got} vs exact {exact} (bound {bound:e})"
                        ));
                    }
                    h = (h ^ got.to_bits() as u64).wrapping_mul(0x100_0000_01b3);
                }
                checks += 1;
            }
        }
    }
    outln!("compressed hash {h:016x}");
    Ok(checks)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            errln!("hetccl-check: {e}");
            return ExitCode::from(2);
        }
    };
    let mut comm = match Communicator::init_from_env() {
        Ok(c) => c,
        Err(e) => {
            errln!("hetccl-check: init failed: {e}");
            return ExitCode::from(1);
        }
    };
    if args.shared && comm.rank() == 0 {
        // Lets tests look for files this job might have left in /dev/shm.
        outln!(
            "shared buffers, job {}",
            comm.config().job_id.as_deref().unwrap_or("-")
        );
    }
    let t0 = Instant::now();
    let result = if args.fault != "none" {
        fault(&comm, &args)
    } else if let Some(steps) = args.soak {
        soak(&mut comm, steps, args.seed, args.shared).map(|said| {
            outln!(
                "rank {}/{}: {said}; checks passed",
                comm.rank(),
                comm.world_size()
            )
        })
    } else if let Some(count) = args.determinism {
        determinism(&comm, count, args.seed, args.shared)
    } else if let Some(count) = args.compressed {
        compressed(&comm, count).map(|k| {
            outln!(
                "rank {}/{}: {k} checks passed",
                comm.rank(),
                comm.world_size()
            )
        })
    } else {
        let mut ck = Checker {
            comm: &comm,
            checks: 0,
            shared: args.shared,
        };
        let run = |ck: &mut Checker| -> Result<(), String> {
            for _ in 0..args.iters {
                for &count in &args.counts {
                    ck.all_ops::<f32>(count)?;
                    ck.all_ops::<f64>(count)?;
                    ck.all_ops::<f16>(count)?;
                    ck.all_ops::<bf16>(count)?;
                    ck.all_ops::<i32>(count)?;
                    ck.all_ops::<i64>(count)?;
                    ck.all_ops::<u8>(count)?;
                }
            }
            if let Some(big) = args.big_f32 {
                ck.all_ops_one::<f32>(big)?;
                ck.all_ops_one::<bf16>(big)?;
            }
            ck.mixed(args.mixed, args.seed)
        };
        let r = run(&mut ck);
        if r.is_ok() {
            outln!(
                "rank {}/{}: {} checks passed in {:.2}s",
                comm.rank(),
                comm.world_size(),
                ck.checks,
                t0.elapsed().as_secs_f64()
            );
        }
        r
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("hetccl-check: rank {}: FAILED: {e}", comm.rank());
            ExitCode::from(1)
        }
    }
}
