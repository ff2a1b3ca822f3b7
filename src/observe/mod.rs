//! Seeing inside a job: per-communicator counters ([`Metrics`]) and the timeline trace
//! (`HETCCL_TRACE`, [`trace`]).
//!
//! Counters are plain integers kept with the communicator's links (under the lock
//! the running collective holds anyway), added once per collective from what the
//! schedule moved: no atomics and no per-message work. The trace is off unless
//! `HETCCL_TRACE` names a file; off, a collective pays one branch on an `Option`.
//!
//! | file | holds |
//! | --- | --- |
//! | `metrics` | [`Metrics`], the counters and their dump at exit |
//! | `trace` | the event buffer, its Chrome trace / Perfetto JSON and [`Span`] |
//! | `clock` | the offset of each rank's trace clock to rank 0's, measured at init |
//! | `waits` | the time a call waited on each peer, for the trace |

mod clock;
pub mod metrics;
pub mod trace;
mod waits;

pub use crate::algorithm::Phase;
pub use metrics::{LinkClass, Metrics};
pub use trace::Span;
pub(crate) use waits::LinkWaits;

pub(crate) use clock::offset_to_rank0;

use std::sync::Arc;

use crate::algorithm::executor::{ExecCtx, PhaseEnds, Wire};
use crate::algorithm::Schedule;
use crate::compression::OverflowStats;
use crate::error::Result;
use crate::flight::Stamp;
pub(crate) use metrics::Counters;
use trace::Tracer;

/// What one finished call was, for the counters and the trace.
pub(crate) struct CallDone<'a> {
    pub(crate) ctx: &'a ExecCtx,
    /// The engine: `"links"`, `"eager"` or `"shared buffers"`.
    pub(crate) path: &'static str,
    /// The schedule, for a call over links.
    pub(crate) sched: Option<&'a Arc<Schedule>>,
    /// The links that carried 16-bit values, for a compressed call.
    pub(crate) wire: Option<&'a Wire>,
    pub(crate) result: &'a Result<OverflowStats>,
    pub(crate) start: Stamp,
    pub(crate) end: Stamp,
    pub(crate) phase_end: &'a PhaseEnds,
}

/// A communicator's counters and trace, kept with its links (the progress state) so
/// that the call that runs updates them under the lock it holds anyway.
#[derive(Default)]
pub(crate) struct Observer {
    pub(crate) counters: Counters,
    /// The class of the link to each peer (`None` for self).
    pub(crate) classes: Arc<[Option<LinkClass>]>,
    pub(crate) tracer: Option<Arc<Tracer>>,
    /// While tracing: the time the running call waited on each peer, and whether the
    /// running call handed it to the executor.
    /// Per-call clock ticks.
    pub(crate) waits: Vec<u64>,
    pub(crate) waits_taken: bool,
}

impl Observer {
    /// Where the next run over links adds its waits on each peer: only while tracing.
    pub(crate) fn link_waits(&mut self) -> Option<&mut [u64]> {
        self.tracer.as_ref()?;
        self.waits.clear();
        self.waits.resize(self.classes.len(), 0);
        self.waits_taken = true;
        Some(&mut self.waits)
    }

    /// Counts a finished call and, when tracing, records it and its phases.
    pub(crate) fn call(&mut self, c: &CallDone<'_>) {
        let m = &mut self.counters.m;
        m.calls += 1;
        let bytes = c.ctx.count * c.ctx.dtype.size() as u64;
        match &c.result {
            Err(_) => m.failed_calls += 1,
            Ok(stats) => {
                match c.sched {
                    Some(s) => {
                        let wire = c.wire.map(|w| w.peers.as_slice());
                        self.counters.links_call(s, &self.classes, wire);
                    }
                    None => {
                        m.shared_calls += 1;
                        m.shared_bytes += bytes;
                    }
                }
                self.counters.overflow(stats);
            }
        }
        self.counters.time(c.start, c.end, c.phase_end);
        if let Some(t) = &self.tracer {
            let waits: &[u64] = if std::mem::take(&mut self.waits_taken) {
                &self.waits
            } else {
                &[]
            };
            record(t, c, &self.classes, waits);
        }
    }
}

