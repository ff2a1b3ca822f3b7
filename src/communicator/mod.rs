//! The user-facing communicator: collectives on host buffers, blocking or scoped
//! non-blocking.
//!
//! Every collective becomes a unit of work on one progress thread per communicator,
//! in the order the caller issued them, so operations complete in issue order on
//! every rank and a trainer can overlap communication with compute:
//!
//! ```no_run
//! # use hetccl::{Communicator, ReduceOp};
//! # fn main() -> hetccl::Result<()> {
//! let comm = Communicator::init_from_env()?;
//! let mut grads = vec![1.0f32; 1 << 20];
//! let (early, late) = grads.split_at_mut(1 << 19);
//! comm.scope(|s| -> hetccl::Result<()> {
//!     let h = s.all_reduce(late, ReduceOp::Sum)?; // runs while we keep computing
//!     early.iter_mut().for_each(|g| *g *= 0.5);
//!     h.wait()
//! })?;
//! comm.all_reduce(early, ReduceOp::Sum)?;
//! # Ok(()) }
//! ```
//!
//! After any error the communicator is *broken*: its links are aborted (so peers
//! fail fast instead of timing out, and learn why: see [`crate::error::AbortCause`]) and
//! every later call returns [`Error::Broken`].
//!
//! No wait here is unbounded: a collective ends by its progress (each wait on a peer
//! ends by `HETCCL_TIMEOUT`, an abort, or the peer's death), and a caller waiting for
//! queued work also returns once the progress thread has stopped for any reason. A
//! panic inside a collective becomes [`Error::Panicked`] for that call and breaks the
//! communicator; a panic anywhere else on the progress thread fails every queued and
//! later call with an error that names it.

mod compress;
mod flight_net;
mod init;
mod launcher_watch;
mod probe;
mod shared;
mod split;
#[cfg(test)]
mod what_runs;

pub use shared::SharedBuf;

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::algorithm::executor::{self, BlockPasses, Buffers, ExecCtx, Job, Wire};
use crate::algorithm::select::{self, Facts, Path};
use crate::algorithm::tuning::LinkModel;
use crate::algorithm::{self, Algo, Call, Schedule, Tuning};
use crate::bootstrap::auth::JobAuth;
use crate::bootstrap::Bootstrap;
use crate::compression::{Compressor, OverflowStats, ScalePolicy};
use crate::config::{AlgoChoice, CompressMode, Config};
use crate::dtype::{CollectiveOp, DataType, Element, ReduceOp};
use crate::error::{AbortCause, AbortKind, Error, Result};
use crate::flight::Stamp;
use crate::observe::trace::Tracer;
use crate::observe::{CallDone, Counters, LinkClass, Metrics, Observer, Phase, Span};
use crate::topology::Topology;
use crate::transport::{Link, LinkKind};

/// Whether the progress thread still serves its queue, and why it stopped.
#[derive(Default)]
struct Worker {
    stopped: Mutex<Option<String>>,
}

impl Worker {
    fn stop(&self, why: String) {
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(why);
    }

    fn stopped(&self) -> Option<String> {
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// How often a caller waiting for queued work looks whether the progress thread is
/// still there (it is woken at once when its work completes).
const WORKER_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Completion state of one submitted operation.
struct Completion {
    result: Mutex<Option<Result<OverflowStats>>>,
    cv: Condvar,
    /// The thread that sets `result`. It sets no result after it stopped, so a result
    /// still missing once it has stopped never comes.
    worker: Arc<Worker>,
}

impl Completion {
    fn new(worker: Arc<Worker>) -> Arc<Self> {
        Arc::new(Completion {
            result: Mutex::new(None),
            cv: Condvar::new(),
            worker,
        })
    }

    fn set(&self, r: Result<OverflowStats>) {
        let mut g = self.result.lock().unwrap_or_else(|p| p.into_inner());
        *g = Some(r);
        self.cv.notify_all();
    }

    /// Waits for the result: the work's own end (bounded by its waits on peers), or the
    /// end of the progress thread, whichever comes first.
    fn wait(&self) -> Result<OverflowStats> {
        let mut g = self.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = g.take() {
                // Leave a marker so a second waiter (scope end after Handle::wait) returns.
                *g = Some(Ok(OverflowStats::default()));
                return r;
            }
            // Checked under the result's lock: the worker sets results only before it
            // stops, so none can come after this.
            if let Some(why) = self.worker.stopped() {
                *g = Some(Err(Error::Broken(why.clone())));
                return Err(Error::Broken(why));
            }
            g = self
                .cv
                .wait_timeout(g, WORKER_CHECK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn is_done(&self) -> bool {
        self.result
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
            || self.worker.stopped().is_some()
    }
}

/// The text of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a payload that is not text".into())
}

/// Where a test makes the progress thread panic.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inject {
    /// Inside a collective.
    Execute,
    /// In the loop that serves the queue, outside any collective.
    Loop,
}

/// One collective handed to the progress thread.
struct Work {
    /// `None` when `direct` runs the call instead.
    sched: Option<Arc<Schedule>>,
    direct: Option<shared::Direct>,
    bufs: Buffers,
    ctx: ExecCtx,
    /// `None` for a call run on the caller's thread.
    done: Option<Arc<Completion>>,
    compress: Option<CompressJob>,
    /// The engine that runs it, as the metrics and the trace name it.
    path: &'static str,
    /// Passes around the output's blocks of a call planned by its caller
    /// ([`Communicator::run_planned`]); borrowed until `done`, as the buffers are.
    passes: Option<*mut (dyn BlockPasses + 'static)>,
}

/// What a compressed all-reduce needs besides its schedule.
struct CompressJob {
    wire: Wire,
    /// The caller's compressor, or null for the communicator's own (no error feedback).
    compressor: *mut Compressor,
    buffer: u64,
    /// The caller's reduction (`Sum` or `Avg`); the schedule itself always sums.
    op: ReduceOp,
}

// SAFETY: `Work` carries raw pointers to caller buffers. The submitting thread keeps
// those buffers borrowed (blocking call, or a `Scope` that outlives the work) until
// `done` is set, and the progress thread is the only one touching them meanwhile.
unsafe impl Send for Work {}

struct Progress {
    rank: usize,
    links: Vec<Option<Box<dyn Link>>>,
    scratch: Vec<u64>,
    broken: Option<String>,
    /// Compressor for collectives compressed by `HETCCL_COMPRESS` alone.
    internal: Option<Compressor>,
    /// Set by [`Communicator::abort`] from any thread.
    abort: Arc<std::sync::atomic::AtomicBool>,
    shared: Arc<shared::SharedState>,
    /// Counters and the trace.
    obs: Observer,
    /// This communicator's flight recorder.
    flight: &'static crate::flight::Recorder,
    /// A panic a test asked for.
    #[cfg(test)]
    inject: Option<Inject>,
}

impl Progress {
    /// The progress thread: runs queued work in order. A blocking call issued while
    /// nothing is queued runs on the caller's thread instead (see `submit`), holding
    /// the same lock, so order is kept either way.
    ///
    /// Whatever ends it (the queue closed, or a panic outside a collective), `worker`
    /// says so before the thread goes: callers waiting for queued work then return an
    /// error instead of waiting for a result that will not come.
    fn run(
        me: Arc<Mutex<Progress>>,
        rx: mpsc::Receiver<Work>,
        inflight: Arc<AtomicUsize>,
        worker: Arc<Worker>,
    ) {
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Self::serve(&me, &rx, &inflight)
        }));
        let why = match served {
            Ok(()) => "the progress thread has stopped (communicator shut down)".to_string(),
            Err(payload) => {
                let mut p = me.lock().unwrap_or_else(|e| e.into_inner());
                let why = format!(
                    "rank {}: the progress thread panicked: {} (a bug in hetccl; please \
                     report it)",
                    p.rank,
                    panic_message(payload.as_ref())
                );
                let cause = AbortCause::new(AbortKind::Failed, p.rank);
                p.fail(why.clone(), cause);
                why
            }
        };
        worker.stop(why);
        // Work still queued is dropped with `rx`; its callers see the worker stopped.
    }

    fn serve(me: &Mutex<Progress>, rx: &mpsc::Receiver<Work>, inflight: &AtomicUsize) {
        while let Ok(mut w) = rx.recv() {
            let mut p = me.lock().unwrap_or_else(|e| e.into_inner());
            #[cfg(test)]
            if p.inject == Some(Inject::Loop) {
                p.inject = None;
                drop(p);
                panic!("injected panic in the progress loop");
            }
            let r = p.execute_guarded(&mut w);
            drop(p);
            inflight.fetch_sub(1, Ordering::AcqRel);
            if let Some(d) = &w.done {
                d.set(r);
            }
        }
        tracing::debug!("progress thread exits");
    }

    /// Breaks the communicator: later calls fail with `why`, and the links and control
    /// pages tell the peers `cause`.
    fn fail(&mut self, why: String, cause: AbortCause) {
        self.broken.get_or_insert(why);
        self.shared.abort(cause);
        for l in self.links.iter_mut().flatten() {
            l.abort(cause);
        }
    }

