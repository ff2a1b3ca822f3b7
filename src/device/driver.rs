//! The device module's one door to the CUDA driver: every call into cudarc's raw layers
//! (`cudarc::driver::sys`, `cudarc::driver::result`) that hetccl makes is in this file.
//! Above it, `context.rs`, `kernels.rs` and the collectives use cudarc's safe API and
//! what is here, nothing else.
//!
//! What the collectives need beyond cudarc's safe API, and the driver calls behind it:
//!
//! ```text
//! DeviceAlloc    cuMemAlloc, cuMemFree          device memory another process can map (cudarc's
//!                cuIpcGetMemHandle              stream-ordered pool cannot be exported); its handle
//! IpcMapping     cuIpcOpenMemHandle,            a peer's exported allocation mapped into this
//!                cuIpcCloseMemHandle            context, closed on drop
//! PinnedHost     cuMemHostAlloc, cuMemFreeHost  page-locked staging memory, freed on drop, and
//!                cuMemcpyDtoHAsync/HtoDAsync    the copies between it and the device
//! memset_d32_async, copy_dtoh_async, copy_dtod_async     async copies on raw device addresses
//! stream_write_u32, stream_wait_geq_u32                  stream memory operations (device fences)
//! stream_idle    cuStreamQuery
//! placement_of   cuPointerGetAttribute,         the device a caller's address lies on, and the
//!                cuMemGetAddressRange           allocation that holds it
//! borrow_stream  (none)                         a caller's CUstream, which cudarc only wraps
//! device_count   cuInit, cuDeviceGetCount, after checking that libcuda can be loaded
//! ```
//!
//! As in cudarc, `unsafe` stays where the device can be misused: a copy or a stream memory
//! operation on a raw device address is sound only if the memory stays allocated (or
//! mapped) until the stream has run it, which only the protocol of the caller can promise.
//! The RAII types bind their context to the calling thread when they are made and when
//! they are dropped, so that can happen on any thread; calls on a live one (its handle,
//! its copies) expect the caller to have bound the context, as every collective does
//! before it moves data.
//!
//! A failed call becomes a [`CallError`] naming the driver call; [`call_failed`] turns it
//! into [`Error::Device`] with what hetccl was doing.

use std::ffi::{c_char, c_void};
use std::fmt;
use std::panic::catch_unwind;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream, DriverError};

use crate::error::Error;

/// An address in device memory: of this context, or of a peer's allocation mapped into it.
pub(super) type DeviceAddr = sys::CUdeviceptr;

/// Address of element `i` of `T` counted from `base`.
pub(super) fn at<T>(base: DeviceAddr, i: usize) -> DeviceAddr {
    base + (i * std::mem::size_of::<T>()) as u64
}

/// A driver call that failed: the call's name and why.
#[derive(Debug)]
pub(super) struct CallError {
    call: &'static str,
    detail: String,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.call, self.detail)
    }
}

/// Names the driver call in its error.
fn call(name: &'static str) -> impl FnOnce(DriverError) -> CallError {
    move |e| CallError {
        call: name,
        detail: e.to_string(),
    }
}

/// Maps a failed driver call to [`Error::Device`]: `op` says what hetccl was doing, the
/// detail names the call and the driver's error.
pub(super) fn call_failed(op: impl Into<String>) -> impl FnOnce(CallError) -> Error {
    let op = op.into();
    move |e| Error::Device {
        op,
        detail: e.to_string(),
    }
}

/// Maps an error of cudarc's safe API to [`Error::Device`], `op` saying what was being done.
pub(super) fn device_error(op: impl Into<String>) -> impl FnOnce(DriverError) -> Error {
    let op = op.into();
    move |e| Error::Device {
        op,
        detail: e.to_string(),
    }
}

/// Why a device cannot be opened when the driver lacks a symbol cudarc wants.
pub(super) const MISSING_ENTRY: &str =
    "the CUDA driver library lacks an entry point this build needs (driver older than CUDA 13.0?)";

