//! Waiting for peers, for both engines that run collectives: this executor (every link
//! of a schedule, polled in turn) and the shared-memory one (`communicator::shared`, one
//! peer's flag at a time).
//!
//! While nothing moves a wait climbs a [`Ladder`]: it spins on the core (a peer on
//! another core answers within microseconds), then yields it (ranks may outnumber
//! cores), then sleeps. How it sleeps is the waiter's own: the executor on its links'
//! sockets ([`Run::sleep_on_links`]), the shared-memory engine on the flag's futex. Every
//! [`CHECK_EVERY`] of waiting it checks, in this order, whether the application aborted
//! the communicator, whether the peers it still needs can make progress ([`Awaited`]),
//! and whether nothing has moved for the timeout; the timeout's error names the peer
//! waited for, what for, and what this side sees of it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::context::{link_error, timeout_note, ExecCtx};
use super::Run;
use crate::algorithm::Phase;
use crate::error::{Error, Result};

/// How often a wait checks the cancel flag, its peers and the timeout.
pub(crate) const CHECK_EVERY: Duration = Duration::from_millis(50);

/// Spins before yielding when every rank has a core of its own.
const SPIN_POLLS: u32 = 64;

/// The executor's last yielding pause; sleeps start after it.
const LINK_YIELD_POLLS: u32 = 511;

/// [`ExecCtx::spin_polls`] for a rank sharing its host with `local_ranks - 1` others.
pub fn spin_polls_for(local_ranks: usize) -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if local_ranks > cores {
        0
    } else {
        SPIN_POLLS
    }
}

/// How a wait escalates while nothing moves, counted in pauses since it began or last
/// moved.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ladder {
    /// Pauses 1 to `spins` spin on the core.
    pub(crate) spins: u32,
    /// Pauses after those up to this one yield the core...
    pub(crate) yield_polls: u32,
    /// ...and later ones too while the wait's clock (started when the spins end, or at
    /// the last progress) reads less than this. Then every pause is a sleep.
    pub(crate) yield_for: Duration,
}

impl Ladder {
    /// The executor's: `spins` ([`ExecCtx::spin_polls`]), then yields up to a fixed
    /// count with no minimum time. Unlike a flag wait it polls every link between
    /// pauses (a system call each on TCP), and its sleep ([`Run::sleep_on_links`]) is
    /// short and wakes on the sockets, so there is nothing to gain by yielding longer.
    pub(super) const fn links(spins: u32) -> Ladder {
        Ladder {
            spins,
            yield_polls: LINK_YIELD_POLLS,
            yield_for: Duration::ZERO,
        }
    }
}

/// What a pause did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pause {
    /// Spun on the core.
    Spun,
    /// Yielded the core.
    Yielded,
    /// Nothing: it is time to sleep, which is the waiter's to do; the number of pauses
    /// so far.
    Sleep(u32),
}

/// What a wait waits on, as its checks see it.
pub(crate) trait Awaited {
    /// Errors when a peer the wait still needs cannot make progress any more (gone,
    /// gave up, or runs something else).
    fn check_peers(&mut self) -> Result<()>;
    /// The peer waited for, and what for ("to send data"), for a timeout.
    fn blocked_on(&mut self) -> (usize, &'static str);
    /// What this side sees of `peer`'s process (stopped, say), for a timeout.
    fn seen(&mut self, peer: usize) -> Option<String>;
    /// The phase of the collective the wait is in, for the flight recorder; a wait
    /// outside a phased schedule says [`Phase::Unnamed`].
    fn phase(&mut self) -> Phase {
        Phase::Unnamed
    }
}

/// One wait: its place on the ladder, its clock, and what ends it early.
pub(crate) struct Wait<'a> {
    ctx: &'a ExecCtx,
    /// Set by `Communicator::abort`.
    cancel: Option<&'a AtomicBool>,
    ladder: Ladder,
    /// Pauses since the wait began or last moved.
    idle: u32,
    /// When the wait began or last moved: the timeout counts from here. Read from the
    /// clock only once the spins are over (or by [`Wait::start`]): most flag waits end
    /// while spinning, and then cost no clock read.
    since: Option<Instant>,
    /// The last check, or when the clock started.
    last_check: Option<Instant>,
}

impl<'a> Wait<'a> {
    /// A wait of the collective `ctx` whose clock starts when its spins are over.
    #[inline]
    pub(crate) fn new(ctx: &'a ExecCtx, ladder: Ladder, cancel: Option<&'a AtomicBool>) -> Self {
        Wait {
            ctx,
            cancel,
            ladder,
            idle: 0,
            since: None,
            last_check: None,
        }
    }

