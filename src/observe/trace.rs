//! The timeline: `HETCCL_TRACE=FILE` writes every collective of a rank, its phases and
//! the spans a program adds ([`Span`]) as Chrome trace JSON, which Perfetto
//! (ui.perfetto.dev) and `chrome://tracing` load.
//!
//! The file is a JSON array of events (the format's array form, whose closing `]` is
//! optional, so a file cut short by a crash still loads):
//!
//! ```text
//! [
//! {"ph":"M","name":"process_name","pid":R,"args":{"name":"rank R"}},
//! {"ph":"M","name":"hetccl_clock","pid":R,"args":{"rank":R,"world_size":N,
//!     "offset_us":O,"error_us":E,"unix_epoch_us":U}}
//! {"ph":"M","name":"thread_name","pid":R,"tid":T,"args":{"name":"..."}}
//! {"ph":"X","name":"all_reduce","cat":"collective","ts":..,"dur":..,"pid":R,"tid":T,
//!     "args":{"seq":..,"bytes":..,"algorithm":..,"path":..,"sent":{"P (CLASS)":BYTES},
//!             "received":{..},"waited_us":{"P (CLASS)":MICROSECONDS},...}}
//! {"ph":"X","name":"inter-node all-reduce","cat":"phase",...}
//! ...
//! ]
//! ```
//!
//! `waited_us` is the time the call spent with nothing to do but wait on each peer
//! (`observe::waits`), peers never waited on left out. `pid` is the rank, `tid` a small number per thread of the process; `ts` and `dur`
//! are microseconds of this process's trace clock (a monotonic clock counted from
//! the first traced event of the process). `hetccl_clock` says how to put the rank on
//! rank 0's clock: add `offset_us` (measured at init, within `error_us`);
//! `hetccl trace merge` does so for every file it merges.
//!
//! Events are kept in memory and written when a few thousand have gathered and when
//! the communicator is dropped. A collective is kept as fixed-size values (its schedule
//! and link classes shared, its times raw per-call clock stamps, made microseconds of
//! the trace clock only when written) and written as JSON by hand, not through
//! `serde_json::Value`: tracing adds
//! under 3 % to a collective's instructions (`scripts/trace-overhead.sh`,
//! `docs/PERFORMANCE.md`), writing included.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::metrics::{phase_spans, LinkClass};
use crate::algorithm::executor::{PhaseEnds, Wire};
use crate::algorithm::Schedule;
use crate::dtype::{CollectiveOp, DataType, ReduceOp};
use crate::error::{Error, Result};
use crate::flight::clock::StampNanos;
use crate::flight::Stamp;

/// Events kept before they are written out.
const FLUSH_EVERY: usize = 4096;

/// The process's trace clock starts here; every rank of a process shares it.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Microseconds of the trace clock at `t`.
pub(crate) fn micros(t: Instant) -> f64 {
    t.saturating_duration_since(epoch()).as_nanos() as f64 / 1e3
}

/// The trace clock now, in microseconds.
pub(crate) fn now_micros() -> f64 {
    micros(Instant::now())
}

/// A small number for the calling thread, the same in every trace of the process.
fn thread_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    thread_local! {
        static ID: u32 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    ID.with(|id| *id)
}

/// The file `pattern` names for `rank`: every `%r` replaced by the rank.
pub fn path_for(pattern: &str, rank: usize) -> PathBuf {
    PathBuf::from(pattern.replace("%r", &rank.to_string()))
}

/// One complete event of the program's ([`Span`]).
struct SpanEvent {
    name: Cow<'static, str>,
    cat: &'static str,
    start: Instant,
    dur: Duration,
    args: Map<String, Value>,
}