/// Number of CUDA devices, or why there are none.
pub(super) fn device_count() -> std::result::Result<usize, String> {
    // SAFETY: only tries to dlopen the driver library; no CUDA function is called.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver library (libcuda.so) could be loaded".to_string());
    }
    // cudarc panics when a symbol is missing from an old driver: turn that into a reason.
    let probe = catch_unwind(|| -> std::result::Result<i32, DriverError> {
        result::init()?;
        result::device::get_count()
    });
    match probe {
        Ok(Ok(n)) if n > 0 => Ok(n as usize),
        Ok(Ok(_)) => Err("the CUDA driver sees no device".to_string()),
        Ok(Err(e)) => Err(format!("the CUDA driver failed to initialise: {e}")),
        Err(_) => Err(MISSING_ENTRY.to_string()),
    }
}

/// Streaming multiprocessors of the context's device.
pub(super) fn multiprocessor_count(ctx: &CudaContext) -> std::result::Result<i32, DriverError> {
    ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
}

/// An event that keeps time (cudarc's default event does not).
pub(super) fn timing_event(ctx: &Arc<CudaContext>) -> std::result::Result<CudaEvent, DriverError> {
    ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
}

/// Waits for everything queued on `stream` (`cuStreamSynchronize`).
pub(super) fn synchronize(stream: &CudaStream) -> std::result::Result<(), CallError> {
    stream.synchronize().map_err(call("cuStreamSynchronize"))
}

/// Device memory from `cuMemAlloc`, freed on drop: unlike cudarc's stream-ordered
/// allocations it can be exported to other processes ([`DeviceAlloc::ipc_handle`]) and
/// be the target of stream memory operations.
pub(super) struct DeviceAlloc {
    ctx: Arc<CudaContext>,
    addr: DeviceAddr,
    bytes: usize,
}

impl DeviceAlloc {
    /// `bytes` of uninitialised device memory in `ctx`.
    pub(super) fn new(
        ctx: &Arc<CudaContext>,
        bytes: usize,
    ) -> std::result::Result<DeviceAlloc, CallError> {
        ctx.bind_to_thread().map_err(call("bind the context"))?;
        // SAFETY: plain allocation; the memory is reached only through addresses that
        // `unsafe` functions take (whose callers vouch for the bounds) and freed once, by
        // Drop.
        let addr = unsafe { result::malloc_sync(bytes) }.map_err(call("cuMemAlloc"))?;
        Ok(DeviceAlloc {
            ctx: ctx.clone(),
            addr,
            bytes,
        })
    }

    /// The first byte's address.
    pub(super) fn addr(&self) -> DeviceAddr {
        self.addr
    }

    /// The 64-byte handle through which other processes of this host map the allocation
    /// ([`IpcMapping::open`]).
    pub(super) fn ipc_handle(&self) -> std::result::Result<[u8; 64], CallError> {
        let mut handle = sys::CUipcMemHandle {
            reserved: [0 as c_char; 64],
        };
        // SAFETY: `addr` is the base of a live cuMemAlloc allocation of this context, and
        // `handle` is a valid place for the driver to write 64 bytes.
        unsafe { sys::cuIpcGetMemHandle(&mut handle, self.addr) }
            .result()
            .map_err(call("cuIpcGetMemHandle"))?;
        Ok(handle.reserved.map(|c| c as u8))
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        let bound = self.ctx.bind_to_thread();
        // SAFETY: `addr` came from cuMemAlloc in `new` and is freed exactly once, here.
        // Whoever handed its address to queued work keeps the owner alive until that work
        // has run (the promise of the `unsafe` functions that take addresses).
        let freed = unsafe { result::free_sync(self.addr) };
        if let Err(e) = bound.and(freed) {
            tracing::warn!(
                target: "hetccl::device",
                "freeing {} bytes of device memory (cuMemFree): {e}",
                self.bytes
            );
        }
    }
}