    /// Starts the clock now: the timeout and the checks count from here.
    #[inline]
    pub(crate) fn start(&mut self) -> Instant {
        let now = Instant::now();
        self.since = Some(now);
        self.last_check = Some(now);
        now
    }

    /// Something moved: the ladder starts again with spins, the timeout from now.
    #[inline]
    pub(crate) fn progressed(&mut self) {
        self.idle = 0;
        self.since = Some(Instant::now());
    }

    /// The spin stage in one tight loop, for a waiter whose poll is one load (a flag):
    /// polls `done` and spins until it says so or the spins are over, and returns
    /// whether it did. The pauses after it continue the ladder with yields. A loop of
    /// its own because on a core shared with the awaited rank every spin is time that
    /// rank cannot run: nothing but the load and the counter belongs in it.
    #[inline]
    pub(crate) fn spin(&mut self, mut done: impl FnMut() -> bool) -> bool {
        for _ in 0..self.ladder.spins {
            if done() {
                return true;
            }
            std::hint::spin_loop();
        }
        self.idle = self.ladder.spins;
        false
    }

    /// Pauses after a poll that found nothing to do: spins or yields here, or says that
    /// it is time to sleep.
    #[inline]
    pub(crate) fn pause(&mut self) -> Pause {
        self.idle = self.idle.saturating_add(1);
        if self.idle <= self.ladder.spins {
            std::hint::spin_loop();
            return Pause::Spun;
        }
        let since = match self.since {
            Some(t) => t,
            None => self.start(),
        };
        if self.idle <= self.ladder.yield_polls
            || (!self.ladder.yield_for.is_zero() && since.elapsed() < self.ladder.yield_for)
        {
            std::thread::yield_now();
            return Pause::Yielded;
        }
        Pause::Sleep(self.idle)
    }

    /// Every [`CHECK_EVERY`]: the cancel flag, then `awaited`'s peers, then the timeout.
    #[inline]
    pub(crate) fn check(&mut self, awaited: &mut impl Awaited) -> Result<()> {
        let now = Instant::now();
        let last = *self.last_check.get_or_insert(now);
        if now.duration_since(last) < CHECK_EVERY {
            return Ok(());
        }
        self.last_check = Some(now);
        let waited = now.duration_since(self.since.unwrap_or(last));
        checks(self.ctx, self.cancel, waited, awaited)
    }
}

/// The checks of a wait that has not moved for `waited`. Apart from [`Wait::check`] so
/// that the wait itself never leaves its caller's registers: its counter is read and
/// written on every pause, next to acquire loads of what is awaited.
#[cold]
#[inline(never)]
fn checks(
    ctx: &ExecCtx,
    cancel: Option<&AtomicBool>,
    waited: Duration,
    awaited: &mut impl Awaited,
) -> Result<()> {
    if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
        return Err(ctx.cancelled());
    }
    let (peer, what) = awaited.blocked_on();
    crate::flight::waiting(peer, what, awaited.phase(), waited.as_millis() as u64);
    awaited.check_peers()?;
    if waited >= ctx.timeout {
        let (peer, what) = awaited.blocked_on();
        let seen = awaited.seen(peer);
        return Err(ctx.timed_out(peer, waited, what, seen));
    }
    Ok(())
}

/// The executor waits on the links of its schedule.
impl Awaited for Run<'_, '_> {
    fn check_peers(&mut self) -> Result<()> {
        // Only peers this rank still has business with: one that got everything it
        // needed from us may already have finished and exited.
        for &p in self.active.iter().filter(|&&p| self.deps.pending(p)) {
            if let Some(l) = self.links[p].as_mut() {
                let r = l.check_peer();
                r.map_err(|e| link_error(e, l.as_mut(), self.ctx))?;
            }
        }
        Ok(())
    }

    fn blocked_on(&mut self) -> (usize, &'static str) {
        self.deps.blocked_on(&self.active)
    }

    fn phase(&mut self) -> Phase {
        self.deps.blocked_phase(&self.active)
    }

    fn seen(&mut self, peer: usize) -> Option<String> {
        self.links
            .get_mut(peer)
            .and_then(|l| l.as_mut()?.peer_note())
    }
}

