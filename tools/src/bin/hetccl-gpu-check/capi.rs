//! `--capi`: the C API's device collectives (`hetcclDevice*`), called as a C program
//! calls them: raw device pointers of memory the program allocated, and a CUDA stream of
//! its own. Checked against the host's values like the `DeviceComm` checks, plus what
//! only the C API does: each call waits for the work queued on the caller's stream
//! before it (an input written there behind a held stream must be what is reduced), and
//! a buffer too small for its count or in host memory is refused on every rank, after
//! which the communicator goes on working.

use std::ffi::{c_int, c_void, CStr};
use std::ptr::null_mut;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaSlice, CudaStream, DevicePtr, ValidAsZeroBits};
use half::{bf16, f16};
use hetccl::capi::{self, hetcclComm_t, hetcclDeviceComm_t, hetcclResult_t};
use hetccl::device::{self, Device, GpuElement};
use hetccl::{Communicator, Element, ReduceOp};

use super::{expected, input, payload, wrong, Res};

const SUM: c_int = ReduceOp::Sum as c_int;
const MAX: c_int = ReduceOp::Max as c_int;

/// The datatype value of `T` in the C API.
fn dt<T: Element>() -> c_int {
    T::DTYPE as u8 as c_int
}

fn last_error() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next failing
    // call on this thread.
    unsafe { CStr::from_ptr(capi::hetcclGetLastError(null_mut())) }
        .to_string_lossy()
        .into_owned()
}

fn ok(what: &str, r: hetcclResult_t) -> Res<()> {
    if r == hetcclResult_t::hetcclSuccess {
        Ok(())
    } else {
        Err(format!("{what}: {r:?}: {}", last_error()))
    }
}

struct CapiCheck {
    comm: hetcclComm_t,
    dcomm: hetcclDeviceComm_t,
    /// The program's own stream, handed to every call.
    stream: Arc<CudaStream>,
    rank: usize,
    n: usize,
    rows: Vec<(String, u64)>,
}

impl CapiCheck {
    fn raw_stream(&self) -> *mut c_void {
        self.stream.cu_stream().cast()
    }

    fn upload<T: GpuElement>(&self, v: &[T]) -> Res<CudaSlice<T>> {
        self.stream
            .clone_htod(v)
            .map_err(|e| format!("upload: {e}"))
    }

    fn zeros<T: GpuElement + ValidAsZeroBits>(&self, n: usize) -> Res<CudaSlice<T>> {
        self.stream
            .alloc_zeros(n.max(1))
            .map_err(|e| format!("allocate: {e}"))
    }

    fn download<T: GpuElement>(&self, d: &CudaSlice<T>) -> Res<Vec<T>> {
        self.stream
            .clone_dtoh(d)
            .map_err(|e| format!("download: {e}"))
    }

    /// Downloads `d` and records the row `what` with its elements that differ from
    /// `want`.
    fn record<T: GpuElement>(
        &mut self,
        what: String,
        d: &CudaSlice<T>,
        want: impl Fn(usize) -> T,
    ) -> Res<()> {
        let bad = wrong(&self.download(d)?, want);
        self.rows.push((what, bad));
        Ok(())
    }

    fn ptr<T>(&self, d: &CudaSlice<T>) -> *mut c_void {
        d.device_ptr(&self.stream).0 as *mut c_void
    }