/// Another process's [`DeviceAlloc`] mapped into this context through its IPC handle,
/// unmapped by [`IpcMapping::close`] or on drop.
pub(super) struct IpcMapping {
    ctx: Arc<CudaContext>,
    addr: DeviceAddr,
}

impl IpcMapping {
    /// Maps the allocation behind `handle` (from [`DeviceAlloc::ipc_handle`] in another
    /// process of this host); peer access to another GPU is enabled lazily by the driver.
    pub(super) fn open(
        ctx: &Arc<CudaContext>,
        handle: &[u8; 64],
    ) -> std::result::Result<IpcMapping, CallError> {
        ctx.bind_to_thread().map_err(call("bind the context"))?;
        let handle = sys::CUipcMemHandle {
            reserved: handle.map(|b| b as c_char),
        };
        let mut addr: DeviceAddr = 0;
        // SAFETY: `addr` is a valid place for the mapped address; a handle that names no
        // live export of this host is refused by the driver with an error. The mapping is
        // closed once, by `close` or Drop.
        unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut addr,
                handle,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        }
        .result()
        .map_err(call("cuIpcOpenMemHandle"))?;
        Ok(IpcMapping {
            ctx: ctx.clone(),
            addr,
        })
    }

    /// The mapped allocation's first byte, as this process addresses it.
    pub(super) fn addr(&self) -> DeviceAddr {
        self.addr
    }

    /// Unmaps the allocation, reporting a failure (Drop can only log it).
    pub(super) fn close(mut self) -> std::result::Result<(), CallError> {
        // 0 tells Drop that the mapping is gone.
        let addr = std::mem::replace(&mut self.addr, 0);
        close_mapping(&self.ctx, addr)
    }
}

/// `cuIpcCloseMemHandle` of a mapping made by [`IpcMapping::open`] in `ctx`.
fn close_mapping(ctx: &CudaContext, addr: DeviceAddr) -> std::result::Result<(), CallError> {
    ctx.bind_to_thread().map_err(call("bind the context"))?;
    // SAFETY: `addr` was returned by cuIpcOpenMemHandle, and its `IpcMapping` forgets it
    // here (`close`) or is being dropped, so it is closed exactly once.
    unsafe { sys::cuIpcCloseMemHandle(addr) }
        .result()
        .map_err(call("cuIpcCloseMemHandle"))
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        if self.addr == 0 {
            return;
        }
        if let Err(e) = close_mapping(&self.ctx, self.addr) {
            tracing::warn!(target: "hetccl::device", "unmapping a peer's device memory: {e}");
        }
    }
}

/// Page-locked host memory from `cuMemHostAlloc`, freed on drop: what the copy engine
/// moves to and from the device without a bounce buffer.
pub(super) struct PinnedHost {
    ctx: Arc<CudaContext>,
    ptr: *mut c_void,
    bytes: usize,
}

// SAFETY: the buffer is plain page-locked memory owned by this value alone, usable from
// any thread; allocating and freeing it bind its context to the calling thread first.
unsafe impl Send for PinnedHost {}

impl PinnedHost {
    /// `bytes` of page-locked host memory, registered with `ctx`.
    pub(super) fn new(
        ctx: &Arc<CudaContext>,
        bytes: usize,
    ) -> std::result::Result<PinnedHost, CallError> {
        ctx.bind_to_thread().map_err(call("bind the context"))?;
        // SAFETY: plain allocation of page-locked host memory, freed once by Drop.
        let ptr = unsafe { result::malloc_host(bytes, 0) }.map_err(call("cuMemHostAlloc"))?;
        Ok(PinnedHost {
            ctx: ctx.clone(),
            ptr,
            bytes,
        })
    }

