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
//! `serde_json::Value`: through a cursor into a byte buffer that goes to the file in
//! large writes, what repeats between calls of one shape (names, sizes, bytes per
//! peer) written once and copied (`Shape`). Tracing adds under 3 % to a collective's
//! instructions (`scripts/trace-overhead.sh`, `docs/PERFORMANCE.md`), writing
//! included.

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
use crate::algorithm::Phase;
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
    /// Calls' lines on their way to the file ([`Cursor`]), kept for its length.
    line: Vec<u8>,
    /// The repeated arguments of the last call written.
    shape: Shape,
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
                // At its full length once: a call's lines never wait for it to grow.
                line: vec![0; TEXT_FLUSH + 4096],
                shape: Shape::default(),
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
            shape,
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
            // Calls' lines gather in `text` up to `at` and go to the file in large
            // writes; a span's line, written to the file directly, first sends them.
            let mut at = 0;
            for e in events.drain(..) {
                match e.kind {
                    Kind::Span(s) => {
                        w.write_all(&text[..at])?;
                        at = 0;
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
                        let waited = waits.get(c.waits.clone()).unwrap_or(&[]);
                        at = write_call_into(
                            text,
                            at,
                            shape,
                            &c,
                            waited,
                            &clock,
                            (self.rank, e.tid),
                        );
                        if at >= TEXT_FLUSH {
                            w.write_all(&text[..at])?;
                            at = 0;
                        }
                    }
                }
            }
            w.write_all(&text[..at])?;
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

/// Bytes of calls' lines gathered before they go to the file: one write to the file's
/// buffered writer per so many, which passes them on without copying them.
const TEXT_FLUSH: usize = 64 << 10;