    /// [`Progress::execute`], with a panic inside it turned into [`Error::Panicked`]
    /// (the communicator is broken afterwards: its links may be mid-message).
    fn execute_guarded(&mut self, w: &mut Work) -> Result<OverflowStats> {
        let (op, seq) = (w.ctx.op, w.ctx.seq);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.execute(w))) {
            Ok(r) => r,
            Err(payload) => {
                crate::flight::clear_current();
                let e = Error::Panicked {
                    rank: self.rank,
                    op,
                    seq,
                    message: panic_message(payload.as_ref()),
                };
                self.fail(e.to_string(), AbortCause::new(AbortKind::Failed, self.rank));
                Err(e)
            }
        }
    }

    fn execute(&mut self, w: &mut Work) -> Result<OverflowStats> {
        if let Some(why) = &self.broken {
            return Err(Error::Broken(why.clone()));
        }
        if self.abort.load(Ordering::Relaxed) {
            let why = launcher_watch::abort_reason(&self.abort, &w.ctx);
            self.fail(why.clone(), AbortCause::new(AbortKind::Aborted, self.rank));
            return Err(Error::Broken(why));
        }
        #[cfg(test)]
        if self.inject == Some(Inject::Execute) {
            self.inject = None;
            panic!("injected panic in {} #{}", w.ctx.op, w.ctx.seq);
        }
        // One clock read at each end, shared by the recorder, the counters and the trace.
        let start = Stamp::now();
        let mut phase_end = [None; Phase::COUNT];
        let entry = self.flight.begin(w.ctx.op, w.ctx.seq, w.ctx.count, start);
        let r = match (&w.direct, w.sched.clone()) {
            (Some(d), _) => d
                .execute(&w.bufs, &w.ctx, &self.abort)
                .map(|()| OverflowStats::default()),
            (None, Some(sched)) => {
                let need = sched.scratch_bytes.div_ceil(8);
                if self.scratch.len() < need {
                    self.scratch.resize(need, 0);
                }
                w.bufs.scratch = self.scratch.as_mut_ptr().cast();
                w.bufs.scratch_len = self.scratch.len() * 8;
                if w.ctx.op != CollectiveOp::SendRecv {
                    self.shared.note_link_op(&w.ctx);
                }
                match (w.compress.take(), w.passes) {
                    (None, None) => executor::execute(
                        &mut self.links,
                        Job::new(&sched, &w.bufs, &w.ctx)
                            .cancel(&self.abort)
                            .phase_ends(&mut phase_end)
                            .link_waits(self.obs.link_waits()),
                    ),
                    (None, Some(passes)) => executor::execute(
                        &mut self.links,
                        Job::new(&sched, &w.bufs, &w.ctx)
                            // SAFETY: `run_planned`'s caller keeps the passes borrowed
                            // until this work is done, and only this thread uses them.
                            .passes(unsafe { &mut *passes })
                            .cancel(&self.abort)
                            .phase_ends(&mut phase_end),
                    ),
                    (Some(job), _) => {
                        let r = self.execute_compressed(w, &sched, &job, &mut phase_end);
                        w.compress = Some(job);
                        r
                    }
                }
            }
            (None, None) => Err(Error::invalid("execute", "work with nothing to run")),
        };
        let end = Stamp::now();
        self.obs.call(&CallDone {
            ctx: &w.ctx,
            path: w.path,
            sched: w.sched.as_ref(),
            wire: w.compress.as_ref().map(|j| &j.wire),
            result: &r,
            start,
            end,
            phase_end: &phase_end,
        });
        let e = match r.map_err(|e| launcher_watch::blame(&self.abort, e, &w.ctx)) {
            Ok(v) => {
                crate::flight::end(entry, end);
                return Ok(v);
            }
            Err(e) => e,
        };
        // Peers first, the recorder and the log after: neither must keep them waiting.
        let cause = match &e {
            Error::Broken(_) if self.abort.load(Ordering::Relaxed) => {
                AbortCause::new(AbortKind::Aborted, self.rank)
            }
            e => AbortCause::of_error(e, self.rank),
        };
        // Later calls say "unusable after an earlier error: <why>" once, not twice.
        let why = |e: &Error| match e {
            Error::Broken(why) => why.clone(),
            e => e.to_string(),
        };
        self.fail(why(&e), cause);
        let culprit = AbortCause::of_error(&e, self.rank).rank;
        // Every rank's error names the job's first failure, not only the peer it saw.
        let e = match crate::flight::failed(entry, end, &e, Some(culprit)) {
            Some(finding) => {
                let e = e.with_finding(&finding);
                self.broken = Some(why(&e));
                e
            }
            None => e,
        };
        tracing::error!(rank = self.rank, op = %w.ctx.op, seq = w.ctx.seq, "{e}");
        Err(e)
    }

    fn execute_compressed(
        &mut self,
        w: &Work,
        sched: &Schedule,
        job: &CompressJob,
        phase_end: &mut executor::PhaseEnds,
    ) -> Result<OverflowStats> {
        let comp: &mut Compressor = if job.compressor.is_null() {
            match &mut self.internal {
                Some(c) if c.format() == job.wire.format => c,
                slot => slot.insert(Compressor::new(
                    job.wire.format,
                    ScalePolicy::InverseWorldSize,
                    false,
                )?),
            }
        } else {
            // SAFETY: the caller's `&mut Compressor` is borrowed until this work completes
            // (blocking call or scope), and only this thread touches it meanwhile.
            unsafe { &mut *job.compressor }
        };
        let world = w.ctx.world_size;
        let input = (!std::ptr::eq(w.bufs.input, w.bufs.output)).then_some(w.bufs.input.cast());
        // SAFETY: output (and input, when distinct) hold `output_len / 4` f32, checked when
        // the call was prepared, and are this work's alone until it completes; input is
        // only read.
        let mut passes = unsafe {
            compress::Passes::new(comp, job.buffer, input, w.bufs.output.cast(), world, job.op)?
        };
        let bufs = Buffers {
            input: w.bufs.output,
            input_len: w.bufs.output_len,
            ..w.bufs
        };
        let stats = executor::execute(
            &mut self.links,
            Job::new(sched, &bufs, &w.ctx)
                .wire(&job.wire)
                .passes(&mut passes)
                .cancel(&self.abort)
                .phase_ends(phase_end)
                .link_waits(self.obs.link_waits()),
        )?;
        // The passes counted their own saturations into the compressor.
        comp.add_pending(stats);
        Ok(comp.finish_collective())
    }
}

/// Per-call compression for [`Communicator::all_reduce_compressed`].
pub struct Compression<'a> {
    /// Which links compress (`Off` makes the call exact).
    pub mode: CompressMode,
    /// Wire format, scale and error-feedback residuals; kept by the caller across steps.
    pub compressor: &'a mut Compressor,
    /// Names the buffer's residual inside the compressor (e.g. a bucket index).
    pub buffer: u64,
}

/// A group of ranks that run collectives together.
pub struct Communicator {
    rank: usize,
    world_size: usize,
    cfg: Config,
    topo: Topology,
    /// Cost-model inputs and shard weights derived from `topo`.
    model: LinkModel,
    link_kinds: Vec<Option<LinkKind>>,
    seq: AtomicU64,
    abort: Arc<std::sync::atomic::AtomicBool>,
    p2p_send_seq: Vec<AtomicU64>,
    p2p_recv_seq: Vec<AtomicU64>,
    /// How long a call waits for a peer, in nanoseconds: `HETCCL_TIMEOUT` until
    /// [`Communicator::set_timeout`]; read when a call is issued.
    timeout_ns: AtomicU64,
    tx: Mutex<Option<mpsc::Sender<Work>>>,
    worker: Option<JoinHandle<()>>,
    /// Whether the progress thread still runs.
    worker_state: Arc<Worker>,
    /// Links, scratch and failure state; the progress thread or an inline caller holds it.
    progress: Arc<Mutex<Progress>>,
    /// Work queued for the progress thread and not finished yet.
    inflight: Arc<AtomicUsize>,
    plans: Mutex<HashMap<(Call, Algo), Arc<Schedule>>>,
    /// (collective, log2 of the size, algorithm) already reported at `info`.
    logged: Mutex<std::collections::HashSet<(CollectiveOp, u32, Algo)>>,
    // Kept alive for the communicator's lifetime: rank 0 may serve the store.
    _boot: Mutex<Option<Box<dyn Bootstrap>>>,
    /// Shared buffers and the control pages of the direct path.
    shared: Arc<shared::SharedState>,
    /// [`ExecCtx::spin_polls`] on this host.
    spin_polls: u32,
    /// The timeline (`HETCCL_TRACE`), also held by the progress state.
    tracer: Option<Arc<Tracer>>,
    /// The job's identity and key, from which a split derives its communicators' keys;
    /// `None` for one built by [`Communicator::from_parts`].
    auth: Option<JobAuth>,
}

/// `d` in nanoseconds; `HETCCL_TIMEOUT`'s week fits in a u64 many times over.
fn duration_ns(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish_non_exhaustive()
    }
}