    /// Size in bytes.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The buffer as `T`s (as many whole ones as fit).
    ///
    /// # Safety
    /// No copy into or out of the buffer may be in flight while the slice lives.
    pub(super) unsafe fn as_mut_slice<T: bytemuck::Pod>(&mut self) -> &mut [T] {
        // SAFETY: the allocation is page-aligned and `bytes` long; any bits are a valid T
        // (Pod); `&mut self` makes the slice the only one, and the caller promises that
        // no copy engine writes it meanwhile.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ptr.cast::<T>(),
                self.bytes / std::mem::size_of::<T>(),
            )
        }
    }

    /// The first byte's address, for copies whose ranges the caller checks.
    pub(super) fn as_ptr(&self) -> *mut u8 {
        self.ptr.cast()
    }

    /// The host address of byte `offset`, when `[offset, offset + len)` lies inside.
    fn range(
        &self,
        call: &'static str,
        offset: usize,
        len: usize,
    ) -> std::result::Result<*mut c_void, CallError> {
        let offset = check_range(call, offset, len, self.bytes)?;
        // SAFETY: `offset + len <= bytes` (checked), so the address is inside the
        // allocation or one past its end.
        Ok(unsafe { self.ptr.cast::<u8>().add(offset) }.cast::<c_void>())
    }

    /// Queues on `stream` a copy of `len` bytes from device address `src` into bytes
    /// `offset..offset + len` of this buffer (refused when they do not fit).
    ///
    /// # Safety
    /// `src` must address `len` readable bytes until the copy has run, and neither the
    /// host (through [`PinnedHost::as_mut_slice`]) nor another copy may use the range
    /// meanwhile.
    pub(super) unsafe fn copy_from_device(
        &self,
        stream: &CudaStream,
        offset: usize,
        src: DeviceAddr,
        len: usize,
    ) -> std::result::Result<(), CallError> {
        let dst = self.range("cuMemcpyDtoHAsync", offset, len)?;
        // SAFETY: `dst..dst + len` lies in this allocation (checked); the caller vouches
        // for `src` and for nobody else using the range until the copy has run.
        unsafe { sys::cuMemcpyDtoHAsync_v2(dst, src, len, stream.cu_stream()) }
            .result()
            .map_err(call("cuMemcpyDtoHAsync"))
    }

    /// Queues on `stream` a copy of bytes `offset..offset + len` of this buffer to device
    /// address `dst` (refused when they do not lie in the buffer).
    ///
    /// # Safety
    /// `dst` must address `len` writable bytes until the copy has run, and the host must
    /// not write the range meanwhile.
    pub(super) unsafe fn copy_to_device(
        &self,
        stream: &CudaStream,
        dst: DeviceAddr,
        offset: usize,
        len: usize,
    ) -> std::result::Result<(), CallError> {
        let src = self.range("cuMemcpyHtoDAsync", offset, len)?;
        // SAFETY: `src..src + len` lies in this allocation (checked); the caller vouches
        // for `dst` and for the host leaving the range alone until the copy has run.
        unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src, len, stream.cu_stream()) }
            .result()
            .map_err(call("cuMemcpyHtoDAsync"))
    }
}

/// `offset` when bytes `offset..offset + len` lie in a buffer of `bytes`, else `call`'s
/// refusal saying they do not.
fn check_range(
    call: &'static str,
    offset: usize,
    len: usize,
    bytes: usize,
) -> std::result::Result<usize, CallError> {
    match offset.checked_add(len) {
        Some(end) if end <= bytes => Ok(offset),
        _ => Err(CallError {
            call,
            detail: format!(
                "bytes {offset}..{offset}+{len} lie outside the {bytes}-byte pinned buffer"
            ),
        }),
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        let bound = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from cuMemHostAlloc and is freed exactly once, here; its
        // owner drains every stream that copies to or from it before dropping it.
        let freed = unsafe { result::free_host(self.ptr) };
        if let Err(e) = bound.and(freed) {
            tracing::warn!(target: "hetccl::device", "freeing pinned staging memory: {e}");
        }
    }
}

