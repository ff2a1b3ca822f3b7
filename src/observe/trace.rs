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
//!     "args":{"seq":..,"bytes":..,"algorithm":..,"path":..,...}}
//! {"ph":"X","name":"inter-node all-reduce","cat":"phase",...}
//! ...
//! ]
//! ```
//!
//! `pid` is the rank, `tid` a small number per thread of the process; `ts` and `dur`
//! are microseconds of this process's trace clock (a monotonic clock counted from
//! the first traced event of the process). `hetccl_clock` says how to put the rank on
//! rank 0's clock: add `offset_us` (measured at init, within `error_us`);
//! `hetccl trace merge` does so for every file it merges.
//!
//! Events are kept in memory and written when a few thousand have gathered and when
//! the communicator is dropped, so a traced call costs a clock read and a push.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

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

/// One complete event.
struct Event {
    name: Cow<'static, str>,
    cat: &'static str,
    start: Instant,
    dur: Duration,
    tid: u32,
    args: Map<String, Value>,
}

struct Buf {
    events: Vec<Event>,
    out: Option<BufWriter<File>>,
    /// Threads whose name is written already.
    named: HashSet<u32>,
    /// Metadata lines not written yet.
    meta: Vec<Value>,
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
                named: HashSet::new(),
                meta: Vec::new(),
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
        let ev = Event {
            name: name.into(),
            cat,
            start,
            dur: end.saturating_duration_since(start),
            tid: thread_id(),
            args,
        };
        let mut b = self.lock();
        if b.named.insert(ev.tid) {
            let t = std::thread::current();
            let name = t
                .name()
                .map_or_else(|| format!("thread {}", ev.tid), str::to_string);
            b.meta
                .push(json!({"ph": "M", "name": "thread_name", "pid": self.rank,
                               "tid": ev.tid, "args": {"name": name}}));
        }
        b.events.push(ev);
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
            events, out, meta, ..
        } = b;
        let Some(w) = out.as_mut() else {
            events.clear();
            meta.clear();
            return;
        };
        let written = (|| -> std::io::Result<()> {
            for m in meta.drain(..) {
                line(w, &m)?;
            }
            for e in events.drain(..) {
                let mut v = json!({
                    "ph": "X", "name": e.name, "cat": e.cat, "ts": micros(e.start),
                    "dur": e.dur.as_nanos() as f64 / 1e3, "pid": self.rank, "tid": e.tid,
                });
                if !e.args.is_empty() {
                    v["args"] = Value::Object(e.args);
                }
                line(w, &v)?;
            }
            w.flush()
        })();
        if let Err(e) = written {
            // A trace that cannot be written must not fail the job: say so once.
            *out = None;
            events.clear();
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
    fn a_span_without_a_tracer_records_nothing() {
        let s = Span::start(None, "idle").arg("x", 1);
        assert!(!s.is_recording());
    }
}