impl Communicator {
    /// Builds a communicator from already-connected links (index = peer rank, `None`
    /// for self). `init_from_env` is the usual way in; this one serves tests and
    /// embedders that bring their own bootstrap.
    pub fn from_parts(
        cfg: Config,
        topo: Topology,
        rank: usize,
        links: Vec<Option<Box<dyn Link>>>,
        boot: Option<Box<dyn Bootstrap>>,
    ) -> Result<Self> {
        let world_size = topo.world_size();
        if links.len() != world_size || rank >= world_size {
            return Err(Error::invalid(
                "Communicator::from_parts",
                format!(
                    "{} links for world size {world_size}, rank {rank}",
                    links.len()
                ),
            ));
        }
        let link_kinds: Vec<Option<LinkKind>> =
            links.iter().map(|l| l.as_ref().map(|l| l.kind())).collect();
        let tracer = match &cfg.trace {
            Some(pattern) => Some(Arc::new(Tracer::create(pattern, rank, world_size)?)),
            None => None,
        };
        let mut obs = Observer {
            classes: link_kinds.iter().map(|k| k.map(LinkClass::of)).collect(),
            tracer: tracer.clone(),
            ..Observer::default()
        };
        obs.counters.m.retries = links.iter().flatten().map(|l| l.setup_retries()).sum();
        let (tx, rx) = mpsc::channel::<Work>();
        let abort = Arc::new(std::sync::atomic::AtomicBool::new(false));
        launcher_watch::register(&cfg, rank, &abort)?;
        // Every rank's host and process: the same on every rank, new with every run.
        let instance = topo.ranks.iter().all(|r| r.pid != 0).then(|| {
            let members: Vec<String> = topo
                .ranks
                .iter()
                .map(|r| format!("{}:{}", r.hostname, r.pid))
                .collect();
            members.join(",")
        });
        let flight = crate::flight::register(
            &cfg,
            rank,
            world_size,
            &crate::topology::hostname(),
            instance.as_deref(),
        );
        let shared = shared::SharedState::new(rank);
        let progress = Progress {
            rank,
            links,
            scratch: Vec::new(),
            broken: None,
            internal: None,
            abort: abort.clone(),
            shared: shared.clone(),
            obs,
            flight,
            #[cfg(test)]
            inject: None,
        };
        let progress = Arc::new(Mutex::new(progress));
        let inflight = Arc::new(AtomicUsize::new(0));
        let worker_state = Arc::new(Worker::default());
        let (p2, i2, w2) = (progress.clone(), inflight.clone(), worker_state.clone());
        let worker = std::thread::Builder::new()
            .name(format!("hetccl-progress-{rank}"))
            .spawn(move || Progress::run(p2, rx, i2, w2))
            .map_err(|e| Error::io("starting the progress thread", e))?;
        let local_ranks = topo.nodes.get(topo.node_of[rank]).map_or(1, Vec::len);
        Ok(Communicator {
            rank,
            world_size,
            timeout_ns: AtomicU64::new(duration_ns(cfg.timeout)),
            cfg,
            spin_polls: crate::algorithm::executor::spin_polls_for(local_ranks),
            model: LinkModel::of(&topo),
            topo,
            link_kinds,
            seq: AtomicU64::new(0),
            abort,
            p2p_send_seq: (0..world_size).map(|_| AtomicU64::new(0)).collect(),
            p2p_recv_seq: (0..world_size).map(|_| AtomicU64::new(0)).collect(),
            tx: Mutex::new(Some(tx)),
            worker: Some(worker),
            worker_state,
            progress,
            inflight,
            plans: Mutex::new(HashMap::new()),
            logged: Mutex::new(Default::default()),
            _boot: Mutex::new(boot),
            shared,
            tracer,
            auth: None,
        })
    }

    /// This communicator's counters since its initialisation ([`Metrics`]). Waits for
    /// the call running now, if any, to end.
    pub fn metrics(&self) -> Metrics {
        let p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.obs.counters.snapshot()
    }