/// One collective, as the call recorded it: plain values, its schedule shared, no
/// formatting and no allocation (an error's text and a compressed call's links aside).
/// Its span and its phases' spans are written from it later ([`write_call`]).
pub(crate) struct CallEvent {
    pub(crate) op: CollectiveOp,
    pub(crate) seq: u64,
    pub(crate) count: u64,
    pub(crate) dtype: DataType,
    pub(crate) redop: ReduceOp,
    pub(crate) path: &'static str,
    pub(crate) sched: Option<Arc<Schedule>>,
    pub(crate) wire: Option<Wire>,
    /// The class of the link to each peer.
    pub(crate) classes: Arc<[Option<LinkClass>]>,
    pub(crate) error: Option<String>,
    /// The per-call clock's stamps, made trace-clock time when written.
    pub(crate) start: Stamp,
    pub(crate) end: Stamp,
    pub(crate) phase_end: PhaseEnds,
    /// Its waits on each peer: `(peer, ticks)` in the buffer's `waits`.
    pub(crate) waits: Range<usize>,
}

enum Kind {
    Span(SpanEvent),
    Call(CallEvent),
}

struct Event {
    tid: u32,
    kind: Kind,
}

struct Buf {
    events: Vec<Event>,
    out: Option<BufWriter<File>>,
    /// Threads whose name is written already (a handful).
    named: Vec<u32>,
    /// Metadata lines not written yet.
    meta: Vec<Value>,
    /// The line being written, kept for its capacity.
    line: Vec<u8>,
    /// The calls' waits on peers they waited on, `(peer, per-call clock ticks)`; each
    /// call holds its range. Kept for its capacity like the events.
    waits: Vec<(u32, u64)>,
}

/// The trace of one rank: its events in memory, and the file they go to.
pub struct Tracer {
    rank: usize,
    path: PathBuf,
    buf: Mutex<Buf>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("rank", &self.rank)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Tracer {
    /// Creates `pattern`'s file for `rank` of `world_size` ranks (`HETCCL_TRACE`). With
    /// more than one rank the pattern must hold `%r`, or every rank would write one file.
    pub fn create(pattern: &str, rank: usize, world_size: usize) -> Result<Tracer> {
        if world_size > 1 && !pattern.contains("%r") {
            return Err(Error::Config {
                var: "HETCCL_TRACE".into(),
                value: pattern.into(),
                accepted: "a file name holding %r, which each rank replaces by its rank \
                           (e.g. /tmp/trace-%r.json), when the job has more than one rank"
                    .into(),
            });
        }
        let path = path_for(pattern, rank);
        let file = File::create(&path).map_err(|e| {
            Error::io(
                format!(
                    "rank {rank}: creating the trace file {} (HETCCL_TRACE)",
                    path.display()
                ),
                e,
            )
        })?;
        let mut out = BufWriter::new(file);
        let opened = (|| -> std::io::Result<()> {
            out.write_all(b"[\n")?;
            serde_json::to_writer(
                &mut out,
                &json!({"ph": "M", "name": "process_name", "pid": rank,
                        "args": {"name": format!("rank {rank}")}}),
            )
            .map_err(std::io::Error::other)?;
            line(
                &mut out,
                &json!({"ph": "M", "name": "process_sort_index", "pid": rank,
                        "args": {"sort_index": rank}}),
            )
        })();
        opened.map_err(|e| {
            Error::io(
                format!(
                    "rank {rank}: writing the trace file {} (HETCCL_TRACE)",
                    path.display()
                ),
                e,
            )
        })?;
        epoch();
        Ok(Tracer {
            rank,
            path,
            buf: Mutex::new(Buf {
                events: Vec::with_capacity(FLUSH_EVERY),
                out: Some(out),
                named: Vec::new(),
                meta: Vec::new(),
                line: Vec::new(),
                waits: Vec::new(),
            }),
        })
    }

    /// The file this rank writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buf> {
        self.buf.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records how this rank's clock lies against rank 0's: rank 0's trace clock reads
    /// this rank's plus `offset_us`, within `error_us`.
    pub(crate) fn set_clock(&self, world_size: usize, offset_us: f64, error_us: f64) {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_nanos() as f64 / 1e3)
            - now_micros();
        self.lock().meta.push(json!({
            "ph": "M", "name": "hetccl_clock", "pid": self.rank,
            "args": {"rank": self.rank, "world_size": world_size, "offset_us": offset_us,
                     "error_us": error_us, "unix_epoch_us": unix}
        }));
    }

