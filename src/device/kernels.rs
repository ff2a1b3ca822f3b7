//! Typed launchers, one per CUDA kernel, named and ordered like the CPU twins.
//!
//! Each checks lengths, takes the device pointers through cudarc (which orders this
//! stream after earlier writers on other streams), and launches on the given [`Stream`].
//! All are asynchronous: results are ready after [`Stream::synchronize`] or a download.
//!
//! Below the launchers, every kernel of `kernels/*.cu` has a key: a [`Signature`] value
//! (the kernel's family and its format, operation or element type) that gives the
//! kernel's index in [`KERNELS`], where the module caches its function, and the Rust
//! types of its parameter list, [`Signature::Args`]. [`Stream::launch`] takes exactly
//! those, so a launcher cannot pass another kernel's arguments, and a test checks each
//! parameter list's size against what the compiler reports for the kernel.

use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, LaunchArgs, PushKernelArg};
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
    /// The element types of the reduction kernels, in the order of their names in
    /// [`super::KERNELS`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum GpuType {
        F32 = 0,
        F16 = 1,
        Bf16 = 2,
    }

    pub trait Sealed {
        const TYPE: GpuType;
    }
    impl Sealed for f32 {
        const TYPE: GpuType = GpuType::F32;
    }
    impl Sealed for half::f16 {
        const TYPE: GpuType = GpuType::F16;
    }
    impl Sealed for half::bf16 {
        const TYPE: GpuType = GpuType::Bf16;
    }
}

use private::GpuType;

impl GpuElement for f32 {
    const NAME: &'static str = "f32";
}
impl GpuElement for f16 {
    const NAME: &'static str = "f16";
}
impl GpuElement for bf16 {
    const NAME: &'static str = "bf16";
}

/// Every `extern "C"` kernel in the fatbin, by index: the wire kernels per format, then
/// `reduce_inplace`, `reduce_from` (each per element type, then per operation in
/// [`ReduceOp`]'s order: sum, prod, max, min, avg) and `reduce_finalize_avg` per element
/// type. The module resolves all of them at load, so a missing one fails `Device::open`
/// rather than a launch.
pub(super) const KERNELS: [&str; 41] = [
    "fp16_compress",
    "fp16_decompress",
    "fp16_decompress_add",
    "fp16_decompress_add_compress",
    "bf16_compress",
    "bf16_decompress",
    "bf16_decompress_add",
    "bf16_decompress_add_compress",
    "reduce_inplace_sum_f32",
    "reduce_inplace_prod_f32",
    "reduce_inplace_max_f32",
    "reduce_inplace_min_f32",
    "reduce_inplace_avg_f32",
    "reduce_inplace_sum_f16",
    "reduce_inplace_prod_f16",
    "reduce_inplace_max_f16",
    "reduce_inplace_min_f16",
    "reduce_inplace_avg_f16",
    "reduce_inplace_sum_bf16",
    "reduce_inplace_prod_bf16",
    "reduce_inplace_max_bf16",
    "reduce_inplace_min_bf16",
    "reduce_inplace_avg_bf16",
    "reduce_from_sum_f32",
    "reduce_from_prod_f32",
    "reduce_from_max_f32",
    "reduce_from_min_f32",
    "reduce_from_avg_f32",
    "reduce_from_sum_f16",
    "reduce_from_prod_f16",
    "reduce_from_max_f16",
    "reduce_from_min_f16",
    "reduce_from_avg_f16",
    "reduce_from_sum_bf16",
    "reduce_from_prod_bf16",
    "reduce_from_max_bf16",
    "reduce_from_min_bf16",
    "reduce_from_avg_bf16",
    "reduce_finalize_avg_f32",
    "reduce_finalize_avg_f16",
    "reduce_finalize_avg_bf16",
];

/// Index of the first `reduce_inplace`, `reduce_from` and `reduce_finalize_avg` kernel in
/// [`KERNELS`].
const REDUCE_INPLACE: usize = 8;
const REDUCE_FROM: usize = REDUCE_INPLACE + 3 * 5;
const FINALIZE_AVG: usize = REDUCE_FROM + 3 * 5;