    /// Adds what a device collective over this communicator moved to its counters
    /// (`observe::Counters::device_call`).
    #[cfg(feature = "cuda")]
    pub(crate) fn count_device(&self, ipc_read: u64, to_host: u64, to_device: u64) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.obs.counters.device_call(ipc_read, to_host, to_device);
    }

    /// Starts a span of the program's own on the timeline (`HETCCL_TRACE`), ended when
    /// the returned guard is dropped; without a trace it records nothing and costs a
    /// branch. A trainer marks its forward, backward, optimizer steps this way, beside
    /// the collectives that the communicator records itself.
    pub fn span(&self, name: &'static str) -> Span<'_> {
        Span::start(self.tracer.as_deref(), name)
    }

    /// Writes the trace events gathered so far to the trace file (they are also written
    /// every few thousand events and when the communicator is dropped).
    pub fn flush_trace(&self) {
        if let Some(t) = &self.tracer {
            t.flush();
        }
    }

    /// The collectives `init` runs itself (the probe, the clock offset, the control
    /// pages) are not the caller's: they stay off the trace, and counting starts over
    /// after them ([`Communicator::restart_metrics`]).
    fn pause_observing(&mut self) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.obs.tracer = None;
    }

    /// Counting starts over, setup retries aside, and the trace records from here.
    fn restart_metrics(&mut self) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        let retries = p.obs.counters.m.retries;
        p.obs.counters = Counters::default();
        p.obs.counters.m.retries = retries;
        p.obs.tracer = self.tracer.clone();
    }

    /// Measures this rank's trace clock against rank 0's and notes it in the trace, when
    /// any rank traces. Collective.
    fn align_trace_clock(&mut self) -> Result<()> {
        // Whether any rank traces: a rank without a trace still answers the others.
        let mut any = [u8::from(self.tracer.is_some())];
        self.all_reduce(&mut any, ReduceOp::Max)?;
        if any[0] != 0 {
            let (offset, error) = crate::observe::offset_to_rank0(self)?;
            if let Some(t) = &self.tracer {
                t.set_clock(self.world_size, offset, error);
            }
        }
        Ok(())
    }

    /// Gives up on the communicator from any thread: an operation blocked on a peer
    /// returns an error within ~50 ms, its links are closed (peers fail fast too), and
    /// every later call fails. For watchdogs, like `ncclCommAbort`. Never blocks: when
    /// no operation runs, the links are closed at once (peers waiting on this rank learn
    /// that it was aborted); otherwise the running operation closes them.
    pub fn abort(&self) {
        self.abort.store(true, Ordering::Relaxed);
        let idle = match self.progress.try_lock() {
            Ok(p) => Some(p),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        if let Some(mut p) = idle {
            let rank = p.rank;
            p.fail(
                "aborted by the application".into(),
                AbortCause::new(AbortKind::Aborted, rank),
            );
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }
    /// Rank within this node.
    pub fn local_rank(&self) -> usize {
        self.topo.local_rank(self.rank)
    }
    /// Ranks on this node.
    pub fn local_size(&self) -> usize {
        self.topo.local_size(self.rank)
    }
    /// The job's layout.
    pub fn topology(&self) -> &Topology {
        &self.topo
    }
    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// Overrides `HETCCL_ALGO` for the calls that follow. Like the variable, it must
    /// be the same on every rank: call it at the same point of the call sequence
    /// everywhere. `&mut self`: no operation is in flight meanwhile.
    pub fn set_algorithm(&mut self, algo: AlgoChoice) {
        self.cfg.algo = algo;
    }

    /// The link used to reach `peer` (`None` for self).
    pub fn link_kind(&self, peer: usize) -> Option<LinkKind> {
        self.link_kinds.get(peer).copied().flatten()
    }

    /// What the selection knows of this communicator.
    fn facts(&self) -> Facts<'_> {
        Facts {
            world_size: self.world_size,
            nodes: self.topo.nodes.len(),
            control_pages: self.shared.ctl.get().is_some(),
            shm_disable: self.cfg.shm_disable,
            algo: self.cfg.algo,
            chunk_bytes: self.cfg.chunk_bytes,
            pipeline_depth: self.cfg.pipeline_depth,
            model: &self.model,
        }
    }

    /// What runs for `call` on these buffers, compressed under `mode` where it applies
    /// ([`select::select`]), with the shared-memory engine's part when that runs it.
    fn choose(
        &self,
        call: &Call,
        input: RawIn,
        output: RawOut,
        mode: CompressMode,
    ) -> (Path, Option<shared::Direct>) {
        let mut on_buffers = None;
        let path = select::select(call, &self.facts(), mode, || {
            on_buffers = shared::Direct::on_buffers(self, call, input, output);
            on_buffers.is_some()
        });
        let direct = match path {
            Path::Eager { .. } => Some(shared::Direct::eager(self)),
            Path::Direct => on_buffers,
            _ => None,
        };
        (path, direct)
    }

    /// The schedule `links` describes, planned once per call and algorithm.
    fn schedule(&self, links: &select::Links) -> Arc<Schedule> {
        let (call, algo) = (&links.call, links.algo);
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if plans.len() > 4096 {
            plans.clear();
        }
        plans
            .entry((*call, algo))
            .or_insert_with(|| {
                let bytes = call.bytes();
                let bucket = usize::BITS - bytes.leading_zeros();
                let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
                if self.rank == 0 && logged.insert((call.op, bucket, algo)) {
                    tracing::info!(
                        rank = self.rank,
                        "{} of {} bytes ({} x {}): {links}",
                        call.op,
                        bytes,
                        call.count,
                        call.dtype,
                    );
                }
                let t = Tuning {
                    chunk_bytes: links.chunk_bytes,
                    slots: links.slots,
                    shard_weights: self.model.shard_weights.clone(),
                    inter_parts: self.model.inter_parts.clone(),
                    ring_order: links.ring_order,
                };
                Arc::new(algorithm::plan(
                    call,
                    self.rank,
                    self.world_size,
                    algo,
                    t,
                    &self.topo.nodes,
                ))
            })
            .clone()
    }

    /// Runs a call to completion: right here when nothing is queued (no hand-off to
    /// another thread and back, which is most of a small message's latency), else
    /// behind the queued work on the progress thread.
    fn run_now(
        &self,
        call: Call,
        input: RawIn,
        output: RawOut,
        compress: Option<(CompressMode, *mut Compressor, u64)>,
    ) -> Result<OverflowStats> {
        let (work, tx_guard) = self.make_work(call, input, output, compress)?;
        self.dispatch(work, tx_guard)
    }

    /// [`Communicator::run_now`] of work already made.
    fn dispatch(
        &self,
        mut work: Work,
        tx_guard: MutexGuard<'_, Option<mpsc::Sender<Work>>>,
    ) -> Result<OverflowStats> {
        if self.inflight.load(Ordering::Acquire) == 0 {
            // Take the progress lock before letting other submitters in, so anything
            // queued after this call also runs after it.
            let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            drop(tx_guard);
            return p.execute_guarded(&mut work);
        }
        self.enqueue(work, tx_guard)?.wait()
    }

    /// Queues a call on the progress thread; the caller must keep the buffers
    /// borrowed until the returned completion is set.
    fn submit(
        &self,
        call: Call,
        input: RawIn,
        output: RawOut,
        compress: Option<(CompressMode, *mut Compressor, u64)>,
    ) -> Result<Arc<Completion>> {
        let (work, tx_guard) = self.make_work(call, input, output, compress)?;
        self.enqueue(work, tx_guard)
    }

    /// Hands `work` to the progress thread; returns the completion it will set.
    fn enqueue(
        &self,
        mut work: Work,
        tx_guard: MutexGuard<'_, Option<mpsc::Sender<Work>>>,
    ) -> Result<Arc<Completion>> {
        let done = Completion::new(self.worker_state.clone());
        work.done = Some(done.clone());
        self.inflight.fetch_add(1, Ordering::AcqRel);
        let sent = match tx_guard.as_ref() {
            Some(tx) => tx.send(work).is_ok(),
            None => false,
        };
        if !sent {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::Broken(
                self.worker_state
                    .stopped()
                    .unwrap_or_else(|| "the progress thread has stopped".into()),
            ));
        }
        Ok(done)
    }

    /// Plans a call and takes its sequence number; returns the work with the queue
    /// lock still held, so queue order is sequence order.
    fn make_work(
        &self,
        call: Call,
        input: RawIn,
        output: RawOut,
        compress: Option<(CompressMode, *mut Compressor, u64)>,
    ) -> Result<(Work, MutexGuard<'_, Option<mpsc::Sender<Work>>>)> {
        let mode = compress.map_or(CompressMode::Off, |(mode, _, _)| mode);
        let (path, direct) = self.choose(&call, input, output, mode);
        let engine = match &path {
            Path::Eager { .. } => "eager",
            Path::Direct => "shared buffers",
            _ => "links",
        };
        let (sched, compress, redop) = match &path {
            Path::Links(l) => (
                Some(self.schedule(l)),
                compress
                    .filter(|_| l.compressed)
                    .map(|(mode, c, buffer)| self.compress_job(&call, mode, c, buffer)),
                l.call.redop,
            ),
            _ => (None, None, call.redop),
        };
        let tx_guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if tx_guard.is_none() {
            return Err(Error::Broken("communicator was shut down".into()));
        }
        // Sequence numbers are taken under the queue lock so queue order = seq order.
        let seq = self.next_seq(&call);
        let work = Work {
            sched,
            direct,
            bufs: Buffers {
                input: input.0,
                input_len: input.1,
                output: output.0,
                output_len: output.1,
                scratch: std::ptr::null_mut(),
                scratch_len: 0,
            },
            ctx: self.exec_ctx(&call, seq, redop, output.1),
            done: None,
            compress,
            path: engine,
            passes: None,
        };
        Ok((work, tx_guard))
    }

    /// Runs `sched`, this rank's part of a collective its caller planned, over the `len`
    /// bytes at `buf` (its output, and its input), as call `call`: every rank must run one with the
    /// same call at the same point of its sequence, ranks with nothing to move too
    /// (an empty schedule), so the numbering stays the same everywhere. `passes` run on
    /// each block of `buf` as the executor first and last touches it. Blocks until it
    /// is done.
    ///
    /// The hierarchical device all-reduce runs its inter-host phase this way
    /// ([`crate::algorithm::hierarchical::inter_node`] over the shards this rank owns,
    /// packed in pinned host memory): the ring between the owners of one shard on each
    /// node is a part of one collective of the whole world, not a group of its own.
    ///
    /// # Safety
    /// `buf` must address `len` bytes that nothing but this call and its passes reads or
    /// writes until it returns (the passes may move a block in or out only in their
    /// `before` and `after` of that block).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) unsafe fn run_planned(
        &self,
        call: Call,
        sched: Arc<Schedule>,
        buf: *mut u8,
        len: usize,
        passes: Option<&mut dyn BlockPasses>,
    ) -> Result<()> {
        let out: RawOut = (buf, len);
        let tx_guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if tx_guard.is_none() {
            return Err(Error::Broken("communicator was shut down".into()));
        }
        let seq = self.next_seq(&call);
        let passes = passes.map(|p| {
            // SAFETY: only the lifetime is erased; this call blocks until the work is
            // done (inline, or waited for), so the passes outlive every use.
            unsafe {
                std::mem::transmute::<&mut dyn BlockPasses, *mut (dyn BlockPasses + 'static)>(p)
            }
        });
        let work = Work {
            sched: Some(sched),
            direct: None,
            bufs: Buffers {
                input: out.0,
                input_len: out.1,
                output: out.0,
                output_len: out.1,
                scratch: std::ptr::null_mut(),
                scratch_len: 0,
            },
            ctx: self.exec_ctx(&call, seq, call.redop, out.1),
            done: None,
            compress: None,
            path: "planned links",
            passes,
        };
        self.dispatch(work, tx_guard).map(|_| ())
    }

    /// How long calls issued now wait for a peer before they fail naming it.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.timeout_ns.load(Ordering::Relaxed))
    }

    /// Sets the timeout of the calls issued from now on (calls already queued keep
    /// theirs), in `HETCCL_TIMEOUT`'s range: what a framework's "change this group's
    /// timeout" maps onto.
    pub fn set_timeout(&self, timeout: std::time::Duration) -> Result<()> {
        let secs = timeout.as_secs_f64();
        if !(crate::config::MIN_TIMEOUT_SECS..=crate::config::MAX_TIMEOUT_SECS).contains(&secs) {
            return Err(Error::invalid(
                "set_timeout",
                format!(
                    "rank {}: a timeout of {secs} s; accepted: {} to {} s (one week), as \
                     HETCCL_TIMEOUT",
                    self.rank,
                    crate::config::MIN_TIMEOUT_SECS,
                    crate::config::MAX_TIMEOUT_SECS
                ),
            ));
        }
        self.timeout_ns
            .store(duration_ns(timeout), Ordering::Relaxed);
        Ok(())
    }

    /// The next sequence number of `call`'s kind; under the queue lock.
    fn next_seq(&self, call: &Call) -> u64 {
        if call.op == CollectiveOp::SendRecv {
            let ctr = if call.is_send {
                &self.p2p_send_seq[call.root]
            } else {
                &self.p2p_recv_seq[call.root]
            };
            ctr.fetch_add(1, Ordering::Relaxed)
        } else {
            self.seq.fetch_add(1, Ordering::Relaxed)
        }
    }

    /// The executor's context of call `call`, number `seq`, over an output of
    /// `out_bytes`.
    fn exec_ctx(&self, call: &Call, seq: u64, redop: ReduceOp, out_bytes: usize) -> ExecCtx {
        ExecCtx {
            rank: self.rank,
            world_size: self.world_size,
            seq,
            op: call.op,
            dtype: call.dtype,
            redop,
            count: call.count as u64,
            timeout: self.timeout(),
            stream_copies: out_bytes >= self.cfg.stream_min_for(call.in_place),
            spin_polls: self.spin_polls,
        }
    }

    /// The compression plan of `call`, which the selection compresses under `mode`: the
    /// links `mode` selects carry 16-bit values.
    fn compress_job(
        &self,
        call: &Call,
        mode: CompressMode,
        compressor: *mut Compressor,
        buffer: u64,
    ) -> CompressJob {
        let me = self.topo.node_of[self.rank];
        let peers: Vec<bool> = (0..self.world_size)
            .map(|p| p != self.rank && select::compresses(mode, self.topo.node_of[p] == me))
            .collect();
        let format = if compressor.is_null() {
            self.cfg.compress_format
        } else {
            // SAFETY: the pointer comes from a live `&mut Compressor` of the caller.
            unsafe { (*compressor).format() }
        };
        CompressJob {
            wire: Wire { format, peers },
            compressor,
            buffer,
            op: call.redop,
        }
    }

    fn check_rank(&self, op: &'static str, what: &str, r: usize) -> Result<()> {
        if r >= self.world_size {
            return Err(Error::invalid(
                op,
                format!(
                    "{what} {r} is not a rank of this communicator (world size {})",
                    self.world_size
                ),
            ));
        }
        Ok(())
    }

    /// Validates a call and returns its pieces for `submit`.
    fn prepare<T: Element>(&self, req: Request<'_, T>) -> Result<(Call, RawIn, RawOut)> {
        let n = self.world_size;
        let Request {
            op,
            input,
            output,
            redop,
            root,
        } = req;
        let out_len = output.len();
        let name = op.name();
        let bad = |reason: String| Error::InvalidArgument { op: name, reason };
        // In place, one buffer is both: the input is the output.
        let in_len = input.map_or(out_len, |s| s.len());
        let count = match op {
            // In place (NCCL's layout), the buffer holds every rank's block, this rank's
            // at block `rank`.
            CollectiveOp::ReduceScatter | CollectiveOp::AllGather if input.is_none() => {
                if out_len % n != 0 {
                    return Err(bad(format!(
                        "in place the buffer holds world_size = {n} blocks of equal size; \
                         {out_len} elements do not divide into {n}"
                    )));
                }
                out_len / n
            }
            CollectiveOp::AllReduce => {
                if input.is_some() && in_len != out_len {
                    return Err(bad(format!(
                        "send buffer has {in_len} elements, receive buffer {out_len}; they must be equal"
                    )));
                }
                out_len
            }
            CollectiveOp::ReduceScatter => {
                if in_len != out_len * n {
                    return Err(bad(format!(
                        "send buffer must hold world_size x receive count = {n} x {out_len} = {} elements, it holds {in_len}",
                        n * out_len
                    )));
                }
                out_len
            }
            CollectiveOp::AllGather => {
                if out_len != in_len * n {
                    return Err(bad(format!(
                        "receive buffer must hold world_size x send count = {n} x {in_len} = {} elements, it holds {out_len}",
                        n * in_len
                    )));
                }
                in_len
            }
            CollectiveOp::Broadcast => {
                self.check_rank(name, "root", root)?;
                out_len
            }
            CollectiveOp::Reduce => {
                self.check_rank(name, "root", root)?;
                if self.rank == root && out_len != in_len {
                    return Err(bad(format!(
                        "on the root the receive buffer must match the send buffer ({in_len} elements), it holds {out_len}"
                    )));
                }
                in_len
            }
            CollectiveOp::Barrier => 1,
            CollectiveOp::SendRecv => {
                self.check_rank(name, "peer", root)?;
                if root == self.rank {
                    return Err(bad("a rank cannot send to or receive from itself".into()));
                }
                in_len.max(out_len)
            }
        };
        let call = Call {
            op,
            dtype: T::DTYPE,
            redop,
            count,
            root,
            in_place: input.is_none(),
            is_send: op == CollectiveOp::SendRecv && input.is_some(),
        };
        let out_bytes = std::mem::size_of_val(output);
        let out_ptr = output.as_mut_ptr() as *mut u8;
        let inp = match input {
            Some(s) => (s.as_ptr() as *const u8, std::mem::size_of_val(s)),
            None => (out_ptr as *const u8, out_bytes),
        };
        Ok((call, inp, (out_ptr, out_bytes)))
    }

    fn run<T: Element>(&self, req: Request<'_, T>) -> Result<()> {
        let (call, i, o) = self.prepare(req)?;
        if self.skip(&call) {
            return Ok(());
        }
        let auto = (self.cfg.compress != CompressMode::Off).then_some((
            self.cfg.compress,
            std::ptr::null_mut(),
            0,
        ));
        self.run_now(call, i, o, auto).map(|_| ())
    }

    /// In-place all-reduce of f32 values with 16-bit values on the links `c.mode`
    /// selects (sums formed in f32; `Sum` and `Avg` only, other ops run exact).
    /// Returns how many values had to be saturated or were non-finite, also logged at
    /// `warn`, so a trainer can skip the step as a loss scaler would.
    pub fn all_reduce_compressed(
        &self,
        buf: &mut [f32],
        op: ReduceOp,
        c: Compression<'_>,
    ) -> Result<OverflowStats> {
        let (call, i, o) =
            self.prepare(Request::new(CollectiveOp::AllReduce, None, buf).redop(op))?;
        if self.skip(&call) {
            return Ok(OverflowStats::default());
        }
        let job = Some((c.mode, c.compressor as *mut Compressor, c.buffer));
        self.run_now(call, i, o, job)
    }

    /// Numbering starts over after the collectives `init` runs itself, so the caller's
    /// first collective is #0 in errors and logs. Safe: every message of those
    /// collectives to or from this rank has been received (links are FIFO and the last
    /// one finished here), and every rank restarts at the same point of its own
    /// sequence. Only before the control pages exist: their flags carry sequence
    /// numbers.
    fn restart_numbering(&mut self) {
        debug_assert!(self.shared.ctl.get().is_none());
        self.seq.store(0, Ordering::Relaxed);
        for c in self.p2p_send_seq.iter().chain(&self.p2p_recv_seq) {
            c.store(0, Ordering::Relaxed);
        }
        self.logged
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Calls that move nothing ([`select::moves_nothing`]) return at once.
    fn skip(&self, call: &Call) -> bool {
        select::moves_nothing(call, self.world_size)
    }

    /// In-place all-reduce: every rank ends with the element-wise reduction of all
    /// ranks' `buf`.
    pub fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.run(Request::new(CollectiveOp::AllReduce, None, buf).redop(op))
    }

    /// Out-of-place all-reduce.
    pub fn all_reduce_into<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        self.run(Request::new(CollectiveOp::AllReduce, Some(send), recv).redop(op))
    }

    /// Reduce-scatter: `send` holds `world_size` blocks of `recv.len()` elements; rank
    /// `r` receives block `r` reduced over all ranks.
    pub fn reduce_scatter<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        self.run(Request::new(CollectiveOp::ReduceScatter, Some(send), recv).redop(op))
    }

    /// In-place reduce-scatter (NCCL's layout): `buf` holds `world_size` blocks of equal
    /// size, and rank `r` ends with block `r` reduced over all ranks, in block `r` of
    /// `buf`. The other blocks are read, not written. Needs no copy of the message: the
    /// partial sums travel through the communicator's bounded scratch.
    pub fn reduce_scatter_in_place<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.run(Request::new(CollectiveOp::ReduceScatter, None, buf).redop(op))
    }

    /// All-gather: rank `r`'s `send` lands at block `r` of every rank's `recv`.
    pub fn all_gather<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.run(Request::new(CollectiveOp::AllGather, Some(send), recv))
    }

    /// In-place all-gather: `buf` holds `world_size` blocks of equal size; block `r` of
    /// rank `r`'s `buf` lands at block `r` of every rank's `buf`.
    pub fn all_gather_in_place<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        self.run(Request::new(CollectiveOp::AllGather, None, buf))
    }

    /// Broadcast `buf` from `root` to every rank.
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.run(Request::new(CollectiveOp::Broadcast, None, buf).root(root))
    }

    /// Reduce every rank's `send` into `recv` on `root` (`recv` is ignored elsewhere
    /// and may be empty).
    pub fn reduce<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        self.run(
            Request::new(CollectiveOp::Reduce, Some(send), recv)
                .redop(op)
                .root(root),
        )
    }

    /// In-place reduce: every rank's `buf` (all of equal length) reduced into `root`'s
    /// `buf`; the other ranks' buffers are read, not written.
    pub fn reduce_in_place<T: Element>(
        &self,
        buf: &mut [T],
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        self.run(
            Request::new(CollectiveOp::Reduce, None, buf)
                .redop(op)
                .root(root),
        )
    }

    /// Returns once every rank has entered the barrier.
    pub fn barrier(&self) -> Result<()> {
        let mut token = [0u8; 1];
        self.run(Request::new(CollectiveOp::Barrier, None, &mut token))
    }

    /// Sends `buf` to `peer`, which must post a matching [`Communicator::recv`] of the
    /// same length. Point-to-point messages between two ranks arrive in send order.
    pub fn send<T: Element>(&self, buf: &[T], peer: usize) -> Result<()> {
        let mut none: [T; 0] = [];
        self.run(Request::new(CollectiveOp::SendRecv, Some(buf), &mut none).root(peer))
    }

    /// Receives into `buf` from `peer`.
    pub fn recv<T: Element>(&self, buf: &mut [T], peer: usize) -> Result<()> {
        self.run(Request::new(CollectiveOp::SendRecv, None, buf).root(peer))
    }

    /// Runs `f` with a [`Scope`] in which collectives can be started without waiting.
    /// Every operation started in the scope is finished when `scope` returns, also if
    /// `f` panics. Operations run one after another, in the order they were started.
    pub fn scope<'env, R>(&'env self, f: impl for<'s> FnOnce(&'s Scope<'s, 'env>) -> R) -> R {
        let scope = Scope {
            comm: self,
            pending: Mutex::new(Vec::new()),
            _scope: PhantomData,
            _env: PhantomData,
        };
        struct WaitAll<'a>(&'a Mutex<Vec<Arc<Completion>>>);
        impl Drop for WaitAll<'_> {
            fn drop(&mut self) {
                let pending =
                    std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
                for c in pending {
                    // Errors reach the caller through its handles; the communicator is
                    // broken after one anyway.
                    let _ = c.wait();
                }
            }
        }
        let _guard = WaitAll(&scope.pending);
        f(&scope)
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // Closing the queue ends the progress thread once the queued work is done.
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        self.shared.close();
        let p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        crate::flight::unregister(p.flight);
        tracing::info!(
            rank = self.rank,
            "metrics: {}",
            p.obs.counters.snapshot().summary()
        );
        if let Some(t) = &self.tracer {
            t.finish();
        }
    }
}

