//! The one error type of the crate. Every variant carries the context a user needs to
//! find the problem: which rank, which peer, which collective and its sequence number.

use std::time::Duration;

use crate::dtype::CollectiveOp;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in hetccl.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value (environment variable or flag) was refused.
    #[error("invalid value {value:?} for {var}: accepted values are {accepted}")]
    Config {
        /// The variable name, e.g. `HETCCL_ALGO`.
        var: String,
        /// The value that was given.
        value: String,
        /// What would have been accepted.
        accepted: String,
    },

    /// The caller passed arguments that cannot work (sizes, roots, peers).
    #[error("invalid argument to {op}: {reason}")]
    InvalidArgument {
        /// The API call.
        op: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// Two ranks called different collectives, counts or dtypes for the same sequence number.
    #[error("rank {rank}: {op} #{seq} does not match what peer {peer} sent: {detail}")]
    Mismatch {
        /// This rank.
        rank: usize,
        /// The peer whose message disagreed.
        peer: usize,
        /// The collective this rank is running.
        op: CollectiveOp,
        /// Its sequence number.
        seq: u64,
        /// Expected versus received.
        detail: String,
    },

    /// A peer made no progress within `HETCCL_TIMEOUT`.
    #[error(
        "rank {rank}: {op} #{seq} timed out after {after:?} waiting for peer {peer} {what}{note}"
    )]
    Timeout {
        /// This (waiting) rank.
        rank: usize,
        /// The peer it waited for.
        peer: usize,
        /// The collective.
        op: CollectiveOp,
        /// Its sequence number.
        seq: u64,
        /// How long it waited.
        after: Duration,
        /// "to send data" or "to accept data".
        what: &'static str,
        /// What else the waiter knows: that the peer's process is stopped, or that the
        /// peer may itself be waiting on a rank further along (empty, or starting with
        /// "; ").
        note: String,
    },

    /// A peer's connection ended (process died, socket closed, peer aborted).
    #[error("rank {rank}: peer {peer} is gone during {op} #{seq}: {detail}")]
    PeerLost {
        /// This rank.
        rank: usize,
        /// The lost peer.
        peer: usize,
        /// The collective.
        op: CollectiveOp,
        /// Its sequence number.
        seq: u64,
        /// How it was noticed.
        detail: String,
    },

    /// A peer gave up on the collective (it failed, timed out, or lost another rank)
    /// and said why when it aborted its link to this rank.
    #[error(
        "rank {rank}: peer {peer} is gone during {op} #{seq}: peer {peer} gave up {}{note}",
        cause.describe(*rank)
    )]
    PeerGaveUp {
        /// This rank.
        rank: usize,
        /// The peer that gave up.
        peer: usize,
        /// The collective.
        op: CollectiveOp,
        /// Its sequence number.
        seq: u64,
        /// What the peer said.
        cause: AbortCause,
        /// When the peer gave up waiting for this rank: whom this rank was waiting for
        /// meanwhile (empty, or starting with "; ").
        note: String,
    },

    /// A link-level failure outside a collective's context (the executor adds context).
    #[error("link to peer {peer}: {detail}")]
    Link {
        /// The peer at the other end.
        peer: usize,
        /// What happened.
        detail: String,
        /// True when the peer is gone (closed, dead, aborted) rather than misbehaving.
        lost: bool,
    },

    /// Finding the other ranks failed.
    #[error("bootstrap: {0}")]
    Bootstrap(String),

    /// A connection failed the handshake (stranger, other job, wrong key).
    #[error("refused connection from {from}: {reason}")]
    Auth {
        /// Remote address.
        from: String,
        /// Why it was refused.
        reason: String,
    },

    /// A topology description is unreadable or does not fit the running job.
    #[error("topology: {0}")]
    Topology(String),

    /// Shared-memory segments could not be created or mapped.
    #[error("shared memory: {0}")]
    Shm(String),

    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The GPU, its driver, or a kernel launch failed (or no GPU is usable).
    #[error("device: {op}: {detail}")]
    Device {
        /// What was being done (`open device 0`, `launch fp16_compress`, ...).
        op: String,
        /// The driver's error or what is missing.
        detail: String,
    },

    /// A collective ended in a panic inside hetccl (a bug): its progress thread caught
    /// it, and the communicator is broken from then on.
    #[error(
        "rank {rank}: {op} #{seq} failed: the progress thread panicked: {message} (a bug in \
         hetccl; please report it)"
    )]
    Panicked {
        /// This rank.
        rank: usize,
        /// The collective that was running.
        op: CollectiveOp,
        /// Its sequence number.
        seq: u64,
        /// The panic's message.
        message: String,
    },

    /// The communicator failed earlier and cannot be used any more.
    #[error("communicator is unusable after an earlier error: {0}")]
    Broken(String),
}

