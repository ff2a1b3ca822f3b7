//! How a producer writes into its ring's slots: with ordinary stores, or with streaming
//! (non-temporal) ones, chosen while the link runs from how far apart the two cores are.
//!
//! Where the two ranks' cores share a last-level cache, an ordinary copy into a slot is
//! cheap and leaves the bytes in that cache for the peer to read: ordinary stores are
//! about twice as fast end to end. Where the cores sit in different cache domains (two
//! sockets, or the two virtual CPUs of a guest that the host has placed on different
//! dies, which on the test machine comes and goes within seconds), every line of a
//! slot the peer has read must be taken back from the other domain before an ordinary
//! store may write it: the copy into the slot costs about ten times as much and the
//! exchange falls to a quarter of its speed. A streaming store writes whole lines
//! without taking them, so it costs the same in both placements, and the peer then
//! reads the bytes from memory.
//!
//! Which placement the link is in shows in how long a slot takes to travel: the
//! producer stamps some slots with the time it publishes them, and the consumer, when
//! it was already waiting for that slot, notes how long after the stamp it read it.
//! The least of the last [`WINDOW`] such delays (of at least [`FIRST_ESTIMATE_AFTER`])
//! is the link's one-way latency (a rank
//! descheduled or busy elsewhere only ever adds to a delay). The two directions of a
//! link join the same two cores, so each side publishes its estimate and sets its own
//! outgoing ring's stores from the lesser of its own and its peer's (leaving out one
//! that has gone stale: the side that lags seldom waits for a slot). Streaming stores
//! are taken once the latency exceeds [`STREAMING_ABOVE_NS`] and left once it falls
//! below [`PLAIN_BELOW_NS`].
//!
//! Until either side has an estimate, the stores are those a probe at start-up chose
//! (`ShmLink::probe_latency`: a stamped round passed back and forth between the two
//! sides, its least delay against [`PROBE_STREAMING_ABOVE_NS`]), so a short job does not
//! run its first messages across dies with ordinary stores.

use crate::config::ShmStores;
use crate::memcopy;

/// Delays that make up the latency estimate (the least of them counts).
pub(super) const WINDOW: usize = 32;
/// Delays needed for a first estimate. The least of a few delays reads high (those of
/// start-up, while the ranks are still being placed, read 120–300 ns within one cache),
/// and a wrong choice of streaming stores halves the speed there, so the link keeps
/// ordinary stores until it has this many.
pub(super) const FIRST_ESTIMATE_AFTER: usize = 16;
/// An estimate this much older (ns) than the other side's is not used.
pub(super) const STALE_NS: u64 = 20_000_000;
/// One-way latency (ns) above which streaming stores are taken.
pub(super) const STREAMING_ABOVE_NS: u64 = 250;
/// One-way latency (ns) below which ordinary stores are taken again.
pub(super) const PLAIN_BELOW_NS: u64 = 200;
/// Least delay (ns) of the start-up probe above which a link starts with streaming
/// stores. A probe round passes two bare lines, without a ring to poll, and reads lower
/// than a slot: on the test machine 40–90 ns within one cache and 210–260 ns across
/// dies, where slots read 50–150 and 300–450.
pub(super) const PROBE_STREAMING_ABOVE_NS: u64 = 150;

/// The producer side's choice of stores for one ring.
#[derive(Debug)]
pub(super) struct SlotStores {
    policy: ShmStores,
    streaming: bool,
    /// The last [`WINDOW`] delays (ns) seen by this side's consumer; 0: none yet.
    delays: [u64; WINDOW],
    next: usize,
    /// Times the choice changed, for the debug log.
    switches: u64,
}

impl SlotStores {
    pub(super) fn new(policy: ShmStores) -> Self {
        SlotStores {
            policy,
            streaming: policy == ShmStores::Streaming,
            delays: [0; WINDOW],
            next: 0,
            switches: 0,
        }
    }

    /// Whether writes into the ring's slots use streaming stores now.
    #[inline]
    pub(super) fn streaming(&self) -> bool {
        self.streaming
    }

