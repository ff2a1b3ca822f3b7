//! The C API's device collectives: `hetcclDeviceComm_t`, made on a host communicator for
//! one GPU of the process, and the collectives on device buffers of that GPU, ordered on
//! the caller's CUDA stream as NCCL's are.
//!
//! Every rank makes one (`hetcclDeviceCommInit`) and then makes the same device calls in
//! the same order; they run their agreement through the host communicator, so they are
//! ordered with the host collectives on it as well. A call starts after the work queued
//! on its `stream` before the call (NULL: the legacy default stream), work queued there
//! afterwards waits for it, and, like the host calls, it returns once the result is in
//! the receive buffer. Each buffer is checked against the communicator's device and the
//! allocation it lies in, so a count larger than a buffer is refused: on every rank, this
//! one naming the buffer and its size and the others naming this rank, as with any call a
//! rank refuses. The reductions take float32, float16 and bfloat16 (computed
//! in f32, rounded once); broadcast and all-gather move every datatype. Device calls are
//! not part of groups: inside `hetcclGroupStart` / `hetcclGroupEnd` they are refused.
//!
//! In a build without the `cuda` feature every function is there and fails with
//! `hetcclUnhandledCudaError`, saying so.

use std::ffi::{c_int, c_void};

use super::group;
use super::handle::{self, hetcclComm_t, Registry};
#[cfg(feature = "cuda")]
use super::ops::{dtype_arg, rank_arg, redop_arg};
use super::ops::{hetcclDataType_t, hetcclRedOp_t, hetcclStream_t};
use super::status::{guard, hetcclResult_t, Failure};
#[cfg(feature = "cuda")]
use crate::dtype::DataType;

/// The opaque type behind `hetcclDeviceComm_t` (never instantiated).
#[allow(non_camel_case_types)]
#[repr(C)]
pub struct hetcclDeviceComm {
    _opaque: [u8; 0],
}

/// `hetcclDeviceComm_t`: a device communicator handle as C sees it (a token, like
/// `hetcclComm_t`).
#[allow(non_camel_case_types)]
pub type hetcclDeviceComm_t = *mut hetcclDeviceComm;

#[cfg(feature = "cuda")]
mod live {
    use std::sync::Mutex;

    use crate::device::{Device, DeviceComm, Stream};

    /// A device communicator with the device it was opened on and hetccl's own stream
    /// there, on which its collectives run.
    pub(super) struct Live {
        pub(super) comm: DeviceComm,
        pub(super) device: Device,
        pub(super) stream: Stream,
    }

    pub(super) type Slot = Mutex<Live>;
}
#[cfg(not(feature = "cuda"))]
mod live {
    /// Never made: without the `cuda` feature no device communicator exists.
    pub(super) enum Slot {}
}

static LIVE: Registry<live::Slot> = Registry::new("device communicator");

/// Number of live device communicators (tests check destroy releases them).
pub fn live_count() -> usize {
    LIVE.len()
}

/// The refusal of device calls inside a group.
fn not_in_group(func: &'static str) -> Result<(), Failure> {
    if group::active() {
        return Err(Failure::usage(
            func,
            "device calls cannot be part of a group; call it outside hetcclGroupStart / \
             hetcclGroupEnd",
        ));
    }
    Ok(())
}

/// Why this build has no device collectives, as the failure of `func`.
#[cfg(not(feature = "cuda"))]
fn no_cuda(func: &'static str) -> Failure {
    crate::error::Error::Device {
        op: func.to_string(),
        detail: crate::device::available().err().unwrap_or_default(),
    }
    .into()
}

