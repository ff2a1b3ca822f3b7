//! Per-communicator counters: calls, bytes by link class, time by phase, link-setup
//! retries, compression overflows.
//!
//! Bytes are the payload the schedule of each completed collective sent and received
//! per peer (message headers not counted), on a link that carries 16-bit values the
//! 16-bit size. The path's engine runs exactly its schedule, so these are the bytes
//! that crossed each link. Calls run on shared memory without links (the eager slots,
//! shared buffers) read their peers' memory and are counted apart.

use std::time::Duration;

use crate::algorithm::executor::PhaseEnds;
use crate::algorithm::{Phase, Schedule};
use crate::compression::OverflowStats;
use crate::flight::clock::ticks_to_duration;
use crate::flight::Stamp;
use crate::transport::LinkKind;

/// The kind of link bytes crossed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkClass {
    /// Shared-memory rings between processes of one host (and the in-process links of
    /// test worlds, which stand in for them).
    Shm = 0,
    /// TCP sockets.
    Tcp = 1,
    /// A device collective's reads of host-mates' device memory over CUDA IPC (counted
    /// as received).
    DeviceIpc = 2,
    /// A device collective's copies through pinned host memory: device to host counted
    /// as sent, host to device as received (the host links' own bytes are counted in
    /// their classes by the host communicator).
    DeviceStaged = 3,
}

impl LinkClass {
    /// Number of classes.
    pub const COUNT: usize = 4;
    /// Every class, in the order of their values.
    pub const ALL: [LinkClass; LinkClass::COUNT] = [
        LinkClass::Shm,
        LinkClass::Tcp,
        LinkClass::DeviceIpc,
        LinkClass::DeviceStaged,
    ];

    /// The class's name in dumps and traces.
    pub fn name(self) -> &'static str {
        match self {
            LinkClass::Shm => "shm",
            LinkClass::Tcp => "tcp",
            LinkClass::DeviceIpc => "device ipc",
            LinkClass::DeviceStaged => "device staged",
        }
    }

    /// The class of a link.
    pub fn of(kind: LinkKind) -> Self {
        match kind {
            LinkKind::Shm => LinkClass::Shm,
            LinkKind::Tcp => LinkClass::Tcp,
        }
    }
}

/// A snapshot of a communicator's counters since its initialisation (the collectives
/// `init` runs itself, the link probe among them, are not counted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Collectives and point-to-point calls run, failed ones included (calls that move
    /// nothing, such as a one-rank all-reduce, return at once and are not counted).
    pub calls: u64,
    /// Of `calls`, those that failed.
    pub failed_calls: u64,
    /// Of `calls`, those run on shared memory without links (eager slots, shared
    /// buffers).
    pub shared_calls: u64,
    /// Payload bytes of the `shared_calls`.
    pub shared_bytes: u64,
    /// Payload bytes sent over links, by [`LinkClass`] value.
    pub bytes_sent: [u64; LinkClass::COUNT],
    /// Payload bytes received over links, by [`LinkClass`] value.
    pub bytes_received: [u64; LinkClass::COUNT],
    /// Time inside collectives, from the start of their work to its end.
    pub time_total: Duration,
    /// Time by [`Phase`] value. A phase's time runs from the end of the phase before
    /// it (or the start of the call) to the end of its last op; what the call spends
    /// outside named phases is [`Phase::Unnamed`]'s.
    pub time_by_phase: [Duration; Phase::COUNT],
    /// Connection attempts that link setup had to repeat (a refused connection, a
    /// handshake shed by a busy listener).
    pub retries: u64,
    /// Values that compression saturated to the wire format's largest finite value.
    pub compress_overflows: u64,
    /// Non-finite values (inf, NaN) that compressed calls met.
    pub compress_nonfinite: u64,
}

impl Metrics {
    /// Payload bytes sent over links of `class`.
    pub fn sent(&self, class: LinkClass) -> u64 {
        self.bytes_sent[class as usize]
    }

    /// Payload bytes received over links of `class`.
    pub fn received(&self, class: LinkClass) -> u64 {
        self.bytes_received[class as usize]
    }

    /// Time spent in `phase`.
    pub fn time_in(&self, phase: Phase) -> Duration {
        self.time_by_phase[phase as usize]
    }

    /// One line for the log at exit (`HETCCL_DEBUG=info`).
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} calls ({} failed, {} on shared memory: {} bytes)",
            self.calls, self.failed_calls, self.shared_calls, self.shared_bytes
        );
        for c in LinkClass::ALL {
            s += &format!(
                "; {} sent {} received {} bytes",
                c.name(),
                self.sent(c),
                self.received(c)
            );
        }
        s += &format!("; {:.3} ms in collectives", ms(self.time_total));
        for p in Phase::ALL {
            let t = self.time_in(p);
            if !t.is_zero() {
                s += &format!(", {} {:.3} ms", p.name(), ms(t));
            }
        }
        s += &format!(
            "; {} setup retries; compression {} overflows, {} non-finite",
            self.retries, self.compress_overflows, self.compress_nonfinite
        );
        s
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// When each phase of one call ran, derived from when it ended: consecutive, in
/// phase order, the first from the call's start, none past its end.
pub(crate) fn phase_spans(
    start: Stamp,
    end: Stamp,
    ends: &PhaseEnds,
) -> impl Iterator<Item = (Phase, Stamp, Stamp)> + '_ {
    let mut from = start;
    Phase::ALL.into_iter().filter_map(move |p| {
        let e = ends[p as usize]?;
        let e = e.clamp(from, end.max(from));
        let span = (p, from, e);
        from = e;
        Some(span)
    })
}

