//! The GPU: a CUDA context, streams, and the kernels of `kernels/*.cu` (feature `cuda`).
//!
//! The kernels are compiled by `build.rs` into one fatbin embedded in the binary and
//! loaded with the driver API through cudarc. cudarc loads `libcuda` at run time, so a
//! binary built with `cuda` still starts on a machine without a GPU; [`available`] says
//! whether one can be used (and why not), and nothing here calls into cudarc before
//! checking that the driver library is present (cudarc panics without it).
//!
//! Each kernel has a typed launcher named like its CPU twin, with the same argument
//! order after the stream:
//!
//! ```text
//! compression::fp16_compress(src, scale, residual, dst)            CPU, returns OverflowStats
//! device::fp16_compress(&stream, &src, scale, residual, &mut dst)  GPU, counts into the stream
//! reduce::reduce_inplace(op, dst, src)                              CPU
//! device::reduce_inplace(&stream, op, &mut dst, &src)               GPU
//! ```
//!
//! GPU overflow counts accumulate on the device per `Stream` (no host sync per launch);
//! `Stream::take_overflow_stats` synchronises and reads them.
//!
//! Collectives between GPUs live in `DeviceComm` (with the `cuda` feature): CUDA IPC
//! between the processes of one host, pinned host memory and the host communicator
//! across hosts.
//! Not here yet: the ring's fused receive-reduce-send kernels over device links.
//!
//! The module is layered as cudarc is (raw calls, a thin layer that turns their codes
//! into `Result`s, safe types on top); each row uses only the rows below it:
//!
//! ```text
//! comm.rs, ipc.rs,        DeviceComm, one file per concern: the entry points, the
//! fence.rs, staged.rs,    per-call agreement and the guard (comm.rs); the IPC path and
//! hier.rs, traffic.rs     the device fences between its phases; the staged path; the
//!                         hierarchical all-reduce across hosts; the bytes each call
//!                         moves per link class (pure, no CUDA type)
//! foreign.rs              the caller's own device buffers (checked against their
//!                         allocation) and streams (ordered with hetccl's own)
//! context.rs, kernels.rs  Device, Stream, the kernel table, the one launch prologue and
//!                         the typed launchers
//! driver.rs               every raw driver call: device and pinned memory and IPC
//!                         mappings as RAII types, async copies and stream memory
//!                         operations, each failure naming its call
//! ```
//!
//! `Device`, `Stream` and the launchers sit below the host communicator and use none of
//! it. `DeviceComm` sits above it: the host [`Communicator`](crate::Communicator) finds
//! the peers, carries the per-call headers and the IPC handles, holds the barriers, and
//! is the staged path's transport.

#[cfg(feature = "cuda")]
mod comm;
#[cfg(feature = "cuda")]
mod context;
#[cfg(feature = "cuda")]
mod driver;
#[cfg(feature = "cuda")]
mod fence;
#[cfg(feature = "cuda")]
mod foreign;
#[cfg(feature = "cuda")]
mod hier;
#[cfg(feature = "cuda")]
mod ipc;
#[cfg(feature = "cuda")]
mod kernels;
#[cfg(feature = "cuda")]
mod staged;
// Pure arithmetic, so its tests run without the feature too.
#[cfg(any(feature = "cuda", test))]
mod traffic;

#[cfg(feature = "cuda")]
pub use crate::algorithm::device_hier::LinkBytes;
#[cfg(feature = "cuda")]
pub use crate::algorithm::select::DeviceAcrossHosts;
#[cfg(feature = "cuda")]
pub use comm::{DeviceComm, DevicePath};
#[cfg(feature = "cuda")]
pub use context::{Device, Stream};
/// cudarc's cuBLAS, loaded at run time like the driver, for matrix products the library
/// does not wrap (the trainer's); call [`cublas_available`] first (cudarc panics when the
/// library is missing).
#[cfg(feature = "cuda")]
pub use cudarc::cublas;
#[cfg(feature = "cuda")]
pub use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DeviceRepr, DeviceSlice, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
#[cfg(feature = "cuda")]
pub use foreign::{ForeignBuf, ForeignStream};
#[cfg(feature = "cuda")]
pub use kernels::*;
#[cfg(feature = "cuda")]
pub use traffic::{device_link_bytes, ipc_one_shot, ipc_window, DeviceRoute};

/// Whether cuBLAS can be loaded (`libcublas.so`, or a versioned name, on the loader's
/// path), or why not.
#[cfg(feature = "cuda")]
pub fn cublas_available() -> Result<(), String> {
    // SAFETY: only tries to dlopen the library; no cuBLAS function is called.
    if unsafe { cudarc::cublas::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(
            "no cuBLAS library (libcublas.so) could be loaded: put its directory on \
             LD_LIBRARY_PATH (the nvidia-cublas wheel's nvidia/cu13/lib or nvidia/cublas/lib)"
                .to_string(),
        )
    }
}

/// Number of usable CUDA devices, or why there are none: built without the `cuda`
/// feature, no driver library, the driver failed to initialise, or it sees no device.
/// Tests call this to skip with the reason.
#[cfg(not(feature = "cuda"))]
pub fn available() -> Result<usize, String> {
    Err("hetccl was built without the `cuda` feature".to_string())
}

/// Number of usable CUDA devices, or why there are none: built without the `cuda`
/// feature, no driver library, the driver failed to initialise, or it sees no device.
/// Tests call this to skip with the reason.
#[cfg(feature = "cuda")]
pub fn available() -> Result<usize, String> {
    driver::device_count()
}

#[cfg(all(test, not(feature = "cuda")))]
mod tests {
    #[test]
    fn without_the_feature_the_reason_is_given() {
        assert_eq!(
            super::available(),
            Err("hetccl was built without the `cuda` feature".to_string())
        );
    }
}
