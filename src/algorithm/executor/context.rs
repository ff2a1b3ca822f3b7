//! The collective a run belongs to, and how its errors are worded: once, for this
//! executor and the shared-memory engine (`communicator::shared`) alike.

use std::time::Duration;

use crate::dtype::{CollectiveOp, DataType, ReduceOp};
use crate::error::{AbortCause, Error};
use crate::transport::Link;

/// What every message of this collective says about it, and who runs it.
#[derive(Clone, Copy, Debug)]
pub struct ExecCtx {
    /// This rank.
    pub rank: usize,
    /// Number of ranks (for `Avg`).
    pub world_size: usize,
    /// Collective sequence number.
    pub seq: u64,
    /// Which collective.
    pub op: CollectiveOp,
    /// Element type.
    pub dtype: DataType,
    /// Reduction.
    pub redop: ReduceOp,
    /// Element count as the caller gave it.
    pub count: u64,
    /// Longest wait without progress.
    pub timeout: Duration,
    /// Received bytes that are only copied into place go there with streaming stores:
    /// for messages well beyond the caches, whose destination is not read again soon
    /// (saves reading each destination line before writing it).
    pub stream_copies: bool,
    /// Polls without giving up the core before the wait starts yielding. Zero when this
    /// host runs more ranks than it has cores: a spinning rank then burns the time
    /// slice of the peer it waits for, which costs small calls most (the runs:
    /// `docs/perf-log/2026-11-27-waiting-oversubscribed.md`).
    pub spin_polls: u32,
}

/// The errors of a collective in its context (this rank, the collective and its
/// sequence number), worded once for every engine that runs collectives: this executor
/// and the shared-memory one (`communicator::shared`).
impl ExecCtx {
    /// The communicator was aborted (`Communicator::abort`) while this collective waited.
    pub(crate) fn cancelled(&self) -> Error {
        Error::Broken(format!(
            "rank {}: {} #{} aborted by the application",
            self.rank, self.op, self.seq
        ))
    }

    /// Waited `after` (the timeout or more) for `peer` to do `what`; `seen`: what this
    /// side sees of the peer's process (stopped, say), if anything.
    pub(crate) fn timed_out(
        &self,
        peer: usize,
        after: Duration,
        what: &'static str,
        seen: Option<String>,
    ) -> Error {
        Error::Timeout {
            rank: self.rank,
            peer,
            op: self.op,
            seq: self.seq,
            after,
            what,
            note: timeout_note(peer, self.world_size, seen),
        }
    }

    /// `peer` is gone (`detail`: how this rank noticed).
    pub(crate) fn peer_lost(&self, peer: usize, detail: String) -> Error {
        Error::PeerLost {
            rank: self.rank,
            peer,
            op: self.op,
            seq: self.seq,
            detail,
        }
    }

    /// `peer` gave up and said why.
    pub(crate) fn peer_gave_up(&self, peer: usize, cause: AbortCause) -> Error {
        Error::PeerGaveUp {
            rank: self.rank,
            peer,
            op: self.op,
            seq: self.seq,
            cause,
            note: String::new(),
        }
    }

    /// `peer` runs another call than this rank (`detail`: expected against seen).
    pub(crate) fn mismatch(&self, peer: usize, detail: String) -> Error {
        Error::Mismatch {
            rank: self.rank,
            peer,
            op: self.op,
            seq: self.seq,
            detail,
        }
    }
}

/// What a timeout's message adds about the peer waited for: what its link sees of it
/// (`seen`: e.g. a stopped process), else, with more than two ranks, that it may be
/// waiting itself. A rank sees only its own waits: whether the peer is the end of the
/// chain is known only where the peer's state can be seen.
pub(super) fn timeout_note(peer: usize, world_size: usize, seen: Option<String>) -> String {
    match seen {
        Some(s) => format!("; {s}"),
        None if world_size > 2 => format!(
            "; peer {peer} may itself be waiting on another rank further along, so the stall \
             may lie there"
        ),
        None => String::new(),
    }
}

/// Adds the collective's context to an error of `link`: a peer lost that said why it
/// gave up becomes [`Error::PeerGaveUp`].
pub(super) fn link_error(e: Error, link: &mut dyn Link, ctx: &ExecCtx) -> Error {
    match e {
        Error::Link {
            peer, lost: true, ..
        } => match link.abort_notice() {
            Some(cause) => ctx.peer_gave_up(peer, cause),
            None => in_context(e, ctx),
        },
        e => in_context(e, ctx),
    }
}

/// Adds the collective's context to a link error.
fn in_context(e: Error, ctx: &ExecCtx) -> Error {
    match e {
        Error::Link {
            peer,
            detail,
            lost: true,
        } => ctx.peer_lost(peer, detail),
        Error::Link {
            peer,
            detail,
            lost: false,
        } => ctx.peer_lost(peer, format!("protocol error: {detail}")),
        other => other,
    }
}
