//! One C call as a checked, type-erased operation, and its execution on a
//! [`Communicator`](crate::Communicator) through the generic API.
//!
//! Checks that need only the call (NULL pointers, enum values, alignment, ranks) run
//! when the C function is called, also inside a group; what needs the peers (matching
//! counts and dtypes) is found by the communicator while the operation runs.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use super::handle::Entry;
use super::status::Failure;
use crate::dtype::{DataType, Element, ReduceOp};
use crate::error::{Error, Result};

/// `hetcclDataType_t` as passed through the ABI (a C enum is an `int`).
#[allow(non_camel_case_types)]
pub type hetcclDataType_t = c_int;
/// `hetcclRedOp_t` as passed through the ABI.
#[allow(non_camel_case_types)]
pub type hetcclRedOp_t = c_int;
/// `hetcclStream_t`: must be NULL (host buffers).
#[allow(non_camel_case_types)]
pub type hetcclStream_t = *mut c_void;

/// Every `hetcclDataType_t` enumerator with its value, aliases included; the values
/// are `DataType as u8`.
pub const DATATYPE_NAMES: &[(&str, DataType)] = &[
    ("hetcclInt8", DataType::I8),
    ("hetcclChar", DataType::I8),
    ("hetcclUint8", DataType::U8),
    ("hetcclInt32", DataType::I32),
    ("hetcclInt", DataType::I32),
    ("hetcclUint32", DataType::U32),
    ("hetcclInt64", DataType::I64),
    ("hetcclUint64", DataType::U64),
    ("hetcclFloat16", DataType::F16),
    ("hetcclHalf", DataType::F16),
    ("hetcclFloat32", DataType::F32),
    ("hetcclFloat", DataType::F32),
    ("hetcclFloat64", DataType::F64),
    ("hetcclDouble", DataType::F64),
    ("hetcclBfloat16", DataType::Bf16),
];
/// `hetcclNumTypes`.
pub const NUM_TYPES: c_int = 10;

/// Every `hetcclRedOp_t` enumerator with its value (`ReduceOp as u8`).
pub const REDOP_NAMES: &[(&str, ReduceOp)] = &[
    ("hetcclSum", ReduceOp::Sum),
    ("hetcclProd", ReduceOp::Prod),
    ("hetcclMax", ReduceOp::Max),
    ("hetcclMin", ReduceOp::Min),
    ("hetcclAvg", ReduceOp::Avg),
];
/// `hetcclNumOps`.
pub const NUM_OPS: c_int = 5;

/// A caller's buffer address. Only dereferenced while the C call that passed it (or
/// the `hetcclGroupEnd` that runs it) has not returned, which the API contract keeps
/// valid, as NCCL's does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ptr(pub *mut c_void);

// SAFETY: a `Ptr` is an address; the group runner moves it to a thread that uses it
// while the thread that owns the buffer is blocked in `hetcclGroupEnd`.
unsafe impl Send for Ptr {}
// SAFETY: shared `Ptr`s are only read (copied), never dereferenced through `&Ptr`.
unsafe impl Sync for Ptr {}

/// What a call asks for. Counts are in elements, as in the C call.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// `hetcclAllReduce`
    AllReduce {
        /// Send buffer (`count` elements).
        send: Ptr,
        /// Receive buffer (`count` elements).
        recv: Ptr,
        /// Elements.
        count: usize,
        /// Reduction.
        op: ReduceOp,
    },
    /// `hetcclReduceScatter`
    ReduceScatter {
        /// Send buffer (`nranks * recvcount` elements).
        send: Ptr,
        /// Receive buffer (`recvcount` elements).
        recv: Ptr,
        /// Elements per rank.
        recvcount: usize,
        /// Reduction.
        op: ReduceOp,
    },
    /// `hetcclAllGather`
    AllGather {
        /// Send buffer (`sendcount` elements).
        send: Ptr,
        /// Receive buffer (`nranks * sendcount` elements).
        recv: Ptr,
        /// Elements per rank.
        sendcount: usize,
    },
    /// `hetcclBroadcast`
    Broadcast {
        /// Root's source (ignored elsewhere).
        send: Ptr,
        /// Every rank's destination.
        recv: Ptr,
        /// Elements.
        count: usize,
        /// The root.
        root: usize,
    },
    /// `hetcclReduce`
    Reduce {
        /// Send buffer.
        send: Ptr,
        /// Root's receive buffer (ignored elsewhere).
        recv: Ptr,
        /// Elements.
        count: usize,
        /// Reduction.
        op: ReduceOp,
        /// The root.
        root: usize,
    },
    /// `hetcclSend`
    Send {
        /// Source.
        buf: Ptr,
        /// Elements.
        count: usize,
        /// Destination rank.
        peer: usize,
    },
    /// `hetcclRecv`
    Recv {
        /// Destination.
        buf: Ptr,
        /// Elements.
        count: usize,
        /// Source rank.
        peer: usize,
    },
}