/// Makes a device communicator over `comm` for CUDA device `device` of this process
/// (its primary context, the one the CUDA runtime uses). Every rank calls it; it
/// exchanges nothing yet. Destroy it (`hetcclDeviceCommDestroy`) before `comm`.
///
/// # Safety
/// `dcomm` must be NULL or point at a writable `hetcclDeviceComm_t`.
#[no_mangle]
pub unsafe extern "C" fn hetcclDeviceCommInit(
    dcomm: *mut hetcclDeviceComm_t,
    comm: hetcclComm_t,
    device: c_int,
) -> hetcclResult_t {
    const F: &str = "hetcclDeviceCommInit";
    guard(F, || {
        if dcomm.is_null() {
            return Err(Failure::invalid(F, "dcomm is NULL"));
        }
        not_in_group(F)?;
        let c = handle::lookup(F, comm)?;
        let ordinal = usize::try_from(device)
            .map_err(|_| Failure::invalid(F, format!("device {device} is negative")))?;
        #[cfg(feature = "cuda")]
        {
            use crate::device::{Device, DeviceComm};
            let dev = Device::open(ordinal)?;
            let stream = dev.new_stream()?;
            let dc = DeviceComm::new(c.comm.clone(), &dev)?;
            let token = LIVE.insert(std::sync::Mutex::new(live::Live {
                comm: dc,
                device: dev,
                stream,
            }));
            tracing::debug!(target: "hetccl::capi", rank = c.rank, device = ordinal,
                            "device communicator {:p} made", token as *const u8);
            // SAFETY: non-NULL; the caller promises a writable handle.
            unsafe { dcomm.write(token as hetcclDeviceComm_t) };
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (c, ordinal);
            Err(no_cuda(F))
        }
    })
}

/// Releases a device communicator and its device resources. The handle is invalid
/// afterwards; calls still running on other threads finish first.
#[no_mangle]
pub extern "C" fn hetcclDeviceCommDestroy(dcomm: hetcclDeviceComm_t) -> hetcclResult_t {
    const F: &str = "hetcclDeviceCommDestroy";
    guard(F, || {
        LIVE.remove(F, "dcomm", dcomm as usize)?;
        Ok(())
    })
}

/// The arguments every device collective shares, checked, and the communicator's size.
#[cfg(feature = "cuda")]
struct Args {
    func: &'static str,
    dtype: DataType,
    stream: hetcclStream_t,
    slot: std::sync::Arc<live::Slot>,
    world_size: usize,
}

#[cfg(feature = "cuda")]
fn args(
    func: &'static str,
    dcomm: hetcclDeviceComm_t,
    datatype: hetcclDataType_t,
    stream: hetcclStream_t,
) -> Result<Args, Failure> {
    not_in_group(func)?;
    let slot = LIVE.lookup(func, "dcomm", dcomm as usize)?;
    let dtype = dtype_arg(func, datatype)?;
    let world_size = slot
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .comm
        .world_size();
    Ok(Args {
        func,
        dtype,
        stream,
        slot,
        world_size,
    })
}

/// A reduction's op, checked, and its datatype, which the GPU reductions must take.
#[cfg(feature = "cuda")]
fn reduction(a: &Args, op: hetcclRedOp_t) -> Result<crate::dtype::ReduceOp, Failure> {
    let op = redop_arg(a.func, op)?;
    reducible(a.func, a.dtype)?;
    Ok(op)
}

/// A reduction's datatype: the GPU reductions take float32, float16 and bfloat16.
#[cfg(feature = "cuda")]
fn reducible(func: &'static str, dtype: DataType) -> Result<(), Failure> {
    match dtype {
        DataType::F32 | DataType::F16 | DataType::Bf16 => Ok(()),
        other => Err(Failure::invalid(
            func,
            format!("device reductions take f32, f16 and bf16, not {other}"),
        )),
    }
}

/// Why two buffers (of `sb` and `rb` bytes) may not be used together: they overlap
/// without being the same buffer (in place).
#[cfg(feature = "cuda")]
fn overlap(send: *const c_void, recv: *const c_void, sb: usize, rb: usize) -> Option<String> {
    use super::ops::{overlaps, Ptr};
    let (s, r) = (Ptr(send as *mut c_void), Ptr(recv as *mut c_void));
    (send != recv && overlaps(s, sb, r, rb)).then(|| {
        format!(
            "sendbuff {send:p} ({sb} bytes) and recvbuff {recv:p} ({rb} bytes) overlap \
             without being the same buffer"
        )
    })
}

