//! The C API: `bindings/hetccl.h` + `libhetccl.so`, shaped like NCCL's so porting a
//! framework's comms backend is mostly renaming `nccl` to `hetccl`
//! (`docs/nccl-migration.md`).
//!
//! This layer is thin: it checks arguments, erases types (`void*` + a
//! `hetcclDataType_t` tag, dispatched once through [`crate::dispatch_dtype!`]), defers
//! calls made inside a group, and maps [`crate::Error`] to a `hetcclResult_t` plus a
//! message for `hetcclGetLastError`. Every entry point runs inside
//! [`status::guard`], so no panic unwinds into C.
//!
//! Buffers are host memory and every call is synchronous: when a collective returns,
//! its receive buffer holds the result. The `stream` argument exists so NCCL call
//! sites compile unchanged; it must be NULL. Device buffers and their CUDA streams go
//! through the `hetcclDevice*` calls of [`device`].

#![allow(non_snake_case)]

pub mod device;
pub mod group;
pub mod handle;
pub mod metrics;
pub mod ops;
pub mod status;
pub mod unique_id;

use std::ffi::{c_char, c_int, c_void};

pub use device::{
    hetcclDeviceAllGather, hetcclDeviceAllReduce, hetcclDeviceBroadcast, hetcclDeviceComm,
    hetcclDeviceCommDestroy, hetcclDeviceCommInit, hetcclDeviceComm_t, hetcclDeviceReduce,
    hetcclDeviceReduceScatter,
};
pub use handle::{hetcclComm, hetcclComm_t, register};
pub use metrics::hetcclMetrics_t;
pub use ops::{hetcclDataType_t, hetcclRedOp_t, hetcclStream_t};
pub use status::{hetcclResult_t, last_error};
pub use unique_id::{hetcclUniqueId, UNIQUE_ID_BYTES};

use group::{OutPtr, PendingInit};
use ops::{buf_arg, dtype_arg, rank_arg, redop_arg, stream_arg, times_ranks, Kind, Op};
use status::{guard, Failure};
use unique_id::JobTicket;

use crate::communicator::Communicator;
use crate::config::Config;

/// `HETCCL_MAJOR`, `HETCCL_MINOR`, `HETCCL_PATCH` in the header: the crate's version.
pub const VERSION: (i32, i32, i32) = (0, 1, 0);

/// `HETCCL_VERSION_CODE`: `major * 10000 + minor * 100 + patch`, as NCCL encodes its own.
pub const VERSION_CODE: i32 = VERSION.0 * 10000 + VERSION.1 * 100 + VERSION.2;

/// Creates the communicator for a fully resolved configuration.
pub(crate) fn init_communicator(cfg: Config) -> Result<Communicator, Failure> {
    Communicator::init(cfg).map_err(Failure::from)
}

/// Writes `v` through an out-parameter, refusing NULL.
///
/// # Safety
/// `p` must be NULL or valid for a write of `T`.
unsafe fn out<T>(func: &'static str, name: &str, p: *mut T, v: T) -> Result<(), Failure> {
    if p.is_null() {
        return Err(Failure::invalid(func, format!("{name} is NULL")));
    }
    // SAFETY: non-NULL, and the caller promises it points at a writable `T`.
    unsafe { p.write(v) };
    Ok(())
}

/// Checks the common arguments of a collective, then runs it or defers it to
/// `hetcclGroupEnd`.
fn collective(
    func: &'static str,
    comm: hetcclComm_t,
    datatype: hetcclDataType_t,
    stream: hetcclStream_t,
    build: impl FnOnce(&handle::Entry, crate::DataType) -> Result<Kind, Failure>,
) -> hetcclResult_t {
    guard(func, || {
        let r = (|| {
            let c = handle::lookup(func, comm)?;
            let dtype = dtype_arg(func, datatype)?;
            stream_arg(func, stream)?;
            let kind = build(&c, dtype)?;
            kind.check_layout(func, dtype.size(), c.rank, c.world_size)?;
            Ok(Op {
                func,
                comm: c,
                dtype,
                kind,
            })
        })();
        let op = r.inspect_err(group::note_failure)?;
        // SAFETY: the buffers are valid for the counts given (the C API contract; inside
        // a group until hetcclGroupEnd returns), and `build` checked them otherwise.
        unsafe { group::submit(op) }
    })
}

