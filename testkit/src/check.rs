//! The checks of `hetccl-check`, for that tool and for tests alike: every collective,
//! reduction and element type on given counts, checked bitwise against the closed forms
//! of [`crate::oracle`]; a long mixed sequence with operations in flight; a soak; a
//! determinism hash; compressed all-reduces within their bounds. [`Options`] holds the
//! flags that choose them (`hetccl-check --help` lists them), [`main`] is a whole rank.
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
//! memory grew by more than `SOAK_RSS_SLACK_KIB`.
//!
//! In a test, the ranks are the test's own executable: [`launch`] (or [`spawn`], and
//! [`command`] or [`argv`] for ranks started another way) runs it as each rank with only
//! the ignored entry test [`ENTRY`], which calls [`rank_main`]; the checks' flags travel
//! in [`ARGS_VAR`]. Each rank prints what `hetccl-check` prints (`rank R/N: K checks
//! passed in Ts`, `determinism hash H`, ...) and exits 0, or 1 after `check rank: rank R:
//! FAILED: why`.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use half::{bf16, f16};
use hetccl::config::AlgoChoice;
use hetccl::{errln, outln, Communicator, Element, ReduceOp};

use crate::oracle::{expected, input, make_buf, mismatch};
use crate::ranks::{assert_all_ok, collect, spawn_ranks, this_test, this_test_argv};

/// Resident memory a soak may gain between the end of its warm-up and its end: room for
/// the allocator's own caching, far below what a leak of even a few bytes per step
/// adds over a long soak.
const SOAK_RSS_SLACK_KIB: u64 = 8 << 10;
/// Element counts a soak step picks from (the last is the warm-up's).
const SOAK_COUNTS: [usize; 9] = [0, 1, 3, 7, 64, 1000, 4099, 16_384, 70_000];
/// Kinds of soak step: one collective each, or (the last) several in flight at once.
const SOAK_KINDS: usize = 12;

/// Which checks to run, from the flags `--counts`, `--iters`, `--mixed`, `--big-f32`,
/// `--seed`, `--determinism`, `--compressed`, `--shared`, `--soak` and `--split`.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// Element counts every collective runs with.
    pub counts: Vec<usize>,
    /// Times the whole set of counts is run.
    pub iters: usize,
    /// Steps of the mixed sequence after the counts.
    pub mixed: usize,
    /// One f32 and one bf16 all-reduce of this many elements.
    pub big_f32: Option<usize>,
    /// Seed of the mixed sequence, the soak and the determinism data.
    pub seed: u64,
    /// Only the determinism hash of an all-reduce of this many elements.
    pub determinism: Option<usize>,
    /// Buffers from `Communicator::alloc_shared`.
    pub shared: bool,
    /// Only compressed all-reduces of this many elements.
    pub compressed: Option<usize>,
    /// Only a soak of this many steps.
    pub soak: Option<usize>,
    /// Only splits of the communicator, checked in the new ones.
    pub split: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            counts: vec![0, 1, 7, 1000],
            iters: 1,
            mixed: 0,
            big_f32: None,
            seed: 1,
            determinism: None,
            shared: false,
            compressed: None,
            soak: None,
            split: false,
        }
    }
}