    /// Copies `len` bytes from `src` into a slot at `dst` with the stores in use.
    ///
    /// # Safety
    /// As for [`memcopy::copy_bytes`]: `src` valid for `len` reads, `dst` for `len`
    /// writes, not overlapping.
    #[inline]
    pub(super) unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: usize) {
        // SAFETY: the caller's contract.
        unsafe { memcopy::copy_bytes(dst, src, len, self.streaming) }
    }

    /// Chooses the stores to start with from the start-up probe's least delay (ns),
    /// before either side has an estimate from slots ([`SlotStores::choose`] decides
    /// from then on).
    pub(super) fn start(&mut self, probe_ns: u64) {
        self.start_with(probe_ns > PROBE_STREAMING_ABOVE_NS, "link probe");
    }

    /// Chooses the stores to start with on a host that runs more ranks than CPUs, from
    /// whether its CPUs are mostly far apart (measured once for the host): the two ranks
    /// of a link there take turns on the CPUs, so no probe of the link itself means
    /// anything. Across dies ordinary stores cost about four times streaming ones; near,
    /// streaming costs about twice ordinary.
    pub(super) fn start_on_shared_cpus(&mut self, far_apart: bool) {
        self.start_with(far_apart, "host CPU probe");
    }

    fn start_with(&mut self, streaming: bool, from: &str) {
        if self.policy != ShmStores::Auto {
            return;
        }
        self.streaming = streaming;
        tracing::debug!(
            streaming,
            from,
            "shared-memory ring: starts with {} stores into the slots",
            if streaming { "streaming" } else { "ordinary" }
        );
    }

    /// Takes in one delay (ns) between a slot's stamp and its read by a consumer that
    /// was waiting for it. Returns this side's latency estimate once the window is
    /// full, for the link to publish to its peer and pass to [`SlotStores::choose`].
    pub(super) fn observe(&mut self, delay_ns: u64) -> Option<u64> {
        if self.policy != ShmStores::Auto {
            return None;
        }
        self.delays[self.next] = delay_ns.max(1);
        self.next = (self.next + 1) % WINDOW;
        self.latency_ns()
    }

    /// Chooses the stores from two latency estimates, each `(ns, taken at)`: this
    /// side's and the one its peer published (`(0, 0)`: none yet). The two directions
    /// of a link join the same two cores, so the lesser of the two counts (each is an
    /// upper bound); but the side that lags behind seldom waits for a slot, so an
    /// estimate more than [`STALE_NS`] older than the other is left out.
    pub(super) fn choose(&mut self, own: (u64, u64), peer: (u64, u64)) {
        if self.policy != ShmStores::Auto {
            return;
        }
        let newest = own.1.max(peer.1);
        let Some(latency) = [own, peer]
            .into_iter()
            .filter(|&(ns, at)| ns != 0 && at + STALE_NS >= newest)
            .map(|(ns, _)| ns)
            .min()
        else {
            return;
        };
        let now = if self.streaming {
            latency >= PLAIN_BELOW_NS
        } else {
            latency > STREAMING_ABOVE_NS
        };
        if now != self.streaming {
            self.streaming = now;
            self.switches += 1;
            tracing::debug!(
                streaming = now,
                latency_ns = latency,
                own_ns = own.0,
                peer_ns = peer.0,
                switches = self.switches,
                "shared-memory ring: {} stores into the slots",
                if now { "streaming" } else { "ordinary" }
            );
        }
    }

    /// This side's one-way latency estimate: the least of the last [`WINDOW`] delays,
    /// once there are [`FIRST_ESTIMATE_AFTER`].
    pub(super) fn latency_ns(&self) -> Option<u64> {
        let seen = self.delays.iter().filter(|&&d| d != 0);
        if seen.clone().count() < FIRST_ESTIMATE_AFTER {
            return None;
        }
        seen.copied().min()
    }
}