impl Error {
    /// Wraps an `io::Error` with a description of what was being attempted.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// This error with `finding` (what the flight recorder found of the job's first
    /// failure, starting with "; ") added to the text that says what else the rank
    /// knows; the kind, and so the C API's code and the cause told to peers, stay.
    pub fn with_finding(self, finding: &str) -> Self {
        match self {
            Error::Timeout {
                rank,
                peer,
                op,
                seq,
                after,
                what,
                note,
            } => Error::Timeout {
                rank,
                peer,
                op,
                seq,
                after,
                what,
                note: note + finding,
            },
            Error::PeerGaveUp {
                rank,
                peer,
                op,
                seq,
                cause,
                note,
            } => Error::PeerGaveUp {
                rank,
                peer,
                op,
                seq,
                cause,
                note: note + finding,
            },
            Error::PeerLost {
                rank,
                peer,
                op,
                seq,
                detail,
            } => Error::PeerLost {
                rank,
                peer,
                op,
                seq,
                detail: detail + finding,
            },
            Error::Mismatch {
                rank,
                peer,
                op,
                seq,
                detail,
            } => Error::Mismatch {
                rank,
                peer,
                op,
                seq,
                detail: detail + finding,
            },
            Error::Broken(why) => Error::Broken(why + finding),
            e => e,
        }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(op: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            reason: reason.into(),
        }
    }
}

/// What a rank that gives up on a collective tells its peers when it aborts its links
/// (in the shared-memory control line, or as a TCP abort notice), so that a rank that
/// was waiting on it can say where the failure lies instead of only blaming it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbortCause {
    /// What went wrong.
    pub kind: AbortKind,
    /// The rank the failure points at: the peer waited for, the peer lost, or the
    /// aborting rank itself.
    pub rank: usize,
    /// Whether the aborting rank learnt it from another rank's notice rather than
    /// seeing it itself.
    pub relayed: bool,
}

/// The kinds of [`AbortCause`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AbortKind {
    /// Waited longer than `HETCCL_TIMEOUT` for `rank`.
    TimedOut = 1,
    /// `rank`'s process exited or its connection closed.
    Lost = 2,
    /// `rank` called a different collective, count or dtype.
    Mismatch = 3,
    /// `rank`'s communicator was aborted: by its application (`Communicator::abort`), or
    /// because its launcher exited.
    Aborted = 4,
    /// Any other error, on `rank`.
    Failed = 5,
}

impl AbortCause {
    /// A cause seen by the aborting rank itself.
    pub fn new(kind: AbortKind, rank: usize) -> Self {
        AbortCause {
            kind,
            rank,
            relayed: false,
        }
    }

    /// One word, as it travels between processes: bits 0..32 the rank + 1, bits 32..40
    /// the kind, bit 40 `relayed`. Never 0, which means "no cause given".
    pub fn to_word(self) -> u64 {
        ((self.rank as u64).min(0xffff_fffe) + 1)
            | (self.kind as u64) << 32
            | (self.relayed as u64) << 40
    }

    /// Reads a word written by [`AbortCause::to_word`] in another process; `None` for 0
    /// (no cause given) and for anything no build writes (unknown kind, stray bits).
    pub fn from_word(w: u64) -> Option<AbortCause> {
        if w >> 41 != 0 || w & 0xffff_ffff == 0 {
            return None;
        }
        let kind = match (w >> 32) as u8 {
            1 => AbortKind::TimedOut,
            2 => AbortKind::Lost,
            3 => AbortKind::Mismatch,
            4 => AbortKind::Aborted,
            5 => AbortKind::Failed,
            _ => return None,
        };
        Some(AbortCause {
            kind,
            rank: (w & 0xffff_ffff) as usize - 1,
            relayed: w >> 40 & 1 == 1,
        })
    }