/// A caller's send buffer as the progress thread sees it: address and length in bytes.
type RawIn = (*const u8, usize);
/// A caller's receive buffer: address and length in bytes.
type RawOut = (*mut u8, usize);

/// A validated request, before it becomes a [`Call`].
struct Request<'a, T> {
    op: CollectiveOp,
    input: Option<&'a [T]>,
    output: &'a mut [T],
    redop: ReduceOp,
    root: usize,
}

impl<'a, T> Request<'a, T> {
    fn new(op: CollectiveOp, input: Option<&'a [T]>, output: &'a mut [T]) -> Self {
        Request {
            op,
            input,
            output,
            redop: ReduceOp::Sum,
            root: 0,
        }
    }
    fn redop(mut self, op: ReduceOp) -> Self {
        self.redop = op;
        self
    }
    fn root(mut self, r: usize) -> Self {
        self.root = r;
        self
    }
}

/// Starts collectives without waiting; see [`Communicator::scope`].
pub struct Scope<'s, 'env: 's> {
    comm: &'env Communicator,
    pending: Mutex<Vec<Arc<Completion>>>,
    _scope: PhantomData<&'s mut &'s ()>,
    _env: PhantomData<&'env mut &'env ()>,
}

/// A started operation; [`Handle::wait`] returns its result.
#[must_use = "an operation's error is only reported through its handle"]
pub struct Handle<'s> {
    done: Option<Arc<Completion>>,
    _scope: PhantomData<&'s ()>,
}

