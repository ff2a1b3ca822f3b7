//! `hetccl-perf`: collective bandwidth table in the style of nccl-tests' `all_reduce_perf`.
//!
//! Start one process per rank:
//!
//! ```text
//! hetccl run -n 2 -- hetccl-perf -b 8 -e 256M -f 4 -g all_reduce -d f32 -o sum
//! ```
//!
//! For every size it times `-n` iterations after `-w` warm-ups, out of place and in
//! place where the API has both forms, reports the slowest rank's per-iteration mean,
//! algbw = bytes / time and busbw = algbw x the collective's bus factor, and last the
//! median over iterations of each iteration's slowest rank (as the MPI peers'
//! benchmarks report: on a loaded machine one preempted iteration moves the mean, not
//! the median; beyond 64 iterations they are timed in 64 batches, and the median is
//! over the batches' mean per call), then (with
//! `-c 1`) runs once more on inputs whose results are exact and counts wrong elements
//! over all ranks. Only rank 0 prints.

mod args;
mod check;
mod report;

/// At most this many timed batches per measurement, for the median column.
const MEDIAN_BATCHES: usize = 64;

use std::process::ExitCode;
use std::time::Instant;

use hetccl::dtype::CollectiveOp;
use hetccl::{errln, outln, Communicator, Config, Element, ReduceOp, SharedBuf};

use args::{Args, Parsed, Shape};
use report::{Row, Timing};

fn main() -> ExitCode {
    let a = match args::parse(std::env::args().skip(1)) {
        Ok(Parsed::Run(a)) => a,
        Ok(Parsed::Help) => {
            outln!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            errln!("hetccl-perf: {e}");
            return ExitCode::from(2);
        }
    };
    let comm = match init(&a) {
        Ok(c) => c,
        Err(e) => {
            errln!("hetccl-perf: init failed: {e}");
            return ExitCode::from(1);
        }
    };
    let r = hetccl::dispatch_dtype!(a.dtype, T => run::<T>(&comm, &a));
    match r {
        Ok(wrong) if wrong > 0 => {
            if comm.rank() == 0 {
                errln!("hetccl-perf: {wrong} wrong elements over all ranks");
            }
            ExitCode::from(3)
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("hetccl-perf: rank {}: {e}", comm.rank());
            ExitCode::from(1)
        }
    }
}

fn init(a: &Args) -> hetccl::Result<Communicator> {
    let mut cfg = Config::from_env()?;
    if let Some(algo) = a.algo {
        cfg.algo = algo;
    }
    Communicator::init(cfg)
}

/// Peak resident set of this process in KiB.
fn max_rss_kib() -> u64 {
    // SAFETY: getrusage writes only into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc == 0 {
        ru.ru_maxrss.max(0) as u64
    } else {
        0
    }
}

/// One line per rank describing where it runs, gathered to every rank.
fn rank_lines(comm: &Communicator) -> Result<Vec<String>, String> {
    const WIDTH: usize = 160;
    let (r, n) = (comm.rank(), comm.world_size());
    let (mut shm, mut tcp) = (0, 0);
    for p in 0..n {
        match comm.link_kind(p) {
            Some(hetccl::transport::LinkKind::Shm) => shm += 1,
            Some(hetccl::transport::LinkKind::Tcp) => tcp += 1,
            None => {}
        }
    }
    let me = format!(
        "Rank {r:3} Pid {:7} on {} local rank {}/{} links: {shm} shm, {tcp} tcp",
        std::process::id(),
        hetccl::topology::hostname(),
        comm.local_rank(),
        comm.local_size(),
    );
    let mut mine = [0u8; WIDTH];
    let b = me.as_bytes();
    let len = b.len().min(WIDTH);
    mine[..len].copy_from_slice(&b[..len]);
    let mut all = vec![0u8; WIDTH * n];
    comm.all_gather(&mine, &mut all)
        .map_err(|e| e.to_string())?;
    Ok(all
        .chunks(WIDTH)
        .map(|c| {
            let end = c.iter().position(|&x| x == 0).unwrap_or(WIDTH);
            String::from_utf8_lossy(&c[..end]).into_owned()
        })
        .collect())
}

