//! The flight recorder: what every rank was last doing, kept so that a hang or a failure
//! can be explained across ranks after the fact.
//!
//! Each communicator keeps its last [`SLOTS`] collectives in a fixed ring of atomic
//! slots ([`Recorder`]; no allocation, no lock, no system call, no read-modify-write per
//! collective: a load and a store of its counter and a few relaxed stores at each end).
//! The times are the call's own clock reads ([`Stamp`], shared with the counters and the
//! trace), made Unix milliseconds only when a dump is taken. A slot says which
//! collective (op, sequence number, count), its state (running, done, failed), when it
//! started and ended, and the peer it waited on since when, in which phase of its
//! schedule (intra-node reduce-scatter, inter-node all-reduce, ...: the phase of the op
//! that waits). The peer and phase are written by the
//! waits' checks (every `CHECK_EVERY`, 50 ms, of a wait without progress:
//! `algorithm::executor::wait`), so a collective that never waits costs nothing more.
//!
//! ```text
//! Progress::execute    rec.begin(ctx, now) -> slot  the thread's current slot
//! a wait's checks      waiting(peer, what, phase, since)  on the thread's current slot
//! Progress::execute    end(slot, now) / failed(slot, now, error): the culprit, a dump
//! SIGUSR1              a dump (the job asked; the rank keeps running)
//! ```
//!
//! A dump is this process's [`report::RankState`] as JSON. With `HETCCL_FLIGHT_DIR` set
//! (`hetccl run` sets it to a private directory per job) it is written there as
//! `rank-K.json` (to a temporary name, then renamed, so a reader never sees half of
//! one); the launcher collects the files of every rank that can still write one and
//! prints one report ([`report::Report`]). Without a directory a SIGUSR1 dump goes to
//! stderr as text.
//!
//! Without the launcher (mpirun, srun, torchrun, ranks started by hand) the directory is
//! `HETCCL_FLIGHT_DIR`, else one derived from the job's identity and this run of it
//! (every rank's host and process id) in the temporary directory
//! (`hetccl-flight-<uid>-<digest>`; one per host): a job started again under the same
//! identity (torchrun's port, a fixed job id) never meets what an earlier run left. Such
//! leftovers (a run whose last process was killed keeps its markers and finding) are
//! removed by the next run of this user on the host. A rank whose collective
//! failed writes its dump, waits 100 ms per rank below it (capped at 1 s) so the lowest
//! failing rank goes first, leaves the report to a lower rank whose dump says it failed
//! too, and else takes `report.lock` (create-exclusive): the one rank that gets it collects the others' dumps as the launcher would (asking the ranks
//! on its host that did not dump with SIGUSR1, describing those that are stopped or
//! gone) and prints the report on its stderr; the others print only their own error,
//! which names the rank it deduced. The printing rank then leaves `finding` (the job's
//! first failure) in place of the dumps, and keeps the lock: a rank that fails later
//! names that failure and prints no second report. The last communicator of a process
//! to close removes its marker, and its dump when nothing failed; the last process the
//! finding and the lock, and the directory once empty.
//!
//! Ranks on other hosts cannot read this host's directory. In a job that spans hosts
//! the communicator gives the recorder a [`Remote`] (`communicator::flight_net`): a
//! failing rank asks the ranks of other hosts for their states over the network (once
//! each, all at once, [`ASK_WITHIN`]; one that takes the connection and says nothing is
//! silent, stopped or hung; one whose host refuses it is gone), sends its own error
//! state to the lowest ranks of other hosts below it (they may print the report after
//! it exits), and the rank that prints the report tells the others its finding, so that
//! no other host prints a second one.
//!
//! Every failing rank also names the job's culprit in its own error: after its dump
//! it reads the others' dumps and the states of this host's processes for up to a
//! second (less once a rank is found stopped or gone), builds the report's findings
//! and adds "; the job's first failure: rank R in OP #SEQ: rank R ..." to its error.
//!
//! SIGUSR1: the first communicator installs a handler when the signal still has its
//! default action (which would end the process), never over a handler the application
//! installed. The handler only writes a byte to a pipe; a thread of this module turns it
//! into a dump. Every process writes `rank-K.pid` (its [`Marker`]) into the directory,
//! saying whether it handles SIGUSR1: the launcher signals only those that do, as for
//! any other the signal would be fatal.

pub mod clock;
pub mod report;

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::algorithm::Phase;
use crate::config::Config;
use crate::dtype::CollectiveOp;
use crate::error::{Error, Result};
pub use clock::Stamp;
use report::{CallRecord, CallState, RankState};

/// Collectives each communicator remembers.
pub const SLOTS: usize = 64;

const NO_PEER: u32 = u32::MAX;

/// One remembered collective. Written by the thread that runs it; read, without any
/// ordering promise beyond each field's own, by a dump (a hang report is a snapshot of
/// ranks that may still move).
struct Slot {
    /// Which collective of the communicator (1-based; 0: never used). Written first by
    /// `begin`, so `end` and `waiting` can tell that a slot still holds their call.
    call: AtomicU64,
    op: AtomicU8,
    state: AtomicU8,
    seq: AtomicU64,
    count: AtomicU64,
    /// [`Stamp`] ticks.
    started: AtomicU64,
    ended: AtomicU64,
    peer: AtomicU32,
    /// Index into [`WHATS`] of what the peer was waited on for.
    what: AtomicU8,
    /// The [`Phase`] of the collective that wait was in; written with `peer`, and
    /// read only when `peer` is set, so `begin` need not clear it.
    phase: AtomicU8,
    waiting_since_ms: AtomicU64,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            call: AtomicU64::new(0),
            op: AtomicU8::new(0),
            state: AtomicU8::new(0),
            seq: AtomicU64::new(0),
            count: AtomicU64::new(0),
            started: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            peer: AtomicU32::new(NO_PEER),
            what: AtomicU8::new(0),
            phase: AtomicU8::new(0),
            waiting_since_ms: AtomicU64::new(0),
        }
    }
}

