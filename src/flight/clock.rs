//! The one clock read a collective pays at each end, shared by the flight recorder, the
//! counters and the trace.
//!
//! `Instant::now()` costs about 45 ns on the VMs this runs on (the vDSO's
//! `CLOCK_MONOTONIC` under a hypervisor), twice a call: half the per-call cost of an
//! 8-byte all-reduce. Where the processor's time-stamp counter is invariant (constant
//! rate, running in every power state; what the kernel requires before it makes the TSC
//! its clocksource) a [`Stamp`] is the counter itself, read with `rdtsc` (about 18 ns
//! there, a few ns on bare metal). Elsewhere it is nanoseconds of `Instant` since the
//! process's epoch.
//!
//! Ticks become time only when someone looks (a dump, [`crate::Metrics`], the trace):
//! the rate is measured against `Instant` from the epoch ([`init`], taken when the first
//! communicator is made) to the moment of the conversion, and kept once that span
//! passes a second (a read of each clock of skew over a second: 1e-7).
//!
//! ```text
//! epoch:      (tsc0, t0)                    at the first communicator
//! conversion: rate = (Instant::now() - t0) / (tsc - tsc0)    kept after 1 s
//!             instant(s) = t0 + (s - tsc0) · rate
//! ```

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A moment as the per-call clock counts it (TSC ticks or nanoseconds since the epoch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp(u64);

/// Which counter [`Stamp::now`] reads: 0 not decided yet, 1 the TSC, 2 `Instant`.
static SOURCE: AtomicU8 = AtomicU8::new(0);
const TSC: u8 = 1;
const INSTANT: u8 = 2;

/// The epoch: a stamp and the `Instant` read beside it.
static EPOCH: OnceLock<(u64, Instant)> = OnceLock::new();
/// Nanoseconds per tick (f64 bits) once measured over a second; 0 until then.
static RATE: AtomicU64 = AtomicU64::new(0);

/// Fixes the epoch and the counter (idempotent); the first communicator calls it, before
/// any stamp is taken.
pub fn init() {
    EPOCH.get_or_init(|| {
        let source = if tsc_invariant() { TSC } else { INSTANT };
        SOURCE.store(source, Ordering::Relaxed);
        if source == TSC {
            tsc_beside_instant()
        } else {
            let t0 = Instant::now();
            (raw(source, t0), t0)
        }
    });
}

/// A TSC read and the `Instant` of the same moment: the middle of the tightest of a few
/// `Instant`–TSC–`Instant` brackets, so a preemption between two reads cannot skew the
/// rate measured from the pair.
fn tsc_beside_instant() -> (u64, Instant) {
    let bracket = || {
        let a = Instant::now();
        let tsc = raw(TSC, a);
        let width = Instant::now().duration_since(a);
        (width, tsc, a + width / 2)
    };
    let mut best = bracket();
    for _ in 0..4 {
        if best.0 < Duration::from_micros(20) {
            break;
        }
        let next = bracket();
        if next.0 < best.0 {
            best = next;
        }
    }
    (best.1, best.2)
}

#[cfg(target_arch = "x86_64")]
fn tsc_invariant() -> bool {
    use std::arch::x86_64::__cpuid;
    // CPUID 0x80000007, EDX bit 8: invariant TSC (Intel SDM vol. 3 17.17.1, AMD APM
    // vol. 3 E.4.18); the extended leaf must exist first.
    let max = __cpuid(0x8000_0000).eax;
    max >= 0x8000_0007 && __cpuid(0x8000_0007).edx & (1 << 8) != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn tsc_invariant() -> bool {
    false
}

#[inline]
fn raw(source: u8, t0: Instant) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if source == TSC {
        // SAFETY: rdtsc reads a counter and touches no memory; `tsc_invariant` found it
        // counts at a constant rate.
        return unsafe { std::arch::x86_64::_rdtsc() };
    }
    let _ = source;
    Instant::now().saturating_duration_since(t0).as_nanos() as u64
}

impl Stamp {
    /// Now. Before [`init`], and where the TSC does not serve, nanoseconds since the
    /// epoch from `Instant`.
    #[inline]
    pub fn now() -> Stamp {
        #[cfg(target_arch = "x86_64")]
        if SOURCE.load(Ordering::Relaxed) == TSC {
            // SAFETY: as in `raw`.
            return Stamp(unsafe { std::arch::x86_64::_rdtsc() });
        }
        let t0 = EPOCH.get_or_init(|| (0, Instant::now())).1;
        Stamp(raw(INSTANT, t0))
    }

    /// The raw count, for atomics.
    pub fn ticks(self) -> u64 {
        self.0
    }

    /// A stamp from [`Stamp::ticks`].
    pub fn from_ticks(t: u64) -> Stamp {
        Stamp(t)
    }

    /// The time from `earlier` to `self` (zero when `earlier` is later).
    pub fn since(self, earlier: Stamp) -> Duration {
        ticks_to_duration(self.0.saturating_sub(earlier.0))
    }

    /// The `Instant` of this stamp.
    pub fn instant(self) -> Instant {
        let (tsc0, t0) = *EPOCH.get_or_init(|| (0, Instant::now()));
        if self.0 >= tsc0 {
            t0 + ticks_to_duration(self.0 - tsc0)
        } else {
            t0.checked_sub(ticks_to_duration(tsc0 - self.0))
                .unwrap_or(t0)
        }
    }
}

/// Stamps as nanoseconds since a given `Instant`, for many stamps at once (the trace's
/// writer): the epoch and the rate read once, then a multiply and an add per stamp, no
/// `Instant` arithmetic.
#[derive(Clone, Copy, Debug)]
pub struct StampNanos {
    tsc0: u64,
    ns_per_tick: f64,
    /// Nanoseconds from `since` to the clock's epoch (negative when the epoch is earlier).
    epoch_ns: f64,
}

impl StampNanos {
    /// Converts stamps to nanoseconds after `since`.
    pub fn since(since: Instant) -> StampNanos {
        let (tsc0, t0) = *EPOCH.get_or_init(|| (0, Instant::now()));
        let epoch_ns = match t0.checked_duration_since(since) {
            Some(d) => d.as_nanos() as f64,
            None => -(since.saturating_duration_since(t0).as_nanos() as f64),
        };
        let ns_per_tick = if SOURCE.load(Ordering::Relaxed) == TSC {
            ns_per_tick()
        } else {
            1.0
        };
        StampNanos {
            tsc0,
            ns_per_tick,
            epoch_ns,
        }
    }

    /// Nanoseconds from `since` to `s`, zero for a stamp before it (the float's cast
    /// saturates). A double holds nanoseconds exactly for 104 days.
    #[inline]
    pub fn at(&self, s: Stamp) -> u64 {
        let ticks = s.0.wrapping_sub(self.tsc0) as i64;
        (self.epoch_ns + ticks as f64 * self.ns_per_tick) as u64
    }

    /// `ticks` of the clock as nanoseconds.
    #[inline]
    pub fn span(&self, ticks: u64) -> u64 {
        (ticks as f64 * self.ns_per_tick) as u64
    }
}

/// `ticks` of the per-call clock as time.
pub fn ticks_to_duration(ticks: u64) -> Duration {
    if SOURCE.load(Ordering::Relaxed) != TSC {
        return Duration::from_nanos(ticks);
    }
    Duration::from_nanos((ticks as f64 * ns_per_tick()) as u64)
}

fn ns_per_tick() -> f64 {
    let kept = f64::from_bits(RATE.load(Ordering::Relaxed));
    if kept > 0.0 {
        return kept;
    }
    let Some(&(tsc0, t0)) = EPOCH.get() else {
        return 1.0;
    };
    // Over less than 2 ms the two reads' skew would show: wait that long, once, right
    // after the first communicator (its setup takes longer than that anyway).
    while Instant::now().duration_since(t0) < Duration::from_millis(2) {
        std::hint::spin_loop();
    }
    let (tsc, t) = tsc_beside_instant();
    let ticks = tsc.saturating_sub(tsc0).max(1);
    let elapsed = t.duration_since(t0);
    let rate = elapsed.as_nanos() as f64 / ticks as f64;
    if elapsed >= Duration::from_secs(1) {
        RATE.store(rate.to_bits(), Ordering::Relaxed);
    }
    rate
}

/// Unix milliseconds of `s`, given a stamp `now` and the Unix milliseconds read beside
/// it: for dumps, whose times other ranks compare.
pub fn unix_ms(s: Stamp, now: Stamp, now_ms: u64) -> u64 {
    if s.0 == 0 {
        return 0;
    }
    now_ms.saturating_sub(now.since(s).as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // Bounds of 5 ms over 30 ms: a preemption between two adjacent reads on a loaded
    // machine stays inside them; a wrong tick rate (1 ns per tick at GHz) does not.
    fn stamps_measure_time_as_instant_does() {
        init();
        let (s0, i0) = (Stamp::now(), Instant::now());
        std::thread::sleep(Duration::from_millis(30));
        let (s1, i1) = (Stamp::now(), Instant::now());
        let by_stamp = s1.since(s0).as_secs_f64();
        let by_instant = i1.duration_since(i0).as_secs_f64();
        assert!(
            (by_stamp - by_instant).abs() < 0.005,
            "{by_stamp} s against {by_instant} s"
        );
        let back = s1.instant();
        let off = if back > i1 { back - i1 } else { i1 - back };
        assert!(off < Duration::from_millis(5), "{off:?}");
        assert_eq!(s0.since(s1), Duration::ZERO);
        let now_ms = 1_000_000;
        let expected = now_ms - (by_instant * 1e3) as u64;
        let ms = unix_ms(s0, s1, now_ms);
        assert!(ms.abs_diff(expected) <= 5, "{ms} against {expected}");
        assert_eq!(unix_ms(Stamp::default(), s1, now_ms), 0);
        // The writer's conversion agrees with `Stamp::instant` to within rounding.
        let conv = StampNanos::since(i0);
        let via_instant = s1.instant().saturating_duration_since(i0).as_nanos() as u64;
        let at = conv.at(s1);
        assert!(
            at.abs_diff(via_instant) < 50_000,
            "{at} ns against {via_instant} ns"
        );
        let span = conv.span(s1.0 - s0.0);
        let since = s1.since(s0).as_nanos() as u64;
        assert!(
            span.abs_diff(since) < 50_000,
            "{span} ns against {since} ns"
        );
    }
}
