//! The caller's own device memory and streams: collectives on buffers hetccl did not
//! allocate (the C API's device calls, a framework's tensors).
//!
//! A [`ForeignBuf`] is a raw device address and an element count, checked when it is
//! made against the device and against the allocation the address lies in (where the
//! driver reports one, as for `cudaMalloc` memory), so a count larger than the buffer
//! is refused with the buffer's size instead of overwriting whatever follows it. It implements cudarc's `DevicePtr` and `DevicePtrMut`, so every
//! [`DeviceComm`](super::DeviceComm) collective takes it as it takes a `CudaSlice`.
//!
//! A [`ForeignStream`] orders a collective, which runs on hetccl's own stream, with the
//! caller's: the collective starts after the work the caller queued on its stream before
//! the call, and work the caller queues there afterwards starts after the collective.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};

use super::context::{Device, Stream};
use super::driver::{self, device_error, DeviceAddr};
use crate::error::{Error, Result};

/// `len` elements of `T` in device memory the caller owns.
pub struct ForeignBuf<T> {
    addr: DeviceAddr,
    len: usize,
    stream: Arc<CudaStream>,
    _elem: PhantomData<*const T>,
}

impl<T> ForeignBuf<T> {
    /// `len` elements at `addr`, to be used on `stream` (hetccl's stream of the device
    /// the memory must lie on). `func` and `what` name the call and the argument in
    /// errors ("hetcclDeviceAllReduce", "recvbuff"). An empty buffer may be NULL and is
    /// not looked up.
    ///
    /// # Safety
    /// The memory must stay allocated until the collective it is given to has returned,
    /// and nothing else may write it (or, for a buffer the collective writes, read it)
    /// meanwhile.
    pub unsafe fn new(
        stream: &Stream,
        func: &'static str,
        what: &str,
        addr: u64,
        len: usize,
    ) -> Result<ForeignBuf<T>> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error::invalid(func, format!("{what}: {len} elements overflow")))?;
        if bytes > 0 {
            if addr == 0 {
                return Err(Error::invalid(func, format!("{what} is NULL")));
            }
            let align = std::mem::align_of::<T>() as u64;
            if addr % align != 0 {
                return Err(Error::invalid(
                    func,
                    format!("{what} ({addr:#x}) is not aligned to {align} bytes"),
                ));
            }
            let ctx = stream.cuda().context();
            ctx.bind_to_thread().map_err(device_error("bind context"))?;
            let (ordinal, range) = driver::placement_of(addr).map_err(|e| {
                Error::invalid(
                    func,
                    format!("{what} ({addr:#x}) is not device memory of this process ({e})"),
                )
            })?;
            let device = ctx.ordinal();
            if usize::try_from(ordinal).ok() != Some(device) {
                return Err(Error::invalid(
                    func,
                    format!(
                        "{what} ({addr:#x}) lies on device {ordinal}, the communicator's \
                         is device {device}"
                    ),
                ));
            }
            if let Some((base, size)) = range {
                let room = (base + size as u64).saturating_sub(addr);
                if bytes as u64 > room {
                    return Err(Error::invalid(
                        func,
                        format!(
                            "{what} is too small: {room} bytes from {addr:#x} to the end of \
                             its allocation ({size} bytes at {base:#x}), the call needs {bytes}"
                        ),
                    ));
                }
            }
        }
        Ok(ForeignBuf {
            addr,
            len,
            stream: stream.cuda().clone(),
            _elem: PhantomData,
        })
    }
}

impl<T> DeviceSlice<T> for ForeignBuf<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

// The caller orders its own use of the memory with its stream (ForeignStream), so there
// are no per-buffer events to record or wait for.
impl<T> DevicePtr<T> for ForeignBuf<T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (DeviceAddr, SyncOnDrop<'a>) {
        (self.addr, SyncOnDrop::Record(None))
    }
}

impl<T> DevicePtrMut<T> for ForeignBuf<T> {
    fn device_ptr_mut<'a>(&'a mut self, _stream: &'a CudaStream) -> (DeviceAddr, SyncOnDrop<'a>) {
        (self.addr, SyncOnDrop::Record(None))
    }
}

/// The caller's stream on a [`Device`] (a `cudaStream_t`; NULL is the legacy default
/// stream). hetccl never destroys it.
pub struct ForeignStream {
    inner: Arc<CudaStream>,
}

impl ForeignStream {
    /// # Safety
    /// `raw` must be NULL, `CU_STREAM_PER_THREAD`, or a live stream of `device`'s
    /// (primary) context that outlives the returned value.
    pub unsafe fn new(device: &Device, raw: *mut c_void) -> ForeignStream {
        ForeignStream {
            // SAFETY: forwarded to the caller.
            inner: unsafe { driver::borrow_stream(device.context(), raw) },
        }
    }

    /// Runs `f`, which queues a collective on `ours`, after the work queued on the
    /// caller's stream so far, and makes the caller's stream wait for it.
    pub fn around<R>(&self, ours: &Stream, f: impl FnOnce(&Stream) -> Result<R>) -> Result<R> {
        ours.cuda()
            .join(&self.inner)
            .map_err(device_error("wait for the caller's stream"))?;
        let r = f(ours)?;
        self.inner.join(ours.cuda()).map_err(device_error(
            "make the caller's stream wait for the collective",
        ))?;
        Ok(r)
    }
}