/// Runs `$body` with `$T` the Rust type of a reduction's datatype (float32, float16,
/// bfloat16; the caller has checked it with [`reducible`]).
#[cfg(feature = "cuda")]
macro_rules! reducing {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DataType::F16 => {
                type $T = half::f16;
                $body
            }
            DataType::Bf16 => {
                type $T = half::bf16;
                $body
            }
            _ => {
                type $T = f32;
                $body
            }
        }
    };
}

#[cfg(feature = "cuda")]
mod run {
    //! The typed bodies: each wraps the caller's pointers and runs the
    //! [`DeviceComm`](crate::device::DeviceComm) collective on them. A buffer that fails
    //! its checks makes this rank refuse the call in the agreement every call starts
    //! with, so every rank fails, not only this one.
    use std::ffi::c_void;

    use super::{overlap, Args, Failure};
    use crate::algorithm::Call;
    use crate::device::{
        DeviceComm, DeviceRepr, DeviceSlice, ForeignBuf, ForeignStream, GpuElement, Stream,
    };
    use crate::dtype::{CollectiveOp, Element, ReduceOp};
    use crate::error::{Error, Result};

    /// Where a call runs: the device communicator and hetccl's stream.
    pub(super) struct On<'a> {
        comm: &'a mut DeviceComm,
        stream: &'a Stream,
        func: &'static str,
    }

    /// Locks the device communicator and runs `f` on hetccl's stream, ordered with the
    /// caller's stream.
    pub(super) fn on_stream(a: &Args, f: impl FnOnce(On<'_>) -> Result<()>) -> Result<(), Failure> {
        let mut guard = a.slot.lock().unwrap_or_else(|p| p.into_inner());
        let live = &mut *guard;
        // SAFETY: the C API's contract: the stream is NULL or a live stream of the
        // communicator's device, alive until the call returns.
        let theirs = unsafe { ForeignStream::new(&live.device, a.stream) };
        let comm = &mut live.comm;
        theirs
            .around(&live.stream, |stream| {
                f(On {
                    comm,
                    stream,
                    func: a.func,
                })
            })
            .map_err(Failure::from)
    }

    /// Two checked buffers of `T`: what a call reads and what it writes.
    type Pair<T> = (ForeignBuf<T>, ForeignBuf<T>);

    impl On<'_> {
        /// The call's buffers: `send` of `sn` and `recv` of `rn` elements, checked
        /// against their allocations and against overlapping (unless the same); on a
        /// failure this rank refuses `call` in the agreement.
        ///
        /// # Safety
        /// The C API's contract on the buffers: valid until the call returns.
        unsafe fn bufs<T>(
            &mut self,
            call: Call,
            (send, sn): (*const c_void, usize),
            (recv, rn): (*const c_void, usize),
        ) -> Result<Pair<T>> {
            let checked = (|| {
                // SAFETY (both): forwarded.
                let s = unsafe {
                    ForeignBuf::new(self.stream, self.func, "sendbuff", send as u64, sn)
                }?;
                let r = unsafe {
                    ForeignBuf::new(self.stream, self.func, "recvbuff", recv as u64, rn)
                }?;
                // Both sizes fit (ForeignBuf::new checked them).
                if let Some(why) = overlap(send, recv, s.num_bytes(), r.num_bytes()) {
                    return Err(Error::invalid(self.func, why));
                }
                Ok((s, r))
            })();
            checked.map_err(|e| self.comm.refuse(call, e))
        }

        /// # Safety
        /// The C API's contract on the buffers.
        pub(super) unsafe fn all_reduce<T: GpuElement>(
            mut self,
            send: *const c_void,
            recv: *mut c_void,
            count: usize,
            op: ReduceOp,
        ) -> Result<()> {
            let call = Call::new(CollectiveOp::AllReduce, T::DTYPE, count).with_redop(op);
            // SAFETY: forwarded.
            let (s, mut r) = unsafe { self.bufs::<T>(call, (send, count), (recv, count)) }?;
            if std::ptr::eq(send, recv) {
                return self.comm.all_reduce(self.stream, &mut r, op);
            }
            self.comm.all_reduce_into(self.stream, &s, &mut r, op)
        }

        /// # Safety
        /// The C API's contract on the buffers (`recv` only on the root).
        pub(super) unsafe fn reduce<T: GpuElement>(
            mut self,
            send: *const c_void,
            recv: *mut c_void,
            count: usize,
            op: ReduceOp,
            root: usize,
        ) -> Result<()> {
            let call = Call::new(CollectiveOp::Reduce, T::DTYPE, count)
                .with_redop(op)
                .with_root(root);
            let kept = if self.comm.rank() == root { count } else { 0 };
            // SAFETY: forwarded.
            let (s, mut r) = unsafe { self.bufs::<T>(call, (send, count), (recv, kept)) }?;
            self.comm.reduce(self.stream, &s, &mut r, op, root)
        }

        /// # Safety
        /// The C API's contract on the buffers.
        pub(super) unsafe fn reduce_scatter<T: GpuElement>(
            mut self,
            send: *const c_void,
            recv: *mut c_void,
            recvcount: usize,
            op: ReduceOp,
        ) -> Result<()> {
            let call = Call::new(CollectiveOp::ReduceScatter, T::DTYPE, recvcount).with_redop(op);
            let whole = recvcount * self.comm.world_size();
            // SAFETY: forwarded.
            let (s, mut r) = unsafe { self.bufs::<T>(call, (send, whole), (recv, recvcount)) }?;
            self.comm.reduce_scatter(self.stream, &s, &mut r, op)
        }

        /// # Safety
        /// The C API's contract on the buffers (`send` only on the root).
        pub(super) unsafe fn broadcast<T: Element + DeviceRepr>(
            mut self,
            send: *const c_void,
            recv: *mut c_void,
            count: usize,
            root: usize,
        ) -> Result<()> {
            let call = Call::new(CollectiveOp::Broadcast, T::DTYPE, count).with_root(root);
            let copy = self.comm.rank() == root && !std::ptr::eq(send, recv);
            let sent = if copy { count } else { 0 };
            // SAFETY: forwarded.
            let (s, mut r) = unsafe { self.bufs::<T>(call, (send, sent), (recv, count)) }?;
            if copy {
                self.stream.copy(&s, &mut r)?;
            }
            self.comm.broadcast(self.stream, &mut r, root)
        }

        /// # Safety
        /// The C API's contract on the buffers.
        pub(super) unsafe fn all_gather<T: Element + DeviceRepr>(
            mut self,
            send: *const c_void,
            recv: *mut c_void,
            sendcount: usize,
        ) -> Result<()> {
            let call = Call::new(CollectiveOp::AllGather, T::DTYPE, sendcount);
            let whole = sendcount * self.comm.world_size();
            // SAFETY: forwarded.
            let (s, mut r) = unsafe { self.bufs::<T>(call, (send, sendcount), (recv, whole)) }?;
            self.comm.all_gather(self.stream, &s, &mut r)
        }
    }
}