    /// Records a complete event on the calling thread.
    pub(crate) fn complete(
        &self,
        name: impl Into<Cow<'static, str>>,
        cat: &'static str,
        start: Instant,
        end: Instant,
        args: Map<String, Value>,
    ) {
        self.push(Kind::Span(SpanEvent {
            name: name.into(),
            cat,
            start,
            dur: end.saturating_duration_since(start),
            args,
        }));
    }

    /// Records a collective on the calling thread, with its wait on each peer in
    /// per-call clock ticks (indexed by rank; empty when it ran on no links).
    pub(crate) fn call(&self, mut c: CallEvent, waits: &[u64]) {
        let mut b = self.lock();
        let from = b.waits.len();
        for (p, &t) in waits.iter().enumerate().filter(|(_, &t)| t != 0) {
            b.waits.push((p as u32, t));
        }
        c.waits = from..b.waits.len();
        self.push_locked(b, Kind::Call(c));
    }

    fn push(&self, kind: Kind) {
        let b = self.lock();
        self.push_locked(b, kind);
    }

    fn push_locked(&self, mut b: std::sync::MutexGuard<'_, Buf>, kind: Kind) {
        let tid = thread_id();
        if !b.named.contains(&tid) {
            b.named.push(tid);
            let t = std::thread::current();
            let name = t
                .name()
                .map_or_else(|| format!("thread {tid}"), str::to_string);
            b.meta
                .push(json!({"ph": "M", "name": "thread_name", "pid": self.rank,
                               "tid": tid, "args": {"name": name}}));
        }
        b.events.push(Event { tid, kind });
        if b.events.len() >= FLUSH_EVERY {
            self.write_out(&mut b);
        }
    }

    /// Writes what is buffered to the file.
    pub fn flush(&self) {
        let mut b = self.lock();
        self.write_out(&mut b);
    }

    /// Writes the rest and closes the array. Later events are dropped.
    pub(crate) fn finish(&self) {
        let mut b = self.lock();
        self.write_out(&mut b);
        if let Some(mut out) = b.out.take() {
            if let Err(e) = out.write_all(b"\n]\n").and_then(|()| out.flush()) {
                self.failed(e);
            }
        }
    }

    fn write_out(&self, b: &mut Buf) {
        let Buf {
            events,
            out,
            meta,
            line: text,
            waits,
            ..
        } = b;
        let Some(w) = out.as_mut() else {
            events.clear();
            meta.clear();
            waits.clear();
            return;
        };
        // One reading of the per-call clock's epoch and rate for all the calls written.
        let clock = StampNanos::since(epoch());
        let written = (|| -> std::io::Result<()> {
            for m in meta.drain(..) {
                line(w, &m)?;
            }
            for e in events.drain(..) {
                match e.kind {
                    Kind::Span(s) => {
                        let mut v = json!({
                            "ph": "X", "name": s.name, "cat": s.cat, "ts": micros(s.start),
                            "dur": s.dur.as_nanos() as f64 / 1e3, "pid": self.rank,
                            "tid": e.tid,
                        });
                        if !s.args.is_empty() {
                            v["args"] = Value::Object(s.args);
                        }
                        line(w, &v)?;
                    }
                    Kind::Call(c) => {
                        text.clear();
                        let waited = waits.get(c.waits.clone()).unwrap_or(&[]);
                        write_call(text, &c, waited, &clock, self.rank, e.tid);
                        w.write_all(text)?;
                    }
                }
            }
            waits.clear();
            w.flush()
        })();
        if let Err(e) = written {
            // A trace that cannot be written must not fail the job: say so once.
            *out = None;
            events.clear();
            waits.clear();
            self.failed(e);
        }
    }