/// `CLOCK_MONOTONIC` in ns, the clock both processes of a link read alike (0 is never
/// returned, so a slot's stamp of 0 means "not stamped").
#[inline]
pub(super) fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `ns` until the window is full of it, choosing from this side alone (taken
    /// at `at`), as the link does.
    fn fill(s: &mut SlotStores, ns: u64, at: u64) {
        for _ in 0..WINDOW {
            if let Some(l) = s.observe(ns) {
                s.choose((l, at), (0, 0));
            }
        }
    }

    #[test]
    fn streaming_is_taken_across_cache_domains_and_left_near_ones() {
        let mut s = SlotStores::new(ShmStores::Auto);
        for _ in 0..FIRST_ESTIMATE_AFTER - 1 {
            assert_eq!(s.observe(900), None, "too few delays: no estimate yet");
        }
        assert_eq!(s.observe(900), Some(900));
        s.choose((900, 1), (0, 0));
        assert!(s.streaming(), "900 ns one way");
        assert_eq!(s.observe(120), Some(120), "one quick delay is the latency");
        s.choose((120, 2), (0, 0));
        assert!(!s.streaming());
        fill(&mut s, 240, 3);
        assert!(
            !s.streaming(),
            "240 ns: between the thresholds, the choice stays"
        );
        fill(&mut s, 251, 4);
        assert!(s.streaming());
        fill(&mut s, 200, 5);
        assert!(
            s.streaming(),
            "200 ns: between the thresholds, the choice stays"
        );
        s.choose((199, 6), (0, 0));
        assert!(!s.streaming());
        assert_eq!(s.switches, 4);
    }

    #[test]
    fn delays_from_a_busy_consumer_do_not_hide_a_near_peer() {
        let mut s = SlotStores::new(ShmStores::Auto);
        fill(&mut s, 80, 1);
        for k in 0..WINDOW - 1 {
            let late = [5_000, 40_000, 900, 3_000, 700, 12_000, 260][k % 7];
            assert_eq!(s.observe(late), Some(80), "80 ns stays in the window");
        }
        assert_eq!(s.observe(1_000), Some(260));
        s.choose((260, 2), (0, 0));
        assert!(
            s.streaming(),
            "the last {WINDOW} delays are all over 250 ns"
        );
    }

    #[test]
    fn the_lesser_of_the_two_sides_recent_estimates_decides() {
        let ms = 1_000_000;
        let mut s = SlotStores::new(ShmStores::Auto);
        s.choose((0, 0), (0, 0));
        assert!(!s.streaming(), "nothing measured: ordinary stores");
        s.choose((0, 0), (400, 10 * ms));
        assert!(s.streaming(), "only the peer has measured: 400 ns");
        s.choose((100, 5 * ms), (400, 10 * ms));
        assert!(!s.streaming(), "this side's 100 ns, 5 ms older, counts");
        s.choose((100, 5 * ms), (400, 30 * ms));
        assert!(
            s.streaming(),
            "this side's estimate is 25 ms old: the peer's counts"
        );
        s.choose((300, 31 * ms), (400, 30 * ms));
        assert!(s.streaming(), "both over 250 ns");
        s.choose((300, 31 * ms), (90, 40 * ms));
        assert!(!s.streaming(), "the peer measured 90 ns");
        assert_eq!(s.switches, 4);
    }

    #[test]
    fn the_probe_sets_the_start_and_the_first_estimate_takes_over() {
        let ms = 1_000_000;
        let mut s = SlotStores::new(ShmStores::Auto);
        s.start(PROBE_STREAMING_ABOVE_NS);
        assert!(!s.streaming(), "at the threshold: ordinary stores");
        s.start(230);
        assert!(s.streaming(), "230 ns: two dies");
        s.choose((0, 0), (0, 0));
        assert!(s.streaming(), "no estimate yet: the probe's choice stays");
        s.choose((0, 0), (120, ms));
        assert!(!s.streaming(), "the peer's first estimate, 120 ns, decides");
        let mut s = SlotStores::new(ShmStores::Auto);
        s.start(60);
        assert!(!s.streaming());
        s.choose((380, ms), (0, 0));
        assert!(s.streaming(), "this side's first estimate, 380 ns, decides");
        for policy in [ShmStores::Plain, ShmStores::Streaming] {
            let mut s = SlotStores::new(policy);
            s.start(if policy == ShmStores::Plain { 900 } else { 10 });
            assert_eq!(s.streaming(), policy == ShmStores::Streaming);
        }
    }

    #[test]
    fn shared_cpus_far_apart_start_streaming_until_an_estimate_says_otherwise() {
        let mut s = SlotStores::new(ShmStores::Auto);
        s.start_on_shared_cpus(true);
        assert!(s.streaming());
        s.choose((0, 0), (0, 0));
        assert!(s.streaming(), "no estimate yet: the host's choice stays");
        s.choose((90, 1), (0, 0));
        assert!(!s.streaming(), "a first estimate of 90 ns decides");
        s.start_on_shared_cpus(false);
        assert!(!s.streaming());
        for policy in [ShmStores::Plain, ShmStores::Streaming] {
            let mut s = SlotStores::new(policy);
            s.start_on_shared_cpus(policy == ShmStores::Plain);
            assert_eq!(s.streaming(), policy == ShmStores::Streaming, "{policy:?}");
        }
    }

    #[test]
    fn fixed_policies_ignore_the_delays_and_copies_arrive_whole() {
        for (policy, streaming) in [(ShmStores::Plain, false), (ShmStores::Streaming, true)] {
            let mut s = SlotStores::new(policy);
            fill(&mut s, if streaming { 50 } else { 5_000 }, 1);
            s.choose((0, 0), (if streaming { 50 } else { 5_000 }, 2));
            assert_eq!(s.latency_ns(), None);
            assert_eq!(s.streaming(), streaming);
            assert_eq!(s.switches, 0);
            let src: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
            for len in [1, 63, 64, 4097, 40_000] {
                let mut dst = vec![0u8; len];
                // SAFETY: `src` holds at least `len` bytes; `dst` is distinct.
                unsafe { s.copy(dst.as_mut_ptr(), src.as_ptr(), len) };
                assert_eq!(dst, src[..len], "{policy:?}, {len} bytes");
            }
        }
    }

    #[test]
    fn the_clock_is_never_zero_and_moves_forward() {
        let a = now_ns();
        let b = now_ns();
        assert!(a > 0 && b >= a);
    }
}