/// Which forms the API offers (out of place, in place): broadcast has only the
/// one-buffer form.
fn modes(coll: CollectiveOp) -> (bool, bool) {
    match coll {
        CollectiveOp::Broadcast => (false, true),
        _ => (true, true),
    }
}

struct Bench<'a, T: Element> {
    comm: &'a Communicator,
    a: &'a Args,
    send: Mem<T>,
    recv: Mem<T>,
}

/// A benchmark buffer: private memory, or a shared buffer (`--shared`).
enum Mem<T: Element> {
    Private(Vec<T>),
    Shared(SharedBuf<T>),
}

impl<T: Element> Mem<T> {
    /// `len` zeros; collective when `shared`.
    fn new(comm: &Communicator, len: usize, shared: bool) -> Result<Self, String> {
        if shared {
            let b = comm.alloc_shared(len).map_err(|e| e.to_string())?;
            Ok(Mem::Shared(b))
        } else {
            Ok(Mem::Private(vec![T::from_f64(0.0); len]))
        }
    }
}

impl<T: Element> std::ops::Deref for Mem<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Mem::Private(v) => v,
            Mem::Shared(s) => s,
        }
    }
}

impl<T: Element> std::ops::DerefMut for Mem<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            Mem::Private(v) => v,
            Mem::Shared(s) => s,
        }
    }
}