/// The trace record of one call: what it was, copied as fixed-size values (the schedule
/// and the link classes shared, not copied; its clock stamps raw); its JSON is written
/// when the trace is written out, off the collective's path. Never inlined, so that
/// `scripts/trace-overhead.sh` can count it.
#[cold]
#[inline(never)]
fn record(t: &Tracer, c: &CallDone<'_>, classes: &Arc<[Option<LinkClass>]>, waits: &[u64]) {
    let ctx = c.ctx;
    t.call(
        trace::CallEvent {
            op: ctx.op,
            seq: ctx.seq,
            count: ctx.count,
            dtype: ctx.dtype,
            redop: ctx.redop,
            path: c.path,
            sched: c.sched.cloned(),
            // Copied for compressed calls only: which links halved their bytes.
            wire: c.wire.cloned(),
            classes: classes.clone(),
            error: c.result.as_ref().err().map(ToString::to_string),
            start: c.start,
            end: c.end,
            phase_end: *c.phase_end,
            waits: 0..0,
        },
        waits,
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::communicator::testing::{on_all, world};
    use crate::compression::{Compressor, ScalePolicy, WireFormat};
    use crate::config::{AlgoChoice, CompressMode, Config};
    use crate::dtype::ReduceOp;
    use crate::Communicator;

    fn comms(n: usize, per_node: usize, algo: AlgoChoice) -> Vec<Communicator> {
        let cfg = Config {
            algo,
            timeout: Duration::from_secs(20),
            ..Config::default()
        };
        world(n, per_node, cfg)
    }

    #[test]
    fn a_ring_counts_the_bytes_it_moves() {
        // Ring all-reduce of S bytes: every rank sends and receives 2(n-1)/n · S.
        for (n, count) in [(2, 1000), (4, 1024)] {
            let cs = comms(n, n, AlgoChoice::Ring);
            let ms = on_all(&cs, |c| {
                let mut v = vec![1.0f32; count];
                c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
                c.metrics()
            });
            let moved = (2 * (n - 1) * count * 4 / n) as u64;
            for m in &ms {
                assert_eq!(m.calls, 1);
                assert_eq!(m.failed_calls, 0);
                assert_eq!(m.sent(LinkClass::Shm), moved, "{n} ranks");
                assert_eq!(m.received(LinkClass::Shm), moved, "{n} ranks");
                assert_eq!(m.sent(LinkClass::Tcp), 0);
                // Both phases ran, and the call's time is theirs and the rest's.
                assert!(!m.time_in(Phase::ReduceScatter).is_zero(), "{m:?}");
                assert!(!m.time_in(Phase::AllGather).is_zero(), "{m:?}");
                let parts: Duration = m.time_by_phase.iter().sum();
                assert_eq!(parts, m.time_total);
            }
        }
    }

    #[test]
    fn a_hierarchical_all_reduce_counts_every_phase() {
        // 2 nodes x 2, S = 4096 bytes, two shards of S/2: a rank sends its mate the shard
        // it does not own (S/2), runs the 2-owner ring over its own (S/2), and hands its
        // finished shard to its mate (S/2).
        let cs = comms(4, 2, AlgoChoice::Hier);
        let ms = on_all(&cs, |c| {
            let mut v = vec![1.0f32; 1024];
            c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
            c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
            c.metrics()
        });
        for m in &ms {
            assert_eq!(m.calls, 2);
            assert_eq!(m.sent(LinkClass::Shm), 2 * 3 * 2048, "{m:?}");
            assert_eq!(m.received(LinkClass::Shm), 2 * 3 * 2048, "{m:?}");
            // The last phase may end with the inter-node ring's last receive, which it
            // forwards to the node-mate as it lands: it can take no time of its own.
            for p in [Phase::IntraReduceScatter, Phase::InterAllReduce] {
                assert!(!m.time_in(p).is_zero(), "{p:?}: {m:?}");
            }
            assert!(m.time_in(Phase::ReduceScatter).is_zero(), "{m:?}");
        }
    }

    #[test]
    fn compressed_links_count_16_bit_bytes_and_overflows() {
        let cs = comms(2, 1, AlgoChoice::Ring);
        let ms = on_all(&cs, |c| {
            let mut comp =
                Compressor::new(WireFormat::F16, ScalePolicy::Factor(1.0), false).unwrap();
            let mut v = vec![1.0f32; 64];
            v[3] = 1e6;
            let c2 = crate::communicator::Compression {
                mode: CompressMode::Inter,
                compressor: &mut comp,
                buffer: 0,
            };
            let stats = c.all_reduce_compressed(&mut v, ReduceOp::Sum, c2).unwrap();
            (stats, c.metrics())
        });
        for (stats, m) in &ms {
            // 64 f32 = 256 bytes through a 2-rank ring, as 16-bit values: 128.
            assert_eq!(m.sent(LinkClass::Shm), 128, "{m:?}");
            assert_eq!(m.compress_overflows, stats.overflow);
        }
        let total: u64 = ms.iter().map(|(_, m)| m.compress_overflows).sum();
        assert!(total >= 2, "each rank saturates its own 1e6: {ms:?}");
    }

    #[test]
    fn a_failed_call_is_counted_and_moves_nothing_counted() {
        let cs = comms(2, 2, AlgoChoice::Ring);
        let ms = on_all(&cs, |c| {
            let mut v = vec![1.0f32; 100 + c.rank()];
            c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err();
            c.metrics()
        });
        for m in &ms {
            assert_eq!((m.calls, m.failed_calls), (1, 1));
            assert_eq!(m.sent(LinkClass::Shm), 0);
        }
    }

    /// Two ranks running the ring, traced into `$TMPDIR/hetccl-NAME-<pid>/t-%r.json`:
    /// the directory, the trace's pattern, the communicators.
    fn traced_pair(name: &str) -> (std::path::PathBuf, String, Vec<Communicator>) {
        let dir = std::env::temp_dir().join(format!("hetccl-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pattern = format!("{}/t-%r.json", dir.display());
        let cfg = Config {
            algo: AlgoChoice::Ring,
            timeout: Duration::from_secs(20),
            trace: Some(pattern.clone()),
            ..Config::default()
        };
        (dir, pattern, world(2, 2, cfg))
    }

    #[test]
    fn the_trace_puts_a_wait_on_the_peer_that_came_late() {
        // Rank 1 comes to the all-reduce 200 ms late: rank 0 waits that long on it;
        // rank 1 finds rank 0 there already and waits on it for no such time. One
        // message each way and step (1 KiB, under a chunk), so that the exchange itself,
        // in which each side waits on the other in turn, takes no time worth the name.
        let (dir, pattern, cs) = traced_pair("waits");
        on_all(&cs, |c| {
            if c.rank() == 1 {
                std::thread::sleep(Duration::from_millis(200));
            }
            let mut v = vec![1.0f32; 256];
            c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        });
        drop(cs);
        let waited = |rank: usize| -> serde_json::Value {
            let path = trace::path_for(&pattern, rank);
            let text = std::fs::read_to_string(&path).unwrap();
            let events: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
            let call = events
                .iter()
                .find(|e| e["cat"] == "collective")
                .unwrap_or_else(|| panic!("no collective in {text}"));
            assert_eq!(call["args"]["path"], "links", "{call}");
            call["args"]["waited_us"].clone()
        };
        let (w0, w1) = (waited(0), waited(1));
        let on = |w: &serde_json::Value, key: &str| w[key].as_f64().unwrap_or(0.0);
        assert!(on(&w0, "1 (shm)") >= 150_000.0, "rank 0: {w0}");
        assert_eq!(w0.as_object().map(|o| o.len()), Some(1), "rank 0: {w0}");
        assert!(on(&w1, "0 (shm)") < 100_000.0, "rank 1: {w1}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_traced_call_writes_every_field_and_its_phases_inside_it() {
        let (dir, pattern, cs) = traced_pair("fields");
        on_all(&cs, |c| {
            let mut v = vec![1.0f32; 1000];
            c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
            c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        });
        drop(cs);
        let text = std::fs::read_to_string(trace::path_for(&pattern, 1)).unwrap();
        let events: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        let calls: Vec<_> = events.iter().filter(|e| e["cat"] == "collective").collect();
        assert_eq!(calls.len(), 2, "{text}");
        let call = calls[1];
        let keys: Vec<&str> = call["args"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut want = [
            "seq",
            "bytes",
            "count",
            "dtype",
            "redop",
            "path",
            "algorithm",
            "sent",
            "received",
            "waited_us",
            "compression",
        ];
        want.sort_unstable();
        let mut got = keys.clone();
        got.sort_unstable();
        assert_eq!(got, want, "{call}");
        let a = &call["args"];
        assert_eq!(
            (a["seq"].as_u64(), a["bytes"].as_u64(), a["count"].as_u64()),
            (Some(1), Some(4000), Some(1000))
        );
        assert_eq!(
            (a["dtype"].as_str(), a["redop"].as_str()),
            (Some("f32"), Some("sum"))
        );
        assert_eq!(
            (a["algorithm"].as_str(), a["compression"].as_str()),
            (Some("ring"), Some("off"))
        );
        // A 2-rank ring moves 2(n-1)/n · S = S each way with its one peer.
        assert_eq!(a["sent"]["0 (shm)"], 4000, "{call}");
        assert_eq!(a["received"]["0 (shm)"], 4000, "{call}");
        assert_eq!(
            (call["pid"].as_u64(), call["ph"].as_str()),
            (Some(1), Some("X"))
        );
        let (ts, dur) = (call["ts"].as_f64().unwrap(), call["dur"].as_f64().unwrap());
        let phases: Vec<_> = events
            .iter()
            .filter(|e| e["cat"] == "phase" && e["args"]["seq"] == 1)
            .collect();
        let names: Vec<_> = phases.iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["reduce-scatter", "all-gather"], "{text}");
        // Consecutive, from the call's start, inside it (three decimals of rounding).
        assert_eq!(phases[0]["ts"].as_f64(), Some(ts));
        let end0 = phases[0]["ts"].as_f64().unwrap() + phases[0]["dur"].as_f64().unwrap();
        assert!(
            (phases[1]["ts"].as_f64().unwrap() - end0).abs() < 0.002,
            "{text}"
        );
        let end1 = phases[1]["ts"].as_f64().unwrap() + phases[1]["dur"].as_f64().unwrap();
        assert!(end1 <= ts + dur + 0.002, "{text}");
        assert_eq!(phases[1]["args"]["op"], "all_reduce");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_summary_names_every_counter() {
        let mut m = Metrics {
            calls: 3,
            retries: 2,
            ..Metrics::default()
        };
        m.bytes_sent[LinkClass::Tcp as usize] = 4096;
        m.time_by_phase[Phase::AllGather as usize] = Duration::from_micros(1500);
        assert_eq!(
            m.summary(),
            "3 calls (0 failed, 0 on shared memory: 0 bytes); shm sent 0 received 0 bytes; \
             tcp sent 4096 received 0 bytes; device ipc sent 0 received 0 bytes; \
             device staged sent 0 received 0 bytes; 0.000 ms in collectives, all-gather 1.500 ms; \
             2 setup retries; compression 0 overflows, 0 non-finite"
        );
    }
}