/// A kernel's parameter list as plain values (device addresses and scalars), in the order
/// of its `.cu` signature: what [`Stream::launch`] pushes through cudarc's launch builder.
pub(super) trait KernelArgs {
    /// Bytes of the parameter block the kernel receives, each value at its alignment
    /// (checked against the compiled kernels by the tests).
    #[cfg(test)]
    const PARAM_BYTES: usize;

    /// Pushes every value, in order, as one kernel argument.
    fn push<'a>(&'a self, launch: &mut LaunchArgs<'a>);
}

macro_rules! kernel_args {
    ($($t:ident $i:tt),+) => {
        impl<$($t: DeviceRepr),+> KernelArgs for ($($t,)+) {
            #[cfg(test)]
            const PARAM_BYTES: usize = {
                let mut end: usize = 0;
                $(end = end.next_multiple_of(std::mem::align_of::<$t>())
                    + std::mem::size_of::<$t>();)+
                end
            };

            fn push<'a>(&'a self, launch: &mut LaunchArgs<'a>) {
                $(launch.arg(&self.$i);)+
            }
        }
    };
}

kernel_args!(A 0, B 1, C 2);
kernel_args!(A 0, B 1, C 2, D 3);
kernel_args!(A 0, B 1, C 2, D 3, E 4, F 5);
kernel_args!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);

/// A kernel of the module and the types of its parameters: the key the launch prologue
/// looks its function up by, and the arguments it accepts.
pub(super) trait Signature: Copy {
    /// The parameter list, as in the `.cu` signature.
    type Args: KernelArgs;

    /// Position in [`KERNELS`].
    fn index(self) -> usize;

    /// The kernel's name, for errors.
    fn name(self) -> &'static str {
        KERNELS
            .get(self.index())
            .copied()
            .unwrap_or("(unknown kernel)")
    }
}

/// `<format>_compress(const float* src, float scale, float* residual, uint16_t* dst,
/// size_t n, unsigned long long* stats)`
#[derive(Clone, Copy, Debug)]
pub(super) struct Compress(pub WireFormat);

impl Signature for Compress {
    type Args = (DeviceAddr, f32, DeviceAddr, DeviceAddr, u64, DeviceAddr);
    fn index(self) -> usize {
        self.0 as usize * 4
    }
}

/// `<format>_decompress(const uint16_t* src, float* dst, size_t n)`, or
/// `<format>_decompress_add` with `add`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Decompress {
    pub format: WireFormat,
    pub add: bool,
}

impl Signature for Decompress {
    type Args = (DeviceAddr, DeviceAddr, u64);
    fn index(self) -> usize {
        self.format as usize * 4 + 1 + usize::from(self.add)
    }
}

/// `<format>_decompress_add_compress(const uint16_t* incoming, const float* local, float
/// scale, float* residual, uint16_t* dst, size_t n, unsigned long long* stats)`
#[derive(Clone, Copy, Debug)]
pub(super) struct DecompressAddCompress(pub WireFormat);

impl Signature for DecompressAddCompress {
    type Args = (
        DeviceAddr,
        DeviceAddr,
        f32,
        DeviceAddr,
        DeviceAddr,
        u64,
        DeviceAddr,
    );
    fn index(self) -> usize {
        self.0 as usize * 4 + 3
    }
}

/// `reduce_inplace_<op>_<type>(T* dst, const T* src, size_t n)`
#[derive(Clone, Copy, Debug)]
pub(super) struct ReduceInplace(pub ReduceOp, pub GpuType);

impl Signature for ReduceInplace {
    type Args = (DeviceAddr, DeviceAddr, u64);
    fn index(self) -> usize {
        REDUCE_INPLACE + self.1 as usize * 5 + self.0 as usize
    }
}

/// `reduce_from_<op>_<type>(T* dst, const T* a, const T* b, size_t n)`
#[derive(Clone, Copy, Debug)]
pub(super) struct ReduceFrom(pub ReduceOp, pub GpuType);

impl Signature for ReduceFrom {
    type Args = (DeviceAddr, DeviceAddr, DeviceAddr, u64);
    fn index(self) -> usize {
        REDUCE_FROM + self.1 as usize * 5 + self.0 as usize
    }
}