/// Reports the library version as `major * 10000 + minor * 100 + patch`.
///
/// # Safety
/// `version` must be NULL or point at a writable `int`.
#[no_mangle]
pub unsafe extern "C" fn hetcclGetVersion(version: *mut c_int) -> hetcclResult_t {
    // SAFETY: forwarded contract on `version`.
    guard("hetcclGetVersion", || unsafe {
        out("hetcclGetVersion", "version", version, VERSION_CODE)
    })
}

/// Makes a new job id on the rank that will be rank 0. Share it with every other rank
/// out of band (MPI_Bcast, a file, a pipe); it carries the job's secret key.
///
/// # Safety
/// `uniqueId` must be NULL or point at a writable `hetcclUniqueId`.
#[no_mangle]
pub unsafe extern "C" fn hetcclGetUniqueId(uniqueId: *mut hetcclUniqueId) -> hetcclResult_t {
    const F: &str = "hetcclGetUniqueId";
    guard(F, || {
        if uniqueId.is_null() {
            return Err(Failure::invalid(F, "uniqueId is NULL"));
        }
        let cfg = Config::from_env()?;
        let id = JobTicket::generate(&cfg)?.encode();
        // SAFETY: non-NULL; the caller promises a writable hetcclUniqueId.
        unsafe { out(F, "uniqueId", uniqueId, id) }
    })
}

/// Like `hetcclGetUniqueId`, for programs with a rendezvous of their own (PyTorch's
/// c10d store, whose port `MASTER_PORT` already is): rank 0's bootstrap store will listen
/// on `host` (NULL: `MASTER_ADDR`, else as `hetcclGetUniqueId` picks) and `port` (0: a
/// port free now). With `keyFromEnv` non-zero the id carries no key: every rank must
/// have the same `HETCCL_JOB_KEY`, and the id may travel over channels others can read.
///
/// # Safety
/// `uniqueId` must be NULL or point at a writable `hetcclUniqueId`; `host` must be NULL
/// or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn hetcclGetUniqueIdAt(
    uniqueId: *mut hetcclUniqueId,
    host: *const c_char,
    port: c_int,
    keyFromEnv: c_int,
) -> hetcclResult_t {
    const F: &str = "hetcclGetUniqueIdAt";
    guard(F, || {
        if uniqueId.is_null() {
            return Err(Failure::invalid(F, "uniqueId is NULL"));
        }
        let host = if host.is_null() {
            None
        } else {
            // SAFETY: non-NULL and NUL-terminated per the caller's contract.
            let h = unsafe { std::ffi::CStr::from_ptr(host) };
            Some(
                h.to_str()
                    .map_err(|_| Failure::invalid(F, "host is not UTF-8"))?
                    .to_string(),
            )
        };
        let port = match u16::try_from(port) {
            Ok(0) => None,
            Ok(p) => Some(p),
            Err(_) => {
                return Err(Failure::invalid(
                    F,
                    format!("port is {port}; it must be 0 (a free port) or 1 to 65535"),
                ))
            }
        };
        let cfg = Config::from_env()?;
        let id = JobTicket::generate_at(&cfg, host, port, keyFromEnv != 0)?.encode();
        // SAFETY: non-NULL; the caller promises a writable hetcclUniqueId.
        unsafe { out(F, "uniqueId", uniqueId, id) }
    })
}

