//! `hetccl trace merge OUT FILES...`: the traces of every rank (`HETCCL_TRACE`) on one
//! timeline, for Perfetto or `chrome://tracing`.
//!
//! Each rank's file says, in its `hetccl_clock` event, how far rank 0's trace clock
//! lies ahead of its own (measured at init: the shortest of a few round trips to rank
//! 0, within half that trip). Every timestamp of a rank is moved by its offset, so the
//! ranks share rank 0's clock; if that puts an event before zero, every rank moves on by
//! the same amount. Events are kept as they are otherwise, all of them, metadata too. A
//! file cut short (a rank that crashed before closing its array) is read up to its last
//! whole event.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

const USAGE: &str = "usage: hetccl trace merge OUT FILE...\n\n\
    Puts the trace files of a job's ranks (HETCCL_TRACE) on one timeline, aligned to\n\
    rank 0's clock, and writes them to OUT.";

/// One rank's file, read.
#[derive(Debug)]
pub struct RankTrace {
    /// The file.
    pub path: PathBuf,
    /// Its events, in file order.
    pub events: Vec<Value>,
    /// Rank 0's clock minus this rank's (µs) and its bound; `None` when the file has no
    /// clock event (its rank's times are then taken as they are).
    pub clock: Option<(f64, f64)>,
}

/// Reads a trace file: a JSON array, closed or not.
pub fn read(path: &Path) -> Result<RankTrace, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let events: Vec<Value> = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(a)) => a,
        Ok(Value::Object(mut o)) => match o.remove("traceEvents") {
            Some(Value::Array(a)) => a,
            _ => {
                return Err(format!(
                    "{}: an object without a traceEvents array",
                    path.display()
                ))
            }
        },
        _ => {
            // Cut short: keep the whole events before the cut.
            let body = text.trim_end().trim_end_matches(',');
            let mut end = body.len();
            loop {
                let attempt = format!("{}]", &body[..end]);
                if let Ok(a) = serde_json::from_str::<Vec<Value>>(&attempt) {
                    break a;
                }
                match body[..end].rfind("\n,") {
                    Some(i) => end = i,
                    None => {
                        return Err(format!(
                            "{} is not a trace: not a JSON array of events",
                            path.display()
                        ))
                    }
                }
            }
        }
    };
    let clock = events
        .iter()
        .rev()
        .find(|e| e["ph"] == "M" && e["name"] == "hetccl_clock")
        .and_then(|e| {
            Some((
                e["args"]["offset_us"].as_f64()?,
                e["args"]["error_us"].as_f64()?,
            ))
        });
    Ok(RankTrace {
        path: path.to_path_buf(),
        events,
        clock,
    })
}

/// Every rank's events on rank 0's clock, in one array.
pub fn merge(ranks: &[RankTrace]) -> Vec<Value> {
    let offset = |r: &RankTrace| r.clock.map_or(0.0, |c| c.0);
    let earliest = ranks
        .iter()
        .flat_map(|r| {
            r.events
                .iter()
                .filter_map(|e| e["ts"].as_f64())
                .map(move |t| t + offset(r))
        })
        .fold(0.0f64, f64::min);
    let mut out = Vec::new();
    for r in ranks {
        let shift = offset(r) - earliest;
        for e in &r.events {
            let mut e = e.clone();
            if let Some(t) = e["ts"].as_f64() {
                e["ts"] = (t + shift).into();
            }
            out.push(e);
        }
    }
    out
}

/// `hetccl trace ARGS`: the exit code.
pub fn cli(args: &[OsString]) -> i32 {
    let mut err = hetccl::log::stderr();
    let args: Vec<&Path> = args.iter().map(Path::new).collect();
    let (out, files) = match args.as_slice() {
        [cmd, out, files @ ..] if cmd.to_str() == Some("merge") && !files.is_empty() => {
            (out, files)
        }
        [h] if matches!(h.to_str(), Some("-h" | "--help")) => {
            let _ = writeln!(hetccl::log::stdout(), "{USAGE}");
            return 0;
        }
        _ => {
            let _ = writeln!(err, "{USAGE}");
            return 2;
        }
    };
    let mut ranks = Vec::new();
    for f in files {
        match read(f) {
            Ok(r) => ranks.push(r),
            Err(e) => {
                let _ = writeln!(err, "hetccl trace merge: {e}");
                return 1;
            }
        }
    }
    let merged = merge(&ranks);
    let text = match serde_json::to_string(&merged) {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(err, "hetccl trace merge: {e}");
            return 1;
        }
    };
    if let Err(e) = std::fs::write(out, text) {
        let _ = writeln!(
            err,
            "hetccl trace merge: cannot write {}: {e}",
            out.display()
        );
        return 1;
    }
    let mut say = hetccl::log::stdout();
    for r in &ranks {
        let _ = match r.clock {
            Some((o, e)) => writeln!(
                say,
                "{}: {} events, moved by {o:.1} us (clock offset to rank 0 within {e:.1} us)",
                r.path.display(),
                r.events.len()
            ),
            None => writeln!(
                say,
                "{}: {} events, not aligned (the file has no hetccl_clock event)",
                r.path.display(),
                r.events.len()
            ),
        };
    }
    let _ = writeln!(say, "{} events written to {}", merged.len(), out.display());
    0
}