/// A checked call, ready to run now or at `hetcclGroupEnd`.
#[derive(Clone)]
pub struct Op {
    /// The C function that made it (for messages).
    pub func: &'static str,
    /// Its communicator.
    pub comm: Arc<Entry>,
    /// Element type.
    pub dtype: DataType,
    /// What to do.
    pub kind: Kind,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?} {}", self.func, self.kind, self.dtype)
    }
}

/// Decodes a `hetcclDataType_t`.
pub fn dtype_arg(func: &'static str, v: hetcclDataType_t) -> Result<DataType, Failure> {
    u8::try_from(v)
        .ok()
        .and_then(DataType::from_u8)
        .ok_or_else(|| {
            Failure::invalid(
                func,
                format!(
                    "datatype {v} is not a hetcclDataType_t (valid values are 0 to {})",
                    NUM_TYPES - 1
                ),
            )
        })
}

/// Decodes a `hetcclRedOp_t`.
pub fn redop_arg(func: &'static str, v: hetcclRedOp_t) -> Result<ReduceOp, Failure> {
    u8::try_from(v)
        .ok()
        .and_then(ReduceOp::from_u8)
        .ok_or_else(|| {
            Failure::invalid(
                func,
                format!(
                    "op {v} is not a hetcclRedOp_t (valid values are 0 to {})",
                    NUM_OPS - 1
                ),
            )
        })
}

/// Why a non-NULL stream is refused, by build.
pub const STREAM_REFUSAL: &str = if cfg!(feature = "cuda") {
    "the host collectives take host buffers; device buffers and their CUDA stream go \
     through the hetcclDevice* calls (hetcclDeviceCommInit)"
} else {
    "this build of hetccl works on host buffers only, device buffers and CUDA streams need \
     hetccl built with the cuda feature (the hetcclDevice* calls)"
};

/// Refuses device streams: the host collectives move host memory only.
pub fn stream_arg(func: &'static str, s: hetcclStream_t) -> Result<(), Failure> {
    if s.is_null() {
        return Ok(());
    }
    Err(Failure::invalid(
        func,
        format!("stream {s:p} is not NULL; {STREAM_REFUSAL}"),
    ))
}

/// Checks a rank argument (`what` = "root" or "peer").
pub fn rank_arg(func: &'static str, what: &str, r: c_int, world: usize) -> Result<usize, Failure> {
    usize::try_from(r)
        .ok()
        .filter(|&r| r < world)
        .ok_or_else(|| {
            Failure::invalid(
                func,
                format!("{what} {r} is not a rank of this communicator (world size {world})"),
            )
        })
}

