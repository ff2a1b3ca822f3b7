//! How far apart a host's CPUs are now, measured by two threads of this process.
//!
//! A shared-memory link measures the distance between its own two ranks' cores
//! (`ShmLink::probe_latency`). That needs the two ranks running at once on their own
//! cores, which a host running more ranks than CPUs does not give: there the ranks take
//! turns, and any link joins two CPUs one moment and one CPU the next. What stays true
//! is how far apart the CPUs themselves are, and that one process can measure alone:
//! this thread pinned on one CPU and a helper pinned on another pass a counter back and
//! forth through one cache line. On the 2-vCPU guest of `docs/PERFORMANCE.md` a round
//! trip reads about 30 ns on one core's two hardware threads, 60–150 ns on two cores
//! that share a last-level cache and 240–450 ns across dies (where the host places the
//! two virtual CPUs comes and goes).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::place;

/// Round trips of one batch; a batch's mean is one reading.
const BATCH: u64 = 16;
/// Batches of one measurement (the least reading counts).
const BATCHES: u64 = 32;
/// Round trip (ns) above which two CPUs count as far apart: in different cache domains,
/// where a cache line written on one is read on the other from another die or socket.
pub const FAR_ROUND_TRIP_NS: u64 = 200;
/// Pairs measured at most by [`far_pairs`].
const MOST_PAIRS: usize = 16;
/// Time after which [`far_pairs`] measures no further pair (each takes about 1 ms, or
/// [`MEET`] where the helper never gets its CPU: the other ranks of a host whose ranks
/// outnumber its CPUs wait meanwhile).
const BUDGET: Duration = Duration::from_millis(100);
/// How long the helper may take to start on its CPU, and then to answer a round.
const MEET: Duration = Duration::from_millis(50);
const ANSWER: Duration = Duration::from_millis(5);

#[repr(align(128))]
struct Line(AtomicU64);

/// The least mean round trip (ns), over [`BATCHES`] batches of [`BATCH`], of a counter
/// passed through one cache line between this thread pinned on CPU `a` and a helper
/// thread pinned on CPU `b`. The least, because a thread descheduled or interrupted
/// only ever adds to a batch. `None` when either CPU cannot be used or the helper does
/// not answer in time (a busy CPU). This thread gets its CPU set back afterwards.
pub fn round_trip_ns(a: usize, b: usize) -> Option<u64> {
    let allowed = place::allowed_cpus()?;
    if a == b || !allowed.contains(&a) || !allowed.contains(&b) {
        return None;
    }
    place::set_affinity(&place::cpu_set(&[a])).ok()?;
    let line = Line(AtomicU64::new(0));
    let quit = AtomicBool::new(false);
    let least = std::thread::scope(|s| {
        let helper = s.spawn(|| {
            if place::set_affinity(&place::cpu_set(&[b])).is_err() {
                quit.store(true, Ordering::Relaxed);
                return;
            }
            for k in 0..BATCH * BATCHES {
                if !wait_for(&line.0, 2 * k + 1, &quit, MEET) {
                    return;
                }
                line.0.store(2 * k + 2, Ordering::Release);
            }
        });
        let mut least = u64::MAX;
        'batches: for batch in 0..BATCHES {
            let t0 = Instant::now();
            for k in batch * BATCH..(batch + 1) * BATCH {
                line.0.store(2 * k + 1, Ordering::Release);
                let patience = if k == 0 { MEET } else { ANSWER };
                if !wait_for(&line.0, 2 * k + 2, &quit, patience) {
                    least = u64::MAX;
                    break 'batches;
                }
            }
            least = least.min(t0.elapsed().as_nanos() as u64 / BATCH);
        }
        quit.store(true, Ordering::Relaxed);
        let _ = helper.join();
        least
    });
    if let Err(e) = place::set_affinity(&place::cpu_set(&allowed)) {
        tracing::warn!("could not give this thread its CPU set back after a CPU probe: {e}");
    }
    (least != u64::MAX).then_some(least.max(1))
}

/// Spins until `line` reads `want` (true), `quit` is set or `patience` has passed
/// (false; then it sets `quit`, so the other side stops too).
fn wait_for(line: &AtomicU64, want: u64, quit: &AtomicBool, patience: Duration) -> bool {
    let start = Instant::now();
    let mut spins = 0u32;
    while line.load(Ordering::Acquire) != want {
        spins = spins.wrapping_add(1);
        if spins % 256 == 0 {
            if quit.load(Ordering::Relaxed) {
                return false;
            }
            if start.elapsed() > patience {
                quit.store(true, Ordering::Relaxed);
                return false;
            }
        }
        std::hint::spin_loop();
    }
    true
}

/// How many of the pairs (first allowed CPU, each other allowed one) read as far apart
/// ([`FAR_ROUND_TRIP_NS`]), of how many were measured: up to [`MOST_PAIRS`], as many as
/// [`BUDGET`] allows. `None` with fewer than two CPUs or no pair measured.
pub fn far_pairs() -> Option<(usize, usize)> {
    let cpus = place::allowed_cpus()?;
    let (&first, others) = cpus.split_first()?;
    let start = Instant::now();
    let readings: Vec<u64> = others
        .iter()
        .take(MOST_PAIRS)
        .take_while(|_| start.elapsed() < BUDGET)
        .filter_map(|&c| round_trip_ns(first, c))
        .collect();
    tracing::debug!(
        first,
        ?readings,
        "CPU probe: round trips (ns) from the first CPU"
    );
    if readings.is_empty() {
        return None;
    }
    let far = readings
        .iter()
        .filter(|&&ns| ns > FAR_ROUND_TRIP_NS)
        .count();
    Some((far, readings.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_cpus_of_this_process_measure_and_the_affinity_comes_back() {
        let before = place::allowed_cpus().unwrap();
        if before.len() < 2 {
            crate::test_skip::skip("this process may use one CPU only");
            return;
        }
        // A busy CPU may fail one try; the helper must answer in one of several.
        let ns = (0..5).find_map(|_| round_trip_ns(before[0], before[1]));
        let ns = ns.expect("no round trip between two allowed CPUs in 5 tries");
        assert!((1..1_000_000).contains(&ns), "{ns} ns");
        assert_eq!(place::allowed_cpus().unwrap(), before);
        let (far, of) = far_pairs().expect("at least one pair");
        assert!(far <= of && (1..=MOST_PAIRS).contains(&of), "{far} of {of}");
    }

    #[test]
    fn a_cpu_outside_the_set_or_one_cpu_twice_is_no_pair() {
        let before = place::allowed_cpus().unwrap();
        let outside = (0..libc::CPU_SETSIZE as usize)
            .find(|c| !before.contains(c))
            .unwrap();
        assert_eq!(round_trip_ns(before[0], outside), None);
        assert_eq!(round_trip_ns(before[0], before[0]), None);
        assert_eq!(place::allowed_cpus().unwrap(), before);
    }
}
