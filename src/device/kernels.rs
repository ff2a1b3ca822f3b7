//! Typed launchers, one per CUDA kernel, named and ordered like the CPU twins.
//!
//! Each checks lengths, takes the device pointers through cudarc (which orders this
//! stream after earlier writers on other streams), and launches on the given [`Stream`].
//! All are asynchronous: results are ready after [`Stream::synchronize`] or a download.

use std::ffi::c_void;

use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr};
use half::{bf16, f16};

use super::context::Stream;
use super::driver::DeviceAddr;
use crate::compression::{WireFloat, WireFormat};
use crate::dtype::{Element, ReduceOp};
use crate::error::{Error, Result};

/// Element types the GPU reductions handle (computed in f32, rounded once).
pub trait GpuElement: Element + DeviceRepr + private::Sealed {
    /// Suffix of the kernel names (`f32`, `f16`, `bf16`).
    const NAME: &'static str;
}

mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

impl GpuElement for f32 {
    const NAME: &'static str = "f32";
}
impl GpuElement for f16 {
    const NAME: &'static str = "f16";
}
impl GpuElement for bf16 {
    const NAME: &'static str = "bf16";
}

const REDUCE_OPS: [ReduceOp; 5] = [
    ReduceOp::Sum,
    ReduceOp::Avg,
    ReduceOp::Prod,
    ReduceOp::Max,
    ReduceOp::Min,
];
const WIRE_KERNELS: [&str; 4] = [
    "compress",
    "decompress",
    "decompress_add",
    "decompress_add_compress",
];

/// Every `extern "C"` kernel in the fatbin; the module resolves all of them at load, so a
/// missing one fails `Device::open` rather than a launch.
pub(super) fn kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for w in [WireFormat::F16, WireFormat::Bf16] {
        for k in WIRE_KERNELS {
            names.push(format!("{}_{k}", w.name()));
        }
    }
    for t in [f32::NAME, f16::NAME, bf16::NAME] {
        for op in REDUCE_OPS {
            names.push(format!("reduce_inplace_{op}_{t}"));
            names.push(format!("reduce_from_{op}_{t}"));
        }
        names.push(format!("reduce_finalize_avg_{t}"));
    }
    names
}

fn check_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!("{what} has {got} elements, expected {want}"),
        ))
    }
}

/// Erases a kernel argument for `cuLaunchKernel`'s `void**`.
fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

/// Device twin of [`crate::compression::compress`]: `dst = W(src*scale + residual)`.
pub fn compress<W: WireFloat + DeviceRepr>(
    stream: &Stream,
    src: &impl DevicePtr<f32>,
    scale: f32,
    residual: Option<&mut dyn DevicePtrMut<f32>>,
    dst: &mut impl DevicePtrMut<W>,
) -> Result<()> {
    const OP: &str = "device::compress";
    let n = dst.len();
    check_len(OP, "src", src.len(), n)?;
    if let Some(r) = &residual {
        check_len(OP, "residual", r.len(), n)?;
    }
    if n == 0 {
        return Ok(());
    }
    let s = stream.cuda();
    let (src_p, _src_g) = src.device_ptr(s);
    let (res_p, _res_g) = match residual {
        Some(r) => {
            let (p, g) = r.device_ptr_mut(s);
            (p, Some(g))
        }
        None => (0, None),
    };
    let (dst_p, _dst_g) = dst.device_ptr_mut(s);
    let (n64, stats) = (n as u64, stream.stats_ptr());
    let name = format!("{}_compress", W::FORMAT.name());
    let mut args = [
        arg(&src_p),
        arg(&scale),
        arg(&res_p),
        arg(&dst_p),
        arg(&n64),
        arg(&stats),
    ];
    // SAFETY: (const float*, float, float*, uint16_t*, size_t, u64*) as in compress.cu;
    // every buffer holds n elements (checked above), residual may be null.
    unsafe { stream.launch(&name, n.div_ceil(8), &mut args) }
}