impl<T: Element> Bench<'_, T> {
    /// Fills the inputs for `sh` and poisons the outputs.
    fn prepare(&mut self, sh: &Shape, in_place: bool) {
        let (r, n, a) = (self.comm.rank(), self.comm.world_size(), self.a);
        let value = |j| T::from_f64(check::send_value(a.coll, a.op, r, n, a.root, j));
        let poison = T::from_f64(check::POISON);
        if in_place && a.coll == CollectiveOp::ReduceScatter {
            // NCCL's layout: the send buffer, whose block `r` takes the result.
            for (j, x) in self.send[..sh.send].iter_mut().enumerate() {
                *x = value(j);
            }
        } else if in_place && a.coll == CollectiveOp::AllGather {
            // This rank's block already in place, the rest poisoned.
            self.recv[..sh.recv].fill(poison);
            let own = &mut self.recv[r * sh.send..(r + 1) * sh.send];
            for (j, x) in own.iter_mut().enumerate() {
                *x = value(j);
            }
        } else if in_place {
            for (j, x) in self.recv[..sh.recv].iter_mut().enumerate() {
                *x = value(j);
            }
        } else {
            for (j, x) in self.send[..sh.send].iter_mut().enumerate() {
                *x = value(j);
            }
            self.recv[..sh.recv].fill(poison);
        }
    }

    fn once(&mut self, sh: &Shape, in_place: bool) -> hetccl::Result<()> {
        let (c, op, root) = (self.comm, self.a.op, self.a.root);
        if in_place && self.a.coll == CollectiveOp::ReduceScatter {
            return c.reduce_scatter_in_place(&mut self.send[..sh.send], op);
        }
        let send = &self.send[..sh.send];
        let recv = &mut self.recv[..sh.recv];
        match (self.a.coll, in_place) {
            (CollectiveOp::AllReduce, false) => c.all_reduce_into(send, recv, op),
            (CollectiveOp::AllReduce, true) => c.all_reduce(recv, op),
            (CollectiveOp::Broadcast, _) => c.broadcast(recv, root),
            (CollectiveOp::ReduceScatter, _) => c.reduce_scatter(send, recv, op),
            (CollectiveOp::AllGather, false) => c.all_gather(send, recv),
            (CollectiveOp::AllGather, true) => c.all_gather_in_place(recv),
            (CollectiveOp::Reduce, false) => {
                let recv = if c.rank() == root { recv } else { &mut [] };
                c.reduce(send, recv, op, root)
            }
            (CollectiveOp::Reduce, true) => c.reduce_in_place(recv, op, root),
            (other, _) => Err(hetccl::Error::invalid(
                "hetccl-perf",
                format!("{other} is not benchmarked"),
            )),
        }
    }

    /// Wrong elements of this rank's output after `once`.
    fn count_wrong(&self, sh: &Shape, in_place: bool) -> u64 {
        let (r, n, a) = (self.comm.rank(), self.comm.world_size(), self.a);
        let block = match a.coll {
            CollectiveOp::ReduceScatter => sh.recv,
            CollectiveOp::AllGather => sh.send,
            _ => sh.recv,
        };
        let out = if in_place && a.coll == CollectiveOp::ReduceScatter {
            &self.send[r * sh.recv..(r + 1) * sh.recv]
        } else {
            &self.recv[..sh.recv]
        };
        let reduction = matches!(
            a.coll,
            CollectiveOp::AllReduce | CollectiveOp::ReduceScatter | CollectiveOp::Reduce
        );
        if reduction {
            if a.coll == CollectiveOp::Reduce && r != a.root {
                return 0;
            }
            // Reduction results repeat with a short period; compare against a table.
            let p = check::period(a.op, n);
            let table: Vec<T> = (0..p)
                .map(|j| T::from_f64(check::reduce_expected(a.op, n, j)))
                .collect();
            let offset = if a.coll == CollectiveOp::ReduceScatter {
                r * block
            } else {
                0
            };
            out.iter()
                .enumerate()
                .filter(|(i, x)| **x != table[(offset + i) % p])
                .count() as u64
        } else {
            out.iter()
                .enumerate()
                .filter(|(i, x)| {
                    check::expected(a.coll, a.op, r, n, a.root, block, *i)
                        .is_some_and(|w| **x != T::from_f64(w))
                })
                .count() as u64
        }
    }

    /// Times one mode of one size and checks it; every rank returns the same numbers.
    fn measure(&mut self, sh: &Shape, in_place: bool) -> Result<Timing, String> {
        let err = |e: hetccl::Error| e.to_string();
        let comm = self.comm;
        self.prepare(sh, in_place);
        for _ in 0..self.a.warmup {
            self.once(sh, in_place).map_err(err)?;
        }
        comm.barrier().map_err(err)?;
        // The iterations are timed in at most MEDIAN_BATCHES batches (one iteration each
        // up to that many): reading the clock around every call would add its own cost,
        // about a quarter of an 8-byte call here, to the mean as well. The mean stays the
        // whole loop's time.
        let iters = self.a.iters;
        let per_batch = iters.div_ceil(MEDIAN_BATCHES).max(1);
        let mut each = Vec::with_capacity(iters.div_ceil(per_batch));
        let t0 = Instant::now();
        let mut done = 0;
        while done < iters {
            let k = per_batch.min(iters - done);
            let tb = Instant::now();
            for _ in 0..k {
                self.once(sh, in_place).map_err(err)?;
            }
            each.push(tb.elapsed().as_secs_f64() * 1e6 / k as f64);
            done += k;
        }
        let mut t = [t0.elapsed().as_secs_f64() * 1e6 / iters as f64];
        comm.all_reduce(&mut t, ReduceOp::Max).map_err(err)?;
        // Batch i's time is its slowest rank's.
        comm.all_reduce(&mut each, ReduceOp::Max).map_err(err)?;
        let median_us = report::median(&each);
        let wrong = if self.a.check {
            self.prepare(sh, in_place);
            self.once(sh, in_place).map_err(err)?;
            let mut w = [self.count_wrong(sh, in_place)];
            comm.all_reduce(&mut w, ReduceOp::Sum).map_err(err)?;
            Some(w[0])
        } else {
            None
        };
        let (algbw, busbw) = args::bandwidths(self.a.coll, comm.world_size(), sh.bytes, t[0]);
        Ok(Timing {
            time_us: t[0],
            median_us,
            algbw,
            busbw,
            wrong,
        })
    }
}