/// One communicator's ring of remembered collectives.
///
/// Only the thread that holds the communicator's progress lock writes it, so its counter
/// moves by a load and a store, not a read-modify-write; dumps read it from any thread.
/// Recorders are never freed: a closed communicator's goes back to a free list for the
/// next one, so a `&'static` to one (the thread's current call, an [`Entry`]) stays
/// valid without a reference count.
pub struct Recorder {
    slots: [Slot; SLOTS],
    /// The rank of the communicator that holds it.
    rank: AtomicU32,
    /// Collectives begun through it.
    calls: AtomicU64,
    /// When its communicator last left a collective ([`Stamp`] ticks; 0: never).
    last_left: AtomicU64,
}

/// Every recorder made, and whether a communicator holds it now.
static RECORDERS: Mutex<Vec<(&'static Recorder, bool)>> = Mutex::new(Vec::new());

/// A recorder for a new communicator of `rank`: a free one emptied, or a new one.
pub(crate) fn recorder(rank: usize) -> &'static Recorder {
    let mut all = RECORDERS.lock().unwrap_or_else(|p| p.into_inner());
    let r = match all.iter_mut().find(|(_, held)| !held) {
        Some((r, held)) => {
            *held = true;
            for s in &r.slots {
                s.call.store(0, Ordering::Relaxed);
            }
            r.calls.store(0, Ordering::Relaxed);
            r.last_left.store(0, Ordering::Relaxed);
            *r
        }
        None => {
            let r: &'static Recorder = Box::leak(Box::new(Recorder {
                slots: [const { Slot::new() }; SLOTS],
                rank: AtomicU32::new(0),
                calls: AtomicU64::new(0),
                last_left: AtomicU64::new(0),
            }));
            all.push((r, true));
            r
        }
    };
    r.rank.store(rank as u32, Ordering::Relaxed);
    r
}

/// What waits say they wait for (`Awaited::blocked_on`), interned so a slot holds a
/// byte; index 0 is "nothing recorded".
static WHATS: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// Who this process is and where its dumps go, from the first communicator.
struct Process {
    rank: usize,
    world_size: usize,
    dir: Option<PathBuf>,
    /// The dump directory was derived here (no launcher, no `HETCCL_FLIGHT_DIR`): remove
    /// it when the process is done with it.
    derived: bool,
    /// Started by `hetccl run`, which prints the report.
    launcher: bool,
    /// This host's name, for dumps and markers.
    host: String,
    /// Communicators alive in this process.
    live: usize,
    job_id: Option<String>,
    /// The last error of a collective, and the rank it points at.
    error: Option<(String, Option<usize>)>,
    /// The job's first failure as this process found it, for its later failures.
    finding: Option<String>,
}

static PROCESS: Mutex<Option<Process>> = Mutex::new(None);

/// Held from deciding what kind of dump to write until it is written, by a failing call
/// and by the SIGUSR1 thread alike: otherwise a request that read "not failed" just
/// before the failure could write its live dump over the error dump, and the report
/// would find no state for this rank.
static DUMP_WRITE: Mutex<()> = Mutex::new(());

/// The ranks of this job on other hosts, reached over the network (the communicator's
/// `flight_net`): with no directory shared between hosts, their states come this way.
pub trait Remote: Send + Sync {
    /// Whether rank `k` runs on another host than this process.
    fn is_remote(&self, k: usize) -> bool;
    /// Asks each of `ranks` for its state, all at once, taking at most `within`; one
    /// answer per rank, in the order of `ranks`.
    fn ask(&self, ranks: &[usize], within: Duration) -> Vec<Answer>;
    /// Tells the ranks on other hosts the job's first failure, once its report is printed.
    fn tell(&self, finding: &str);
    /// Sends this rank's error state to the lowest ranks of other hosts below it, which
    /// may print the report ([`shared`]); it may exit before they would ask. Returns at
    /// once: the sending is left to a thread of its own.
    fn share(&self, state: RankState);
}

/// What a rank on another host answered.
#[derive(Clone, Debug)]
pub enum Answer {
    /// Its state ([`answer`]).
    State(Box<RankState>),
    /// Its host refused the connection: the process is gone.
    Gone,
    /// Its host took the connection but the process never answered: stopped or hung.
    Silent,
    /// Its host could not be reached, or the exchange broke.
    Unreachable,
}

/// How long a failing rank waits for the answers of ranks on other hosts: a live
/// process answers in a few ms (its answering thread does not wait for its
/// collectives), so this is the time after which silence means "stopped".
pub const ASK_WITHIN: Duration = Duration::from_millis(600);

/// The first communicator's ranks on other hosts (see [`set_remote`]).
static REMOTE: Mutex<Option<Arc<dyn Remote>>> = Mutex::new(None);