    /// What the aborting peer did, as seen from rank `me`, to follow "peer P gave up".
    /// A stall found further along is said in the words the fault reports look for.
    pub fn describe(&self, me: usize) -> String {
        let c = self.rank;
        let who = if c == me {
            format!("rank {c} (this rank)")
        } else {
            format!("rank {c}")
        };
        match (self.kind, self.relayed) {
            // This rank was waiting on another itself when the peer gave up on it.
            (AbortKind::TimedOut, _) if c == me => format!(
                "after waiting too long for rank {c} (this rank, itself held up by a stall \
                 further along)"
            ),
            (AbortKind::TimedOut, false) => format!(
                "after waiting too long for {who}: the stall is further along, at {who} or \
                 beyond"
            ),
            (AbortKind::TimedOut, true) => format!(
                "on news that a rank waited too long for {who}: the stall is further along, \
                 at {who} or beyond"
            ),
            (AbortKind::Lost, false) => {
                format!("after losing {who} (its process exited or its connection closed)")
            }
            (AbortKind::Lost, true) => {
                format!("on news that {who} was lost (its process exited or its connection closed)")
            }
            (AbortKind::Mismatch, false) => {
                format!("after {who} called a different collective, count or dtype")
            }
            (AbortKind::Mismatch, true) => {
                format!("on news that {who} called a different collective, count or dtype")
            }
            (AbortKind::Aborted, false) => {
                format!(
                    "because {who}'s communicator was aborted (by its application or its launcher)"
                )
            }
            (AbortKind::Aborted, true) => {
                format!("on news that {who}'s communicator was aborted")
            }
            (AbortKind::Failed, false) => format!("after an error on {who}"),
            (AbortKind::Failed, true) => format!("on news of an error on {who}"),
        }
    }

    /// The cause a rank gives when it aborts its links after `e`, with `me` its own rank.
    pub fn of_error(e: &Error, me: usize) -> AbortCause {
        match *e {
            Error::Timeout { peer, .. } => AbortCause::new(AbortKind::TimedOut, peer),
            Error::PeerGaveUp { cause, .. } => AbortCause {
                relayed: true,
                ..cause
            },
            Error::PeerLost { peer, .. } | Error::Link { peer, .. } => {
                AbortCause::new(AbortKind::Lost, peer)
            }
            Error::Mismatch { peer, .. } => AbortCause::new(AbortKind::Mismatch, peer),
            _ => AbortCause::new(AbortKind::Failed, me),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KINDS: [AbortKind; 5] = [
        AbortKind::TimedOut,
        AbortKind::Lost,
        AbortKind::Mismatch,
        AbortKind::Aborted,
        AbortKind::Failed,
    ];

    #[test]
    fn causes_survive_their_word_and_say_where_the_stall_is() {
        for kind in KINDS {
            for rank in [0, 1, 7, 4095] {
                for relayed in [false, true] {
                    let c = AbortCause {
                        kind,
                        rank,
                        relayed,
                    };
                    assert_ne!(c.to_word(), 0);
                    assert_eq!(AbortCause::from_word(c.to_word()), Some(c));
                }
            }
        }
        assert_eq!(AbortCause::from_word(0), None);
        let c = AbortCause::new(AbortKind::TimedOut, 2);
        assert_eq!(
            c.describe(0),
            "after waiting too long for rank 2: the stall is further along, at rank 2 or beyond"
        );
        assert_eq!(
            c.describe(2),
            "after waiting too long for rank 2 (this rank, itself held up by a stall further \
             along)"
        );
        let relayed = AbortCause::of_error(
            &Error::PeerGaveUp {
                rank: 1,
                peer: 3,
                op: CollectiveOp::AllReduce,
                seq: 4,
                cause: AbortCause::new(AbortKind::Lost, 2),
                note: String::new(),
            },
            1,
        );
        assert_eq!(
            relayed,
            AbortCause {
                kind: AbortKind::Lost,
                rank: 2,
                relayed: true
            }
        );
        let e = Error::PeerGaveUp {
            rank: 0,
            peer: 1,
            op: CollectiveOp::AllReduce,
            seq: 4,
            cause: relayed,
            note: String::new(),
        };
        assert_eq!(
            e.to_string(),
            "rank 0: peer 1 is gone during all_reduce #4: peer 1 gave up on news that rank 2 \
             was lost (its process exited or its connection closed)"
        );
    }

    proptest! {
        /// Words come from other processes (shared memory, a socket): any word is read
        /// without a panic, and only the words some cause writes are read as one.
        #[test]
        fn any_word_reads_as_a_cause_or_none(w in any::<u64>()) {
            match AbortCause::from_word(w) {
                Some(c) => {
                    prop_assert_eq!(c.to_word(), w);
                    prop_assert!(!c.describe(0).is_empty());
                }
                None => prop_assert!(
                    w == 0 || w >> 41 != 0 || w & 0xffff_ffff == 0
                        || !(1..=5).contains(&((w >> 32) as u8))
                ),
            }
        }
    }
}