fn decompress_impl<W: WireFloat + DeviceRepr>(
    kernel: &str,
    stream: &Stream,
    src: &impl DevicePtr<W>,
    dst: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    let n = dst.len();
    check_len("device::decompress", "src", src.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let s = stream.cuda();
    let (src_p, _src_g) = src.device_ptr(s);
    let (dst_p, _dst_g) = dst.device_ptr_mut(s);
    let n64 = n as u64;
    let name = format!("{}_{kernel}", W::FORMAT.name());
    let mut args = [arg(&src_p), arg(&dst_p), arg(&n64)];
    // SAFETY: (const uint16_t*, float*, size_t) as in compress.cu; both hold n elements.
    unsafe { stream.launch(&name, n.div_ceil(8), &mut args) }
}

/// Device twin of [`crate::compression::decompress`]: `dst = f32(src)`.
pub fn decompress<W: WireFloat + DeviceRepr>(
    stream: &Stream,
    src: &impl DevicePtr<W>,
    dst: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    decompress_impl("decompress", stream, src, dst)
}

/// Device twin of [`crate::compression::decompress_add`]: `dst += f32(src)`.
pub fn decompress_add<W: WireFloat + DeviceRepr>(
    stream: &Stream,
    src: &impl DevicePtr<W>,
    dst: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    decompress_impl("decompress_add", stream, src, dst)
}

/// Device twin of [`crate::compression::decompress_add_compress`]:
/// `dst = W(f32(incoming) + (local*scale + residual))`.
pub fn decompress_add_compress<W: WireFloat + DeviceRepr>(
    stream: &Stream,
    incoming: &impl DevicePtr<W>,
    local: &impl DevicePtr<f32>,
    scale: f32,
    residual: Option<&mut dyn DevicePtrMut<f32>>,
    dst: &mut impl DevicePtrMut<W>,
) -> Result<()> {
    const OP: &str = "device::decompress_add_compress";
    let n = dst.len();
    check_len(OP, "incoming", incoming.len(), n)?;
    check_len(OP, "local", local.len(), n)?;
    if let Some(r) = &residual {
        check_len(OP, "residual", r.len(), n)?;
    }
    if n == 0 {
        return Ok(());
    }
    let s = stream.cuda();
    let (inc_p, _inc_g) = incoming.device_ptr(s);
    let (loc_p, _loc_g) = local.device_ptr(s);
    let (res_p, _res_g) = match residual {
        Some(r) => {
            let (p, g) = r.device_ptr_mut(s);
            (p, Some(g))
        }
        None => (0, None),
    };
    let (dst_p, _dst_g) = dst.device_ptr_mut(s);
    let (n64, stats) = (n as u64, stream.stats_ptr());
    let name = format!("{}_decompress_add_compress", W::FORMAT.name());
    let mut args = [
        arg(&inc_p),
        arg(&loc_p),
        arg(&scale),
        arg(&res_p),
        arg(&dst_p),
        arg(&n64),
        arg(&stats),
    ];
    // SAFETY: (const uint16_t*, const float*, float, float*, uint16_t*, size_t, u64*) as
    // in compress.cu; every buffer holds n elements, residual may be null.
    unsafe { stream.launch(&name, n.div_ceil(8), &mut args) }
}

/// [`compress`] to fp16.
pub fn fp16_compress(
    stream: &Stream,
    src: &impl DevicePtr<f32>,
    scale: f32,
    residual: Option<&mut dyn DevicePtrMut<f32>>,
    dst: &mut impl DevicePtrMut<f16>,
) -> Result<()> {
    compress(stream, src, scale, residual, dst)
}

/// [`decompress`] from fp16.
pub fn fp16_decompress(
    stream: &Stream,
    src: &impl DevicePtr<f16>,
    dst: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    decompress(stream, src, dst)
}

/// [`decompress_add`] from fp16.
pub fn fp16_decompress_add(
    stream: &Stream,
    src: &impl DevicePtr<f16>,
    dst: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    decompress_add(stream, src, dst)
}

/// [`decompress_add_compress`] on fp16.
pub fn fp16_decompress_add_compress(
    stream: &Stream,
    incoming: &impl DevicePtr<f16>,
    local: &impl DevicePtr<f32>,
    scale: f32,
    residual: Option<&mut dyn DevicePtrMut<f32>>,
    dst: &mut impl DevicePtrMut<f16>,
) -> Result<()> {
    decompress_add_compress(stream, incoming, local, scale, residual, dst)
}

/// [`compress`] to bf16.
pub fn bf16_compress(
    stream: &Stream,
    src: &impl DevicePtr<f32>,
    scale: f32,
    residual: Option<&mut dyn DevicePtrMut<f32>>,
    dst: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    compress(stream, src, scale, residual, dst)
}

/// [`decompress`] from bf16.
pub fn bf16_decompress(
    stream: &Stream,
    src: &impl DevicePtr<bf16>,
    dst: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    decompress(stream, src, dst)
}

/// [`decompress_add`] from bf16.
pub fn bf16_decompress_add(
    stream: &Stream,
    src: &impl DevicePtr<bf16>,
    dst: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    decompress_add(stream, src, dst)
}

/// [`decompress_add_compress`] on bf16.
pub fn bf16_decompress_add_compress(
    stream: &Stream,
    incoming: &impl DevicePtr<bf16>,
    local: &impl DevicePtr<f32>,
    scale: f32,
    residual: Option<&mut dyn DevicePtrMut<f32>>,
    dst: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    decompress_add_compress(stream, incoming, local, scale, residual, dst)
}

/// Elements per 16-byte vector step of the reduction kernels.
fn per_vector<T>() -> usize {
    (16 / std::mem::size_of::<T>()).max(1)
}

/// Device twin of [`crate::reduce::reduce_inplace`]: `dst[i] = dst[i] (op) src[i]`
/// (`Avg` accumulates as a sum; see [`reduce_finalize`]).
pub fn reduce_inplace<T: GpuElement>(
    stream: &Stream,
    op: ReduceOp,
    dst: &mut impl DevicePtrMut<T>,
    src: &impl DevicePtr<T>,
) -> Result<()> {
    let n = dst.len();
    check_len("device::reduce_inplace", "src", src.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let s = stream.cuda();
    let (src_p, _src_g) = src.device_ptr(s);
    let (dst_p, _dst_g) = dst.device_ptr_mut(s);
    // SAFETY: both pointers come from buffers of n elements (checked above).
    unsafe { reduce_inplace_ptr::<T>(stream, op, dst_p, src_p, n) }
}

/// [`reduce_inplace`] on raw device addresses, for memory cudarc does not own (buffers of
/// other processes opened through CUDA IPC).
///
/// # Safety
/// `dst` and `src` must each address `n` elements of `T` readable (and, for `dst`,
/// writable) from the stream's context until the kernel has run.
pub(super) unsafe fn reduce_inplace_ptr<T: GpuElement>(
    stream: &Stream,
    op: ReduceOp,
    dst: DeviceAddr,
    src: DeviceAddr,
    n: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let n64 = n as u64;
    let name = format!("reduce_inplace_{op}_{}", T::NAME);
    let mut args = [arg(&dst), arg(&src), arg(&n64)];
    // SAFETY: (T*, const T*, size_t) as in reduce.cu; the caller vouches for n elements.
    unsafe { stream.launch(&name, n.div_ceil(per_vector::<T>()), &mut args) }
}

/// Device twin of [`crate::reduce::reduce_from`]: `dst[i] = a[i] (op) b[i]`.
pub fn reduce_from<T: GpuElement>(
    stream: &Stream,
    op: ReduceOp,
    dst: &mut impl DevicePtrMut<T>,
    a: &impl DevicePtr<T>,
    b: &impl DevicePtr<T>,
) -> Result<()> {
    let n = dst.len();
    check_len("device::reduce_from", "a", a.len(), n)?;
    check_len("device::reduce_from", "b", b.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let s = stream.cuda();
    let (a_p, _a_g) = a.device_ptr(s);
    let (b_p, _b_g) = b.device_ptr(s);
    let (dst_p, _dst_g) = dst.device_ptr_mut(s);
    // SAFETY: all three pointers come from buffers of n elements (checked above).
    unsafe { reduce_from_ptr::<T>(stream, op, dst_p, a_p, b_p, n) }
}

/// [`reduce_from`] on raw device addresses.
///
/// # Safety
/// `dst`, `a` and `b` must each address `n` elements of `T` usable from the stream's
/// context until the kernel has run; `dst` may equal `a` but must not partly overlap
/// either input.
pub(super) unsafe fn reduce_from_ptr<T: GpuElement>(
    stream: &Stream,
    op: ReduceOp,
    dst: DeviceAddr,
    a: DeviceAddr,
    b: DeviceAddr,
    n: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let n64 = n as u64;
    let name = format!("reduce_from_{op}_{}", T::NAME);
    let mut args = [arg(&dst), arg(&a), arg(&b), arg(&n64)];
    // SAFETY: (T*, const T*, const T*, size_t) as in reduce.cu; the caller vouches for
    // n elements behind each pointer.
    unsafe { stream.launch(&name, n.div_ceil(per_vector::<T>()), &mut args) }
}

/// Device twin of [`crate::reduce::reduce_finalize`]: divides by `world_size` for `Avg`,
/// nothing otherwise.
pub fn reduce_finalize<T: GpuElement>(
    stream: &Stream,
    op: ReduceOp,
    dst: &mut impl DevicePtrMut<T>,
    world_size: usize,
) -> Result<()> {
    let n = dst.len();
    if op != ReduceOp::Avg || n == 0 {
        return Ok(());
    }
    let s = stream.cuda();
    let (dst_p, _dst_g) = dst.device_ptr_mut(s);
    // SAFETY: the pointer comes from a buffer of n elements.
    unsafe { reduce_finalize_ptr::<T>(stream, op, dst_p, world_size, n) }
}

/// [`reduce_finalize`] on a raw device address.
///
/// # Safety
/// `dst` must address `n` writable elements of `T` until the kernel has run.
pub(super) unsafe fn reduce_finalize_ptr<T: GpuElement>(
    stream: &Stream,
    op: ReduceOp,
    dst: DeviceAddr,
    world_size: usize,
    n: usize,
) -> Result<()> {
    if op != ReduceOp::Avg || n == 0 {
        return Ok(());
    }
    let (world, n64) = (world_size as u64, n as u64);
    let name = format!("reduce_finalize_avg_{}", T::NAME);
    let mut args = [arg(&dst), arg(&world), arg(&n64)];
    // SAFETY: (T*, unsigned long long, size_t) as in reduce.cu; dst holds n elements.
    unsafe { stream.launch(&name, n, &mut args) }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// Without a GPU, the ptxas report of the build is the best witness of what the
    /// fatbin holds: every launcher's kernel must be there for both architectures, and
    /// nothing else.
    #[test]
    fn every_launcher_has_a_compiled_kernel() {
        let report = include_str!(concat!(env!("OUT_DIR"), "/ptxas.txt"));
        for arch in ["sm_80", "sm_90"] {
            let compiled: BTreeSet<&str> = report
                .lines()
                .filter_map(|l| l.split("Compiling entry function '").nth(1))
                .filter(|rest| rest.ends_with(&format!("for '{arch}'")))
                .filter_map(|rest| rest.split('\'').next())
                .collect();
            let wanted: BTreeSet<String> = super::kernel_names().into_iter().collect();
            let wanted: BTreeSet<&str> = wanted.iter().map(|s| s.as_str()).collect();
            assert_eq!(compiled, wanted, "{arch}");
            assert_eq!(wanted.len(), 8 + 3 * 11);
        }
    }
}