impl Options {
    /// Takes `flag`, reading its value (if it has one) from `val`; `Ok(false)` when it is
    /// not one of these flags, so a tool can add its own.
    pub fn flag(
        &mut self,
        flag: &str,
        mut val: impl FnMut() -> Result<String, String>,
    ) -> Result<bool, String> {
        match flag {
            "--counts" => {
                self.counts = val()?
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<usize>()
                            .map_err(|e| format!("--counts: {e}"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--iters" => self.iters = val()?.parse().map_err(|e| format!("--iters: {e}"))?,
            "--mixed" => self.mixed = val()?.parse().map_err(|e| format!("--mixed: {e}"))?,
            "--big-f32" => {
                self.big_f32 = Some(val()?.parse().map_err(|e| format!("--big-f32: {e}"))?)
            }
            "--seed" => self.seed = val()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--shared" => self.shared = true,
            "--split" => self.split = true,
            "--soak" => self.soak = Some(val()?.parse().map_err(|e| format!("--soak: {e}"))?),
            "--compressed" => {
                self.compressed = Some(val()?.parse().map_err(|e| format!("--compressed: {e}"))?)
            }
            "--determinism" => {
                self.determinism = Some(val()?.parse().map_err(|e| format!("--determinism: {e}"))?)
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Options from flags and values, e.g. `["--counts", "0,7", "--mixed", "20"]`.
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Options, String> {
        let mut o = Options::default();
        let mut it = args.iter().map(|a| a.as_ref().to_string());
        while let Some(flag) = it.next() {
            let val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            if !o.flag(&flag, val)? {
                return Err(format!("unknown flag {flag}"));
            }
        }
        Ok(o)
    }
}

/// Runs collectives on one communicator and counts the checks that passed.
struct Checker<'a> {
    comm: &'a Communicator,
    checks: usize,
    shared: bool,
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

/// One split's new communicator against what it must be: this rank's place among the
/// parent ranks `members` (in their new order), who they are (an all-gather of parent
/// ranks) and a sum over exactly them. Returns the checks passed.
fn check_member(
    what: &str,
    comm: &Communicator,
    child: &Communicator,
    members: &[usize],
) -> Result<usize, String> {
    let want_rank = members.iter().position(|&r| r == comm.rank());
    if Some(child.rank()) != want_rank || child.world_size() != members.len() {
        return Err(format!(
            "{what}: rank {} of {} in the new communicator, expected {want_rank:?} of {}",
            child.rank(),
            child.world_size(),
            members.len()
        ));
    }
    let mut who = vec![0i64; members.len()];
    child
        .all_gather(&[comm.rank() as i64], &mut who)
        .map_err(|e| format!("{what}: all_gather: {e}"))?;
    let want: Vec<i64> = members.iter().map(|&r| r as i64).collect();
    if who != want {
        return Err(format!("{what}: members {who:?}, expected {want:?}"));
    }
    let mut sum = vec![(comm.rank() + 1) as f32; 1000];
    child
        .all_reduce(&mut sum, ReduceOp::Sum)
        .map_err(|e| format!("{what}: all_reduce: {e}"))?;
    let want = members.iter().map(|&r| (r + 1) as f32).sum::<f32>();
    mismatch(what, &sum, |_| want)?;
    Ok(3)
}

/// `Communicator::split` three ways, each new communicator checked by
/// [`check_member`]: by parity with keys that reverse the order; every rank but 0
/// (which passes no colour) into one; a split of a split. The parent keeps working
/// beside its children, and is checked last, after they are gone.
fn splits(comm: &Communicator) -> Result<usize, String> {
    let (r, n) = (comm.rank(), comm.world_size());
    let mut checks = 0;

    let child = comm
        .split(Some((r % 2) as u32), -(r as i32))
        .map_err(|e| format!("split by parity: {e}"))?
        .ok_or("split by parity: no communicator for a colour")?;
    let parity: Vec<usize> = (0..n).rev().filter(|q| q % 2 == r % 2).collect();
    checks += check_member("split by parity", comm, &child, &parity)?;

    let without_0 = comm
        .split((r != 0).then_some(0), 0)
        .map_err(|e| format!("split without rank 0: {e}"))?;
    match (r, without_0) {
        (0, None) => checks += 1,
        (0, Some(_)) => return Err("split without rank 0: rank 0 got a communicator".into()),
        (_, Some(c)) => {
            let rest: Vec<usize> = (1..n).collect();
            checks += check_member("split without rank 0", comm, &c, &rest)?;
        }
        (_, None) => return Err("split without rank 0: no communicator".into()),
    }

    // The split of a split, while the parent runs a collective of its own first.
    let mut x = vec![r as f64; 7];
    comm.all_reduce(&mut x, ReduceOp::Max)
        .map_err(|e| format!("parent all_reduce beside a split: {e}"))?;
    mismatch("parent all_reduce beside a split", &x, |_| (n - 1) as f64)?;
    checks += 1;
    let grandchild = child
        .split(Some(0), 0)
        .map_err(|e| format!("split of a split: {e}"))?
        .ok_or("split of a split: no communicator")?;
    // Equal keys: the order of the ranks in the communicator split.
    checks += check_member("split of a split", comm, &grandchild, &parity)?;
    drop(grandchild);
    drop(child);

    let mut sum = vec![1u8; 3];
    comm.all_reduce(&mut sum, ReduceOp::Sum)
        .map_err(|e| format!("parent all_reduce after its splits: {e}"))?;
    mismatch("parent all_reduce after its splits", &sum, |_| n as u8)?;
    Ok(checks + 1)
}

/// Runs the checks `o` asks for on `comm` and prints their result lines: `determinism
/// hash H`, `compressed hash H` then `rank R/N: K checks passed`, a soak's figures then
/// `; checks passed`, or `rank R/N: K checks passed in Ts`.
pub fn run(comm: &mut Communicator, o: &Options) -> Result<(), String> {
    let t0 = Instant::now();
    if let Some(steps) = o.soak {
        let said = soak(comm, steps, o.seed, o.shared)?;
        outln!(
            "rank {}/{}: {said}; checks passed",
            comm.rank(),
            comm.world_size()
        );
        return Ok(());
    }
    if let Some(count) = o.determinism {
        return determinism(comm, count, o.seed, o.shared);
    }
    if o.split {
        let k = splits(comm)?;
        outln!(
            "rank {}/{}: {k} checks passed",
            comm.rank(),
            comm.world_size()
        );
        return Ok(());
    }
    if let Some(count) = o.compressed {
        let k = compressed(comm, count)?;
        outln!(
            "rank {}/{}: {k} checks passed",
            comm.rank(),
            comm.world_size()
        );
        return Ok(());
    }
    let mut ck = Checker {
        comm,
        checks: 0,
        shared: o.shared,
    };
    for _ in 0..o.iters {
        for &count in &o.counts {
            ck.all_ops::<f32>(count)?;
            ck.all_ops::<f64>(count)?;
            ck.all_ops::<f16>(count)?;
            ck.all_ops::<bf16>(count)?;
            ck.all_ops::<i32>(count)?;
            ck.all_ops::<i64>(count)?;
            ck.all_ops::<u8>(count)?;
        }
    }
    if let Some(big) = o.big_f32 {
        ck.all_ops_one::<f32>(big)?;
        ck.all_ops_one::<bf16>(big)?;
    }
    ck.mixed(o.mixed, o.seed)?;
    outln!(
        "rank {}/{}: {} checks passed in {:.2}s",
        comm.rank(),
        comm.world_size(),
        ck.checks,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One rank from start to end: a communicator from the environment, then `instead`'s
/// work where it has some for this run (a tool's own modes), else [`run`]. Returns the
/// exit status: 0, or 1 after `<program>: init failed: why` or `<program>: rank R:
/// FAILED: why` on stderr.
pub fn main(
    program: &str,
    o: &Options,
    instead: impl FnOnce(&Communicator) -> Option<Result<(), String>>,
) -> u8 {
    let mut comm = match Communicator::init_from_env() {
        Ok(c) => c,
        Err(e) => {
            errln!("{program}: init failed: {e}");
            return 1;
        }
    };
    if o.shared && comm.rank() == 0 {
        // Lets tests look for files this job might have left in /dev/shm.
        outln!(
            "shared buffers, job {}",
            comm.config().job_id.as_deref().unwrap_or("-")
        );
    }
    let result = match instead(&comm) {
        Some(r) => r,
        None => run(&mut comm, o),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            errln!("{program}: rank {}: FAILED: {e}", comm.rank());
            1
        }
    }
}

/// The ignored test a test file defines to be a checking rank (it calls [`rank_main`]).
pub const ENTRY: &str = "check_rank";

/// The variable that carries the checks' flags to a rank, separated by spaces.
pub const ARGS_VAR: &str = "HETCCL_TESTKIT_CHECK_ARGS";

/// The body of the entry test [`ENTRY`]: one rank of the checks in [`ARGS_VAR`]; ends
/// the process with [`main`]'s status, so the test harness prints no result of its own
/// into the rank's output.
pub fn rank_main() -> ! {
    use std::io::Write;
    let args = std::env::var(ARGS_VAR).unwrap_or_default();
    let args: Vec<&str> = args.split_whitespace().collect();
    let code = match Options::parse(&args) {
        Ok(o) => main("check rank", &o, |_| None),
        Err(e) => {
            errln!("check rank: {ARGS_VAR}={args:?}: {e}");
            2
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code.into());
}

/// This test executable as one checking rank with `args`, for ranks started by hand
/// (a test's own environment for each).
pub fn command(args: &[&str]) -> Command {
    let mut c = this_test(ENTRY);
    c.env(ARGS_VAR, args.join(" "));
    c
}

/// The command line of a checking rank of this test executable, for ranks another
/// program starts (`mpirun`, a simulated cluster), with the variable that carries `args`.
pub fn argv(args: &[&str]) -> (Vec<String>, (&'static str, String)) {
    (this_test_argv(ENTRY), (ARGS_VAR, args.join(" ")))
}

/// `n` checking ranks of this test executable, as [`spawn_ranks`] starts them.
pub fn spawn(
    n: usize,
    args: &[&str],
    env: &[(&str, &str)],
    per_rank: impl Fn(usize) -> Vec<(String, String)>,
) -> Vec<Child> {
    let (argv, (var, val)) = argv(args);
    let mut all: Vec<(&str, &str)> = vec![(var, &val)];
    all.extend_from_slice(env);
    let rest: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    spawn_ranks(n, &argv[0], &rest, &all, per_rank)
}

/// `n` checking ranks with `args` and `env` (plus `HETCCL_TIMEOUT=60` and
/// `HETCCL_CONNECT_TIMEOUT=60`), killed after `deadline`; asserts that every rank exited
/// cleanly and reported success ("checks passed", or a "determinism hash" with
/// `--determinism`). Returns every rank's output, in rank order.
pub fn launch(
    n: usize,
    args: &[&str],
    env: &[(&str, &str)],
    deadline: Duration,
    what: &str,
) -> String {
    let mut all = vec![("HETCCL_TIMEOUT", "60"), ("HETCCL_CONNECT_TIMEOUT", "60")];
    all.extend_from_slice(env);
    let outs = collect(spawn(n, args, &all, |_| vec![]), deadline);
    assert_all_ok(&outs, what);
    let out: String = outs.into_iter().map(|o| o.output).collect();
    let marker = if args.contains(&"--determinism") {
        "determinism hash"
    } else {
        "checks passed"
    };
    assert_eq!(
        out.matches(marker).count(),
        n,
        "{what}: expected {n} ranks to report success (does the test file define the \
         ignored entry test `{ENTRY}`?):\n{out}"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_into_options_and_unknown_ones_are_named() {
        let o = Options::parse(&["--counts", "0,7", "--mixed", "20", "--shared"]).unwrap();
        assert_eq!(
            o,
            Options {
                counts: vec![0, 7],
                mixed: 20,
                shared: true,
                ..Options::default()
            }
        );
        assert_eq!(
            Options::parse(&["--counts", "1,x"]).unwrap_err(),
            "--counts: invalid digit found in string"
        );
        assert_eq!(
            Options::parse(&["--soak"]).unwrap_err(),
            "--soak needs a value"
        );
        assert_eq!(
            Options::parse(&["--fault", "kill"]).unwrap_err(),
            "unknown flag --fault"
        );
    }
}