/// The counters a communicator keeps; [`Metrics`] is their snapshot.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) m: Metrics,
    /// The time of every call and of each named phase, in per-call clock ticks, made
    /// time only by [`Counters::snapshot`]: a call pays a subtraction and an add per
    /// phase, no conversion.
    total_ticks: u64,
    phase_ticks: [u64; Phase::COUNT],
}

impl Counters {
    /// Counts one call that ran over links with `sched`, compressed on the links
    /// `wire_peers` marks (each carries half the bytes), whose links are of `classes`.
    pub(crate) fn links_call(
        &mut self,
        sched: &Schedule,
        classes: &[Option<LinkClass>],
        wire_peers: Option<&[bool]>,
    ) {
        let on_wire = |p: usize, b: u64| match wire_peers {
            Some(w) if w.get(p).copied().unwrap_or(false) => b / 2,
            _ => b,
        };
        for &(p, b) in &sched.sent_to {
            if let Some(Some(c)) = classes.get(p) {
                self.m.bytes_sent[*c as usize] += on_wire(p, b);
            }
        }
        for &(p, b) in &sched.received_from {
            if let Some(Some(c)) = classes.get(p) {
                self.m.bytes_received[*c as usize] += on_wire(p, b);
            }
        }
    }

    /// Counts what a device collective moved: `ipc_read` bytes read from host-mates'
    /// device memory, `to_host` and `to_device` bytes copied through pinned host memory.
    #[cfg(any(feature = "cuda", test))]
    pub(crate) fn device_call(&mut self, ipc_read: u64, to_host: u64, to_device: u64) {
        self.m.bytes_received[LinkClass::DeviceIpc as usize] += ipc_read;
        self.m.bytes_sent[LinkClass::DeviceStaged as usize] += to_host;
        self.m.bytes_received[LinkClass::DeviceStaged as usize] += to_device;
    }

    /// The counters now. The unnamed share is what the named phases leave of the
    /// total, so that the phases add up to it exactly.
    pub(crate) fn snapshot(&self) -> Metrics {
        let mut m = self.m.clone();
        let total = ticks_to_duration(self.total_ticks);
        m.time_total += total;
        let mut named = Duration::ZERO;
        for p in Phase::ALL {
            if p != Phase::Unnamed {
                let d = ticks_to_duration(self.phase_ticks[p as usize]);
                named += d;
                m.time_by_phase[p as usize] += d;
            }
        }
        m.time_by_phase[Phase::Unnamed as usize] += total.saturating_sub(named);
        m
    }

    /// Counts a call's time: in all, and by phase.
    #[inline]
    pub(crate) fn time(&mut self, start: Stamp, end: Stamp, ends: &PhaseEnds) {
        self.total_ticks += end.ticks().saturating_sub(start.ticks());
        if ends.iter().all(Option::is_none) {
            return;
        }
        for (p, a, b) in phase_spans(start, end, ends) {
            if p != Phase::Unnamed {
                self.phase_ticks[p as usize] += b.ticks().saturating_sub(a.ticks());
            }
        }
    }

    /// Counts what a compressed call saturated.
    pub(crate) fn overflow(&mut self, s: &OverflowStats) {
        self.m.compress_overflows += s.overflow;
        self.m.compress_nonfinite += s.nonfinite;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_consecutive_and_clamped_to_the_call() {
        let at = |t: u64| Stamp::from_ticks(1000 + t);
        let mut ends: PhaseEnds = [None; Phase::COUNT];
        ends[Phase::IntraReduceScatter as usize] = Some(at(3));
        // Ended before the phase before it: it takes no time of its own.
        ends[Phase::InterAllReduce as usize] = Some(at(2));
        ends[Phase::IntraAllGather as usize] = Some(at(12));
        let spans: Vec<_> = phase_spans(at(0), at(10), &ends)
            .map(|(p, a, b)| (p, a.ticks() - 1000, b.ticks() - 1000))
            .collect();
        assert_eq!(
            spans,
            [
                (Phase::IntraReduceScatter, 0, 3),
                (Phase::InterAllReduce, 3, 3),
                (Phase::IntraAllGather, 3, 10),
            ]
        );
        let mut c = Counters::default();
        c.time(at(0), at(10), &ends);
        c.time(at(20), at(25), &[None; Phase::COUNT]);
        assert_eq!(c.total_ticks, 15);
        assert_eq!(c.phase_ticks[Phase::IntraAllGather as usize], 7);
        assert_eq!(c.phase_ticks[Phase::IntraReduceScatter as usize], 3);
        assert_eq!(c.phase_ticks[Phase::InterAllReduce as usize], 0);
        assert_eq!(c.phase_ticks[Phase::Unnamed as usize], 0);
        // Made time at the snapshot, the phases adding up to the total.
        let m = c.snapshot();
        let parts: Duration = m.time_by_phase.iter().sum();
        assert_eq!(parts, m.time_total);
        assert_eq!(m.time_total, ticks_to_duration(15));
    }

    #[test]
    fn device_bytes_count_in_their_classes() {
        let mut c = Counters::default();
        c.device_call(3000, 0, 0);
        c.device_call(500, 4096, 2048);
        let m = c.snapshot();
        assert_eq!(m.received(LinkClass::DeviceIpc), 3500);
        assert_eq!(m.sent(LinkClass::DeviceIpc), 0);
        assert_eq!(m.sent(LinkClass::DeviceStaged), 4096);
        assert_eq!(m.received(LinkClass::DeviceStaged), 2048);
        // The host links' classes are the host communicator's alone.
        assert_eq!((m.sent(LinkClass::Shm), m.sent(LinkClass::Tcp)), (0, 0));
        assert!(m.summary().contains(
            "; device ipc sent 0 received 3500 bytes; device staged sent 4096 received 2048 bytes"
        ), "{}", m.summary());
    }
}