impl Run<'_, '_> {
    /// Sleeps until a socket of a waiting link is ready, when links have sockets: up to
    /// 2 ms when every link can wake us, 100 µs when some (shared memory) can only be
    /// polled. Links with no sockets sleep in growing steps up to 200 µs instead.
    pub(super) fn sleep_on_links(&self, idle: u32, fds: &mut Vec<(i32, bool)>) {
        fds.clear();
        let mut all_wake = true;
        for &p in &self.active {
            if let Some(l) = self.links[p].as_ref() {
                let before = fds.len();
                l.wait_fds(fds);
                all_wake &= fds.len() > before;
            }
        }
        if fds.is_empty() {
            let us = u64::from(idle.saturating_sub(LINK_YIELD_POLLS)).min(200);
            std::thread::sleep(Duration::from_micros(us));
            return;
        }
        let mut pfds: Vec<libc::pollfd> = fds
            .iter()
            .map(|&(fd, w)| libc::pollfd {
                fd,
                events: libc::POLLIN | if w { libc::POLLOUT } else { 0 },
                revents: 0,
            })
            .collect();
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: if all_wake { 2_000_000 } else { 100_000 },
        };
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs for the call's
        // duration; a null sigmask leaves the signal mask unchanged.
        unsafe {
            libc::ppoll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
    }