    /// Every collective of `T` at `count`, out of place and in place.
    fn dtype<T: GpuElement + ValidAsZeroBits>(&mut self, count: usize) -> Res<()> {
        let (r, n) = (self.rank, self.n);
        let (s, d) = (self.raw_stream(), self.dcomm);
        for (op, opv) in [(ReduceOp::Sum, SUM), (ReduceOp::Max, MAX)] {
            let host: Vec<T> = (0..count).map(|i| input::<T>(op, r, i)).collect();
            let send = self.upload(&host)?;
            let recv = self.zeros::<T>(count)?;
            // SAFETY (every call below): the buffers hold the counts given and live until
            // the call returns; the stream is this program's.
            ok("hetcclDeviceAllReduce", unsafe {
                capi::hetcclDeviceAllReduce(
                    self.ptr(&send),
                    self.ptr(&recv),
                    count,
                    dt::<T>(),
                    opv,
                    d,
                    s,
                )
            })?;
            let what = format!("all_reduce {} {op:?} x {count}", T::NAME);
            self.record(what, &recv, |i| expected::<T>(op, i, n))?;
            let inplace = self.upload(&host)?;
            let p = self.ptr(&inplace);
            ok("hetcclDeviceAllReduce (in place)", unsafe {
                capi::hetcclDeviceAllReduce(p, p, count, dt::<T>(), opv, d, s)
            })?;
            let what = format!("all_reduce in place {} {op:?} x {count}", T::NAME);
            self.record(what, &inplace, |i| expected::<T>(op, i, n))?;

            let root = n - 1;
            let out = self.zeros::<T>(count)?;
            ok("hetcclDeviceReduce", unsafe {
                capi::hetcclDeviceReduce(
                    self.ptr(&send),
                    self.ptr(&out),
                    count,
                    dt::<T>(),
                    opv,
                    root as c_int,
                    d,
                    s,
                )
            })?;
            // Only the root's receive buffer is written.
            let what = format!("reduce to {root} {} {op:?} x {count}", T::NAME);
            self.record(what, &out, |i| {
                if r == root {
                    expected::<T>(op, i, n)
                } else {
                    T::from_f64(0.0)
                }
            })?;

            let per = count.div_ceil(n);
            let whole: Vec<T> = (0..per * n).map(|i| input::<T>(op, r, i)).collect();
            let send = self.upload(&whole)?;
            let out = self.zeros::<T>(per)?;
            ok("hetcclDeviceReduceScatter", unsafe {
                capi::hetcclDeviceReduceScatter(
                    self.ptr(&send),
                    self.ptr(&out),
                    per,
                    dt::<T>(),
                    opv,
                    d,
                    s,
                )
            })?;
            let what = format!("reduce_scatter {} {op:?} x {per}", T::NAME);
            self.record(what, &out, |i| expected::<T>(op, r * per + i, n))?;
        }
        let root = n - 1;
        let mine: Vec<T> = (0..count).map(|i| payload::<T>(r, i)).collect();
        let send = self.upload(&mine)?;
        let recv = self.zeros::<T>(count)?;
        ok("hetcclDeviceBroadcast", unsafe {
            capi::hetcclDeviceBroadcast(
                self.ptr(&send),
                self.ptr(&recv),
                count,
                dt::<T>(),
                root as c_int,
                d,
                s,
            )
        })?;
        let what = format!("broadcast from {root} {} x {count}", T::NAME);
        self.record(what, &recv, |i| payload::<T>(root, i))?;
        let all = self.zeros::<T>(count * n)?;
        ok("hetcclDeviceAllGather", unsafe {
            capi::hetcclDeviceAllGather(self.ptr(&send), self.ptr(&all), count, dt::<T>(), d, s)
        })?;
        let what = format!("all_gather {} x {count}", T::NAME);
        self.record(what, &all, |i| payload::<T>(i / count, i % count))?;
        Ok(())
    }

    /// The input is written on the program's stream behind a hold of `secs`: the
    /// all-reduce must wait for it (an unordered call would sum the zeros before it).
    fn stream_order(&mut self, dev: &Device, secs: f64) -> Res<()> {
        let count = 4096;
        let buf = self.zeros::<f32>(count)?;
        super::hold_raw(dev, self.stream.cu_stream(), secs)?;
        // SAFETY: `buf` holds `count` words; the memset is queued behind the hold.
        unsafe {
            sys::cuMemsetD32Async(
                self.ptr(&buf) as u64,
                1.0f32.to_bits(),
                count,
                self.stream.cu_stream(),
            )
        }
        .result()
        .map_err(|e| format!("memset: {e}"))?;
        let p = self.ptr(&buf);
        // SAFETY: as in `dtype`.
        ok("hetcclDeviceAllReduce (after a held stream)", unsafe {
            capi::hetcclDeviceAllReduce(
                p,
                p,
                count,
                dt::<f32>(),
                SUM,
                self.dcomm,
                self.raw_stream(),
            )
        })?;
        let n = self.n as f32;
        let what = format!("waits for the caller's stream ({secs} s held)");
        self.record(what, &buf, |_| n)?;
        Ok(())
    }