/// Creates rank `rank` of an `nranks`-rank communicator from rank 0's id. Blocks until
/// every rank has called it (inside a group: until `hetcclGroupEnd`). Other settings
/// come from the `HETCCL_*` environment.
///
/// # Safety
/// `comm` must be NULL or point at a writable `hetcclComm_t` (inside a group, until
/// `hetcclGroupEnd` returns).
#[no_mangle]
pub unsafe extern "C" fn hetcclCommInitRank(
    comm: *mut hetcclComm_t,
    nranks: c_int,
    commId: hetcclUniqueId,
    rank: c_int,
) -> hetcclResult_t {
    // SAFETY: forwarded contract on `comm`.
    unsafe { init_rank("hetcclCommInitRank", comm, nranks, commId, rank, None) }
}

/// `hetcclCommInitRank` with settings of this communicator's own: `settings` is NULL or
/// `HETCCL_NAME=value` lines (separated by newlines), which take precedence over the
/// environment and are checked as it is (e.g. `"HETCCL_COMPRESS=all\nHETCCL_COMPRESS_FORMAT=bf16"`
/// for one process group of a framework).
///
/// # Safety
/// As `hetcclCommInitRank`; `settings` must be NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn hetcclCommInitRankSettings(
    comm: *mut hetcclComm_t,
    nranks: c_int,
    commId: hetcclUniqueId,
    rank: c_int,
    settings: *const c_char,
) -> hetcclResult_t {
    const F: &str = "hetcclCommInitRankSettings";
    let text = if settings.is_null() {
        None
    } else {
        // SAFETY: non-NULL and NUL-terminated per the caller's contract.
        Some(unsafe { std::ffi::CStr::from_ptr(settings) })
    };
    // SAFETY: forwarded contract on `comm`.
    unsafe { init_rank(F, comm, nranks, commId, rank, text) }
}

/// The `HETCCL_NAME=value` lines of one communicator's settings, checked.
fn parse_settings(
    func: &'static str,
    text: &std::ffi::CStr,
) -> Result<Vec<(String, String)>, Failure> {
    let text = text
        .to_str()
        .map_err(|_| Failure::invalid(func, "settings are not UTF-8"))?;
    let mut vars = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (k, v) = line.split_once('=').ok_or_else(|| {
            Failure::invalid(func, format!("setting {line:?} is not HETCCL_NAME=value"))
        })?;
        let k = k.trim();
        if !k.starts_with("HETCCL_") || k == "HETCCL_JOB_KEY" || k == "HETCCL_JOB_ID" {
            return Err(Failure::invalid(
                func,
                format!(
                    "setting {k:?} is not accepted: only HETCCL_* settings, other than the \
                     job's id and key (the unique id carries those)"
                ),
            ));
        }
        vars.push((k.to_string(), v.trim().to_string()));
    }
    Ok(vars)
}

/// # Safety
/// `comm` must be NULL or point at a writable `hetcclComm_t`.
unsafe fn init_rank(
    F: &'static str,
    comm: *mut hetcclComm_t,
    nranks: c_int,
    commId: hetcclUniqueId,
    rank: c_int,
    settings: Option<&std::ffi::CStr>,
) -> hetcclResult_t {
    guard(F, || {
        let r = (|| {
            if comm.is_null() {
                return Err(Failure::invalid(F, "comm is NULL"));
            }
            let n = usize::try_from(nranks)
                .ok()
                .filter(|&n| n >= 1)
                .ok_or_else(|| {
                    Failure::invalid(F, format!("nranks is {nranks}; it must be at least 1"))
                })?;
            let r = usize::try_from(rank)
                .ok()
                .filter(|&r| r < n)
                .ok_or_else(|| {
                    Failure::invalid(F, format!("rank {rank} is outside 0..{nranks}"))
                })?;
            let ticket = JobTicket::decode(F, &commId)?;
            let mut cfg = match settings {
                None => Config::from_env()?,
                Some(text) => Config::from_env_with(&parse_settings(F, text)?)?,
            };
            ticket.apply(F, &mut cfg, r, n)?;
            Ok(PendingInit {
                out: OutPtr(comm),
                cfg,
            })
        })();
        let init = r.inspect_err(group::note_failure)?;
        // SAFETY: `comm` is non-NULL and writable per the caller's contract.
        unsafe { group::submit_init(init) }
    })
}