/// Makes `r` how this process reaches the ranks of other hosts, if no communicator of the
/// process is alive yet (later ones, as with dumps, do not speak for the process).
/// Cleared when the last communicator closes.
pub fn set_remote(r: Arc<dyn Remote>) {
    let live = PROCESS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .is_some_and(|p| p.live > 0);
    if !live {
        *REMOTE.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        FAR.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

fn remote() -> Option<Arc<dyn Remote>> {
    REMOTE.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// What the ranks of other hosts answered so far, by rank: a state stays after its
/// process exits (a dump would stay in the directory), and a rank that is settled (its
/// state is an error's, or it is silent or gone) is not asked again.
static FAR: Mutex<Vec<Option<FarRank>>> = Mutex::new(Vec::new());

/// A rank of another host as last heard of: its state (kept after its process is gone)
/// and what became of it.
type FarRank = (Option<RankState>, report::Fate);

/// The states and fates of the ranks of other hosts among `0..world` (all of them, or
/// those below `below`), asking those not settled yet.
fn far_states(
    r: &dyn Remote,
    world: usize,
    below: usize,
) -> Vec<(usize, Option<RankState>, report::Fate)> {
    use report::Fate;
    let ranks: Vec<usize> = (0..world.min(below)).filter(|&k| r.is_remote(k)).collect();
    let settled = |e: &Option<FarRank>| match e {
        Some((s, f)) => {
            matches!(f, Fate::Silent | Fate::Gone) || s.as_ref().is_some_and(|s| s.why == "error")
        }
        None => false,
    };
    let need: Vec<usize> = {
        let known = FAR.lock().unwrap_or_else(|p| p.into_inner());
        ranks
            .iter()
            .copied()
            .filter(|&k| !known.get(k).is_some_and(settled))
            .collect()
    };
    let answers = if need.is_empty() {
        Vec::new()
    } else {
        r.ask(&need, ASK_WITHIN)
    };
    let mut known = FAR.lock().unwrap_or_else(|p| p.into_inner());
    if known.len() < world {
        known.resize(world, None);
    }
    for (k, a) in need.into_iter().zip(answers) {
        let before = known[k].take().and_then(|e| e.0);
        known[k] = Some(match a {
            Answer::State(s) => (Some(*s), Fate::Running),
            Answer::Gone => (before, Fate::Gone),
            Answer::Silent => (before, Fate::Silent),
            Answer::Unreachable => (before, Fate::Unknown),
        });
    }
    ranks
        .into_iter()
        .map(|k| match &known[k] {
            Some((s, f)) => (k, s.clone(), *f),
            None => (k, None, Fate::Unknown),
        })
        .collect()
}

/// This process's state, for a rank of another host that asks: taken on an error once
/// a collective failed (as a dump would be), else "asked".
pub fn answer() -> RankState {
    let failed = PROCESS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .is_some_and(|p| p.error.is_some());
    snapshot(if failed { "error" } else { "asked" })
}

/// A rank of another host failed and sent its state, taken at its error: kept as its
/// answer, which no later question replaces.
pub fn shared(state: RankState) {
    let mut known = FAR.lock().unwrap_or_else(|p| p.into_inner());
    let k = state.rank;
    if k >= state.world_size.max(known.len()) || k > 1 << 20 {
        return;
    }
    if known.len() <= k {
        known.resize(k + 1, None);
    }
    known[k] = Some((Some(state), report::Fate::Running));
}

/// A rank of another host printed the job's report, and this was its finding: this
/// process's failures name it and print no report, and the ranks of this host that
/// fail later find it in the dump directory as they would the local report's.
pub fn told(finding: &str) {
    keep_finding(finding);
    let dir = PROCESS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|p| p.dir.clone());
    if let Some(dir) = dir.filter(|d| d.is_dir()) {
        if read_finding(&dir).is_none() {
            leave_finding(&dir, Some(finding));
        }
    }
}

thread_local! {
    /// The collective this thread runs: its recorder and `call` number (0: none).
    static CURRENT: Cell<(Option<&'static Recorder>, u64)> = const { Cell::new((None, 0)) };
}

/// Now, in Unix milliseconds, from the coarse clock (a few ms of resolution, a few ns
/// to read): enough for "waiting since", and comparable between the ranks' dumps.
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which lives across the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1000)
        .saturating_add(ts.tv_nsec as u64 / 1_000_000)
}

/// A collective's slot, returned by [`Recorder::begin`].
#[derive(Clone, Copy)]
pub struct Entry {
    rec: &'static Recorder,
    call: u64,
}

impl Recorder {
    /// Records the start, at `at` (the call's own clock read), of collective `op` #`seq`
    /// of `count` elements, on this thread. The caller holds the communicator's
    /// progress lock: the one writer.
    #[inline]
    pub fn begin(&'static self, op: CollectiveOp, seq: u64, count: u64, at: Stamp) -> Entry {
        let call = self.calls.load(Ordering::Relaxed) + 1;
        self.calls.store(call, Ordering::Relaxed);
        let s = &self.slots[(call % SLOTS as u64) as usize];
        s.call.store(call, Ordering::Relaxed);
        s.op.store(op as u8, Ordering::Relaxed);
        s.seq.store(seq, Ordering::Relaxed);
        s.count.store(count, Ordering::Relaxed);
        s.started.store(at.ticks(), Ordering::Relaxed);
        s.ended.store(0, Ordering::Relaxed);
        s.peer.store(NO_PEER, Ordering::Relaxed);
        s.what.store(0, Ordering::Relaxed);
        s.state.store(CallState::Running as u8, Ordering::Release);
        CURRENT.with(|c| c.set((Some(self), call)));
        Entry { rec: self, call }
    }
}

fn slot_of(e: Entry) -> Option<&'static Slot> {
    let s = &e.rec.slots[(e.call % SLOTS as u64) as usize];
    (s.call.load(Ordering::Relaxed) == e.call).then_some(s)
}

/// Records that the collective of `e` returned successfully at `at`.
#[inline]
pub fn end(e: Entry, at: Stamp) {
    if let Some(s) = slot_of(e) {
        s.ended.store(at.ticks(), Ordering::Relaxed);
        s.state.store(CallState::Done as u8, Ordering::Release);
    }
    e.rec.last_left.store(at.ticks(), Ordering::Relaxed);
    CURRENT.with(|c| c.set((None, 0)));
}

/// Forgets this thread's current collective (one that ended by a panic).
pub fn clear_current() {
    CURRENT.with(|c| c.set((None, 0)));
}