/// `reduce_finalize_avg_<type>(T* dst, unsigned long long world_size, size_t n)`
#[derive(Clone, Copy, Debug)]
pub(super) struct FinalizeAvg(pub GpuType);

impl Signature for FinalizeAvg {
    type Args = (DeviceAddr, u64, u64);
    fn index(self) -> usize {
        FINALIZE_AVG + self.0 as usize
    }
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
    let args = (src_p, scale, res_p, dst_p, n64, stats);
    // SAFETY: every buffer holds n elements (checked above), residual may be null.
    unsafe { stream.launch(Compress(W::FORMAT), n.div_ceil(8), args) }
}

fn decompress_impl<W: WireFloat + DeviceRepr>(
    add: bool,
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
    let kernel = Decompress {
        format: W::FORMAT,
        add,
    };
    // SAFETY: both buffers hold n elements (checked above).
    unsafe { stream.launch(kernel, n.div_ceil(8), (src_p, dst_p, n as u64)) }
}

/// Device twin of [`crate::compression::decompress`]: `dst = f32(src)`.
pub fn decompress<W: WireFloat + DeviceRepr>(
    stream: &Stream,
    src: &impl DevicePtr<W>,
    dst: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    decompress_impl(false, stream, src, dst)
}

/// Device twin of [`crate::compression::decompress_add`]: `dst += f32(src)`.
pub fn decompress_add<W: WireFloat + DeviceRepr>(
    stream: &Stream,
    src: &impl DevicePtr<W>,
    dst: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    decompress_impl(true, stream, src, dst)
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
    let args = (inc_p, loc_p, scale, res_p, dst_p, n64, stats);
    let kernel = DecompressAddCompress(W::FORMAT);
    // SAFETY: every buffer holds n elements (checked above), residual may be null.
    unsafe { stream.launch(kernel, n.div_ceil(8), args) }
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
    let kernel = ReduceInplace(op, T::TYPE);
    // SAFETY: the caller vouches for n elements behind each address.
    unsafe { stream.launch(kernel, n.div_ceil(per_vector::<T>()), (dst, src, n as u64)) }
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
    let kernel = ReduceFrom(op, T::TYPE);
    let items = n.div_ceil(per_vector::<T>());
    // SAFETY: the caller vouches for n elements behind each address.
    unsafe { stream.launch(kernel, items, (dst, a, b, n as u64)) }
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
    // SAFETY: the caller vouches for n elements behind `dst`.
    unsafe { stream.launch(FinalizeAvg(T::TYPE), n, (dst, world, n64)) }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// Every kernel key with its name as the `.cu` macros compose it and the size of the
    /// parameter list its launchers pass.
    fn every_key() -> Vec<(usize, String, usize)> {
        const OPS: [ReduceOp; 5] = [
            ReduceOp::Sum,
            ReduceOp::Prod,
            ReduceOp::Max,
            ReduceOp::Min,
            ReduceOp::Avg,
        ];
        const TYPES: [(GpuType, &str); 3] = [
            (GpuType::F32, f32::NAME),
            (GpuType::F16, f16::NAME),
            (GpuType::Bf16, bf16::NAME),
        ];
        fn key<S: Signature>(s: S, name: String) -> (usize, String, usize) {
            (s.index(), name, <S::Args as KernelArgs>::PARAM_BYTES)
        }
        let mut keys = Vec::new();
        for w in WireFormat::ALL {
            let f = w.name();
            keys.push(key(Compress(w), format!("{f}_compress")));
            for (add, k) in [(false, "decompress"), (true, "decompress_add")] {
                keys.push(key(Decompress { format: w, add }, format!("{f}_{k}")));
            }
            let k = DecompressAddCompress(w);
            keys.push(key(k, format!("{f}_decompress_add_compress")));
        }
        for (t, tn) in TYPES {
            for op in OPS {
                keys.push(key(
                    ReduceInplace(op, t),
                    format!("reduce_inplace_{op}_{tn}"),
                ));
                keys.push(key(ReduceFrom(op, t), format!("reduce_from_{op}_{tn}")));
            }
            keys.push(key(FinalizeAvg(t), format!("reduce_finalize_avg_{tn}")));
        }
        keys
    }

    #[test]
    fn every_key_names_its_own_kernel() {
        let keys = every_key();
        assert_eq!(keys.len(), KERNELS.len());
        let indices: BTreeSet<usize> = keys.iter().map(|k| k.0).collect();
        assert_eq!(indices, (0..KERNELS.len()).collect());
        for (index, name, _) in &keys {
            assert_eq!(KERNELS[*index], name, "index {index}");
        }
        assert_eq!(
            ReduceFrom(ReduceOp::Min, GpuType::F16).name(),
            "reduce_from_min_f16"
        );
        assert_eq!(Compress(WireFormat::Bf16).name(), "bf16_compress");
    }

    #[test]
    fn parameter_blocks_are_packed_as_in_c() {
        // (ptr, float, ptr, ptr, size_t, ptr): the pointer after the float starts at 16.
        assert_eq!(<Compress as Signature>::Args::PARAM_BYTES, 48);
        // (ptr, ptr, float, ptr, ptr, size_t, ptr)
        assert_eq!(<DecompressAddCompress as Signature>::Args::PARAM_BYTES, 56);
        assert_eq!(<(u64, u64, u64) as KernelArgs>::PARAM_BYTES, 24);
        assert_eq!(<(f32, f32, u64) as KernelArgs>::PARAM_BYTES, 16);
    }

    /// What ptxas reported compiling for `arch`: kernel name -> bytes of constant bank 0,
    /// where the parameters sit after a fixed header.
    fn compiled(report: &str, arch: &str) -> BTreeMap<String, Option<usize>> {
        let mut out = BTreeMap::new();
        let mut current: Option<String> = None;
        for line in report.lines() {
            if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                current = None;
                if rest.ends_with(&format!("for '{arch}'")) {
                    let name = rest.split('\'').next().unwrap_or_default().to_string();
                    out.insert(name.clone(), None);
                    current = Some(name);
                }
            } else if let (Some(name), Some(used)) = (&current, line.split(" barriers, ").nth(1)) {
                let bytes = used
                    .strip_suffix(" bytes cmem[0]")
                    .and_then(|b| b.parse().ok());
                out.insert(name.clone(), bytes);
            }
        }
        out
    }

    /// The kernels of `kernels/bert.cu` (the trainer's, launched by name through
    /// `Device::function`): every `extern "C" __global__ void [__launch_bounds__(..)] name(`.
    fn trainer_kernels() -> BTreeSet<&'static str> {
        let src = include_str!("../../kernels/bert.cu");
        src.split("extern \"C\" __global__ void")
            .skip(1)
            .filter_map(|rest| {
                let rest = rest.trim_start();
                let rest = match rest.strip_prefix("__launch_bounds__(") {
                    Some(r) => r.split_once(')')?.1.trim_start(),
                    None => rest,
                };
                rest.split_once('(').map(|(name, _)| name.trim())
            })
            .collect()
    }

    /// Without a GPU, the ptxas report of the build is the best witness of what the
    /// fatbin holds: every launcher's kernel must be there for every architecture, and
    /// nothing else but the trainer's; and on sm_80, whose report gives the size of constant bank 0 (the
    /// parameters start at its byte 0x160), every kernel's parameter block must be the
    /// size of the Rust argument list its launchers pass.
    #[test]
    fn every_launcher_has_a_compiled_kernel() {
        let report = include_str!(concat!(env!("OUT_DIR"), "/ptxas.txt"));
        let mut wanted: BTreeSet<&str> = KERNELS.iter().copied().collect();
        assert_eq!(wanted.len(), 8 + 3 * 11);
        let trainer = trainer_kernels();
        assert_eq!(trainer.len(), 16, "{trainer:?}");
        assert!(trainer.is_disjoint(&wanted), "{trainer:?}");
        wanted.extend(trainer);
        for arch in ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90"] {
            let compiled = compiled(report, arch);
            let names: BTreeSet<&str> = compiled.keys().map(|s| s.as_str()).collect();
            assert_eq!(names, wanted, "{arch}");
        }
        let sm80 = compiled(report, "sm_80");
        for (index, name, params) in every_key() {
            assert_eq!(
                sm80[&name],
                Some(0x160 + params),
                "kernel {name} (#{index}): constant bank 0 against the launchers' arguments"
            );
        }
    }
}