/// Creates this process's communicator from the environment: `hetccl run`'s or
/// torchrun's `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT`, OpenMPI's, PMI's or
/// Slurm's variables, or `HETCCL_INIT=file:///shared/dir` / `mpi`. Blocks until every
/// rank has called it.
///
/// # Safety
/// `comm` must be NULL or point at a writable `hetcclComm_t`.
#[no_mangle]
pub unsafe extern "C" fn hetcclCommInitFromEnv(comm: *mut hetcclComm_t) -> hetcclResult_t {
    const F: &str = "hetcclCommInitFromEnv";
    guard(F, || {
        let r = (|| {
            if comm.is_null() {
                return Err(Failure::invalid(F, "comm is NULL"));
            }
            Ok(PendingInit {
                out: OutPtr(comm),
                cfg: Config::from_env()?,
            })
        })();
        let init = r.inspect_err(group::note_failure)?;
        // SAFETY: `comm` is non-NULL and writable per the caller's contract.
        unsafe { group::submit_init(init) }
    })
}

/// `color` of `hetcclCommSplit` for a rank that joins no new communicator.
pub const HETCCL_SPLIT_NOCOLOR: c_int = -1;

/// Splits `comm`, as `ncclCommSplit` (without its config argument: the new
/// communicators take `comm`'s settings). Every rank of `comm` calls it; the ranks that
/// pass the same `color` (0 or more) get a new communicator in `*newcomm`, ranked by
/// `key` and, for equal keys, by their rank in `comm`; a rank that passes
/// `HETCCL_SPLIT_NOCOLOR` gets NULL. Blocks until the new communicators are up. Destroy
/// each one like any other; either `comm` or the new ones may go first.
///
/// # Safety
/// `newcomm` must be NULL or point at a writable `hetcclComm_t`.
#[no_mangle]
pub unsafe extern "C" fn hetcclCommSplit(
    comm: hetcclComm_t,
    color: c_int,
    key: c_int,
    newcomm: *mut hetcclComm_t,
) -> hetcclResult_t {
    const F: &str = "hetcclCommSplit";
    guard(F, || {
        if group::active() {
            return Err(Failure::usage(
                F,
                "a split cannot be part of a group; call it outside hetcclGroupStart / \
                 hetcclGroupEnd",
            ));
        }
        let c = handle::lookup(F, comm)?;
        let color = if newcomm.is_null() {
            Err(Failure::invalid(F, "newcomm is NULL"))
        } else if color == HETCCL_SPLIT_NOCOLOR {
            Ok(None)
        } else {
            u32::try_from(color).map(Some).map_err(|_| {
                Failure::invalid(
                    F,
                    format!("color is {color}; it must be 0 or more, or HETCCL_SPLIT_NOCOLOR (-1)"),
                )
            })
        };
        // A rank with a bad argument still takes part, as no colour, so that no other
        // rank waits for it; then it fails alone.
        let child = c
            .comm
            .split(color.as_ref().ok().copied().flatten(), key)
            .map_err(Failure::from)?;
        color?;
        let h = child.map_or(std::ptr::null_mut(), handle::register);
        // SAFETY: non-NULL (checked above), and writable per the caller's contract.
        unsafe { newcomm.write(h) };
        Ok(())
    })
}

/// Releases a communicator. The handle is invalid afterwards: any later call with it
/// returns `hetcclInvalidArgument`. Calls still running on other threads finish first.
#[no_mangle]
pub extern "C" fn hetcclCommDestroy(comm: hetcclComm_t) -> hetcclResult_t {
    const F: &str = "hetcclCommDestroy";
    guard(F, || {
        let c = handle::unregister(F, comm)?;
        tracing::debug!(target: "hetccl::capi", rank = c.rank, "communicator {comm:p} destroyed");
        drop(c);
        Ok(())
    })
}