    /// A peer that gave up while this rank was waiting for another peer (typically: gave
    /// up waiting for this rank, which was itself held up): says whom this rank waited
    /// for, where the stall more likely lies.
    pub(super) fn waiting_note(&mut self, e: Error) -> Error {
        match e {
            Error::PeerGaveUp {
                rank,
                peer,
                op,
                seq,
                cause,
                note,
            } if note.is_empty() => {
                let (p, what) = self.blocked_on();
                let note = if p == peer {
                    note
                } else {
                    let seen = self.seen(p);
                    format!(
                        "; this rank was waiting for peer {p} {what}{}",
                        timeout_note(p, self.ctx.world_size, seen)
                    )
                };
                Error::PeerGaveUp {
                    rank,
                    peer,
                    op,
                    seq,
                    cause,
                    note,
                }
            }
            e => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ctx, run};
    use super::*;
    use crate::algorithm::schedule::{BufId, Builder, Combine, Region};
    use crate::transport::{mem, Link};

    /// Peers as a wait's checks see them: counts the peer checks, and fails one when
    /// told to; blocked on peer 2, which is seen stopped.
    #[derive(Default)]
    struct Peers {
        checks: u32,
        fail: Option<Error>,
    }

    impl Awaited for Peers {
        fn check_peers(&mut self) -> Result<()> {
            self.checks += 1;
            self.fail.take().map_or(Ok(()), Err)
        }
        fn blocked_on(&mut self) -> (usize, &'static str) {
            (2, "to send data")
        }
        fn seen(&mut self, peer: usize) -> Option<String> {
            Some(format!("peer {peer}'s process is stopped"))
        }
    }

    #[test]
    fn a_wait_spins_then_yields_then_sleeps_and_starts_over_when_something_moves() {
        let c = ctx(0);
        let ladder = Ladder {
            spins: 3,
            yield_polls: 5,
            yield_for: Duration::ZERO,
        };
        let mut w = Wait::new(&c, ladder, None);
        let pauses: Vec<Pause> = (0..7).map(|_| w.pause()).collect();
        use Pause::*;
        assert_eq!(
            pauses,
            [Spun, Spun, Spun, Yielded, Yielded, Sleep(6), Sleep(7)]
        );
        w.progressed();
        assert_eq!(w.pause(), Spun);
        // The spin stage as one loop: polled once per spin, then the yields follow.
        let mut w = Wait::new(&c, ladder, None);
        let mut polls = 0;
        assert!(!w.spin(|| {
            polls += 1;
            false
        }));
        assert_eq!(polls, 3);
        assert_eq!(
            [w.pause(), w.pause(), w.pause()],
            [Yielded, Yielded, Sleep(6)]
        );
        let mut w = Wait::new(&c, ladder, None);
        let mut polls = 0;
        assert!(w.spin(|| {
            polls += 1;
            polls == 2
        }));
        assert_eq!(polls, 2);
        // The executor's: 64 spins where every rank has a core, none where they do not,
        // then yields up to the 511th pause.
        for (spins, first_yield) in [(64, 65), (0, 1)] {
            let mut w = Wait::new(&c, Ladder::links(spins), None);
            let pauses: Vec<Pause> = (0..512).map(|_| w.pause()).collect();
            assert!(pauses[..first_yield - 1].iter().all(|p| *p == Spun));
            assert!(pauses[first_yield - 1..511].iter().all(|p| *p == Yielded));
            assert_eq!(pauses[511], Sleep(512));
        }
    }

    #[test]
    fn a_wait_yields_for_at_least_its_yield_time_before_it_sleeps() {
        let c = ctx(0);
        let ladder = Ladder {
            spins: 2,
            yield_polls: 2,
            yield_for: Duration::from_millis(30),
        };
        let mut w = Wait::new(&c, ladder, None);
        let t = Instant::now();
        let mut yields = 0;
        loop {
            match w.pause() {
                Pause::Spun => assert_eq!(yields, 0),
                Pause::Yielded => yields += 1,
                Pause::Sleep(_) => break,
            }
        }
        let took = t.elapsed();
        assert!(yields > 0);
        assert!(took >= Duration::from_millis(30), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    /// Checks come every CHECK_EVERY, not more often; the cancel flag goes first, then
    /// the peers, then the timeout, which counts from the last progress and names the
    /// peer waited for.
    #[test]
    fn checks_come_every_50_ms_cancel_first_then_peers_then_the_timeout() {
        let c = ExecCtx {
            world_size: 2,
            timeout: Duration::from_millis(400),
            ..ctx(1)
        };
        let cancel = AtomicBool::new(false);
        let mut peers = Peers::default();
        let mut w = Wait::new(&c, Ladder::links(0), Some(&cancel));
        let start = w.start();
        // Checked as often as asked for 130 ms: at most once per CHECK_EVERY.
        while start.elapsed() < Duration::from_millis(130) {
            w.check(&mut peers).unwrap();
        }
        let most = start.elapsed().as_millis() / CHECK_EVERY.as_millis();
        assert!(
            (1..=most as u32).contains(&peers.checks),
            "{} checks in {:?}",
            peers.checks,
            start.elapsed()
        );
        peers.checks = 1;

        // A peer that cannot go on ends the wait.
        std::thread::sleep(CHECK_EVERY);
        peers.fail = Some(c.peer_lost(0, "gone".into()));
        match w.check(&mut peers) {
            Err(Error::PeerLost {
                rank: 1,
                peer: 0,
                ref detail,
                ..
            }) => assert_eq!(detail, "gone"),
            r => panic!("{r:?}"),
        }

        // Cancel before the peers: they are not asked.
        std::thread::sleep(CHECK_EVERY);
        cancel.store(true, Ordering::Relaxed);
        match w.check(&mut peers) {
            Err(Error::Broken(why)) => {
                assert_eq!(why, "rank 1: all_gather #0 aborted by the application")
            }
            r => panic!("{r:?}"),
        }
        assert_eq!(peers.checks, 2);
        cancel.store(false, Ordering::Relaxed);

        // Progress moves the deadline; then the timeout names peer 2 and what is seen.
        let t = Instant::now();
        w.progressed();
        let e = loop {
            std::thread::sleep(Duration::from_millis(10));
            if let Err(e) = w.check(&mut peers) {
                break e;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "no timeout");
        };
        assert!(t.elapsed() >= c.timeout, "{:?}", t.elapsed());
        match e {
            Error::Timeout {
                rank: 1,
                peer: 2,
                what: "to send data",
                after,
                ref note,
                ..
            } => {
                assert!(after >= c.timeout, "{after:?}");
                assert_eq!(note, "; peer 2's process is stopped");
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn waits_spin_only_when_every_local_rank_has_a_core() {
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(spin_polls_for(1), SPIN_POLLS);
        assert_eq!(spin_polls_for(cores), SPIN_POLLS);
        assert_eq!(spin_polls_for(cores + 1), 0);
    }

    #[test]
    fn a_peer_that_finished_and_left_is_not_an_error() {
        // Rank 0 receives from 1, then (much later) from 2. Rank 1 exits right after
        // its send, while rank 0 still waits on rank 2.
        let (l01, l10) = mem::pair(0, 1);
        let (l02, l20) = mem::pair(0, 2);
        let mut b = Builder::new("test");
        b.recv(1, Region::new(BufId::Output, 0..4), Combine::Copy);
        b.recv(2, Region::new(BufId::Output, 4..8), Combine::Copy);
        let s0 = b.build();
        let mut b = Builder::new("test");
        b.send(0, Region::new(BufId::Input, 0..4));
        let s_send = b.build();
        let out = std::thread::scope(|sc| {
            let s = &s_send;
            sc.spawn(move || {
                let mut links: Vec<Option<Box<dyn Link>>> = vec![Some(Box::new(l10)), None, None];
                run(s, &mut links, 1).unwrap();
                // dropping `links` closes the link to rank 0
            });
            sc.spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                let mut links: Vec<Option<Box<dyn Link>>> = vec![Some(Box::new(l20)), None, None];
                run(s, &mut links, 2).unwrap();
            });
            let mut links: Vec<Option<Box<dyn Link>>> =
                vec![None, Some(Box::new(l01)), Some(Box::new(l02))];
            run(&s0, &mut links, 0)
        });
        assert_eq!(out.unwrap(), vec![1, 1, 1, 1, 2, 2, 2, 2]);
    }
}