/// Where a call's lines are written: a byte buffer kept at its full length (zeroed
/// once, when it grows) and the end of what is written in it. A piece that does not fit
/// is not written and marks the cursor `short`; the writer then writes the call again
/// into a longer buffer. So a piece costs a bounds check and a copy, with no capacity
/// check and length update in a `Vec` per piece.
struct Cursor<'a> {
    buf: &'a mut [u8],
    at: usize,
    short: bool,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a mut [u8], at: usize) -> Self {
        Cursor {
            buf,
            at,
            short: false,
        }
    }

    #[inline(always)]
    fn put(&mut self, s: &[u8]) {
        let end = self.at + s.len();
        match self.buf.get_mut(self.at..end) {
            Some(d) => {
                d.copy_from_slice(s);
                self.at = end;
            }
            None => self.short = true,
        }
    }

    /// Copies what was written at `r` (the same call's bytes) to the end.
    #[inline(always)]
    fn again(&mut self, r: Range<usize>) {
        let end = self.at + r.len();
        if r.end <= self.at && end <= self.buf.len() {
            self.buf.copy_within(r, self.at);
            self.at = end;
        } else {
            self.short = true;
        }
    }

    /// `v` in decimal: the digit count from the bit length (log10(2) ~ 1233 / 4096, one
    /// table look-up to correct it), then the digits from the right, two a step, into
    /// the buffer itself.
    #[inline(always)]
    fn uint(&mut self, mut v: u64) {
        let bits = 64 - (v | 1).leading_zeros() as usize;
        let t = (bits * 1233) >> 12;
        let n = (t + 1 - usize::from(v < POW10[t])).max(1);
        let Some(digits) = self
            .buf
            .get_mut(self.at..)
            .and_then(|b| b.first_chunk_mut::<20>())
        else {
            self.short = true;
            return;
        };
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
        self.at += n;
    }

    /// `ns` nanoseconds as microseconds with three decimals, as the format counts time.
    #[inline(always)]
    fn micros(&mut self, ns: u64) {
        self.uint(ns / 1000);
        let frac = (ns % 1000) as usize;
        let d = frac % 100 * 2;
        self.put(&[b'.', b'0' + (frac / 100) as u8, PAIRS[d], PAIRS[d + 1]]);
    }

    /// `"ts":..,"dur":..,"pid":..,"tid":..` of a span from `a` to `b` (trace clock
    /// nanoseconds). `ts` and `who` are where `a` and `,"pid":..,"tid":..` were written
    /// already for an earlier line of the same call, copied rather than written again;
    /// `None` the first time. Returns where they are, for the next line.
    #[inline(always)]
    fn times(
        &mut self,
        a: u64,
        b: u64,
        ts: Option<Range<usize>>,
        rank: usize,
        tid: u32,
        who: Option<Range<usize>>,
    ) -> (Range<usize>, Range<usize>) {
        self.put(b"\"ts\":");
        let from = self.at;
        match ts {
            Some(r) => self.again(r),
            None => self.micros(a),
        }
        let ts = from..self.at;
        self.put(b",\"dur\":");
        self.micros(b.saturating_sub(a));
        let from = self.at;
        match who {
            Some(r) => self.again(r),
            None => {
                self.put(b",\"pid\":");
                self.uint(rank as u64);
                self.put(b",\"tid\":");
                self.uint(u64::from(tid));
            }
        }
        (ts, from..self.at)
    }

    /// `"key":"value"` (`key` given with its quotes and colon) for a value of the
    /// runtime's own naming, which needs no escaping (operation, type, algorithm and
    /// format names).
    #[inline(always)]
    fn name_field(&mut self, key: &[u8], value: &str) {
        self.put(key);
        self.put(b"\"");
        self.put(value.as_bytes());
        self.put(b"\"");
    }

    /// A peer as the per-peer arguments name it, in quotes and with its colon:
    /// `"P (CLASS)":`.
    #[inline(always)]
    fn peer_key(&mut self, p: usize, classes: &[Option<LinkClass>]) {
        let class = classes
            .get(p)
            .copied()
            .flatten()
            .map_or("?", LinkClass::name);
        self.put(b"\"");
        self.uint(p as u64);
        self.put(b" (");
        self.put(class.as_bytes());
        self.put(b")\":");
    }

    /// A JSON string of free text, escaped by the JSON writer.
    fn text(&mut self, s: &str) {
        let Some(mut rest) = self.buf.get_mut(self.at..) else {
            self.short = true;
            return;
        };
        let room = rest.len();
        // A slice too short for the text fails the write: the call is written again.
        match serde_json::to_writer(&mut rest, s) {
            Ok(()) => self.at += room - rest.len(),
            Err(_) => self.short = true,
        }
    }
}

/// Per-call clock stamps and tick counts as nanoseconds of the trace clock: the
/// clock's conversion when written out ([`StampNanos`]), a fixed one in tests.
trait ToNanos {
    fn at(&self, s: Stamp) -> u64;
    fn span(&self, ticks: u64) -> u64;
}

impl ToNanos for StampNanos {
    #[inline]
    fn at(&self, s: Stamp) -> u64 {
        StampNanos::at(self, s)
    }

    #[inline]
    fn span(&self, ticks: u64) -> u64 {
        StampNanos::span(self, ticks)
    }
}

/// What repeats from call to call of one shape (the same operation, count, types,
/// engine, schedule, link classes and compression), as written for the last call: the
/// next call of that shape copies it. The pieces, in the order the lines hold them:
///
/// ```text
/// head        ,\n{"ph":"X","name":"all_reduce","cat":"collective",
/// args        ,"bytes":..,"count":..,"dtype":..,..,"received":{..},"waited_us":{
/// tail        ,"compression":"off"
/// phase_args  ,"args":{"op":"all_reduce","seq":
/// phase_head  ,\n{"ph":"X","name":"reduce-scatter","cat":"phase",   (one per phase)
/// ```
///
/// `args` ends with `"waited_us":{` only for a call over links. Holds the schedule and
/// the classes it was written from, so that their addresses, which it compares, stay
/// theirs.
#[derive(Default)]
struct Shape {
    of: Option<CallShape>,
    bytes: Vec<u8>,
    /// Where each piece lies in `bytes`: head, args, tail, phase_args, then the phases'
    /// heads in [`Phase::ALL`]'s order.
    at: [Range<usize>; 4 + Phase::COUNT],
}