/// Releases a communicator after an error. A call blocked on it in another thread
/// returns an error within about 50 ms instead of waiting for `HETCCL_TIMEOUT`, and
/// the peers see the links close.
#[no_mangle]
pub extern "C" fn hetcclCommAbort(comm: hetcclComm_t) -> hetcclResult_t {
    const F: &str = "hetcclCommAbort";
    guard(F, || {
        let c = handle::unregister(F, comm)?;
        c.comm.abort();
        tracing::debug!(target: "hetccl::capi", rank = c.rank, "communicator {comm:p} aborted");
        drop(c);
        Ok(())
    })
}

/// Writes the number of ranks.
///
/// # Safety
/// `count` must be NULL or point at a writable `int`.
#[no_mangle]
pub unsafe extern "C" fn hetcclCommCount(comm: hetcclComm_t, count: *mut c_int) -> hetcclResult_t {
    const F: &str = "hetcclCommCount";
    guard(F, || {
        let c = handle::lookup(F, comm)?;
        // SAFETY: forwarded contract on `count`.
        unsafe { out(F, "count", count, c.world_size as c_int) }
    })
}

/// Writes this process's rank.
///
/// # Safety
/// `rank` must be NULL or point at a writable `int`.
#[no_mangle]
pub unsafe extern "C" fn hetcclCommUserRank(
    comm: hetcclComm_t,
    rank: *mut c_int,
) -> hetcclResult_t {
    const F: &str = "hetcclCommUserRank";
    guard(F, || {
        let c = handle::lookup(F, comm)?;
        // SAFETY: forwarded contract on `rank`.
        unsafe { out(F, "rank", rank, c.rank as c_int) }
    })
}

/// Sets how long the calls issued on `comm` from now on wait for a peer before they fail
/// naming it (`HETCCL_TIMEOUT` until then), in seconds, in `HETCCL_TIMEOUT`'s range.
/// Calls already running keep the timeout they started with.
#[no_mangle]
pub extern "C" fn hetcclCommSetTimeout(comm: hetcclComm_t, seconds: f64) -> hetcclResult_t {
    const F: &str = "hetcclCommSetTimeout";
    guard(F, || {
        let c = handle::lookup(F, comm)?;
        let secs = Some(seconds)
            .filter(|s| {
                (crate::config::MIN_TIMEOUT_SECS..=crate::config::MAX_TIMEOUT_SECS).contains(s)
            })
            .ok_or_else(|| {
                Failure::invalid(
                    F,
                    format!(
                        "seconds is {seconds}; it must be from {} to {} (one week), as \
                         HETCCL_TIMEOUT",
                        crate::config::MIN_TIMEOUT_SECS,
                        crate::config::MAX_TIMEOUT_SECS
                    ),
                )
            })?;
        c.comm
            .set_timeout(std::time::Duration::from_secs_f64(secs))
            .map_err(Failure::from)
    })
}

/// Always reports `hetcclSuccess` for a live communicator: operations are synchronous,
/// so their errors come back from the call itself. Present so NCCL watchdog loops port.
///
/// # Safety
/// `asyncError` must be NULL or point at a writable `hetcclResult_t`.
#[no_mangle]
pub unsafe extern "C" fn hetcclCommGetAsyncError(
    comm: hetcclComm_t,
    asyncError: *mut hetcclResult_t,
) -> hetcclResult_t {
    const F: &str = "hetcclCommGetAsyncError";
    guard(F, || {
        handle::lookup(F, comm)?;
        // SAFETY: forwarded contract on `asyncError`.
        unsafe { out(F, "asyncError", asyncError, hetcclResult_t::hetcclSuccess) }
    })
}

/// A static description of a result code ("unknown result code" for other values).
#[no_mangle]
pub extern "C" fn hetcclGetErrorString(result: c_int) -> *const c_char {
    usize::try_from(result)
        .ok()
        .and_then(|i| hetcclResult_t::ALL.get(i))
        .map_or(c"unknown result code".as_ptr(), |r| {
            r.description().as_ptr()
        })
}