/// Records that the collective of `e` failed at `at` with `err`, whose culprit is
/// `culprit` (the rank the error points at), and writes a dump when dumps have a
/// directory. Then, from the dumps and the processes it can see, it names the rank that
/// stopped first, job-wide ([`job_finding`]): the text to add to this rank's error, so
/// that every rank's error names the same rank, not only the peer it waited on. Cold:
/// a failed collective breaks its communicator.
#[cold]
pub fn failed(e: Entry, at: Stamp, err: &Error, culprit: Option<usize>) -> Option<String> {
    if let Some(s) = slot_of(e) {
        s.ended.store(at.ticks(), Ordering::Relaxed);
        s.state.store(CallState::Failed as u8, Ordering::Release);
    }
    e.rec.last_left.store(at.ticks(), Ordering::Relaxed);
    CURRENT.with(|c| c.set((None, 0)));
    let (dir, alone, rank, world, host) = {
        let mut p = PROCESS.lock().unwrap_or_else(|p| p.into_inner());
        match p.as_mut() {
            Some(p) => {
                // The first error stays: later ones follow from it.
                p.error.get_or_insert((err.to_string(), culprit));
                if let Some(f) = &p.finding {
                    return Some(f.clone());
                }
                (
                    p.dir.clone(),
                    !p.launcher,
                    p.rank,
                    p.world_size,
                    p.host.clone(),
                )
            }
            None => (None, false, 0, 0, String::new()),
        }
    };
    let dir = dir?;
    // Without a launcher, once the report is printed its dumps are gone and what it
    // found stays in their place: a rank failing later names it and stays quiet.
    if let Some(f) = read_finding(&dir) {
        keep_finding(&f);
        return Some(f);
    }
    if !dir.is_dir() {
        return None;
    }
    let state = snapshot("error");
    let written = {
        let _order = DUMP_WRITE.lock().unwrap_or_else(|p| p.into_inner());
        write_dump(&dir, &state)
    };
    if let Err(e) = written {
        tracing::warn!("flight recorder: {e}");
        return None;
    }
    if let Some(r) = remote() {
        r.share(state);
    }
    let finding = job_finding(&dir, world, &host);
    if alone {
        report_alone(&dir, rank, world, &host);
    }
    if let Some(f) = &finding {
        keep_finding(f);
    }
    finding
}

/// `dir/finding`: the job's first failure as the printed report named it.
fn finding_path(dir: &Path) -> PathBuf {
    dir.join("finding")
}

fn read_finding(dir: &Path) -> Option<String> {
    std::fs::read_to_string(finding_path(dir))
        .ok()
        .filter(|f| !f.is_empty())
}

/// The process's later failures name the same first failure without looking again.
fn keep_finding(f: &str) {
    let mut p = PROCESS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = p.as_mut() {
        p.finding.get_or_insert_with(|| f.to_string());
    }
}