struct CallShape {
    op: CollectiveOp,
    count: u64,
    dtype: DataType,
    redop: ReduceOp,
    path: &'static str,
    sched: Option<Arc<Schedule>>,
    classes: Arc<[Option<LinkClass>]>,
    wire: Option<Wire>,
}

impl Shape {
    /// Makes the pieces `c`'s, written anew unless the last call's were `c`'s.
    fn of(&mut self, c: &CallEvent) {
        let same = self.of.as_ref().is_some_and(|s| {
            s.op == c.op
                && s.count == c.count
                && s.dtype == c.dtype
                && s.redop == c.redop
                && std::ptr::eq(s.path, c.path)
                && match (&s.sched, &c.sched) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                }
                && Arc::ptr_eq(&s.classes, &c.classes)
                && s.wire == c.wire
        });
        if same {
            return;
        }
        loop {
            let mut cur = Cursor::new(&mut self.bytes, 0);
            let at = shape_pieces(&mut cur, c);
            if !cur.short {
                self.at = at;
                break;
            }
            let longer = (self.bytes.len() * 2).max(1024);
            self.bytes.resize(longer, 0);
        }
        self.of = Some(CallShape {
            op: c.op,
            count: c.count,
            dtype: c.dtype,
            redop: c.redop,
            path: c.path,
            sched: c.sched.clone(),
            classes: c.classes.clone(),
            wire: c.wire.clone(),
        });
    }

    fn piece(&self, i: usize) -> &[u8] {
        self.at
            .get(i)
            .and_then(|r| self.bytes.get(r.clone()))
            .unwrap_or(&[])
    }

    fn head(&self) -> &[u8] {
        self.piece(0)
    }

    fn args(&self) -> &[u8] {
        self.piece(1)
    }

    fn tail(&self) -> &[u8] {
        self.piece(2)
    }

    fn phase_args(&self) -> &[u8] {
        self.piece(3)
    }

    fn phase_head(&self, p: Phase) -> &[u8] {
        self.piece(4 + p as usize)
    }
}

/// Writes [`Shape`]'s pieces for `c`; returns where each lies.
fn shape_pieces(out: &mut Cursor<'_>, c: &CallEvent) -> [Range<usize>; 4 + Phase::COUNT] {
    let mut at: [Range<usize>; 4 + Phase::COUNT] = Default::default();
    let op = c.op.name();
    let from = out.at;
    out.name_field(b",\n{\"ph\":\"X\",\"name\":", op);
    out.put(b",\"cat\":\"collective\",");
    at[0] = from..out.at;
    let from = out.at;
    out.put(b",\"bytes\":");
    out.uint(c.count.saturating_mul(c.dtype.size() as u64));
    out.put(b",\"count\":");
    out.uint(c.count);
    out.name_field(b",\"dtype\":", c.dtype.name());
    out.name_field(b",\"redop\":", c.redop.name());
    out.name_field(b",\"path\":", c.path);
    if let Some(s) = &c.sched {
        out.name_field(b",\"algorithm\":", s.algo);
        // Bytes per peer as the link carried them, and the peer's link class.
        let per_peer = |out: &mut Cursor<'_>, key: &[u8], list: &[(usize, u64)]| {
            out.put(key);
            for (i, &(p, b)) in list.iter().enumerate() {
                let b = match &c.wire {
                    Some(w) if w.peers.get(p).copied().unwrap_or(false) => b / 2,
                    _ => b,
                };
                if i > 0 {
                    out.put(b",");
                }
                out.peer_key(p, &c.classes);
                out.uint(b);
            }
            out.put(b"}");
        };
        per_peer(out, b",\"sent\":{", &s.sent_to);
        per_peer(out, b",\"received\":{", &s.received_from);
        out.put(b",\"waited_us\":{");
    }
    at[1] = from..out.at;
    let from = out.at;
    out.name_field(
        b",\"compression\":",
        c.wire.as_ref().map_or("off", |w| w.format.name()),
    );
    at[2] = from..out.at;
    let from = out.at;
    out.name_field(b",\"args\":{\"op\":", op);
    out.put(b",\"seq\":");
    at[3] = from..out.at;
    for p in Phase::ALL {
        let from = out.at;
        out.name_field(b",\n{\"ph\":\"X\",\"name\":", p.name());
        out.put(b",\"cat\":\"phase\",");
        at[4 + p as usize] = from..out.at;
    }
    at
}

