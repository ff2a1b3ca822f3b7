//! Result codes, the mapping from [`Error`] to them, the per-thread last-error text,
//! and the guard every entry point runs in (no panic crosses the C boundary).

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::Error;

/// `hetcclResult_t`: what every C function returns. Values 0 to 7 equal NCCL's
/// `ncclResult_t`, so code that tests NCCL codes numerically keeps working.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum hetcclResult_t {
    /// The call did what it was asked.
    hetcclSuccess = 0,
    /// The GPU, its driver or a kernel launch failed (`Error::Device`).
    hetcclUnhandledCudaError = 1,
    /// The operating system refused something: sockets, shared memory, files, the
    /// bootstrap store.
    hetcclSystemError = 2,
    /// A defect inside hetccl (a caught panic); the message says where.
    hetcclInternalError = 3,
    /// An argument is wrong: NULL buffer, unknown datatype or op, bad rank, a handle
    /// that is not a live communicator, a non-NULL stream.
    hetcclInvalidArgument = 4,
    /// The arguments are fine but the call is not: ranks disagree on a collective,
    /// a communicator is used after it failed, a bad `HETCCL_*` variable, group misuse.
    hetcclInvalidUsage = 5,
    /// A peer died, closed its links, misbehaved or failed the handshake.
    hetcclRemoteError = 6,
    /// Reserved for non-blocking initialisation (never returned yet).
    hetcclInProgress = 7,
    /// A peer made no progress within `HETCCL_TIMEOUT`; the message names it.
    hetcclTimeout = 8,
}

use hetcclResult_t::*;

/// Number of result codes (`hetcclNumResults` in the header).
pub const NUM_RESULTS: i32 = 9;

impl hetcclResult_t {
    /// Every code, in value order (for the header test and `hetcclGetErrorString`).
    pub const ALL: [hetcclResult_t; NUM_RESULTS as usize] = [
        hetcclSuccess,
        hetcclUnhandledCudaError,
        hetcclSystemError,
        hetcclInternalError,
        hetcclInvalidArgument,
        hetcclInvalidUsage,
        hetcclRemoteError,
        hetcclInProgress,
        hetcclTimeout,
    ];

    /// The enumerator's name as spelled in `hetccl.h`.
    pub fn c_name(self) -> &'static str {
        match self {
            hetcclSuccess => "hetcclSuccess",
            hetcclUnhandledCudaError => "hetcclUnhandledCudaError",
            hetcclSystemError => "hetcclSystemError",
            hetcclInternalError => "hetcclInternalError",
            hetcclInvalidArgument => "hetcclInvalidArgument",
            hetcclInvalidUsage => "hetcclInvalidUsage",
            hetcclRemoteError => "hetcclRemoteError",
            hetcclInProgress => "hetcclInProgress",
            hetcclTimeout => "hetcclTimeout",
        }
    }

    /// Short description, as `hetcclGetErrorString` returns it.
    pub fn description(self) -> &'static CStr {
        match self {
            hetcclSuccess => c"no error",
            hetcclUnhandledCudaError => c"unhandled cuda error",
            hetcclSystemError => c"unhandled system error (sockets, shared memory, files)",
            hetcclInternalError => c"internal error - please report this",
            hetcclInvalidArgument => c"invalid argument",
            hetcclInvalidUsage => c"invalid usage (ranks disagree, or the call is out of place)",
            hetcclRemoteError => c"remote process exited, aborted or misbehaved",
            hetcclInProgress => c"operation in progress",
            hetcclTimeout => c"a peer made no progress within HETCCL_TIMEOUT",
        }
    }
}

/// The code for an error. Exhaustive on purpose: a new `Error` variant must be given
/// a code here before the crate compiles.
pub fn code_of(e: &Error) -> hetcclResult_t {
    match e {
        Error::InvalidArgument { .. } => hetcclInvalidArgument,
        Error::Config { .. } | Error::Mismatch { .. } | Error::Broken(_) | Error::Topology(_) => {
            hetcclInvalidUsage
        }
        Error::Timeout { .. } => hetcclTimeout,
        Error::PeerLost { .. }
        | Error::PeerGaveUp { .. }
        | Error::Link { .. }
        | Error::Auth { .. } => hetcclRemoteError,
        Error::Bootstrap(_) | Error::Shm(_) | Error::Io { .. } => hetcclSystemError,
        Error::Device { .. } => hetcclUnhandledCudaError,
        Error::Panicked { .. } => hetcclInternalError,
    }
}

/// A failed call: its code and the message `hetcclGetLastError` will return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The code returned to C.
    pub code: hetcclResult_t,
    /// The text kept for `hetcclGetLastError`.
    pub message: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure {
            code: code_of(&e),
            message: e.to_string(),
        }
    }
}

impl Failure {
    /// `hetcclInvalidArgument` with the same wording as [`Error::InvalidArgument`].
    pub fn invalid(func: &'static str, reason: impl Into<String>) -> Self {
        Error::invalid(func, reason).into()
    }