impl Handle<'_> {
    /// Blocks until the operation is done and returns its result.
    pub fn wait(self) -> Result<()> {
        self.wait_stats().map(|_| ())
    }

    /// Like [`Handle::wait`], also returning what compression saturated (zero for
    /// uncompressed operations).
    pub fn wait_stats(self) -> Result<OverflowStats> {
        match &self.done {
            Some(c) => c.wait(),
            None => Ok(OverflowStats::default()),
        }
    }

    /// True once the operation is done (its result is kept for `wait`).
    pub fn test(&self) -> bool {
        self.done.as_ref().is_none_or(|c| c.is_done())
    }
}

impl<'s, 'env> Scope<'s, 'env> {
    fn start<T: Element>(&'s self, req: Request<'env, T>) -> Result<Handle<'s>> {
        let (call, i, o) = self.comm.prepare(req)?;
        if self.comm.skip(&call) {
            return Ok(Handle {
                done: None,
                _scope: PhantomData,
            });
        }
        let auto = (self.comm.cfg.compress != CompressMode::Off).then_some((
            self.comm.cfg.compress,
            std::ptr::null_mut(),
            0,
        ));
        let c = self.comm.submit(call, i, o, auto)?;
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(c.clone());
        Ok(Handle {
            done: Some(c),
            _scope: PhantomData,
        })
    }

    /// Starts an in-place all-reduce of `buf`.
    pub fn all_reduce<T: Element>(
        &'s self,
        buf: &'env mut [T],
        op: ReduceOp,
    ) -> Result<Handle<'s>> {
        self.start(Request::new(CollectiveOp::AllReduce, None, buf).redop(op))
    }

    /// Starts a compressed in-place all-reduce (see [`Communicator::all_reduce_compressed`]).
    pub fn all_reduce_compressed(
        &'s self,
        buf: &'env mut [f32],
        op: ReduceOp,
        c: Compression<'env>,
    ) -> Result<Handle<'s>> {
        let (call, i, o) = self
            .comm
            .prepare(Request::new(CollectiveOp::AllReduce, None, buf).redop(op))?;
        if self.comm.skip(&call) {
            return Ok(Handle {
                done: None,
                _scope: PhantomData,
            });
        }
        let job = Some((c.mode, c.compressor as *mut Compressor, c.buffer));
        let done = self.comm.submit(call, i, o, job)?;
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(done.clone());
        Ok(Handle {
            done: Some(done),
            _scope: PhantomData,
        })
    }

    /// Starts an out-of-place all-reduce.
    pub fn all_reduce_into<T: Element>(
        &'s self,
        send: &'env [T],
        recv: &'env mut [T],
        op: ReduceOp,
    ) -> Result<Handle<'s>> {
        self.start(Request::new(CollectiveOp::AllReduce, Some(send), recv).redop(op))
    }

    /// Starts a reduce-scatter.
    pub fn reduce_scatter<T: Element>(
        &'s self,
        send: &'env [T],
        recv: &'env mut [T],
        op: ReduceOp,
    ) -> Result<Handle<'s>> {
        self.start(Request::new(CollectiveOp::ReduceScatter, Some(send), recv).redop(op))
    }

    /// Starts an in-place reduce-scatter (see [`Communicator::reduce_scatter_in_place`]).
    pub fn reduce_scatter_in_place<T: Element>(
        &'s self,
        buf: &'env mut [T],
        op: ReduceOp,
    ) -> Result<Handle<'s>> {
        self.start(Request::new(CollectiveOp::ReduceScatter, None, buf).redop(op))
    }

    /// Starts an all-gather.
    pub fn all_gather<T: Element>(
        &'s self,
        send: &'env [T],
        recv: &'env mut [T],
    ) -> Result<Handle<'s>> {
        self.start(Request::new(CollectiveOp::AllGather, Some(send), recv))
    }

    /// Starts an in-place all-gather (see [`Communicator::all_gather_in_place`]).
    pub fn all_gather_in_place<T: Element>(&'s self, buf: &'env mut [T]) -> Result<Handle<'s>> {
        self.start(Request::new(CollectiveOp::AllGather, None, buf))
    }

    /// Starts a broadcast.
    pub fn broadcast<T: Element>(&'s self, buf: &'env mut [T], root: usize) -> Result<Handle<'s>> {
        self.start(Request::new(CollectiveOp::Broadcast, None, buf).root(root))
    }

    /// Starts a reduce.
    pub fn reduce<T: Element>(
        &'s self,
        send: &'env [T],
        recv: &'env mut [T],
        op: ReduceOp,
        root: usize,
    ) -> Result<Handle<'s>> {
        self.start(
            Request::new(CollectiveOp::Reduce, Some(send), recv)
                .redop(op)
                .root(root),
        )
    }

    /// Starts an in-place reduce (see [`Communicator::reduce_in_place`]).
    pub fn reduce_in_place<T: Element>(
        &'s self,
        buf: &'env mut [T],
        op: ReduceOp,
        root: usize,
    ) -> Result<Handle<'s>> {
        self.start(
            Request::new(CollectiveOp::Reduce, None, buf)
                .redop(op)
                .root(root),
        )
    }
}

/// The dtype tag of `T` (re-exported for type-erased callers).
pub fn dtype_of<T: Element>() -> DataType {
    T::DTYPE
}

/// In-process worlds for tests: communicators joined by in-memory links, one thread per
/// rank. The unit tests use them as they are; integration tests and other crates get them
/// through hetccl-testkit, which turns on the `testkit` feature. Test support: a world
/// that cannot be built panics, as a failed test should.
#[cfg(any(test, feature = "testkit"))]
pub mod testing {
    use super::*;
    use crate::topology::RankInfo;
    use crate::transport::mem;