    /// The last rank passes a receive buffer too small for the count, then a host
    /// pointer: every rank's call must fail (that rank's naming the buffer), and the next
    /// call must work.
    fn refusals(&mut self) -> Res<()> {
        let (r, n) = (self.rank, self.n);
        let last = r + 1 == n;
        let count = 1000usize;
        let send = self.upload(&vec![1.0f32; count])?;
        // cuMemAlloc memory, whose allocation the driver reports exactly.
        // SAFETY: a plain 1 KiB allocation, freed below.
        let small = unsafe { result::malloc_sync(1024) }.map_err(|e| format!("allocate: {e}"))?;
        let fine = self.zeros::<f32>(count)?;
        let recv = if last {
            small as *mut c_void
        } else {
            self.ptr(&fine)
        };
        // SAFETY: the other ranks' buffers fit; the last rank's is refused before use.
        let rc = unsafe {
            capi::hetcclDeviceAllReduce(
                self.ptr(&send),
                recv,
                count,
                dt::<f32>(),
                SUM,
                self.dcomm,
                self.raw_stream(),
            )
        };
        let msg = last_error();
        let want = if last {
            format!(
                "invalid argument to hetcclDeviceAllReduce: recvbuff is too small: 1024 bytes \
                 from {small:#x} to the end of its allocation (1024 bytes at {small:#x}), the \
                 call needs 4000"
            )
        } else {
            format!("peer {} refused its", n - 1)
        };
        let refused = rc != hetcclResult_t::hetcclSuccess && msg.contains(&want);
        if !refused {
            println!("rank {r}: too small a buffer: {rc:?} {msg:?}, expected {want:?}");
        }
        self.rows.push((
            "too small a recvbuff refused on every rank".into(),
            u64::from(!refused),
        ));
        // SAFETY: `small` came from cuMemAlloc above and nothing uses it any more.
        unsafe { result::free_sync(small) }.map_err(|e| format!("free: {e}"))?;

        let host = vec![0.0f32; count];
        let sendp = if last {
            host.as_ptr() as *mut c_void
        } else {
            self.ptr(&send)
        };
        // SAFETY: as above; the host pointer is refused before any device access.
        let rc = unsafe {
            capi::hetcclDeviceAllReduce(
                sendp,
                self.ptr(&fine),
                count,
                dt::<f32>(),
                SUM,
                self.dcomm,
                self.raw_stream(),
            )
        };
        let msg = last_error();
        let want = if last {
            "is not device memory of this process"
        } else {
            "refused its"
        };
        let refused = rc != hetcclResult_t::hetcclSuccess && msg.contains(want);
        if !refused {
            println!("rank {r}: host sendbuff: {rc:?} {msg:?}, expected {want:?}");
        }
        self.rows.push((
            "host sendbuff refused on every rank".into(),
            u64::from(!refused),
        ));

        // And the communicator still works.
        let p = self.ptr(&fine);
        let again = self.upload(&vec![2.0f32; count])?;
        ok("hetcclDeviceAllReduce (after the refusals)", unsafe {
            capi::hetcclDeviceAllReduce(
                self.ptr(&again),
                p,
                count,
                dt::<f32>(),
                SUM,
                self.dcomm,
                self.raw_stream(),
            )
        })?;
        self.record("all_reduce after the refusals".into(), &fine, |_| {
            2.0 * n as f32
        })?;
        Ok(())
    }
}

/// Runs the checks on this rank; prints a table on rank 0 and a summary on every rank.
pub(super) fn run(counts: &[usize]) -> Res<bool> {
    let comm = Communicator::init_from_env().map_err(|e| format!("init: {e}"))?;
    let (r, n, local) = (comm.rank(), comm.world_size(), comm.local_rank());
    let devices = device::available().map_err(|e| format!("no GPU after all: {e}"))?;
    let ordinal = local % devices;
    let handle = capi::register(comm);
    let mut dcomm: hetcclDeviceComm_t = null_mut();
    // SAFETY: valid out-parameter and live handle.
    ok("hetcclDeviceCommInit", unsafe {
        capi::hetcclDeviceCommInit(&mut dcomm, handle, ordinal as c_int)
    })?;
    let dev = Device::open(ordinal).map_err(|e| format!("open device: {e}"))?;
    let stream = dev
        .context()
        .new_stream()
        .map_err(|e| format!("create stream: {e}"))?;
    println!(
        "rank {r}/{n}: device {ordinal} ({}), C API device calls",
        dev.name()
    );
    let mut ck = CapiCheck {
        comm: handle,
        dcomm,
        stream,
        rank: r,
        n,
        rows: Vec::new(),
    };
    for &count in counts {
        ck.dtype::<f32>(count)?;
        ck.dtype::<f16>(count)?;
        ck.dtype::<bf16>(count)?;
    }
    ck.stream_order(&dev, 0.5)?;
    if n > 1 {
        ck.refusals()?;
    }
    let rows = std::mem::take(&mut ck.rows);
    let mut wrong: Vec<u64> = rows.iter().map(|(_, w)| *w).collect();
    let p = wrong.as_mut_ptr() as *mut c_void;
    // SAFETY: host buffer of `wrong.len()` u64s; host call, NULL stream.
    ok("hetcclAllReduce (wrong counts)", unsafe {
        capi::hetcclAllReduce(p, p, wrong.len(), dt::<u64>(), SUM, ck.comm, null_mut())
    })?;
    let total: u64 = wrong.iter().sum();
    if r == 0 {
        println!("{:<56} {:>7}", "# C API check", "#wrong");
        for ((what, _), w) in rows.iter().zip(&wrong) {
            println!("{what:<56} {w:>7}");
        }
    }
    ok(
        "hetcclDeviceCommDestroy",
        capi::hetcclDeviceCommDestroy(dcomm),
    )?;
    ok("hetcclCommDestroy", capi::hetcclCommDestroy(handle))?;
    println!(
        "rank {r}/{n}: {} C API checks passed, #wrong={total}",
        rows.len()
    );
    Ok(total == 0)
}