/// Checks that `name` can hold `count` elements of `dtype`: non-NULL unless empty,
/// aligned for the element type, and of a size the address space can hold.
pub fn buf_arg(
    func: &'static str,
    name: &str,
    p: *const c_void,
    count: usize,
    dtype: DataType,
) -> Result<Ptr, Failure> {
    if count == 0 {
        return Ok(Ptr(p as *mut c_void));
    }
    if p.is_null() {
        return Err(Failure::invalid(
            func,
            format!("{name} is NULL but count is {count}"),
        ));
    }
    let size = dtype.size();
    if !matches!(count.checked_mul(size), Some(b) if b <= isize::MAX as usize) {
        return Err(Failure::invalid(
            func,
            format!("{name}: {count} elements of {dtype} do not fit in memory"),
        ));
    }
    if (p as usize) % size != 0 {
        return Err(Failure::invalid(
            func,
            format!("{name} {p:p} is not aligned to {size} bytes, as {dtype} elements must be"),
        ));
    }
    Ok(Ptr(p as *mut c_void))
}

/// `count * nranks`, or an error naming the call.
pub fn times_ranks(func: &'static str, count: usize, nranks: usize) -> Result<usize, Failure> {
    count
        .checked_mul(nranks)
        .ok_or_else(|| Failure::invalid(func, format!("count {count} x {nranks} ranks overflows")))
}

/// # Safety
/// `p` must be valid for reads of `n` elements of `T` (any value when `n == 0`), and
/// nobody may write it while the slice lives.
unsafe fn slice<'a, T: Element>(p: Ptr, n: usize) -> &'a [T] {
    if n == 0 {
        return &[];
    }
    // SAFETY: the caller's contract; `buf_arg` checked non-NULL and alignment.
    unsafe { std::slice::from_raw_parts(p.0 as *const T, n) }
}

/// # Safety
/// `p` must be valid for writes of `n` elements of `T`, and no other reference to
/// that memory may be live while the slice lives.
unsafe fn slice_mut<'a, T: Element>(p: Ptr, n: usize) -> &'a mut [T] {
    if n == 0 {
        return &mut [];
    }
    // SAFETY: the caller's contract; `buf_arg` checked non-NULL and alignment.
    unsafe { std::slice::from_raw_parts_mut(p.0 as *mut T, n) }
}

/// True when the byte ranges `[a, a+alen)` and `[b, b+blen)` share a byte (an empty
/// range shares none).
pub(crate) fn overlaps(a: Ptr, alen: usize, b: Ptr, blen: usize) -> bool {
    let (a, b) = (a.0 as usize, b.0 as usize);
    alen > 0 && blen > 0 && a < b + blen && b < a + alen
}

/// `p` advanced by `bytes` (wrapping, so a negated count steps back), as an address
/// (never dereferenced here).
fn offset(p: Ptr, bytes: usize) -> Ptr {
    Ptr((p.0 as usize).wrapping_add(bytes) as *mut c_void)
}

/// Where a collective's two buffers lie, in bytes.
struct Layout {
    send: Ptr,
    send_len: usize,
    recv: Ptr,
    recv_len: usize,
    /// Where `send` starts when the call is in place (NCCL's layouts).
    in_place_send: Ptr,
}

impl Kind {
    /// The buffers of a two-buffer collective, for elements of `size` bytes, on `rank`
    /// of `nranks`; `None` for calls with one buffer.
    fn layout(&self, size: usize, rank: usize, nranks: usize) -> Option<Layout> {
        let l = |send, send_len, recv, recv_len, in_place_send| Layout {
            send,
            send_len,
            recv,
            recv_len,
            in_place_send,
        };
        match *self {
            Kind::AllReduce {
                send, recv, count, ..
            }
            | Kind::Reduce {
                send, recv, count, ..
            } => Some(l(send, count * size, recv, count * size, recv)),
            Kind::ReduceScatter {
                send,
                recv,
                recvcount,
                ..
            } => {
                // In place, recvbuff is this rank's block of sendbuff.
                let block = recvcount * size;
                let start = offset(recv, (rank * block).wrapping_neg());
                Some(l(send, block * nranks, recv, block, start))
            }
            Kind::AllGather {
                send,
                recv,
                sendcount,
            } => {
                // In place, sendbuff is this rank's block of recvbuff.
                let block = sendcount * size;
                Some(l(
                    send,
                    block,
                    recv,
                    block * nranks,
                    offset(recv, rank * block),
                ))
            }
            Kind::Broadcast { .. } | Kind::Send { .. } | Kind::Recv { .. } => None,
        }
    }

