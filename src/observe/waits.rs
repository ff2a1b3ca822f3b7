//! How long a run of the executor waited on each peer, for the trace: a stretch in
//! which nothing moved counts for the peer the executor was blocked on when it began
//! (the first receive that could start, else the first send; as a timeout names it).
//! Kept only while tracing: two reads of the per-call clock ([`Stamp`]) per stretch and a
//! subtraction, nothing per message; ticks become time when the trace is written.

use crate::flight::Stamp;

/// The waits of one run, added into a slot per peer (per-call clock ticks).
pub struct LinkWaits<'a> {
    per_peer: &'a mut [u64],
    /// The stretch under way: when it began and on whom.
    since: Option<(Stamp, usize)>,
}

impl<'a> LinkWaits<'a> {
    /// Adds this run's waits into `per_peer` (indexed by rank, in ticks).
    pub fn new(per_peer: &'a mut [u64]) -> Self {
        LinkWaits {
            per_peer,
            since: None,
        }
    }

    /// A poll found nothing to do: a stretch starts, unless one is under way, waiting
    /// on `peer()`. Inlined: every idle pass of the executor asks, and only the first of
    /// a stretch reads the clock ([`LinkWaits::begin`]).
    #[inline]
    pub fn stalled(&mut self, peer: impl FnOnce() -> usize) {
        if self.since.is_none() {
            self.begin(peer());
        }
    }

    /// A stretch starts. Never inlined, so that `scripts/trace-overhead.sh` can count it:
    /// it is called only while tracing.
    #[inline(never)]
    fn begin(&mut self, peer: usize) {
        self.since = Some((Stamp::now(), peer));
    }

    /// Something moved: the stretch under way, if any, is over. Never inlined, as
    /// [`LinkWaits::begin`].
    #[inline(never)]
    pub fn moved(&mut self) {
        if let Some((t, p)) = self.since.take() {
            if let Some(slot) = self.per_peer.get_mut(p) {
                *slot += Stamp::now().ticks().saturating_sub(t.ticks());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::flight::clock::ticks_to_duration;

    #[test]
    fn a_stretch_counts_once_for_the_peer_it_began_on() {
        crate::flight::clock::init();
        let mut slots = [0u64; 3];
        let mut w = LinkWaits::new(&mut slots);
        w.moved();
        w.stalled(|| 2);
        std::thread::sleep(Duration::from_millis(20));
        // Later polls of the same stretch do not restart it nor change its peer.
        w.stalled(|| 1);
        w.moved();
        w.moved();
        assert_eq!(slots[0], 0);
        assert_eq!(slots[1], 0);
        let waited = ticks_to_duration(slots[2]);
        assert!(waited >= Duration::from_millis(19), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }
}