/// After the report: `finding` (written whole, to a temporary name then renamed) takes
/// the place of the dumps, which are removed. The report's lock stays, so that no second
/// report is printed, and so do the ranks' markers: each process removes its own as it
/// closes, and the last one the finding, the lock and the directory.
fn leave_finding(dir: &Path, finding: Option<&str>) {
    if let Some(f) = finding {
        let tmp = dir.join(".finding");
        let written =
            std::fs::write(&tmp, f).and_then(|()| std::fs::rename(&tmp, finding_path(dir)));
        if let Err(e) = written {
            tracing::debug!(
                "flight recorder: writing {}: {e}",
                finding_path(dir).display()
            );
        }
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name != "finding" && name != "report.lock" && !name.ends_with(".pid") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// How long a failing rank looks for the others' dumps before it names the job's
/// culprit with what it has: the ranks that fail with it dump within a few tens of ms
/// of each other (their timeouts started together), a stopped or gone process is seen
/// at once.
const FINDING_WAIT_MS: u64 = 1000;

/// The job-wide culprit as the hang report finds it from the dumps in `dir` and the
/// processes of this host (rule 1: a stopped or gone process names itself at once),
/// phrased to follow an error: "; the job's first failure: rank 2 in all_reduce #1 is
/// stopped ...". `None` when nothing names one.
#[cold]
fn job_finding(dir: &Path, world: usize, host: &str) -> Option<String> {
    let start = now_ms();
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(FINDING_WAIT_MS);
    let (states, fates) = collect(dir, world, host, start, deadline, true, true);
    let r = report::build("", &states, &fates, now_ms());
    phrase(&r)
}

/// A report's finding, phrased to follow an error.
fn phrase(r: &report::Report) -> Option<String> {
    let culprit = r.culprit?;
    let place = r
        .collective
        .as_ref()
        .map(|c| format!(" in {c}"))
        .unwrap_or_default();
    Some(format!(
        "; the job's first failure: rank {culprit}{place}: rank {culprit} {}",
        r.why
    ))
}

/// The dumps in `dir` of the `world` ranks (those taken on an error, or since `start`)
/// and the fates of this host's processes, read until every rank has a dump or a fate
/// that needs none (stopped, gone), or `deadline`; with `early` (for a culprit only),
/// as soon as a rank is found stopped or gone. With `ask`, a running rank of this host
/// that has not dumped is asked once with SIGUSR1.
fn collect(
    dir: &Path,
    world: usize,
    host: &str,
    start: u64,
    deadline: std::time::Instant,
    ask: bool,
    early: bool,
) -> (Vec<Option<RankState>>, Vec<report::Fate>) {
    let mut asked = vec![false; world];
    // Ranks on other hosts are asked once, over the network, before this host's dumps
    // are read: they answer at once or not at all.
    let far = match remote() {
        Some(r) if ask => far_states(r.as_ref(), world, world),
        _ => Vec::new(),
    };
    loop {
        let mut states: Vec<Option<RankState>> = vec![None; world];
        let mut fates = vec![report::Fate::Unknown; world];
        let mut waiting = false;
        let mut decided = false;
        let mut here = vec![true; world];
        for (k, state, fate) in &far {
            here[*k] = false;
            (states[*k], fates[*k]) = (state.clone(), *fate);
            decided |= state.is_none() && matches!(fate, report::Fate::Gone | report::Fate::Silent);
        }
        for k in (0..world).filter(|&k| here[k]) {
            states[k] = read_dump(&dump_path(dir, k))
                .filter(|s| s.why == "error" || s.taken_ms + 10 >= start);
            // Only processes on this host can be looked at and asked.
            let Some(Marker { pid, asks, .. }) =
                read_marker(&pid_path(dir, k)).filter(|m| m.host == host)
            else {
                continue;
            };
            fates[k] = match proc_state(pid) {
                Some('T' | 't') => report::Fate::Stopped,
                Some('Z' | 'X') | None => report::Fate::Gone,
                Some(_) => report::Fate::Running,
            };
            decided |= matches!(fates[k], report::Fate::Stopped)
                || (fates[k] == report::Fate::Gone && states[k].is_none());
            if states[k].is_none() && fates[k] == report::Fate::Running && asks {
                if ask && !asked[k] {
                    asked[k] = true;
                    // SAFETY: kill(2) has no memory effects; the marker says this process
                    // handles SIGUSR1 (`asks`).
                    unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
                }
                waiting = true;
            }
        }
        if (decided && early) || !waiting || std::time::Instant::now() >= deadline {
            return (states, fates);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Without a launcher: the lowest failing rank that takes `report.lock` prints the one
/// report (see the module docs).
#[cold]
fn report_alone(dir: &Path, rank: usize, world: usize, host: &str) {
    std::thread::sleep(std::time::Duration::from_millis(100 * rank.min(10) as u64));
    // A lower rank that failed too prints it (or already did), on this host or another.
    let lower_failed =
        (0..rank).any(|k| read_dump(&dump_path(dir, k)).is_some_and(|s| s.why == "error"));
    if lower_failed {
        return;
    }
    let far = remote();
    if let Some(r) = &far {
        let lower = far_states(r.as_ref(), world, rank);
        if lower
            .iter()
            .any(|(_, s, _)| s.as_ref().is_some_and(|s| s.why == "error"))
        {
            return;
        }
    }
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir.join("report.lock"));
    if lock.is_err() {
        return;
    }
    let start = now_ms();
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
    let (states, fates) = collect(dir, world, host, start, deadline, true, false);
    // A rank of another host printed it meanwhile and told this one.
    let told = PROCESS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .is_some_and(|p| p.finding.is_some());
    if told {
        return;
    }
    let title = format!("printed by rank {rank}, the lowest rank that failed");
    let r = report::build(&title, &states, &fates, now_ms());
    use std::io::Write as _;
    let _ = crate::log::stderr().write_all(r.text.as_bytes());
    // Printed once: the dumps have served. A rank that fails later finds the finding
    // in their place, names it and stays quiet; on other hosts, through `told`.
    let finding = phrase(&r);
    leave_finding(dir, finding.as_deref());
    if let (Some(far), Some(f)) = (far, &finding) {
        far.tell(f);
    }
}

fn read_dump(path: &Path) -> Option<RankState> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The marker at `path` ([`Marker`]).
pub fn read_marker(path: &Path) -> Option<Marker> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut it = text.split_whitespace();
    let pid = it.next()?.parse().ok()?;
    let host = it.next().unwrap_or_default().to_string();
    Some(Marker {
        pid,
        host,
        asks: it.next() != Some("-"),
    })
}

/// The state letter of `/proc/PID/stat` (R, S, D, T, t, Z, ...).
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) S ...": COMM may hold spaces and parentheses; the state follows the
    // last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// Records that this thread's collective has waited on `peer` (for `what`, e.g. "to
/// send data") without progress for `waited_ms`. Called by a wait's checks only, so at
/// most every 50 ms of a wait.
pub fn waiting(peer: usize, what: &'static str, phase: Phase, waited_ms: u64) {
    let (Some(rec), call) = CURRENT.with(Cell::get) else {
        return;
    };
    let s = &rec.slots[(call % SLOTS as u64) as usize];
    if s.call.load(Ordering::Relaxed) != call {
        return;
    }
    s.peer.store(peer as u32, Ordering::Relaxed);
    s.what.store(intern(what), Ordering::Relaxed);
    s.phase.store(phase as u8, Ordering::Relaxed);
    s.waiting_since_ms
        .store(now_ms().saturating_sub(waited_ms), Ordering::Relaxed);
}

fn intern(what: &'static str) -> u8 {
    let mut w = WHATS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = w.iter().position(|x| *x == what) {
        return (i + 1) as u8;
    }
    if w.len() >= u8::MAX as usize {
        return 0;
    }
    w.push(what);
    w.len() as u8
}

/// A named phase's name; `None` for [`Phase::Unnamed`] (a tree, a copy: nothing to add
/// to the op's name).
fn phase_name(v: u8) -> Option<String> {
    Phase::ALL
        .get(v as usize)
        .filter(|&&p| p != Phase::Unnamed)
        .map(|p| p.name().to_string())
}

fn what_of(i: u8) -> Option<String> {
    let w = WHATS.lock().unwrap_or_else(|p| p.into_inner());
    (i > 0)
        .then(|| w.get(i as usize - 1).map(|s| s.to_string()))
        .flatten()
}

/// This process's state now: its remembered collectives, oldest first.
pub fn snapshot(why: &str) -> RankState {
    let (rank, world_size, job_id, error, host) = {
        let p = PROCESS.lock().unwrap_or_else(|p| p.into_inner());
        match p.as_ref() {
            Some(p) => (
                p.rank,
                p.world_size,
                p.job_id.clone(),
                p.error.clone(),
                p.host.clone(),
            ),
            None => (0, 0, None, None, String::new()),
        }
    };
    // Stamps become Unix ms against one reading of both clocks.
    let (now, now_unix) = (Stamp::now(), now_ms());
    let unix = |t: u64| clock::unix_ms(Stamp::from_ticks(t), now, now_unix);
    let recorders: Vec<&'static Recorder> = RECORDERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(r, _)| *r)
        .filter(|r| r.rank.load(Ordering::Relaxed) as usize == rank)
        .collect();
    // Ordered by start, ties by the recorder's own order.
    let mut calls: Vec<((u64, u64), CallRecord)> = Vec::new();
    let mut left = 0;
    for rec in &recorders {
        left = left.max(rec.last_left.load(Ordering::Relaxed));
        for s in &rec.slots {
            let call = s.call.load(Ordering::Relaxed);
            if call == 0 {
                continue;
            }
            let Some(op) = CollectiveOp::from_u8(s.op.load(Ordering::Relaxed)) else {
                continue;
            };
            let state = CallState::from_u8(s.state.load(Ordering::Acquire));
            let peer = s.peer.load(Ordering::Relaxed);
            let started = s.started.load(Ordering::Relaxed);
            let ended = s.ended.load(Ordering::Relaxed);
            calls.push((
                (started, call),
                CallRecord {
                    op: op.name().to_string(),
                    seq: s.seq.load(Ordering::Relaxed),
                    count: s.count.load(Ordering::Relaxed),
                    state,
                    started_ms: unix(started),
                    ended_ms: (ended != 0).then(|| unix(ended)),
                    waiting_on: (peer != NO_PEER).then_some(peer as usize),
                    what: what_of(s.what.load(Ordering::Relaxed)),
                    phase: (peer != NO_PEER)
                        .then(|| phase_name(s.phase.load(Ordering::Relaxed)))
                        .flatten(),
                    waiting_since_ms: (peer != NO_PEER)
                        .then(|| s.waiting_since_ms.load(Ordering::Relaxed)),
                },
            ));
        }
    }
    calls.sort_by_key(|c| c.0);
    if calls.len() > SLOTS {
        calls.drain(..calls.len() - SLOTS);
    }
    RankState {
        rank,
        world_size,
        pid: std::process::id(),
        host,
        job_id,
        why: why.to_string(),
        taken_ms: now_unix,
        last_left_ms: (left != 0).then(|| unix(left)),
        error: error.as_ref().map(|e| e.0.clone()),
        culprit: error.and_then(|e| e.1),
        calls: calls.into_iter().map(|c| c.1).collect(),
    }
}

/// `dir/rank-K.json`.
pub fn dump_path(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("rank-{rank}.json"))
}

/// `dir/rank-K.pid`: the [`Marker`] of rank K's process.
pub fn pid_path(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("rank-{rank}.pid"))
}