/// Runs the whole table; returns the total of wrong elements.
fn run<T: Element>(comm: &Communicator, a: &Args) -> Result<u64, String> {
    let (rank, n) = (comm.rank(), comm.world_size());
    if a.root >= n {
        return Err(format!("-r {} is not a rank (world size {n})", a.root));
    }
    let lines = rank_lines(comm)?;
    let shapes = args::rows(a, n);
    let cfg = comm.config();
    let algo = cfg.algo.name();
    if rank == 0 {
        outln!(
            "# hetccl-perf {}: minBytes {} maxBytes {} step: {}(factor) warmup iters: {} iters: {} validation: {} algo: {}",
            a.coll, a.min_bytes, a.max_bytes, a.factor, a.warmup, a.iters, a.check as u8, algo
        );
        outln!("#");
        outln!(
            "# Ranks (world size {n}; chunk {} B, pipeline depth {}; {} buffers)",
            cfg.chunk_bytes,
            cfg.pipeline_depth,
            if a.shared { "shared" } else { "private" }
        );
        for l in &lines {
            outln!("#  {l}");
        }
        outln!("#");
        outln!("{}", report::table_heading());
    }
    let max_send = shapes.iter().map(|s| s.send).max().unwrap_or(0);
    let max_recv = shapes.iter().map(|s| s.recv).max().unwrap_or(0);
    // Allocated and touched once, like a trainer's gradient buffer.
    let mut b = Bench {
        comm,
        a,
        send: Mem::<T>::new(comm, max_send, a.shared)?,
        recv: Mem::<T>::new(comm, max_recv, a.shared)?,
    };
    let (oop, ip) = modes(a.coll);
    let reduces = !matches!(a.coll, CollectiveOp::AllGather | CollectiveOp::Broadcast);
    let has_root = matches!(a.coll, CollectiveOp::Broadcast | CollectiveOp::Reduce);
    let mut rows = Vec::with_capacity(shapes.len());
    for sh in &shapes {
        let row = Row {
            size: sh.bytes,
            count: sh.count,
            dtype: a.dtype.name(),
            redop: if reduces { a.op.name() } else { "none" },
            root: if has_root { a.root as i64 } else { -1 },
            out_of_place: if oop {
                Some(b.measure(sh, false)?)
            } else {
                None
            },
            in_place: if ip { Some(b.measure(sh, true)?) } else { None },
        };
        if rank == 0 {
            outln!("{}", report::format_row(&row));
        }
        rows.push(row);
    }
    let mut rss = [max_rss_kib()];
    comm.all_reduce(&mut rss, ReduceOp::Max)
        .map_err(|e| e.to_string())?;
    let wrong = report::total_wrong(&rows);
    let avg = report::avg_busbw(&rows);
    if rank == 0 {
        match wrong {
            Some(0) => outln!("# Out of bounds values : 0 OK"),
            Some(w) => outln!("# Out of bounds values : {w} FAILED"),
            None => outln!("# Out of bounds values : not checked"),
        }
        outln!("# Avg bus bandwidth    : {avg:.4}");
        outln!(
            "# Peak RSS (max over ranks) : {:.1} MiB",
            rss[0] as f64 / 1024.0
        );
        if let Some(path) = &a.json {
            let rep = report::Report {
                collective: a.coll.name(),
                world_size: n,
                algo,
                iters: a.iters,
                warmup: a.warmup,
                ranks: &lines,
                rows: &rows,
                avg_busbw: avg,
                max_rss_kib: rss[0],
            };
            let text = serde_json::to_string_pretty(&rep).map_err(|e| format!("--json: {e}"))?;
            std::fs::write(path, text).map_err(|e| format!("--json {path}: {e}"))?;
        }
    }
    Ok(wrong.unwrap_or(0))
}