    fn failed(&self, e: std::io::Error) {
        tracing::warn!(
            rank = self.rank,
            "the trace file {} cannot be written, tracing stops: {e}",
            self.path.display()
        );
    }
}

/// One event per line, after the comma that ends the line before: the file is a valid
/// array as soon as its `]` is written, and a valid array less its `]` before.
fn line(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    w.write_all(b",\n")?;
    serde_json::to_writer(&mut *w, v).map_err(std::io::Error::other)
}

/// `00` to `99`, two bytes each: numbers are written two digits a step.
const PAIRS: &[u8; 200] = b"00010203040506070809101112131415161718192021222324252627282930313233343536373839404142434445464748495051525354555657585960616263646566676869707172737475767778798081828384858687888990919293949596979899";

/// 10^i for i up to 19, the powers a `u64` holds.
const POW10: [u64; 20] = {
    let mut p = [1u64; 20];
    let mut i = 1;
    while i < 20 {
        p[i] = p[i - 1] * 10;
        i += 1;
    }
    p
};

/// Appends `v` in decimal: its digits into a fixed array from the left, the whole array
/// appended (a fixed-size copy, no `memcpy` call) and cut back to the digits.
fn uint(out: &mut Vec<u8>, mut v: u64) {
    // The digit count from the bit length: log10(2) ~ 1233 / 4096, one table look-up
    // to correct it.
    let bits = 64 - (v | 1).leading_zeros() as usize;
    let t = (bits * 1233) >> 12;
    let n = (t + 1 - usize::from(v < POW10[t])).max(1);
    let mut digits = [0u8; 20];
    let mut i = n;
    while v >= 100 {
        let d = (v % 100) as usize * 2;
        v /= 100;
        i -= 2;
        digits[i] = PAIRS[d];
        digits[i + 1] = PAIRS[d + 1];
    }
    if v >= 10 {
        let d = v as usize * 2;
        digits[0] = PAIRS[d];
        digits[1] = PAIRS[d + 1];
    } else {
        digits[0] = b'0' + v as u8;
    }
    let len = out.len();
    out.extend_from_slice(&digits);
    out.truncate(len + n);
}

/// Appends `ns` nanoseconds as microseconds with three decimals, as the format counts
/// time.
fn micros_of(out: &mut Vec<u8>, ns: u64) {
    uint(out, ns / 1000);
    let frac = (ns % 1000) as usize;
    let d = frac % 100 * 2;
    out.extend_from_slice(&[b'.', b'0' + (frac / 100) as u8, PAIRS[d], PAIRS[d + 1]]);
}

/// Appends `"ts":..,"dur":..,"pid":..,"tid":..` of a span from `a` to `b` (trace clock
/// nanoseconds). `who` is where `,"pid":..,"tid":..` was written already for an earlier
/// line of the same call, copied rather than written again; `None` the first time, and
/// returned for the next.
fn times(
    out: &mut Vec<u8>,
    a: u64,
    b: u64,
    rank: usize,
    tid: u32,
    who: Option<Range<usize>>,
) -> Range<usize> {
    out.extend_from_slice(b"\"ts\":");
    micros_of(out, a);
    out.extend_from_slice(b",\"dur\":");
    micros_of(out, b.saturating_sub(a));
    let from = out.len();
    match who {
        Some(r) => out.extend_from_within(r),
        None => {
            out.extend_from_slice(b",\"pid\":");
            uint(out, rank as u64);
            out.extend_from_slice(b",\"tid\":");
            uint(out, u64::from(tid));
        }
    }
    from..out.len()
}

/// Appends `"key":"value"` (`key` given with its quotes and colon) for a value of the
/// runtime's own naming, which needs no escaping (operation, type, algorithm and format
/// names).
fn name_field(out: &mut Vec<u8>, key: &[u8], value: &str) {
    out.extend_from_slice(key);
    out.push(b'"');
    out.extend_from_slice(value.as_bytes());
    out.push(b'"');
}

