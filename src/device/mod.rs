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
//! Collectives between GPUs live in `DeviceComm` (`comm.rs`, with the `cuda` feature):
//! CUDA IPC between the processes of one host, pinned host memory and the host
//! communicator across hosts.
//! Not here yet: the ring's fused receive-reduce-send kernels over device links.

#[cfg(feature = "cuda")]
mod comm;
#[cfg(feature = "cuda")]
mod context;
#[cfg(feature = "cuda")]
mod driver;
#[cfg(feature = "cuda")]
mod kernels;

#[cfg(feature = "cuda")]
pub use comm::{DeviceComm, DevicePath};
#[cfg(feature = "cuda")]
pub use context::{Device, Stream};
#[cfg(feature = "cuda")]
pub use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice,
    ValidAsZeroBits,
};
#[cfg(feature = "cuda")]
pub use kernels::*;

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