/// `count * n`, or the overflow named.
#[cfg(feature = "cuda")]
fn times(func: &'static str, count: usize, n: usize) -> Result<usize, Failure> {
    super::ops::times_ranks(func, count, n)
}

/// Device all-reduce: `recvbuff` becomes the reduction of every rank's `sendbuff`
/// (`count` elements each; in place when the two are the same).
///
/// # Safety
/// Both buffers must be device memory of the communicator's GPU holding `count`
/// elements, valid and untouched by other work until the call returns; `stream` NULL
/// or a live stream of that device.
#[no_mangle]
pub unsafe extern "C" fn hetcclDeviceAllReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: hetcclDataType_t,
    op: hetcclRedOp_t,
    dcomm: hetcclDeviceComm_t,
    stream: hetcclStream_t,
) -> hetcclResult_t {
    const F: &str = "hetcclDeviceAllReduce";
    guard(F, || {
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (sendbuff, recvbuff, count, datatype, op, dcomm, stream);
            Err(no_cuda(F))
        }
        #[cfg(feature = "cuda")]
        {
            let a = args(F, dcomm, datatype, stream)?;
            let op = reduction(&a, op)?;
            times(F, count, a.dtype.size())?;
            // SAFETY: the caller's contract on the buffers.
            run::on_stream(
                &a,
                |on| reducing!(a.dtype, T => unsafe { on.all_reduce::<T>(sendbuff, recvbuff, count, op) }),
            )
        }
    })
}