/// The message of the most recent failed hetccl call on this thread (also for failed
/// initialisations, so `comm` may be NULL and is not used); "" if none failed yet. The
/// text stays valid until the next failing call on this thread.
#[no_mangle]
pub extern "C" fn hetcclGetLastError(comm: hetcclComm_t) -> *const c_char {
    let _ = comm;
    status::last_error_ptr()
}

/// Element-wise reduction of every rank's `count` elements; every rank receives the
/// result. In place when `sendbuff == recvbuff`; other overlaps of the two buffers are
/// refused, here and in the other collectives ([`ops::Kind::check_layout`]).
///
/// # Safety
/// `sendbuff` and `recvbuff` must hold `count` elements of `datatype` (inside a group,
/// until `hetcclGroupEnd` returns).
#[no_mangle]
pub unsafe extern "C" fn hetcclAllReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: hetcclDataType_t,
    op: hetcclRedOp_t,
    comm: hetcclComm_t,
    stream: hetcclStream_t,
) -> hetcclResult_t {
    const F: &str = "hetcclAllReduce";
    collective(F, comm, datatype, stream, |_, dt| {
        Ok(Kind::AllReduce {
            op: redop_arg(F, op)?,
            send: buf_arg(F, "sendbuff", sendbuff, count, dt)?,
            recv: buf_arg(F, "recvbuff", recvbuff, count, dt)?,
            count,
        })
    })
}

/// Reduces `nranks * recvcount` elements of every rank; rank `r` receives block `r` of
/// the result (`recvcount` elements). In place when `recvbuff == sendbuff + r *
/// recvcount` elements.
///
/// # Safety
/// `sendbuff` must hold `nranks * recvcount` elements, `recvbuff` `recvcount`.
#[no_mangle]
pub unsafe extern "C" fn hetcclReduceScatter(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    recvcount: usize,
    datatype: hetcclDataType_t,
    op: hetcclRedOp_t,
    comm: hetcclComm_t,
    stream: hetcclStream_t,
) -> hetcclResult_t {
    const F: &str = "hetcclReduceScatter";
    collective(F, comm, datatype, stream, |c, dt| {
        let total = times_ranks(F, recvcount, c.world_size)?;
        Ok(Kind::ReduceScatter {
            op: redop_arg(F, op)?,
            send: buf_arg(F, "sendbuff", sendbuff, total, dt)?,
            recv: buf_arg(F, "recvbuff", recvbuff, recvcount, dt)?,
            recvcount,
        })
    })
}

/// Every rank's `sendcount` elements, concatenated in rank order into every rank's
/// `recvbuff` (`nranks * sendcount` elements). In place when `sendbuff == recvbuff + r *
/// sendcount` elements.
///
/// # Safety
/// `sendbuff` must hold `sendcount` elements, `recvbuff` `nranks * sendcount`.
#[no_mangle]
pub unsafe extern "C" fn hetcclAllGather(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    sendcount: usize,
    datatype: hetcclDataType_t,
    comm: hetcclComm_t,
    stream: hetcclStream_t,
) -> hetcclResult_t {
    const F: &str = "hetcclAllGather";
    collective(F, comm, datatype, stream, |c, dt| {
        let total = times_ranks(F, sendcount, c.world_size)?;
        Ok(Kind::AllGather {
            send: buf_arg(F, "sendbuff", sendbuff, sendcount, dt)?,
            recv: buf_arg(F, "recvbuff", recvbuff, total, dt)?,
            sendcount,
        })
    })
}

