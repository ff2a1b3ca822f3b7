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
    #[error("rank {rank}: {op} #{seq} timed out after {after:?} waiting for peer {peer} {what}")]
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

    /// A checkpoint file was refused (which check failed is in `reason`).
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: String,
        /// The failed check, e.g. "checksum mismatch" or "truncated".
        reason: String,
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

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(op: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            reason: reason.into(),
        }
    }
}