/// Device broadcast: every rank's `recvbuff` becomes `root`'s `sendbuff` (`count`
/// elements; in place when the two are the same; `sendbuff` is read on the root only).
///
/// # Safety
/// As [`hetcclDeviceAllReduce`] (`sendbuff` on the root only).
#[no_mangle]
pub unsafe extern "C" fn hetcclDeviceBroadcast(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: hetcclDataType_t,
    root: c_int,
    dcomm: hetcclDeviceComm_t,
    stream: hetcclStream_t,
) -> hetcclResult_t {
    const F: &str = "hetcclDeviceBroadcast";
    guard(F, || {
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (sendbuff, recvbuff, count, datatype, root, dcomm, stream);
            Err(no_cuda(F))
        }
        #[cfg(feature = "cuda")]
        {
            let a = args(F, dcomm, datatype, stream)?;
            let n = a.world_size;
            let root = rank_arg(F, "root", root, n)?;
            times(F, count, a.dtype.size())?;
            // SAFETY: the caller's contract on the buffers.
            run::on_stream(&a, |on| {
                crate::dispatch_dtype!(a.dtype, T => unsafe {
                    on.broadcast::<T>(sendbuff, recvbuff, count, root)
                })
            })
        }
    })
}

/// Device reduce: `root`'s `recvbuff` becomes the reduction of every rank's `sendbuff`
/// (`count` elements each); the other ranks' `recvbuff` is not touched and may be NULL.
///
/// # Safety
/// As [`hetcclDeviceAllReduce`] (`recvbuff` on the root only).
#[no_mangle]
pub unsafe extern "C" fn hetcclDeviceReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: hetcclDataType_t,
    op: hetcclRedOp_t,
    root: c_int,
    dcomm: hetcclDeviceComm_t,
    stream: hetcclStream_t,
) -> hetcclResult_t {
    const F: &str = "hetcclDeviceReduce";
    guard(F, || {
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (sendbuff, recvbuff, count, datatype, op, root, dcomm, stream);
            Err(no_cuda(F))
        }
        #[cfg(feature = "cuda")]
        {
            let a = args(F, dcomm, datatype, stream)?;
            let op = reduction(&a, op)?;
            let n = a.world_size;
            let root = rank_arg(F, "root", root, n)?;
            times(F, count, a.dtype.size())?;
            // SAFETY: the caller's contract on the buffers.
            run::on_stream(&a, |on| {
                reducing!(a.dtype, T => unsafe {
                    on.reduce::<T>(sendbuff, recvbuff, count, op, root)
                })
            })
        }
    })
}