    /// Whether the call is in place: its send buffer lies where NCCL's in-place layout
    /// puts it (see [`Kind::check_layout`]).
    fn in_place(&self, size: usize, rank: usize, nranks: usize) -> bool {
        self.layout(size, rank, nranks)
            .is_some_and(|l| l.send == l.in_place_send)
    }

    /// Refuses send and receive buffers that share bytes without being in place:
    /// `recvbuff == sendbuff` (all-reduce, reduce), `recvbuff == sendbuff + rank *
    /// recvcount` (reduce-scatter), `sendbuff == recvbuff + rank * sendcount`
    /// (all-gather). Any other overlap would have the call read what it already
    /// overwrote (NCCL leaves it undefined). A reduce's receive buffer counts on the
    /// root only.
    pub fn check_layout(
        &self,
        func: &'static str,
        size: usize,
        rank: usize,
        nranks: usize,
    ) -> Result<(), Failure> {
        let Some(l) = self.layout(size, rank, nranks) else {
            return Ok(());
        };
        let ignored_recv = matches!(self, Kind::Reduce { root, .. } if *root != rank);
        if ignored_recv
            || l.send == l.in_place_send
            || !overlaps(l.send, l.send_len, l.recv, l.recv_len)
        {
            return Ok(());
        }
        let range = |p: Ptr, len: usize| format!("[{:p}, {:p})", p.0, offset(p, len).0);
        let want = match self {
            Kind::ReduceScatter { .. } => format!(
                "in place, recvbuff must be sendbuff + rank x recvcount elements \
                 (here {:p})",
                offset(l.send, rank * l.recv_len).0
            ),
            Kind::AllGather { .. } => format!(
                "in place, sendbuff must be recvbuff + rank x sendcount elements \
                 (here {:p})",
                l.in_place_send.0
            ),
            _ => "in place, sendbuff must equal recvbuff".to_string(),
        };
        Err(Failure::invalid(
            func,
            format!(
                "sendbuff {} and recvbuff {} overlap; {want}",
                range(l.send, l.send_len),
                range(l.recv, l.recv_len)
            ),
        ))
    }
}

impl Op {
    /// Runs the operation to completion (blocking).
    ///
    /// # Safety
    /// The buffers must be what the C caller promised: valid for the counts given,
    /// unchanged by anyone else until this returns.
    pub unsafe fn run(&self) -> Result<()> {
        // SAFETY: forwarded contract.
        crate::dispatch_dtype!(self.dtype, T => unsafe { self.run_typed::<T>() })
    }

    /// # Safety
    /// As [`Op::run`].
    unsafe fn run_typed<T: Element>(&self) -> Result<()> {
        let c = &self.comm.comm;
        let n = c.world_size();
        let in_place = self.kind.in_place(std::mem::size_of::<T>(), c.rank(), n);
        // SAFETY (every block below): the buffers are valid per the caller's contract,
        // and `check_layout` refused send and receive ranges that overlap without being
        // in place, so no `&[T]` and `&mut [T]` to the same memory are ever live together.
        unsafe {
            match self.kind {
                Kind::AllReduce {
                    send,
                    recv,
                    count,
                    op,
                } => {
                    if in_place {
                        return c.all_reduce(slice_mut::<T>(recv, count), op);
                    }
                    c.all_reduce_into(slice::<T>(send, count), slice_mut(recv, count), op)
                }
                Kind::ReduceScatter {
                    send,
                    recv,
                    recvcount,
                    op,
                } => {
                    let total = recvcount * n;
                    if in_place {
                        return c.reduce_scatter_in_place(slice_mut::<T>(send, total), op);
                    }
                    c.reduce_scatter(slice::<T>(send, total), slice_mut(recv, recvcount), op)
                }
                Kind::AllGather {
                    send,
                    recv,
                    sendcount,
                } => {
                    let total = sendcount * n;
                    if in_place {
                        return c.all_gather_in_place(slice_mut::<T>(recv, total));
                    }
                    c.all_gather(slice::<T>(send, sendcount), slice_mut(recv, total))
                }
                Kind::Broadcast {
                    send,
                    recv,
                    count,
                    root,
                } => {
                    if c.rank() == root && send != recv && count > 0 {
                        // `copy`, not `copy_nonoverlapping`: the ranges may overlap.
                        std::ptr::copy(send.0 as *const T, recv.0 as *mut T, count);
                    }
                    c.broadcast(slice_mut::<T>(recv, count), root)
                }
                Kind::Reduce {
                    send,
                    recv,
                    count,
                    op,
                    root,
                } => {
                    if c.rank() != root {
                        return c.reduce(slice::<T>(send, count), &mut [], op, root);
                    }
                    if in_place {
                        return c.reduce_in_place(slice_mut::<T>(recv, count), op, root);
                    }
                    c.reduce(slice::<T>(send, count), slice_mut(recv, count), op, root)
                }
                Kind::Send { buf, count, peer } => c.send(slice::<T>(buf, count), peer),
                Kind::Recv { buf, count, peer } => c.recv(slice_mut::<T>(buf, count), peer),
            }
        }
    }