/// Appends a peer as the per-peer arguments name it: `P (CLASS)`.
fn peer_key(out: &mut Vec<u8>, p: usize, classes: &[Option<LinkClass>]) {
    let class = classes
        .get(p)
        .copied()
        .flatten()
        .map_or("?", LinkClass::name);
    uint(out, p as u64);
    out.extend_from_slice(b" (");
    out.extend_from_slice(class.as_bytes());
    out.push(b')');
}

/// The lines of one collective: its span, then one per phase, each after the `,\n`
/// that ends the line before (as [`line`] writes them). Written by hand rather than
/// through `serde_json::Value`, which would cost the call more than the 3 % of its
/// instructions `docs/PERFORMANCE.md` holds the trace to.
fn write_call(
    out: &mut Vec<u8>,
    c: &CallEvent,
    waited: &[(u32, u64)],
    clock: &StampNanos,
    rank: usize,
    tid: u32,
) {
    let op = c.op.name();
    out.reserve(1024);
    out.extend_from_slice(b",\n{\"ph\":\"X\",");
    name_field(out, b"\"name\":", op);
    out.extend_from_slice(b",\"cat\":\"collective\",");
    let who = times(out, clock.at(c.start), clock.at(c.end), rank, tid, None);
    out.extend_from_slice(b",\"args\":{\"seq\":");
    uint(out, c.seq);
    out.extend_from_slice(b",\"bytes\":");
    uint(out, c.count.saturating_mul(c.dtype.size() as u64));
    out.extend_from_slice(b",\"count\":");
    uint(out, c.count);
    out.push(b',');
    name_field(out, b"\"dtype\":", c.dtype.name());
    out.push(b',');
    name_field(out, b"\"redop\":", c.redop.name());
    out.push(b',');
    name_field(out, b"\"path\":", c.path);
    if let Some(s) = &c.sched {
        out.push(b',');
        name_field(out, b"\"algorithm\":", s.algo);
        // Bytes per peer as the link carried them, and the peer's link class.
        let per_peer = |out: &mut Vec<u8>, key: &str, list: &[(usize, u64)]| {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":{");
            for (i, &(p, b)) in list.iter().enumerate() {
                let b = match &c.wire {
                    Some(w) if w.peers.get(p).copied().unwrap_or(false) => b / 2,
                    _ => b,
                };
                if i > 0 {
                    out.push(b',');
                }
                out.push(b'"');
                peer_key(out, p, &c.classes);
                out.extend_from_slice(b"\":");
                uint(out, b);
            }
            out.push(b'}');
        };
        per_peer(out, "sent", &s.sent_to);
        per_peer(out, "received", &s.received_from);
        // Microseconds spent waiting on each peer, peers never waited on left out.
        out.extend_from_slice(b",\"waited_us\":{");
        for (i, &(p, ticks)) in waited.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'"');
            peer_key(out, p as usize, &c.classes);
            out.extend_from_slice(b"\":");
            micros_of(out, clock.span(ticks));
        }
        out.push(b'}');
    }
    out.push(b',');
    name_field(
        out,
        b"\"compression\":",
        c.wire.as_ref().map_or("off", |w| w.format.name()),
    );
    if let Some(e) = &c.error {
        out.extend_from_slice(b",\"error\":");
        // The one free text: escaped by the JSON writer. Writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, e);
    }
    out.extend_from_slice(b"}}");
    for (p, a, b) in phase_spans(c.start, c.end, &c.phase_end) {
        out.extend_from_slice(b",\n{\"ph\":\"X\",");
        name_field(out, b"\"name\":", p.name());
        out.extend_from_slice(b",\"cat\":\"phase\",");
        times(out, clock.at(a), clock.at(b), rank, tid, Some(who.clone()));
        out.extend_from_slice(b",\"args\":{");
        name_field(out, b"\"op\":", op);
        out.extend_from_slice(b",\"seq\":");
        uint(out, c.seq);
        out.extend_from_slice(b"}}");
    }
}