/// Queues on `stream` the setting of `words` 32-bit words from `addr` on to `value`.
///
/// # Safety
/// `addr` must address `4 * words` writable bytes of device memory (own or mapped) until
/// the stream has run the operation.
pub(super) unsafe fn memset_d32_async(
    stream: &CudaStream,
    addr: DeviceAddr,
    value: u32,
    words: usize,
) -> std::result::Result<(), CallError> {
    // SAFETY: the caller vouches for the range.
    unsafe { sys::cuMemsetD32Async(addr, value, words, stream.cu_stream()) }
        .result()
        .map_err(call("cuMemsetD32Async"))
}

/// Queues on `stream` a copy of `len` bytes from device address `src` to host memory.
///
/// # Safety
/// `src` must address `len` readable bytes and `dst` `len` writable bytes of host memory,
/// both until the copy has run; nothing may read `dst` before then.
pub(super) unsafe fn copy_dtoh_async(
    stream: &CudaStream,
    dst: *mut c_void,
    src: DeviceAddr,
    len: usize,
) -> std::result::Result<(), CallError> {
    // SAFETY: the caller vouches for both ranges.
    unsafe { sys::cuMemcpyDtoHAsync_v2(dst, src, len, stream.cu_stream()) }
        .result()
        .map_err(call("cuMemcpyDtoHAsync"))
}

/// Queues on `stream` a copy of `len` bytes from host memory to device address `dst`.
///
/// # Safety
/// `src` must address `len` readable bytes of host memory (pinned, for the copy to be
/// asynchronous) that nothing writes, and `dst` `len` writable bytes of device memory,
/// both until the copy has run.
pub(super) unsafe fn copy_htod_async(
    stream: &CudaStream,
    dst: DeviceAddr,
    src: *const c_void,
    len: usize,
) -> std::result::Result<(), CallError> {
    // SAFETY: the caller vouches for both ranges.
    unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src, len, stream.cu_stream()) }
        .result()
        .map_err(call("cuMemcpyHtoDAsync"))
}

/// Queues on `stream` a copy of `len` bytes between device addresses.
///
/// # Safety
/// Both ranges must be device memory of the stream's context (or mapped into it) until
/// the copy has run, `src` readable and `dst` writable.
pub(super) unsafe fn copy_dtod_async(
    stream: &CudaStream,
    dst: DeviceAddr,
    src: DeviceAddr,
    len: usize,
) -> std::result::Result<(), CallError> {
    // SAFETY: the caller vouches for both ranges.
    unsafe { result::memcpy_dtod_async(dst, src, len, stream.cu_stream()) }
        .map_err(call("cuMemcpyDtoDAsync"))
}

/// Queues on `stream` the write of `value` into the 32-bit word at `addr`, after a memory
/// barrier that makes everything the stream wrote before visible to whoever sees the word
/// (`cuStreamWriteValue32`, default flags).
///
/// # Safety
/// `addr` must be a writable, 4-byte aligned word of device memory (own or mapped) until
/// the stream has run the write.
pub(super) unsafe fn stream_write_u32(
    stream: &CudaStream,
    addr: DeviceAddr,
    value: u32,
) -> std::result::Result<(), CallError> {
    // SAFETY: the caller vouches for the word.
    unsafe {
        sys::cuStreamWriteValue32_v2(
            stream.cu_stream(),
            addr,
            value,
            sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
        )
    }
    .result()
    .map_err(call("cuStreamWriteValue32"))
}

/// Queues on `stream` a wait until the 32-bit word at `addr` is at least `value`, compared
/// cyclically (`cuStreamWaitValue32`, `CU_STREAM_WAIT_VALUE_GEQ`): work queued after it runs
/// only then.
///
/// # Safety
/// `addr` must be a readable, 4-byte aligned word of device memory (own or mapped) until
/// the stream has passed the wait.
pub(super) unsafe fn stream_wait_geq_u32(
    stream: &CudaStream,
    addr: DeviceAddr,
    value: u32,
) -> std::result::Result<(), CallError> {
    // SAFETY: the caller vouches for the word.
    unsafe {
        sys::cuStreamWaitValue32_v2(
            stream.cu_stream(),
            addr,
            value,
            sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32,
        )
    }
    .result()
    .map_err(call("cuStreamWaitValue32"))
}