/// Writes the lines of one collective of thread `tid` of `rank` at `at` in `text`,
/// which grows until they fit; returns where they end.
fn write_call_into(
    text: &mut Vec<u8>,
    at: usize,
    shape: &mut Shape,
    c: &CallEvent,
    waited: &[(u32, u64)],
    clock: &impl ToNanos,
    (rank, tid): (usize, u32),
) -> usize {
    loop {
        let mut cur = Cursor::new(text, at);
        write_call(&mut cur, shape, c, waited, clock, rank, tid);
        if !cur.short {
            return cur.at;
        }
        let longer = (text.len() * 2).max(at + 4096);
        text.resize(longer, 0);
    }
}

/// The lines of one collective: its span, then one per phase, each after the `,\n`
/// that ends the line before (as [`line`] writes them). Written by hand rather than
/// through `serde_json::Value`, which would cost the call more than the 3 % of its
/// instructions `docs/PERFORMANCE.md` holds the trace to.
fn write_call(
    out: &mut Cursor<'_>,
    shape: &mut Shape,
    c: &CallEvent,
    waited: &[(u32, u64)],
    clock: &impl ToNanos,
    rank: usize,
    tid: u32,
) {
    shape.of(c);
    out.put(shape.head());
    let start = clock.at(c.start);
    let (ts, who) = out.times(start, clock.at(c.end), None, rank, tid, None);
    out.put(b",\"args\":{\"seq\":");
    let from = out.at;
    out.uint(c.seq);
    let seq = from..out.at;
    out.put(shape.args());
    if c.sched.is_some() {
        // Microseconds spent waiting on each peer, peers never waited on left out.
        for (i, &(p, ticks)) in waited.iter().enumerate() {
            if i > 0 {
                out.put(b",");
            }
            out.peer_key(p as usize, &c.classes);
            out.micros(clock.span(ticks));
        }
        out.put(b"}");
    }
    out.put(shape.tail());
    if let Some(e) = &c.error {
        // The one free text.
        out.put(b",\"error\":");
        out.text(e);
    }
    out.put(b"}}");
    for (p, a, b) in phase_spans(c.start, c.end, &c.phase_end) {
        out.put(shape.phase_head(p));
        // The first phase starts with the call: the same stamp, the same text.
        let a_ns = clock.at(a);
        let same_ts = (a == c.start).then(|| ts.clone());
        out.times(a_ns, clock.at(b), same_ts, rank, tid, Some(who.clone()));
        out.put(shape.phase_args());
        out.again(seq.clone());
        out.put(b"}}");
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
        drop(t);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn written(f: impl FnOnce(&mut Cursor<'_>)) -> String {
        let mut buf = vec![0u8; 64];
        let mut cur = Cursor::new(&mut buf, 0);
        f(&mut cur);
        assert!(!cur.short);
        let end = cur.at;
        String::from_utf8(buf[..end].to_vec()).unwrap()
    }

    #[test]
    fn numbers_are_written_as_rust_formats_them() {
        // Every digit count's first and last value, where the count from the bit length
        // needs its correction, and the ends of the range.
        let mut edges = vec![0u64, 7, 1_000_000_007, u64::MAX, u64::MAX - 1];
        for p in POW10 {
            edges.extend([p - 1, p, p + 1]);
        }
        for v in edges {
            assert_eq!(written(|c| c.uint(v)), v.to_string());
        }
        // Microseconds: the integer part, then the three decimals of the nanoseconds
        // (no rounding: the nanoseconds are exact), zeros kept.
        for (ns, text) in [
            (0u64, "0.000"),
            (5, "0.005"),
            (999, "0.999"),
            (1_000, "1.000"),
            (90_010, "90.010"),
            (1_234_567, "1234.567"),
            (u64::MAX, "18446744073709551.615"),
        ] {
            assert_eq!(written(|c| c.micros(ns)), text);
        }
    }

    proptest::proptest! {
        #[test]
        fn any_number_is_written_as_rust_formats_it(v: u64) {
            proptest::prop_assert_eq!(written(|c| c.uint(v)), v.to_string());
            // As the float the format means prints with three decimals, wherever the
            // double's error stays under half a nanosecond (the trace clock's first 26
            // days).
            let ns = v >> 13;
            proptest::prop_assert_eq!(
                written(|c| c.micros(ns)),
                format!("{}.{:03}", ns / 1000, ns % 1000)
            );
            proptest::prop_assert_eq!(
                written(|c| c.micros(ns)),
                format!("{:.3}", ns as f64 / 1e3)
            );
        }
    }

    /// Stamps as nanoseconds: 1 tick, 1 ns, from tick 1000 on.
    struct Fixed;

    impl ToNanos for Fixed {
        fn at(&self, s: Stamp) -> u64 {
            s.ticks().saturating_sub(1000)
        }
        fn span(&self, ticks: u64) -> u64 {
            ticks
        }
    }

    /// A 4-rank ring's call on rank 2 as the writer keeps it: TCP to the right, shared
    /// memory from the left, both phases ended.
    fn ring_call(error: Option<String>, wire: Option<Wire>) -> (CallEvent, Vec<(u32, u64)>) {
        let sched = Schedule {
            algo: "ring",
            sent_to: vec![(3, 1_572_864)],
            received_from: vec![(1, 1_572_864)],
            ..Schedule::default()
        };
        let mut phase_end: PhaseEnds = Default::default();
        phase_end[crate::algorithm::Phase::ReduceScatter as usize] =
            Some(Stamp::from_ticks(1000 + 299_534_344_999));
        phase_end[crate::algorithm::Phase::AllGather as usize] =
            Some(Stamp::from_ticks(1000 + 307_467_038_000));
        let call = CallEvent {
            op: CollectiveOp::AllReduce,
            seq: 18_446_744_073_709_551_615,
            count: 262_144,
            dtype: DataType::F32,
            redop: ReduceOp::Sum,
            path: "links",
            sched: Some(Arc::new(sched)),
            wire,
            classes: vec![
                Some(LinkClass::Shm),
                Some(LinkClass::Shm),
                None,
                Some(LinkClass::Tcp),
            ]
            .into(),
            error,
            start: Stamp::from_ticks(1000 + 279_300_095_000),
            end: Stamp::from_ticks(1000 + 307_466_794_001),
            phase_end,
            waits: 0..2,
        };
        (call, vec![(1, 6_760_066_499), (3, 0)])
    }

    /// What the writer wrote for [`ring_call`] before calls were written through a
    /// [`Cursor`] (`Vec` appends and the same digit tables), byte for byte.
    const RING_CALL: &str = concat!(
        r#","#,
        "\n",
        r#"{"ph":"X","name":"all_reduce","cat":"collective","ts":279300095.000,"dur":28166699.001,"pid":2,"tid":7,"args":{"seq":18446744073709551615,"bytes":1048576,"count":262144,"dtype":"f32","redop":"sum","path":"links","algorithm":"ring","sent":{"3 (tcp)":1572864},"received":{"1 (shm)":1572864},"waited_us":{"1 (shm)":6760066.499,"3 (tcp)":0.000},"compression":"off"}},"#,
        "\n",
        r#"{"ph":"X","name":"reduce-scatter","cat":"phase","ts":279300095.000,"dur":20234249.999,"pid":2,"tid":7,"args":{"op":"all_reduce","seq":18446744073709551615}},"#,
        "\n",
        r#"{"ph":"X","name":"all-gather","cat":"phase","ts":299534344.999,"dur":7932449.002,"pid":2,"tid":7,"args":{"op":"all_reduce","seq":18446744073709551615}}"#,
    );

    /// [`RING_CALL`] compressed on the link to rank 3 and failed, from rank 0, thread 1.
    const RING_CALL_FAILED: &str = concat!(
        r#","#,
        "\n",
        r#"{"ph":"X","name":"all_reduce","cat":"collective","ts":279300095.000,"dur":28166699.001,"pid":0,"tid":1,"args":{"seq":18446744073709551615,"bytes":1048576,"count":262144,"dtype":"f32","redop":"sum","path":"links","algorithm":"ring","sent":{"3 (tcp)":786432},"received":{"1 (shm)":1572864},"waited_us":{"1 (shm)":6760066.499,"3 (tcp)":0.000},"compression":"bf16","error":"rank 1: peer 3 \"closed\"\n\ttab \u0001"}},"#,
        "\n",
        r#"{"ph":"X","name":"reduce-scatter","cat":"phase","ts":279300095.000,"dur":20234249.999,"pid":0,"tid":1,"args":{"op":"all_reduce","seq":18446744073709551615}},"#,
        "\n",
        r#"{"ph":"X","name":"all-gather","cat":"phase","ts":299534344.999,"dur":7932449.002,"pid":0,"tid":1,"args":{"op":"all_reduce","seq":18446744073709551615}}"#,
    );

    fn failed_ring_call() -> (CallEvent, Vec<(u32, u64)>) {
        ring_call(
            Some("rank 1: peer 3 \"closed\"\n\ttab \u{1}".into()),
            Some(Wire {
                format: crate::dtype::WireFormat::Bf16,
                peers: vec![false, false, false, true],
            }),
        )
    }

    #[test]
    fn a_call_is_written_as_before_byte_for_byte() {
        // One shape kept across the calls, as the writer keeps it: a call of the last
        // call's shape copies its arguments, one of another shape writes them anew.
        let mut shape = Shape::default();
        let mut text = Vec::new();
        let (ring, waited) = ring_call(None, None);
        let (failed, failed_waited) = failed_ring_call();
        for (c, waited, rank, tid, want) in [
            (&ring, &waited, 2, 7, RING_CALL),
            (&ring, &waited, 2, 7, RING_CALL),
            (&failed, &failed_waited, 0, 1, RING_CALL_FAILED),
            (&ring, &waited, 2, 7, RING_CALL),
        ] {
            let end = write_call_into(&mut text, 0, &mut shape, c, waited, &Fixed, (rank, tid));
            assert_eq!(std::str::from_utf8(&text[..end]).unwrap(), want);
        }
        // The same schedule at another count is another shape.
        let mut other = ring_call(None, None).0;
        other.sched = ring.sched.clone();
        other.classes = ring.classes.clone();
        other.count = 5;
        let end = write_call_into(&mut text, 0, &mut shape, &other, &waited, &Fixed, (2, 7));
        let want = RING_CALL.replace("1048576,\"count\":262144", "20,\"count\":5");
        assert_eq!(std::str::from_utf8(&text[..end]).unwrap(), want);
    }

    #[test]
    fn a_call_that_does_not_fit_is_written_again_into_a_longer_buffer() {
        // Every length from none to the whole call's: each piece, the numbers and the
        // escaped error among them, falls short of the end once, and what was written
        // before the call stays.
        let (c, waited) = failed_ring_call();
        for room in 0..RING_CALL_FAILED.len() + 40 {
            let mut text = vec![b'#'; 3 + room];
            let end = write_call_into(
                &mut text,
                3,
                &mut Shape::default(),
                &c,
                &waited,
                &Fixed,
                (0, 1),
            );
            assert_eq!(&text[..3], b"###", "room {room}");
            assert_eq!(
                std::str::from_utf8(&text[3..end]).unwrap(),
                RING_CALL_FAILED,
                "room {room}"
            );
        }
    }

    #[test]
    fn a_span_without_a_tracer_records_nothing() {
        let s = Span::start(None, "idle").arg("x", 1);
        assert!(!s.is_recording());
    }
}