    /// `n` communicators in one process, fully connected by in-memory links, ranks
    /// grouped into pretend nodes of `per_node`; `cfg` with 4 KiB chunks.
    #[allow(clippy::needless_range_loop)]
    pub fn world(n: usize, per_node: usize, cfg: Config) -> Vec<Communicator> {
        let mut links: Vec<Vec<Option<Box<dyn Link>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        for a in 0..n {
            for b in a + 1..n {
                let (la, lb) = mem::pair_with(a, b, 4096, 4);
                links[a][b] = Some(Box::new(la));
                links[b][a] = Some(Box::new(lb));
            }
        }
        let topo = Topology::from_ranks(
            (0..n)
                .map(|r| RankInfo {
                    rank: r,
                    hostname: "h".into(),
                    node_id: format!("n{}", r / per_node),
                    // A live pid: the shared-buffer path checks peers' liveness by pid.
                    pid: std::process::id(),
                    device: crate::topology::Device::Cpu,
                    cpus: 0,
                })
                .collect(),
        );
        let cfg = Config {
            chunk_bytes: 4096,
            ..cfg
        };
        links
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let c = Communicator::from_parts(cfg.clone(), topo.clone(), r, l, None)
                    .unwrap_or_else(|e| panic!("in-process world of {n}: rank {r}: {e}"));
                // One process, one trace clock: every rank is on rank 0's exactly.
                if let Some(t) = &c.tracer {
                    t.set_clock(n, 0.0, 0.0);
                }
                c
            })
            .collect()
    }

    /// Runs `f` on every communicator at once, one thread each; a rank's panic is
    /// raised again here.
    pub fn on_all<R: Send>(
        comms: &[Communicator],
        f: impl Fn(&Communicator) -> R + Sync,
    ) -> Vec<R> {
        std::thread::scope(|s| {
            let hs: Vec<_> = comms.iter().map(|c| s.spawn(|| f(c))).collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use testing::on_all;

    fn world(n: usize, per_node: usize, algo: AlgoChoice) -> Vec<Communicator> {
        let cfg = Config {
            algo,
            timeout: std::time::Duration::from_secs(20),
            ..Config::default()
        };
        testing::world(n, per_node, cfg)
    }

    #[test]
    fn all_reduce_every_algorithm_over_memory_links() {
        for algo in [
            AlgoChoice::Ring,
            AlgoChoice::Tree,
            AlgoChoice::Hier,
            AlgoChoice::Auto,
        ] {
            let comms = world(4, 2, algo);
            for count in [0usize, 1, 7, 1000, 100_003] {
                let outs = on_all(&comms, |c| {
                    let mut v: Vec<f32> =
                        (0..count).map(|i| (c.rank() * 10 + i % 3) as f32).collect();
                    c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
                    v
                });
                let want: Vec<f32> = (0..count).map(|i| (60 + 4 * (i % 3)) as f32).collect();
                for o in outs {
                    assert_eq!(o, want, "{algo:?} count={count}");
                }
            }
        }
    }

    #[test]
    fn doubling_out_of_place_leaves_the_same_bits_on_both_ranks() {
        // Max over +0 and -0 picks its left operand, and these sums depend on the order:
        // both ranks must still end with one value, the one in place gives, over shared
        // memory (2 per node) and over links between nodes (1 per node), each element
        // arriving in pieces of every size the links cut.
        for per_node in [1, 2] {
            let cfg = Config {
                algo: AlgoChoice::Doubling,
                timeout: std::time::Duration::from_secs(20),
                ..Config::default()
            };
            let comms = testing::world(2, per_node, cfg);
            for (op, vals) in [
                (ReduceOp::Max, [0.0f32, -0.0]),
                (ReduceOp::Min, [-0.0f32, 0.0]),
                (ReduceOp::Sum, [1e8f32, 0.75]),
            ] {
                let count = 5000;
                let outs = on_all(&comms, |c| {
                    let x: Vec<f32> = (0..count)
                        .map(|i| vals[(c.rank() + i) % 2] * (1.0 + (i % 3) as f32))
                        .collect();
                    let mut out = vec![7.0f32; count];
                    c.all_reduce_into(&x, &mut out, op).unwrap();
                    let mut inplace = x.clone();
                    c.all_reduce(&mut inplace, op).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    (bits(&out), bits(&inplace))
                });
                assert_eq!(outs[0].0, outs[1].0, "{op} per node {per_node}");
                assert_eq!(outs[0].0, outs[0].1, "{op} per node {per_node}: in place");
            }
        }
    }

    #[test]
    fn streaming_copies_of_received_pieces_land_exactly() {
        // Every received piece that is only copied, and every final sum, goes through
        // streaming stores here (threshold 0), at odd lengths and offsets: the heads and
        // tails of each piece take the ordinary path, the aligned middle the streaming
        // one.
        let cfg = Config {
            algo: AlgoChoice::Ring,
            stream_min_bytes: 0,
            timeout: std::time::Duration::from_secs(20),
            ..Config::default()
        };
        let comms = testing::world(3, 3, cfg);
        for count in [1usize, 7, 1000, 100_003] {
            let outs = on_all(&comms, |c| {
                let x: Vec<u8> = (0..count).map(|i| (c.rank() * 50 + i % 7) as u8).collect();
                let mut sum = vec![0u8; count];
                c.all_reduce_into(&x, &mut sum, ReduceOp::Sum).unwrap();
                let mut all = vec![0u8; 3 * count];
                c.all_gather(&x, &mut all).unwrap();
                // A reduce-scatter's own block, read by nothing after the last step,
                // is summed with streaming stores.
                let big: Vec<f32> = (0..3 * count)
                    .map(|i| (c.rank() * 10 + i % 11) as f32)
                    .collect();
                let mut part = vec![0f32; count];
                c.reduce_scatter(&big, &mut part, ReduceOp::Sum).unwrap();
                (sum, all, part)
            });
            for (r, (sum, all, part)) in outs.into_iter().enumerate() {
                for i in [0, count / 2, count - 1] {
                    assert_eq!(sum[i], (150 + 3 * (i % 7)) as u8, "count {count} [{i}]");
                    for r in 0..3 {
                        assert_eq!(all[r * count + i], (r * 50 + i % 7) as u8);
                    }
                }
                for (i, x) in part.iter().enumerate() {
                    let g = r * count + i;
                    assert_eq!(
                        *x,
                        (30 + 3 * (g % 11)) as f32,
                        "rank {r} count {count} [{i}]"
                    );
                }
            }
        }
    }

    #[test]
    fn outputs_of_their_own_stream_from_a_quarter_of_the_in_place_size() {
        let comms = world(2, 2, AlgoChoice::Ring);
        let streams = |in_place: bool, out_bytes: usize| {
            let call = Call {
                op: CollectiveOp::AllReduce,
                dtype: DataType::F32,
                redop: ReduceOp::Sum,
                count: out_bytes / 4,
                root: 0,
                in_place,
                is_send: false,
            };
            comms[0]
                .exec_ctx(&call, 0, ReduceOp::Sum, out_bytes)
                .stream_copies
        };
        // The default HETCCL_STREAM_MIN_BYTES, 32 MiB.
        assert!(!streams(false, (8 << 20) - 4));
        assert!(streams(false, 8 << 20));
        assert!(!streams(true, 8 << 20));
        assert!(!streams(true, (32 << 20) - 4));
        assert!(streams(true, 32 << 20));
    }

    #[test]
    fn scoped_operations_overlap_and_finish_in_order() {
        let comms = world(3, 3, AlgoChoice::Ring);
        let outs = on_all(&comms, |c| {
            let mut a = vec![c.rank() as i64 + 1; 5000];
            let mut b = vec![0u8; 10];
            if c.rank() == 2 {
                b.fill(9);
            }
            c.scope(|s| {
                let h1 = s.all_reduce(&mut a, ReduceOp::Prod).unwrap();
                let h2 = s.broadcast(&mut b, 2).unwrap();
                h2.wait().unwrap();
                assert!(h1.test(), "an earlier operation finishes first");
                h1.wait().unwrap();
            });
            (a, b)
        });
        for (a, b) in outs {
            assert_eq!(a, vec![6i64; 5000]);
            assert_eq!(b, vec![9u8; 10]);
        }
    }

    #[test]
    fn compressed_all_reduce_is_close_and_identical_on_every_rank() {
        use crate::compression::WireFormat;
        // Small counts too: there the cost model would pick recursive doubling, whose
        // partners each add a rounded copy of the other's partial sum to their exact
        // own, so a compressed call must not run it.
        for (algo, count) in [
            (AlgoChoice::Ring, 30_001),
            (AlgoChoice::Tree, 30_001),
            (AlgoChoice::Hier, 30_001),
            (AlgoChoice::Halving, 30_001),
            (AlgoChoice::Doubling, 1000),
            (AlgoChoice::Auto, 1000),
        ] {
            for mode in [CompressMode::Inter, CompressMode::All] {
                let comms = world(4, 2, algo);
                let outs = on_all(&comms, |c| {
                    let mut comp =
                        Compressor::new(WireFormat::F16, ScalePolicy::InverseWorldSize, true)
                            .unwrap();
                    let mut v: Vec<f32> = (0..count)
                        .map(|i| ((i * (c.rank() + 1)) as f32 * 0.001).sin())
                        .collect();
                    let stats = c
                        .all_reduce_compressed(
                            &mut v,
                            ReduceOp::Sum,
                            Compression {
                                mode,
                                compressor: &mut comp,
                                buffer: 0,
                            },
                        )
                        .unwrap();
                    assert!(stats.is_clean());
                    assert_eq!(comp.residual(0).map(|r| r.len()), Some(count));
                    v
                });
                for i in (0..count).step_by(97) {
                    let exact: f64 = (0..4)
                        .map(|r| ((i * (r + 1)) as f32 * 0.001).sin() as f64)
                        .sum();
                    let err = (outs[0][i] as f64 - exact).abs();
                    // fp16 keeps 11 bits: each of the 4 inputs, the partial sums and the
                    // result are rounded once or twice, each within 2^-11 relative.
                    assert!(
                        err < 4.0 * 2f64.powi(-11) * exact.abs().max(1.0),
                        "{algo:?} {mode:?} [{i}]: {} vs {exact}",
                        outs[0][i]
                    );
                }
                for o in &outs[1..] {
                    assert!(
                        o.iter()
                            .zip(&outs[0])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{algo:?} {mode:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn overflow_is_counted_not_turned_into_inf() {
        use crate::compression::WireFormat;
        let comms = world(2, 1, AlgoChoice::Ring);
        let outs = on_all(&comms, |c| {
            let mut comp =
                Compressor::new(WireFormat::F16, ScalePolicy::Factor(1.0), false).unwrap();
            let mut v = vec![1.0f32; 64];
            v[3] = 1e6; // beyond fp16's 65504
            v[5] = f32::NAN;
            let stats = c
                .all_reduce_compressed(
                    &mut v,
                    ReduceOp::Sum,
                    Compression {
                        mode: CompressMode::Inter,
                        compressor: &mut comp,
                        buffer: 0,
                    },
                )
                .unwrap();
            (stats, v)
        });
        // Both ranks saturate their own 1e6 and pass their NaN on when quantising. In the
        // ring, one rank sends chunk 0 (NaN again) while reducing; the other sends the
        // reduced chunk 0 (65504 + 65504 saturates again, NaN again).
        let mut counts: Vec<(u64, u64)> = outs
            .iter()
            .map(|(s, _)| (s.overflow, s.nonfinite))
            .collect();
        counts.sort();
        assert_eq!(counts, [(1, 2), (2, 2)]);
        for (_, v) in outs {
            assert_eq!(v[3], 65504.0);
            assert!(v[5].is_nan());
            assert_eq!(v[0], 2.0);
        }
    }

    #[test]
    fn abort_from_another_thread_ends_a_blocked_call() {
        let comms = world(2, 2, AlgoChoice::Ring);
        let t0 = std::time::Instant::now();
        let e = std::thread::scope(|s| {
            // Rank 1 never joins: rank 0's all-reduce blocks until the abort.
            let h = s.spawn(|| comms[0].all_reduce(&mut [1.0f32; 100], ReduceOp::Sum));
            std::thread::sleep(std::time::Duration::from_millis(100));
            comms[0].abort();
            h.join().unwrap().unwrap_err()
        });
        assert!(e.to_string().contains("aborted by the application"), "{e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
        let again = comms[0].barrier().unwrap_err().to_string();
        assert!(again.contains("aborted"), "{again}");
    }

    /// Runs `f` on another thread and returns what it returns, failing the test if
    /// that takes longer than `limit` (the thread is then left behind, hung).
    fn within<T: Send + 'static>(
        limit: std::time::Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit)
            .expect("no answer within the limit: a call hung")
    }

    /// Rank 0's progress thread panics (`inject`) while rank 0 has two all-reduces
    /// queued: both, and the next call, fail naming the panic; rank 1 learns that rank 0
    /// gave up. The communicators' timeout is 20 s, so only the panic's handling can end
    /// the calls within the limit.
    fn panicking_progress_thread(inject: Inject) -> Vec<(String, String, String)> {
        within(std::time::Duration::from_secs(10), move || {
            let comms = world(2, 2, AlgoChoice::Ring);
            comms[0]
                .progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .inject = Some(inject);
            on_all(&comms, |c| {
                let mut a = vec![1.0f32; 1000];
                let mut b = vec![2.0f32; 1000];
                let (first, second) = c.scope(|s| {
                    // A thread that is gone already refuses the second call at once.
                    let h1 = s.all_reduce(&mut a, ReduceOp::Sum);
                    let h2 = s.all_reduce(&mut b, ReduceOp::Sum);
                    (h1.and_then(|h| h.wait()), h2.and_then(|h| h.wait()))
                });
                let next = c.barrier();
                let text = |r: Result<()>| r.unwrap_err().to_string();
                (text(first), text(second), text(next))
            })
        })
    }

    #[test]
    fn an_idle_abort_reaches_the_peers_at_once() {
        let comms = world(2, 2, AlgoChoice::Ring);
        comms[0].abort();
        let t0 = std::time::Instant::now();
        let e = comms[1]
            .all_reduce(&mut [1.0f32; 100], ReduceOp::Sum)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "rank 1: peer 0 is gone during all_reduce #0: peer 0 gave up because rank 0's \
             communicator was aborted (by its application or its launcher)"
        );
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
        let again = comms[0].barrier().unwrap_err().to_string();
        assert_eq!(
            again,
            "communicator is unusable after an earlier error: aborted by the application"
        );
    }

    #[test]
    fn abort_from_another_thread_ends_queued_work_too() {
        // Three all-reduces queued on rank 0, whose peer never joins; the timeout is
        // 20 s, so only the abort ends them within the limit.
        let errs = within(std::time::Duration::from_secs(10), || {
            let comms = world(2, 2, AlgoChoice::Ring);
            std::thread::scope(|s| {
                let c = &comms[0];
                let waiter = s.spawn(move || {
                    let mut bufs = [[1.0f32; 100]; 3];
                    c.scope(|sc| {
                        let hs: Vec<_> = bufs
                            .iter_mut()
                            .map(|b| sc.all_reduce(b, ReduceOp::Sum).unwrap())
                            .collect();
                        hs.into_iter()
                            .map(|h| h.wait().unwrap_err().to_string())
                            .collect::<Vec<_>>()
                    })
                });
                std::thread::sleep(std::time::Duration::from_millis(100));
                c.abort();
                waiter.join().unwrap()
            })
        });
        // The running all-reduce notices the abort (or, had the abort come before the
        // progress thread took it up, the idle abort broke the communicator first).
        for e in &errs {
            assert!(
                e == "communicator is unusable after an earlier error: rank 0: all_reduce #0 \
                      aborted by the application"
                    || e == "communicator is unusable after an earlier error: aborted by the \
                             application",
                "{e}"
            );
        }
    }

    #[test]
    fn a_panic_inside_a_collective_fails_it_the_queue_and_later_calls() {
        let t0 = std::time::Instant::now();
        let errs = panicking_progress_thread(Inject::Execute);
        let said = "rank 0: all_reduce #0 failed: the progress thread panicked: injected panic \
                    in all_reduce #0 (a bug in hetccl; please report it)";
        assert_eq!(errs[0].0, said);
        let broken = format!("communicator is unusable after an earlier error: {said}");
        assert_eq!(errs[0].1, broken);
        assert_eq!(errs[0].2, broken);
        assert_eq!(
            errs[1].0,
            "rank 1: peer 0 is gone during all_reduce #0: peer 0 gave up after an error on \
             rank 0"
        );
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn a_panic_outside_a_collective_fails_the_queue_and_later_calls() {
        let t0 = std::time::Instant::now();
        let errs = panicking_progress_thread(Inject::Loop);
        let said = "communicator is unusable after an earlier error: rank 0: the progress \
                    thread panicked: injected panic in the progress loop (a bug in hetccl; \
                    please report it)";
        // The thread is gone: the queued calls end when their callers see it stopped,
        // and the next call finds the queue closed.
        assert_eq!(errs[0], (said.into(), said.into(), said.into()));
        assert_eq!(
            errs[1].0,
            "rank 1: peer 0 is gone during all_reduce #0: peer 0 gave up after an error on \
             rank 0"
        );
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn ranks_waiting_on_a_silent_rank_name_whom_they_waited_on() {
        // Rank 2 of 3 never joins the ring. Its receiver (rank 0) times out on it; rank 1
        // waits on rank 0, a waiter, and either times out saying so or learns from rank
        // 0's abort where the stall is.
        let cfg = Config {
            algo: AlgoChoice::Ring,
            timeout: std::time::Duration::from_millis(500),
            ..Config::default()
        };
        let comms = testing::world(3, 3, cfg);
        let errs = on_all(&comms, |c| {
            if c.rank() == 2 {
                return String::new();
            }
            let mut v = vec![1.0f32; 1000];
            c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err().to_string()
        });
        // Rank 0 names rank 2, whether it timed out itself or rank 1 gave up on it
        // first (both wait about as long).
        let on_2 = "waiting for peer 2 to send data; peer 2 may itself be waiting on another \
                    rank further along, so the stall may lie there";
        assert!(
            errs[0].ends_with(on_2)
                && (errs[0].starts_with("rank 0: all_reduce #0 timed out after")
                    || errs[0].starts_with(
                        "rank 0: peer 1 is gone during all_reduce #0: peer 1 gave up after \
                         waiting too long for rank 0 (this rank, itself held up by a stall \
                         further along); this rank was waiting for peer 2 to send data"
                    )),
            "{errs:?}"
        );
        let heard = "rank 1: peer 0 is gone during all_reduce #0: peer 0 gave up after \
                     waiting too long for rank 2: the stall is further along, at rank 2 or \
                     beyond";
        assert!(
            errs[1] == heard
                || (errs[1].starts_with("rank 1: all_reduce #0 timed out after")
                    && errs[1].contains("waiting for peer 0 to send data; peer 0 may itself")),
            "{errs:?}"
        );
    }

    #[test]
    fn bad_arguments_are_refused_before_any_traffic() {
        let comms = world(2, 2, AlgoChoice::Ring);
        let c = &comms[0];
        let e = c
            .reduce_scatter(&[1.0f32; 5], &mut [0.0f32; 2], ReduceOp::Sum)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid argument to reduce_scatter: send buffer must hold world_size x receive count = 2 x 2 = 4 elements, it holds 5"
        );
        for e in [
            c.reduce_scatter_in_place(&mut [1.0f32; 5], ReduceOp::Sum),
            c.all_gather_in_place(&mut [1.0f32; 5]),
        ] {
            let e = e.unwrap_err().to_string();
            assert!(
                e.ends_with(
                    "in place the buffer holds world_size = 2 blocks of equal size; 5 elements \
                     do not divide into 2"
                ),
                "{e}"
            );
        }
        let e = c
            .reduce_in_place(&mut [0u8; 4], ReduceOp::Sum, 2)
            .unwrap_err();
        assert!(e.to_string().contains("root 2 is not a rank"), "{e}");
        let e = c.broadcast(&mut [0u8; 4], 2).unwrap_err();
        assert!(e.to_string().contains("root 2 is not a rank"), "{e}");
        let e = c.send(&[1u8], 0).unwrap_err();
        assert!(e.to_string().contains("itself"), "{e}");
    }

    #[test]
    fn a_mismatch_breaks_the_communicator_on_both_sides() {
        let comms = world(2, 2, AlgoChoice::Ring);
        let errs = on_all(&comms, |c| {
            let mut v = vec![1.0f32; 100 + c.rank()];
            let e = c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err();
            let again = c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err();
            (e.to_string(), again.to_string())
        });
        let all = format!("{errs:?}");
        assert!(all.contains("does not match what peer"), "{all}");
        for (_, again) in &errs {
            assert!(
                again.starts_with("communicator is unusable after an earlier error"),
                "{again}"
            );
        }
    }
}