/// A span of the program's own (forward, backward, optimizer, ...), recorded when it is
/// dropped; from [`crate::Communicator::span`]. Without `HETCCL_TRACE` it records
/// nothing and costs a branch.
#[must_use = "a span lasts until it is dropped"]
pub struct Span<'a> {
    on: Option<(&'a Tracer, Map<String, Value>)>,
    name: &'static str,
    start: Instant,
}

impl<'a> Span<'a> {
    pub(crate) fn start(tracer: Option<&'a Tracer>, name: &'static str) -> Self {
        match tracer {
            None => Span {
                on: None,
                name,
                // Never read: a span that records nothing has no clock to read.
                start: epoch(),
            },
            Some(t) => Span {
                on: Some((t, Map::new())),
                name,
                start: Instant::now(),
            },
        }
    }

    /// A span that records nothing (for a program running without a communicator).
    pub fn off(name: &'static str) -> Span<'static> {
        Span::start(None, name)
    }

    /// Adds an argument shown with the span (e.g. the bucket's index).
    pub fn arg(mut self, key: &'static str, value: impl Into<Value>) -> Self {
        if let Some((_, args)) = &mut self.on {
            args.insert(key.into(), value.into());
        }
        self
    }

    /// Whether the span records anything.
    pub fn is_recording(&self) -> bool {
        self.on.is_some()
    }
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        if let Some((t, args)) = self.on.take() {
            t.complete(self.name, "app", self.start, Instant::now(), args);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hetccl-trace-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_pattern_without_the_rank_is_refused_for_several_ranks() {
        let e = Tracer::create("/tmp/t.json", 0, 2).unwrap_err().to_string();
        assert!(e.contains("HETCCL_TRACE") && e.contains("%r"), "{e}");
    }

    #[test]
    fn spans_are_complete_events_in_a_json_array_even_before_the_end() {
        let dir = scratch("spans");
        let pattern = format!("{}/t-%r.json", dir.display());
        let t = Tracer::create(&pattern, 3, 4).unwrap();
        assert_eq!(t.path(), dir.join("t-3.json"));
        t.set_clock(4, 12.5, 0.25);
        {
            let _s = Span::start(Some(&t), "forward").arg("step", 7);
            std::thread::sleep(Duration::from_millis(2));
        }
        t.flush();
        // Cut short (no closing bracket yet): what Perfetto's reader accepts, closed.
        let text = std::fs::read_to_string(t.path()).unwrap();
        let cut: Vec<Value> = serde_json::from_str(&format!("{text}]")).unwrap();
        let fwd = cut.iter().find(|e| e["name"] == "forward").unwrap();
        assert_eq!(
            (fwd["ph"].as_str(), fwd["pid"].as_u64()),
            (Some("X"), Some(3))
        );
        assert_eq!(fwd["args"]["step"], 7);
        assert!(fwd["dur"].as_f64().unwrap() >= 2000.0, "{fwd}");
        t.finish();
        let whole: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(t.path()).unwrap()).unwrap();
        assert_eq!(whole.len(), cut.len());
        let clock = cut.iter().find(|e| e["name"] == "hetccl_clock").unwrap();
        assert_eq!(clock["args"]["offset_us"], 12.5);
        assert_eq!(clock["args"]["world_size"], 4);
    }

    #[test]
    fn numbers_are_written_as_rust_formats_them() {
        for v in [0u64, 7, 10, 99, 100, 101, 12_345, 1_000_000_007, u64::MAX] {
            let mut out = Vec::new();
            uint(&mut out, v);
            assert_eq!(String::from_utf8(out).unwrap(), v.to_string());
        }
        for (ns, text) in [
            (0u64, "0.000"),
            (5, "0.005"),
            (1_234_567, "1234.567"),
            (90_010, "90.010"),
        ] {
            let mut out = Vec::new();
            micros_of(&mut out, ns);
            assert_eq!(String::from_utf8(out).unwrap(), text);
        }
    }

    #[test]
    fn a_span_without_a_tracer_records_nothing() {
        let s = Span::start(None, "idle").arg("x", 1);
        assert!(!s.is_recording());
    }
}