    /// Peer of a point-to-point operation, `None` for collectives.
    pub fn p2p_peer(&self) -> Option<(usize, bool)> {
        match self.kind {
            Kind::Send { peer, .. } => Some((peer, true)),
            Kind::Recv { peer, .. } => Some((peer, false)),
            _ => None,
        }
    }
}

/// Copies a send to this rank into the matching receive from this rank (in a group).
///
/// # Safety
/// As [`Op::run`], for both operations.
pub unsafe fn self_copy(send: &Op, recv: &Op) -> Result<()> {
    let (
        Kind::Send {
            buf: s, count: sc, ..
        },
        Kind::Recv {
            buf: r, count: rc, ..
        },
    ) = (send.kind, recv.kind)
    else {
        return Err(Error::invalid(
            "hetcclGroupEnd",
            "self_copy needs a send and a receive",
        ));
    };
    if sc != rc || send.dtype != recv.dtype {
        return Err(Error::invalid(
            "hetcclGroupEnd",
            format!(
                "a send of {sc} x {} to this rank is matched with a receive of {rc} x {} from \
                 it; counts and datatypes must be equal",
                send.dtype, recv.dtype
            ),
        ));
    }
    if sc > 0 {
        // SAFETY: both buffers hold `sc` elements (checked at call time); `copy`
        // tolerates overlap.
        unsafe { std::ptr::copy(s.0 as *const u8, r.0 as *mut u8, sc * send.dtype.size()) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_arguments_are_decoded_or_refused() {
        assert_eq!(dtype_arg("f", 7).unwrap(), DataType::F32);
        assert_eq!(
            dtype_arg("hetcclAllReduce", 42).unwrap_err().message,
            "invalid argument to hetcclAllReduce: datatype 42 is not a hetcclDataType_t (valid values are 0 to 9)"
        );
        assert_eq!(
            dtype_arg("f", -1).unwrap_err().message,
            "invalid argument to f: datatype -1 is not a hetcclDataType_t (valid values are 0 to 9)"
        );
        assert_eq!(redop_arg("f", 4).unwrap(), ReduceOp::Avg);
        assert_eq!(
            redop_arg("f", 5).unwrap_err().message,
            "invalid argument to f: op 5 is not a hetcclRedOp_t (valid values are 0 to 4)"
        );
    }

    #[test]
    fn buffers_are_checked_for_null_alignment_and_size() {
        assert!(buf_arg("f", "sendbuff", std::ptr::null(), 0, DataType::F32).is_ok());
        assert_eq!(
            buf_arg("f", "sendbuff", std::ptr::null(), 3, DataType::F32)
                .unwrap_err()
                .message,
            "invalid argument to f: sendbuff is NULL but count is 3"
        );
        let words = [0u64; 2];
        let odd = (words.as_ptr() as *const u8).wrapping_add(2) as *const c_void;
        let e = buf_arg("f", "recvbuff", odd, 1, DataType::F32)
            .unwrap_err()
            .message;
        assert_eq!(
            e,
            format!("invalid argument to f: recvbuff {odd:p} is not aligned to 4 bytes, as f32 elements must be")
        );
        assert!(buf_arg("f", "recvbuff", odd, 1, DataType::F16).is_ok());
        let e = buf_arg(
            "f",
            "b",
            words.as_ptr().cast(),
            usize::MAX / 2,
            DataType::F64,
        )
        .unwrap_err()
        .message;
        assert!(e.ends_with("elements of f64 do not fit in memory"), "{e}");
    }

    #[test]
    fn overlap_is_exact_at_the_edges() {
        let p = |a: usize| Ptr(a as *mut c_void);
        assert!(!overlaps(p(100), 8, p(108), 8));
        assert!(overlaps(p(100), 9, p(108), 8));
        assert!(!overlaps(p(100), 0, p(100), 8));
        assert!(overlaps(p(116), 4, p(100), 32));
    }

    #[test]
    fn nccl_in_place_layouts_run_in_place_and_other_overlaps_are_refused() {
        let p = |a: usize| Ptr(a as *mut c_void);
        let op = ReduceOp::Sum;
        // Rank 2 of 4, f32 (4 bytes), 8 elements per block (32 bytes).
        let (size, rank, n) = (4, 2, 4);
        let check = |k: Kind| {
            k.check_layout("f", size, rank, n)
                .map(|()| k.in_place(size, rank, n))
                .map_err(|e| e.message)
        };
        let rs = |send, recv| Kind::ReduceScatter {
            send: p(send),
            recv: p(recv),
            recvcount: 8,
            op,
        };
        assert_eq!(check(rs(0x1000, 0x1040)), Ok(true));
        assert_eq!(check(rs(0x1000, 0x2000)), Ok(false));
        assert_eq!(
            check(rs(0x1000, 0x1020)),
            Err(
                "invalid argument to f: sendbuff [0x1000, 0x1080) and recvbuff [0x1020, 0x1040) \
                 overlap; in place, recvbuff must be sendbuff + rank x recvcount elements \
                 (here 0x1040)"
                    .into()
            )
        );
        let ag = |send, recv| Kind::AllGather {
            send: p(send),
            recv: p(recv),
            sendcount: 8,
        };
        assert_eq!(check(ag(0x1040, 0x1000)), Ok(true));
        assert_eq!(check(ag(0x2000, 0x1000)), Ok(false));
        assert_eq!(
            check(ag(0x1000, 0x1000)),
            Err(
                "invalid argument to f: sendbuff [0x1000, 0x1020) and recvbuff [0x1000, 0x1080) \
                 overlap; in place, sendbuff must be recvbuff + rank x sendcount elements \
                 (here 0x1040)"
                    .into()
            )
        );
        let ar = |send, recv| Kind::AllReduce {
            send: p(send),
            recv: p(recv),
            count: 8,
            op,
        };
        assert_eq!(check(ar(0x1000, 0x1000)), Ok(true));
        assert_eq!(check(ar(0x1000, 0x1020)), Ok(false));
        assert_eq!(
            check(ar(0x1000, 0x1004)),
            Err(
                "invalid argument to f: sendbuff [0x1000, 0x1020) and recvbuff [0x1004, 0x1024) \
                 overlap; in place, sendbuff must equal recvbuff"
                    .into()
            )
        );
        let reduce = |root, recv| Kind::Reduce {
            send: p(0x1000),
            recv: p(recv),
            count: 8,
            op,
            root,
        };
        assert_eq!(check(reduce(rank, 0x1000)), Ok(true));
        assert!(check(reduce(rank, 0x1010)).is_err());
        // Off the root the receive buffer is ignored.
        assert_eq!(check(reduce(0, 0x1010)), Ok(false));
        // Empty buffers overlap nothing.
        assert_eq!(
            check(Kind::AllReduce {
                send: p(0x1000),
                recv: p(0x1000),
                count: 0,
                op
            }),
            Ok(true)
        );
    }
}