/// Writes `state` to `dir/rank-K.json` whole: to a temporary name, then renamed.
pub fn write_dump(dir: &Path, state: &RankState) -> Result<()> {
    let path = dump_path(dir, state.rank);
    // A name of this write's own: a failure's dump and a SIGUSR1 dump may be written at
    // once by two threads, and one must not rename the other's half-written file.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".rank-{}.json.{}.{}",
        state.rank,
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let text = serde_json::to_vec(state)
        .map_err(|e| Error::invalid("flight recorder", format!("cannot encode the state: {e}")))?;
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| Error::io(format!("writing the flight dump {}", path.display()), e))
}

/// Registers a communicator of `rank` and returns its recorder. The first of the process
/// decides whom dumps speak for (later ones are recorded too, but dumps speak for the
/// first rank) and installs the SIGUSR1 dump.
///
/// `instance` tells this run of the job from an earlier one of the same identity (every
/// rank's host and process id, when all are known): without a launcher's directory the
/// dumps go to a directory derived from both, so what a crashed run left behind (its
/// dumps, its finding, its report's lock) can never be read as this run's.
pub(crate) fn register(
    cfg: &Config,
    rank: usize,
    world_size: usize,
    host: &str,
    instance: Option<&str>,
) -> &'static Recorder {
    clock::init();
    let rec = recorder(rank);
    let dir = {
        let mut p = PROCESS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = p.as_mut() {
            p.live += 1;
            return rec;
        }
        let (dir, derived) = match &cfg.flight_dir {
            Some(d) => (Some(d.clone()), false),
            None if cfg.launch.launcher_fd.is_none() => (derived_dir(cfg, instance, host), true),
            None => (None, false),
        };
        *p = Some(Process {
            rank,
            world_size,
            dir: dir.clone(),
            derived,
            launcher: cfg.launch.launcher_fd.is_some(),
            host: host.to_string(),
            live: 1,
            job_id: cfg.job_id.clone(),
            error: None,
            finding: None,
        });
        dir
    };
    let asks = match install_sigusr1() {
        Ok(true) => true,
        Ok(false) => {
            tracing::debug!(
                "SIGUSR1 has the application's handler; the flight recorder dumps on errors only"
            );
            false
        }
        Err(e) => {
            tracing::warn!("flight recorder: no SIGUSR1 dump: {e}");
            false
        }
    };
    if let Some(dir) = &dir {
        let path = pid_path(dir, rank);
        let marker = Marker {
            pid: std::process::id(),
            host: host.to_string(),
            asks,
        };
        if let Err(e) = std::fs::write(&path, marker.to_string()) {
            tracing::warn!(
                "flight recorder: cannot write {}: {e}; the launcher will not ask this rank \
                 for its state",
                path.display()
            );
        }
    }
    rec
}

/// What `rank-K.pid` says: rank K's process and host, and whether it answers SIGUSR1
/// with a dump (for any other process the signal would be fatal). Written as
/// `PID HOST`, or `PID HOST -` for a process that does not answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    /// The rank's process.
    pub pid: u32,
    /// The host it runs on (only processes of this host can be looked at).
    pub host: String,
    /// It handles SIGUSR1 with a dump.
    pub asks: bool,
}

impl std::fmt::Display for Marker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.pid, self.host)?;
        if !self.asks {
            f.write_str(" -")?;
        }
        Ok(())
    }
}