/// Device all-gather: rank `q`'s `sendbuff` (`sendcount` elements) lands at elements
/// `[q * sendcount, (q + 1) * sendcount)` of every rank's `recvbuff`.
///
/// # Safety
/// As [`hetcclDeviceAllReduce`], `recvbuff` holding `sendcount` times the number of
/// ranks.
#[no_mangle]
pub unsafe extern "C" fn hetcclDeviceAllGather(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    sendcount: usize,
    datatype: hetcclDataType_t,
    dcomm: hetcclDeviceComm_t,
    stream: hetcclStream_t,
) -> hetcclResult_t {
    const F: &str = "hetcclDeviceAllGather";
    guard(F, || {
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (sendbuff, recvbuff, sendcount, datatype, dcomm, stream);
            Err(no_cuda(F))
        }
        #[cfg(feature = "cuda")]
        {
            let a = args(F, dcomm, datatype, stream)?;
            let n = a.world_size;
            times(F, times(F, sendcount, a.dtype.size())?, n)?;
            // SAFETY: the caller's contract on the buffers.
            run::on_stream(&a, |on| {
                crate::dispatch_dtype!(a.dtype, T => unsafe {
                    on.all_gather::<T>(sendbuff, recvbuff, sendcount)
                })
            })
        }
    })
}

/// Device reduce-scatter: `sendbuff` holds one block of `recvcount` elements per rank,
/// and rank `r`'s `recvbuff` becomes block `r` reduced over every rank.
///
/// # Safety
/// As [`hetcclDeviceAllReduce`], `sendbuff` holding `recvcount` times the number of
/// ranks.
#[no_mangle]
pub unsafe extern "C" fn hetcclDeviceReduceScatter(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    recvcount: usize,
    datatype: hetcclDataType_t,
    op: hetcclRedOp_t,
    dcomm: hetcclDeviceComm_t,
    stream: hetcclStream_t,
) -> hetcclResult_t {
    const F: &str = "hetcclDeviceReduceScatter";
    guard(F, || {
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (sendbuff, recvbuff, recvcount, datatype, op, dcomm, stream);
            Err(no_cuda(F))
        }
        #[cfg(feature = "cuda")]
        {
            let a = args(F, dcomm, datatype, stream)?;
            let op = reduction(&a, op)?;
            let n = a.world_size;
            times(F, times(F, recvcount, a.dtype.size())?, n)?;
            // SAFETY: the caller's contract on the buffers.
            run::on_stream(&a, |on| {
                reducing!(a.dtype, T => unsafe {
                    on.reduce_scatter::<T>(sendbuff, recvbuff, recvcount, op)
                })
            })
        }
    })
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;

    #[test]
    fn buffers_may_be_the_same_or_apart_but_not_overlap() {
        let p = |a: usize| a as *const c_void;
        assert_eq!(overlap(p(0x1000), p(0x1000), 64, 64), None, "in place");
        assert_eq!(overlap(p(0x1000), p(0x1040), 64, 64), None, "adjacent");
        assert_eq!(
            overlap(p(0x1040), p(0x1000), 64, 64),
            None,
            "adjacent, other order"
        );
        assert_eq!(
            overlap(p(0x1000), p(0), 64, 0),
            None,
            "an empty NULL recvbuff"
        );
        assert_eq!(
            overlap(p(0x1000), p(0x1020), 64, 0),
            None,
            "an empty recvbuff inside sendbuff"
        );
        assert_eq!(
            overlap(p(0x1000), p(0x1020), 64, 64).as_deref(),
            Some(
                "sendbuff 0x1000 (64 bytes) and recvbuff 0x1020 (64 bytes) overlap without \
                 being the same buffer"
            )
        );
        // NCCL's in-place all-gather layout (send inside recv) is refused here.
        assert!(overlap(p(0x1040), p(0x1000), 64, 128).is_some());
    }

    #[test]
    fn reductions_take_the_float_types_of_the_kernels() {
        for ok in [DataType::F32, DataType::F16, DataType::Bf16] {
            assert_eq!(reducible("f", ok), Ok(()));
        }
        let e = reducible("hetcclDeviceAllReduce", DataType::I64).unwrap_err();
        assert_eq!(e.code, hetcclResult_t::hetcclInvalidArgument);
        assert_eq!(
            e.message,
            "invalid argument to hetcclDeviceAllReduce: device reductions take f32, f16 and \
             bf16, not i64"
        );
    }
}