/// Copies `root`'s `sendbuff` into every rank's `recvbuff`. `sendbuff` is read on the
/// root only (it may be NULL elsewhere); in place when `sendbuff == recvbuff`.
///
/// # Safety
/// `recvbuff` (and `sendbuff` on the root) must hold `count` elements.
#[no_mangle]
pub unsafe extern "C" fn hetcclBroadcast(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: hetcclDataType_t,
    root: c_int,
    comm: hetcclComm_t,
    stream: hetcclStream_t,
) -> hetcclResult_t {
    const F: &str = "hetcclBroadcast";
    collective(F, comm, datatype, stream, |c, dt| {
        let root = rank_arg(F, "root", root, c.world_size)?;
        let send = if c.rank == root {
            buf_arg(F, "sendbuff", sendbuff, count, dt)?
        } else {
            ops::Ptr(recvbuff)
        };
        Ok(Kind::Broadcast {
            send,
            recv: buf_arg(F, "recvbuff", recvbuff, count, dt)?,
            count,
            root,
        })
    })
}

/// Like `hetcclAllReduce`, but only `root` receives the result. `recvbuff` is written
/// on the root only (it may be NULL elsewhere); in place when `sendbuff == recvbuff` there.
///
/// # Safety
/// `sendbuff` (and `recvbuff` on the root) must hold `count` elements.
#[no_mangle]
pub unsafe extern "C" fn hetcclReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: hetcclDataType_t,
    op: hetcclRedOp_t,
    root: c_int,
    comm: hetcclComm_t,
    stream: hetcclStream_t,
) -> hetcclResult_t {
    const F: &str = "hetcclReduce";
    collective(F, comm, datatype, stream, |c, dt| {
        let root = rank_arg(F, "root", root, c.world_size)?;
        let recv = if c.rank == root {
            buf_arg(F, "recvbuff", recvbuff, count, dt)?
        } else {
            ops::Ptr(std::ptr::null_mut())
        };
        Ok(Kind::Reduce {
            op: redop_arg(F, op)?,
            send: buf_arg(F, "sendbuff", sendbuff, count, dt)?,
            recv,
            count,
            root,
        })
    })
}

/// Sends `count` elements to `peer`, which calls `hetcclRecv` with the same count and
/// datatype. Messages between two ranks arrive in call order. Outside a group the call
/// returns once the message is handed to the link (it may wait for the peer to receive
/// when the message is larger than the link buffers).
///
/// # Safety
/// `sendbuff` must hold `count` elements.
#[no_mangle]
pub unsafe extern "C" fn hetcclSend(
    sendbuff: *const c_void,
    count: usize,
    datatype: hetcclDataType_t,
    peer: c_int,
    comm: hetcclComm_t,
    stream: hetcclStream_t,
) -> hetcclResult_t {
    const F: &str = "hetcclSend";
    collective(F, comm, datatype, stream, |c, dt| {
        Ok(Kind::Send {
            peer: rank_arg(F, "peer", peer, c.world_size)?,
            buf: buf_arg(F, "sendbuff", sendbuff, count, dt)?,
            count,
        })
    })
}

/// Receives `count` elements from `peer`.
///
/// # Safety
/// `recvbuff` must hold `count` elements.
#[no_mangle]
pub unsafe extern "C" fn hetcclRecv(
    recvbuff: *mut c_void,
    count: usize,
    datatype: hetcclDataType_t,
    peer: c_int,
    comm: hetcclComm_t,
    stream: hetcclStream_t,
) -> hetcclResult_t {
    const F: &str = "hetcclRecv";
    collective(F, comm, datatype, stream, |c, dt| {
        Ok(Kind::Recv {
            peer: rank_arg(F, "peer", peer, c.world_size)?,
            buf: buf_arg(F, "recvbuff", recvbuff, count, dt)?,
            count,
        })
    })
}

/// Opens a group on this thread: later calls are checked now and run at the matching
/// outermost `hetcclGroupEnd`. Groups nest.
#[no_mangle]
pub extern "C" fn hetcclGroupStart() -> hetcclResult_t {
    guard("hetcclGroupStart", || {
        group::start();
        Ok(())
    })
}

/// Closes a group; the outermost one runs the deferred calls (see [`group`]) and
/// returns when they are all done. If a call in the group failed, nothing runs and its
/// error is returned.
#[no_mangle]
pub extern "C" fn hetcclGroupEnd() -> hetcclResult_t {
    guard("hetcclGroupEnd", group::end)
}