/// A communicator of the process closed, handing back its recorder (whose calls dumps
/// still show until another communicator takes it): the last one removes the marker,
/// the dump when nothing failed, and a derived directory once empty.
pub(crate) fn unregister(rec: &'static Recorder) {
    if let Some(e) = RECORDERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter_mut()
        .find(|(r, _)| std::ptr::eq(*r, rec))
    {
        e.1 = false;
    }
    let mut p = PROCESS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(proc_) = p.as_mut() else { return };
    proc_.live = proc_.live.saturating_sub(1);
    if proc_.live > 0 {
        return;
    }
    *REMOTE.lock().unwrap_or_else(|p| p.into_inner()) = None;
    FAR.lock().unwrap_or_else(|p| p.into_inner()).clear();
    if let Some(dir) = &proc_.dir {
        let _ = std::fs::remove_file(pid_path(dir, proc_.rank));
        if proc_.error.is_none() {
            let _ = std::fs::remove_file(dump_path(dir, proc_.rank));
        }
        if proc_.derived {
            let markers_left = std::fs::read_dir(dir).is_ok_and(|es| {
                es.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".pid"))
            });
            if !markers_left {
                let _ = std::fs::remove_file(finding_path(dir));
                let _ = std::fs::remove_file(dir.join("report.lock"));
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// `$TMPDIR/hetccl-flight-<uid>-<digest of the job's identity and instance>`, made
/// (0700) if needed; `None` without an identity every rank shares. Directories of this
/// user that earlier runs left behind (their last process killed) are removed first.
fn derived_dir(cfg: &Config, instance: Option<&str>, host: &str) -> Option<PathBuf> {
    use sha2::Digest as _;
    let identity = cfg
        .job_id
        .clone()
        .or_else(|| cfg.launch.job_identity.clone())
        .or_else(|| {
            let (a, p) = (cfg.launch.master_addr.as_ref()?, cfg.launch.master_port?);
            Some(format!("{a}:{p}"))
        })?;
    let mut h = sha2::Sha256::new();
    h.update(identity.as_bytes());
    if let Some(i) = instance {
        h.update(b"\n");
        h.update(i.as_bytes());
    }
    let hex: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // SAFETY: getuid cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    let prefix = format!("hetccl-flight-{uid}-");
    let dir = std::env::temp_dir().join(format!("{prefix}{hex}"));
    remove_abandoned(&std::env::temp_dir(), &prefix, &dir, host);
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => Some(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Some(dir),
        Err(e) => {
            tracing::warn!("flight recorder: cannot make {}: {e}", dir.display());
            None
        }
    }
}

/// Removes the directories `$TMPDIR/<prefix>*` other than `keep` that earlier runs of
/// this host left, by the rule of [`remove_abandoned`]: how `hetccl run` clears the dump
/// directories of launchers that were killed before they could remove their own.
pub fn sweep(prefix: &str, keep: &Path) {
    remove_abandoned(
        &std::env::temp_dir(),
        prefix,
        keep,
        &crate::topology::hostname(),
    );
}

/// A directory with no marker is left this long after its last change: a run that is
/// starting has made it and not yet written its markers.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes the dump directories `parent/<prefix>*` other than `keep` that no live
/// process of this host holds: every marker in it names a process of this host that is
/// gone (a run whose last process was killed, or that failed and kept its finding for
/// processes that were then killed), or it has no marker and has not changed for
/// [`ABANDONED_AFTER`]. A directory with a marker of another host (a shared temporary
/// directory) is left to that host.
fn remove_abandoned(parent: &Path, prefix: &str, keep: &Path, host: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path == keep || !e.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        if abandoned(&path, host) {
            let _ = std::fs::remove_dir_all(&path);
            tracing::debug!(
                "flight recorder: removed {}, left by an earlier run",
                path.display()
            );
        }
    }
}

fn abandoned(dir: &Path, host: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut markers = 0;
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().ends_with(".pid") {
            continue;
        }
        markers += 1;
        match read_marker(&e.path()) {
            Some(m) if m.host == host => {
                if !matches!(proc_state(m.pid), None | Some('Z' | 'X')) {
                    return false;
                }
            }
            // Another host's process, or a marker being written: not ours to judge.
            _ => return false,
        }
    }
    markers > 0
        || std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= ABANDONED_AFTER))
}

/// Write end of the pipe the SIGUSR1 handler writes to; -1 until installed.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);
static INSTALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    // SAFETY: errno is thread-local and both calls are async-signal-safe; the saved
    // value is put back so the interrupted code sees its own.
    unsafe {
        let errno = *libc::__errno_location();
        let b = 1u8;
        libc::write(fd, (&b as *const u8).cast(), 1);
        *libc::__errno_location() = errno;
    }
}

/// Installs the SIGUSR1 handler and its thread; `Ok(false)` when the application
/// handles or ignores the signal itself.
fn install_sigusr1() -> std::io::Result<bool> {
    if INSTALLED.swap(true, Ordering::AcqRel) {
        return Ok(true);
    }
    // SAFETY: a zeroed sigaction is a valid out-parameter; sigaction with a null new
    // action only reads the current one.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::sigaction(libc::SIGUSR1, std::ptr::null(), &mut old) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if old.sa_sigaction != libc::SIG_DFL {
        return Ok(false);
    }
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (rd, wr) = (fds[0], fds[1]);
    // The reader blocks; only the handler's end must never block.
    // SAFETY: fcntl on a descriptor this function just made.
    unsafe { libc::fcntl(rd, libc::F_SETFL, 0) };
    SIGNAL_PIPE.store(wr, Ordering::Relaxed);
    std::thread::Builder::new()
        .name("hetccl-flight".into())
        .spawn(move || serve_sigusr1(rd))?;
    // SAFETY: a zeroed sigaction with a handler, an empty mask and SA_RESTART is valid;
    // the handler is async-signal-safe (one write to a non-blocking pipe).
    let rc = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigusr1 as extern "C" fn(libc::c_int) as usize;
        act.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGUSR1, &act, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}