/// Where a caller's device address lies: the ordinal of its device
/// (`cuPointerGetAttribute`, `CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL`; fails for memory the
/// driver does not know, such as ordinary host memory), and the first byte and size of
/// the allocation that holds it where the driver reports one (`cuMemGetAddressRange`:
/// `cuMemAlloc` memory, which is what `cudaMalloc` and PyTorch's caching allocator hand
/// out; `None` for memory it has no range for). The context must be bound.
pub(super) fn placement_of(
    addr: DeviceAddr,
) -> std::result::Result<(i32, Option<(DeviceAddr, usize)>), CallError> {
    let mut ordinal: i32 = -1;
    // SAFETY: the driver only looks the address up; DEVICE_ORDINAL writes one int.
    unsafe {
        sys::cuPointerGetAttribute(
            (&mut ordinal as *mut i32).cast::<c_void>(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            addr,
        )
    }
    .result()
    .map_err(call("cuPointerGetAttribute"))?;
    let (mut base, mut size): (DeviceAddr, usize) = (0, 0);
    // SAFETY: as above; writes the two out-values.
    let range = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, addr) }
        .result()
        .ok()
        .map(|()| (base, size));
    Ok((ordinal, range))
}

/// A caller's stream (a `cudaStream_t`/`CUstream` of `ctx`; NULL is the legacy default
/// stream) as a cudarc stream that is never destroyed by hetccl.
///
/// # Safety
/// `raw` must be NULL, `CU_STREAM_PER_THREAD`, or a live stream of `ctx` that outlives
/// the returned handle and everything it is given to.
pub(super) unsafe fn borrow_stream(ctx: &Arc<CudaContext>, raw: *mut c_void) -> Arc<CudaStream> {
    // SAFETY: forwarded to the caller.
    unsafe { ctx.wrap_borrowed_stream(raw.cast()) }
}

/// Whether `stream` has run everything queued on it (`cuStreamQuery`), without waiting.
pub(super) fn stream_idle(stream: &CudaStream) -> std::result::Result<bool, CallError> {
    // SAFETY: `stream` is a live stream; the query reads no memory of ours.
    match unsafe { sys::cuStreamQuery(stream.cu_stream()) } {
        sys::CUresult::CUDA_SUCCESS => Ok(true),
        sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
        e => Err(call("cuStreamQuery")(DriverError(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_step_by_the_element_size() {
        assert_eq!(at::<f32>(0x1000, 3), 0x100c);
        assert_eq!(at::<half::bf16>(0x1000, 3), 0x1006);
        assert_eq!(at::<u64>(0x1000, 0), 0x1000);
    }

    #[test]
    fn pinned_copies_stay_inside_the_buffer_and_a_refusal_names_the_call() {
        assert_eq!(check_range("cuMemcpyDtoHAsync", 0, 64, 64).ok(), Some(0));
        assert_eq!(check_range("cuMemcpyDtoHAsync", 64, 0, 64).ok(), Some(64));
        assert_eq!(check_range("cuMemcpyDtoHAsync", 48, 16, 64).ok(), Some(48));
        let e = check_range("cuMemcpyHtoDAsync", 56, 16, 64).unwrap_err();
        assert_eq!(
            call_failed("copy 16 bytes host to device")(e).to_string(),
            "device: copy 16 bytes host to device: cuMemcpyHtoDAsync: bytes 56..56+16 lie \
             outside the 64-byte pinned buffer"
        );
        // An end past usize::MAX is outside too, not a wrapped small number.
        let e = check_range("cuMemcpyDtoHAsync", usize::MAX, 2, 64).unwrap_err();
        assert_eq!(e.call, "cuMemcpyDtoHAsync");
    }
}
