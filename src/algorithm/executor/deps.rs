//! Which op may start. Per link, sends and receives each run in schedule order (links are
//! FIFO), and local copies and reductions in schedule order too; an op starts once every
//! op it depends on is done.

use crate::flight::Stamp;

use super::buffers::Buffers;
use crate::algorithm::schedule::{OpKind, Phase, Schedule};
use crate::error::{Error, Result};
use crate::transport::Link;

/// Ops of one kind on one link (or the local ops), in schedule order.
#[derive(Default)]
pub(super) struct Queue {
    pub(super) ops: Vec<usize>,
    /// Position of the first op not yet done.
    pub(super) next: usize,
}

impl Queue {
    /// The first op not yet done.
    #[inline]
    pub(super) fn head(&self) -> Option<usize> {
        self.ops.get(self.next).copied()
    }
}

/// The queues of a schedule and which of its ops are done.
pub(super) struct Deps<'s> {
    pub(super) sched: &'s Schedule,
    /// Per link.
    pub(super) sends: Vec<Queue>,
    /// Per link.
    pub(super) recvs: Vec<Queue>,
    pub(super) locals: Queue,
    pub(super) done: Vec<bool>,
    n_done: usize,
    /// Ops of each phase not done yet, and when each named phase's last op was done.
    phase_left: [u32; Phase::COUNT],
    pub(super) phase_end: PhaseEnds,
}

/// When each phase of a run ended (its last op was done), indexed by the phase's
/// value; `None` for a phase without ops. Per-call clock stamps: a read costs a
/// `rdtsc`, and the counters and the trace make them time only when read.
pub type PhaseEnds = [Option<Stamp>; Phase::COUNT];

impl<'s> Deps<'s> {
    /// The queues of `sched`, once every region it addresses lies inside `bufs`, every
    /// local op's source and destination have one length, and every peer it sends to or
    /// receives from has a link.
    pub(super) fn new(
        sched: &'s Schedule,
        links: &[Option<Box<dyn Link>>],
        bufs: &Buffers,
    ) -> Result<Self> {
        let mut sends: Vec<Queue> = (0..links.len()).map(|_| Queue::default()).collect();
        let mut recvs: Vec<Queue> = (0..links.len()).map(|_| Queue::default()).collect();
        let mut locals = Queue::default();
        for (i, op) in sched.ops.iter().enumerate() {
            match op.kind {
                OpKind::Send { peer, src } => {
                    bufs.check(&src)?;
                    queue_for(&mut sends, links, peer, "send to")?.ops.push(i);
                }
                OpKind::Recv { peer, dst, combine } => {
                    bufs.check(&dst)?;
                    if let Some(src) = combine.operand() {
                        bufs.check(&src)?;
                    }
                    queue_for(&mut recvs, links, peer, "receive from")?
                        .ops
                        .push(i);
                }
                OpKind::Copy { src, dst } | OpKind::Reduce { src, dst } => {
                    bufs.check(&src)?;
                    bufs.check(&dst)?;
                    if src.len != dst.len {
                        return Err(Error::invalid(
                            "execute",
                            format!("local op from {src:?} into {dst:?} of another length"),
                        ));
                    }
                    locals.ops.push(i);
                }
            }
        }
        Ok(Deps {
            sched,
            sends,
            recvs,
            locals,
            done: vec![false; sched.ops.len()],
            n_done: 0,
            phase_left: sched.phase_ops,
            phase_end: [None; Phase::COUNT],
        })
    }

    /// The links with anything to send or receive.
    pub(super) fn active(&self) -> Vec<usize> {
        (0..self.sends.len())
            .filter(|&p| !self.sends[p].ops.is_empty() || !self.recvs[p].ops.is_empty())
            .collect()
    }

    /// Whether every op `i` depends on is done.
    #[inline]
    pub(super) fn ready(&self, i: usize) -> bool {
        self.sched.ops[i].deps.iter().all(|&d| self.done[d])
    }

    #[inline]
    pub(super) fn all_done(&self) -> bool {
        self.n_done == self.done.len()
    }

    /// Whether this rank still has ops for link `p`.
    pub(super) fn pending(&self, p: usize) -> bool {
        self.sends[p].head().is_some() || self.recvs[p].head().is_some()
    }

    #[inline]
    fn mark(&mut self, i: usize) {
        self.done[i] = true;
        self.n_done += 1;
        // A phase's end is its last op's: one clock read per phase and run.
        if let Some(&ph) = self.sched.op_phase.get(i) {
            let left = &mut self.phase_left[ph as usize];
            *left = left.saturating_sub(1);
            if *left == 0 && ph != Phase::Unnamed {
                self.phase_end[ph as usize] = Some(Stamp::now());
            }
        }
    }

    /// Send `i`, the head of link `p`'s sends, is done.
    #[inline]
    pub(super) fn sent(&mut self, i: usize, p: usize) {
        self.mark(i);
        self.sends[p].next += 1;
    }

    /// Receive `i`, the head of link `p`'s receives, is done.
    #[inline]
    pub(super) fn received(&mut self, i: usize, p: usize) {
        self.mark(i);
        self.recvs[p].next += 1;
    }

    /// Local op `i`, the head of the local ops, is done.
    #[inline]
    pub(super) fn ran(&mut self, i: usize) {
        self.mark(i);
        self.locals.next += 1;
    }

    /// The peer a stuck schedule waits for, among the links `active`: a receive whose
    /// data never came, else a send the peer never drained.
    pub(super) fn blocked_on(&self, active: &[usize]) -> (usize, &'static str) {
        let (p, what, _) = self.blocked_op(active);
        (p, what)
    }

    /// The phase of the op [`Deps::blocked_on`] names, for the flight recorder: the
    /// phase a rank is stuck in. Asked by a wait's checks only (every 50 ms of a wait
    /// without progress), so a run pays nothing for it.
    pub(super) fn blocked_phase(&self, active: &[usize]) -> Phase {
        let (_, _, op) = self.blocked_op(active);
        op.and_then(|i| self.sched.op_phase.get(i).copied())
            .unwrap_or(Phase::Unnamed)
    }

    /// The peer waited on, what for, and the op that waits: a ready receive first
    /// (its data is all that is missing), else a ready send; of several, the one
    /// earliest in the schedule. A later phase's receive may be ready too (its buffer
    /// is free from the start), but the earliest op is the one the rest waits behind:
    /// in a hierarchical all-reduce, the inter-node ring's receive, not the intra-node
    /// all-gather's that follows it.
    fn blocked_op(&self, active: &[usize]) -> (usize, &'static str, Option<usize>) {
        let earliest = |qs: &[Queue]| {
            active
                .iter()
                .filter_map(|&p| Some((qs[p].head().filter(|&i| self.ready(i))?, p)))
                .min()
        };
        if let Some((i, p)) = earliest(&self.recvs) {
            return (p, "to send data", Some(i));
        }
        if let Some((i, p)) = earliest(&self.sends) {
            return (p, "to accept data", Some(i));
        }
        (
            active.first().copied().unwrap_or(0),
            "to make progress",
            None,
        )
    }
}

fn queue_for<'q>(
    qs: &'q mut [Queue],
    links: &[Option<Box<dyn Link>>],
    peer: usize,
    what: &str,
) -> Result<&'q mut Queue> {
    if links.get(peer).is_none_or(|l| l.is_none()) {
        return Err(Error::invalid(
            "execute",
            format!("schedule wants to {what} rank {peer}, but there is no link to it"),
        ));
    }
    Ok(&mut qs[peer])
}
