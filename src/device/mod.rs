//! The GPU: a CUDA context, a stream, and the kernels of `kernels/*.cu` (feature `cuda`).
//!
//! Without the `cuda` feature only [`available`] exists and says why there is no device.

/// Number of usable CUDA devices, or why there are none (built without the `cuda`
/// feature, no driver library, driver failed to initialise, zero devices). Tests call this
/// to skip with the reason.
#[cfg(not(feature = "cuda"))]
pub fn available() -> Result<usize, String> {
    Err("hetccl was built without the `cuda` feature".to_string())
}