fn serve_sigusr1(rd: i32) {
    let mut b = [0u8; 64];
    loop {
        // SAFETY: reads into `b`, which outlives the call, at most its length.
        let n = unsafe { libc::read(rd, b.as_mut_ptr().cast(), b.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if n == 0 {
            return;
        }
        let _order = DUMP_WRITE.lock().unwrap_or_else(|p| p.into_inner());
        let (dir, failed) = PROCESS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or((None, false), |p| (p.dir.clone(), p.error.is_some()));
        // After a failure the dump stays one of the error (a failing rank asks the others
        // while it names the culprit): a collector keeps error dumps whatever their age.
        let state = snapshot(if failed { "error" } else { "SIGUSR1" });
        match dir {
            // After a printed report its directory holds the finding, not dumps.
            Some(dir) if dir.is_dir() && read_finding(&dir).is_none() => {
                if let Err(e) = write_dump(&dir, &state) {
                    tracing::warn!("flight recorder: {e}");
                }
            }
            _ => {
                use std::io::Write as _;
                let text = report::describe_rank(&state, state.taken_ms);
                let _ = writeln!(
                    crate::log::stderr(),
                    "hetccl: rank {} state (SIGUSR1): {text}",
                    state.rank
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process of rank `rank` of 4, on host "h", with one communicator alive.
    fn process(rank: usize, dir: Option<PathBuf>) -> Process {
        Process {
            rank,
            world_size: 4,
            dir,
            derived: false,
            launcher: false,
            host: "h".into(),
            live: 1,
            job_id: None,
            error: None,
            finding: None,
        }
    }

    #[test]
    fn the_ring_keeps_the_last_calls_with_their_state_and_waits() {
        // A rank no other test of this process uses.
        let rank = 3_000_001;
        clock::init();
        let rec = recorder(rank);
        for seq in 0..(SLOTS as u64 + 5) {
            let e = rec.begin(CollectiveOp::AllReduce, seq, 10, Stamp::now());
            end(e, Stamp::now());
        }
        let e = rec.begin(CollectiveOp::Broadcast, 99, 10, Stamp::now());
        waiting(2, "to send data", Phase::InterAllReduce, 1500);
        let mut p = PROCESS.lock().unwrap();
        let saved = p.take();
        *p = Some(process(rank, None));
        drop(p);
        let s = snapshot("test");
        *PROCESS.lock().unwrap() = saved;
        end(e, Stamp::now());
        // The ring keeps the last SLOTS calls of its communicator.
        assert_eq!(s.calls.len(), SLOTS);
        let last = s.calls.last().unwrap();
        assert_eq!((last.op.as_str(), last.seq), ("broadcast", 99));
        assert_eq!(last.state, CallState::Running);
        assert_eq!(last.waiting_on, Some(2));
        assert_eq!(last.what.as_deref(), Some("to send data"));
        assert_eq!(last.phase.as_deref(), Some("inter-node all-reduce"));
        let since = s.taken_ms - last.waiting_since_ms.unwrap();
        assert!((1400..5000).contains(&since), "{since}");
        let before = &s.calls[s.calls.len() - 2];
        assert_eq!(
            (before.seq, before.state),
            (SLOTS as u64 + 4, CallState::Done)
        );
        // A call that never waited has no phase, whatever its slot held before.
        assert_eq!(before.phase, None);
        assert!(s.last_left_ms.is_some());
    }

    #[test]
    fn a_rank_failing_after_the_report_names_the_first_failure() {
        let rank = 3_000_002;
        clock::init();
        let dir = std::env::temp_dir().join(format!("hetccl-finding-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "rank-0.json",
            "rank-1.json",
            "report.lock",
            "rank-1.pid",
            "rank-3.pid",
        ] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let finding = "; the job's first failure: rank 2 in all_reduce #1: rank 2 is stopped \
                       (SIGSTOP or a debugger) and cannot answer";
        // What the rank that printed the report leaves: the finding, the markers.
        leave_finding(&dir, Some(finding));
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["finding", "rank-1.pid", "rank-3.pid", "report.lock"]);

        let rec = recorder(rank);
        let err = Error::invalid("all_reduce", "timed out waiting for rank 0");
        let saved = PROCESS
            .lock()
            .unwrap()
            .replace(process(rank, Some(dir.clone())));
        // A rank of another process fails later: it reads the finding, writes no dump.
        let e = rec.begin(CollectiveOp::AllReduce, 1, 10, Stamp::now());
        let got = failed(e, Stamp::now(), &err, Some(0));
        assert!(!dump_path(&dir, rank).exists());
        // Its process keeps it: a later failure names it with the directory gone.
        std::fs::remove_dir_all(&dir).unwrap();
        let e = rec.begin(CollectiveOp::AllReduce, 2, 10, Stamp::now());
        let again = failed(e, Stamp::now(), &err, Some(0));
        *PROCESS.lock().unwrap() = saved;
        assert_eq!(got.as_deref(), Some(finding));
        assert_eq!(again.as_deref(), Some(finding));
    }

    #[test]
    fn markers_say_whether_the_process_answers_sigusr1() {
        let dir = std::env::temp_dir().join(format!("hetccl-marker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for asks in [true, false] {
            let m = Marker {
                pid: 42,
                host: "h1".into(),
                asks,
            };
            std::fs::write(pid_path(&dir, 1), m.to_string()).unwrap();
            assert_eq!(read_marker(&pid_path(&dir, 1)), Some(m));
        }
        // The form written before markers said it: a process that answers.
        std::fs::write(pid_path(&dir, 1), "42 h1").unwrap();
        assert!(read_marker(&pid_path(&dir, 1)).unwrap().asks);
        std::fs::write(pid_path(&dir, 1), "x h1").unwrap();
        assert_eq!(read_marker(&pid_path(&dir, 1)), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_directories_no_live_process_of_this_host_holds_are_removed() {
        let parent = std::env::temp_dir().join(format!("hetccl-abandon-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        std::fs::create_dir_all(&parent).unwrap();
        // A process that has surely exited: a child, reaped.
        let mut c = std::process::Command::new("true").spawn().unwrap();
        c.wait().unwrap();
        let (dead, me) = (c.id(), std::process::id());
        let marker = |pid: u32, host: &str| {
            Marker {
                pid,
                host: host.into(),
                asks: true,
            }
            .to_string()
        };
        let make = |name: &str, files: &[(&str, String)]| {
            let d = parent.join(name);
            std::fs::create_dir_all(&d).unwrap();
            for (f, text) in files {
                std::fs::write(d.join(f), text).unwrap();
            }
        };
        // A killed run: its marker's process is gone, its finding and lock stay.
        make(
            "p-killed",
            &[
                ("rank-2.pid", marker(dead, "h")),
                ("finding", "x".into()),
                ("report.lock", String::new()),
            ],
        );
        // A live run: one of its processes is alive.
        make(
            "p-live",
            &[
                ("rank-0.pid", marker(me, "h")),
                ("rank-1.pid", marker(dead, "h")),
            ],
        );
        // Another host's process: not judged here.
        make("p-other", &[("rank-0.pid", marker(dead, "other"))]);
        // A run starting: no marker yet, just made.
        make("p-new", &[]);
        // Not a dump directory of this prefix, and the directory being made now.
        make("q-killed", &[("rank-0.pid", marker(dead, "h"))]);
        make("p-mine", &[("rank-0.pid", marker(dead, "h"))]);
        remove_abandoned(&parent, "p-", &parent.join("p-mine"), "h");
        let mut left: Vec<String> = std::fs::read_dir(&parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["p-live", "p-mine", "p-new", "p-other", "q-killed"]);
        std::fs::remove_dir_all(&parent).unwrap();
    }
}