    /// `hetcclInvalidUsage` for call-order mistakes (groups).
    pub fn usage(func: &'static str, reason: impl std::fmt::Display) -> Self {
        Failure {
            code: hetcclInvalidUsage,
            message: format!("invalid use of {func}: {reason}"),
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `msg` as this thread's last error (interior NULs become spaces).
pub fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = c);
}

/// Pointer to this thread's last error text. It stays valid until the next failing
/// hetccl call on this thread replaces it.
pub fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

/// This thread's last error text (for Rust callers and tests).
pub fn last_error() -> String {
    LAST_ERROR.with(|l| l.borrow().to_string_lossy().into_owned())
}

/// Runs the body of C entry point `func`: a panic becomes `hetcclInternalError`, a
/// failure is logged and kept for `hetcclGetLastError`.
pub fn guard(func: &'static str, body: impl FnOnce() -> Result<(), Failure>) -> hetcclResult_t {
    let outcome = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic payload".into());
        Err(Failure {
            code: hetcclInternalError,
            message: format!("internal error in {func}: panic: {what}"),
        })
    });
    match outcome {
        Ok(()) => hetcclSuccess,
        Err(f) => {
            tracing::debug!(target: "hetccl::capi", "{func} returns {}: {}", f.code.c_name(), f.message);
            set_last_error(&f.message);
            f.code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::CollectiveOp;
    use std::time::Duration;

    #[test]
    fn every_error_variant_has_the_intended_code() {
        let io = || std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let cases: Vec<(Error, hetcclResult_t)> = vec![
            (Error::invalid("x", "y"), hetcclInvalidArgument),
            (
                Error::Config {
                    var: "HETCCL_ALGO".into(),
                    value: "fast".into(),
                    accepted: "ring".into(),
                },
                hetcclInvalidUsage,
            ),
            (
                Error::Mismatch {
                    rank: 0,
                    peer: 1,
                    op: CollectiveOp::AllReduce,
                    seq: 3,
                    detail: String::new(),
                },
                hetcclInvalidUsage,
            ),
            (Error::Broken("x".into()), hetcclInvalidUsage),
            (
                Error::Panicked {
                    rank: 0,
                    op: CollectiveOp::Barrier,
                    seq: 1,
                    message: "x".into(),
                },
                hetcclInternalError,
            ),
            (
                Error::Timeout {
                    rank: 0,
                    peer: 1,
                    op: CollectiveOp::AllReduce,
                    seq: 0,
                    after: Duration::from_secs(1),
                    what: "to send data",
                    note: String::new(),
                },
                hetcclTimeout,
            ),
            (
                Error::PeerLost {
                    rank: 0,
                    peer: 1,
                    op: CollectiveOp::Broadcast,
                    seq: 0,
                    detail: String::new(),
                },
                hetcclRemoteError,
            ),
            (
                Error::PeerGaveUp {
                    rank: 0,
                    peer: 1,
                    op: CollectiveOp::AllReduce,
                    seq: 0,
                    cause: crate::error::AbortCause::new(crate::error::AbortKind::TimedOut, 2),
                    note: String::new(),
                },
                hetcclRemoteError,
            ),
            (
                Error::Link {
                    peer: 1,
                    detail: String::new(),
                    lost: true,
                },
                hetcclRemoteError,
            ),
            (
                Error::Auth {
                    from: "127.0.0.1:5".into(),
                    reason: "bad key".into(),
                },
                hetcclRemoteError,
            ),
            (Error::Bootstrap("x".into()), hetcclSystemError),
            (Error::Shm("x".into()), hetcclSystemError),
            (Error::io("binding", io()), hetcclSystemError),
            (
                Error::Device {
                    op: "open device 0".into(),
                    detail: "no CUDA driver".into(),
                },
                hetcclUnhandledCudaError,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(code_of(&e), want, "{e}");
        }
    }

    #[test]
    fn guard_turns_panics_into_internal_errors_with_the_function_name() {
        let r = guard("hetcclTestEntry", || panic!("boom {}", 7));
        assert_eq!(r, hetcclInternalError);
        assert_eq!(
            last_error(),
            "internal error in hetcclTestEntry: panic: boom 7"
        );
        let r = guard("hetcclTestEntry", || {
            Err(Failure::invalid("hetcclTestEntry", "n is 3"))
        });
        assert_eq!(r, hetcclInvalidArgument);
        assert_eq!(last_error(), "invalid argument to hetcclTestEntry: n is 3");
        assert_eq!(guard("hetcclTestEntry", || Ok(())), hetcclSuccess);
        assert_eq!(
            last_error(),
            "invalid argument to hetcclTestEntry: n is 3",
            "success keeps it"
        );
    }

    #[test]
    fn codes_are_dense_and_named() {
        for (i, c) in hetcclResult_t::ALL.iter().enumerate() {
            assert_eq!(*c as i32, i as i32);
            assert!(c.c_name().starts_with("hetccl"));
        }
    }
}
