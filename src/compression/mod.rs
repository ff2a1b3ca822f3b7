//! fp16 / bf16 wire formats: element kernels and the [`Compressor`] that owns their state.
//!
//! Gradients travel as 16-bit floats and are accumulated in f32. Every kernel here is the
//! CPU twin of a CUDA kernel in `kernels/compress.cu` with the same name and argument
//! order; [`mod@reference`] holds plain scalar versions that the fast paths (AVX2/F16C on
//! x86-64, chosen at run time) must match bit for bit.
//!
//! # Numeric policy (shared with the CUDA kernels)
//!
//! For each element the kernels form `v` in f32 with two roundings and no fused
//! multiply-add, so that CPU and GPU agree bitwise:
//!
//! ```text
//! compress:                 v = src*scale + residual            (residual term only if given)
//! decompress_add_compress:  v = f32(incoming) + (local*scale + residual)
//! ```
//!
//! then classify `v`:
//!
//! | case | wire value | residual afterwards | counted as |
//! | --- | --- | --- | --- |
//! | `\|v\| <= MAX` (finite) | round-to-nearest-even of `v` | `v - f32(wire)` (exact) | — |
//! | finite, `\|v\| > MAX` | `±MAX` (saturate) | `v - (±MAX)` | `overflow` |
//! | `±inf` although every input was finite (f32 overflow while scaling) | `±MAX` | `0` | `overflow` |
//! | `±inf` from an infinite input | `±inf` | `0` | `nonfinite` |
//! | NaN | canonical quiet NaN (`0x7E00` / `0x7FC0`) | `0` | `nonfinite` |
//!
//! `MAX` is 65504 for fp16 and 3.3895314e38 for bf16. A finite input therefore never
//! turns into an infinity on the wire; what saturation cuts off stays in the residual and
//! is sent on later steps. NaN and infinities are passed on (hiding them would hide a
//! diverging run) and counted, but never stored in a residual, so one bad step does not
//! poison every later one.
//!
//! Widening a wire value to f32 is exact. For bf16 it is a plain 16-bit shift (NaN
//! payloads pass unchanged); for fp16 NaNs come out quiet with their payload, as F16C
//! and `half` do.
//!
//! Length mismatches follow [`crate::reduce`]: the element kernels process the common
//! prefix and check equality in debug builds; [`Compressor`] checks and returns errors.

use std::fmt;
use std::ops::{Add, AddAssign};

use half::{bf16, f16};

mod compressor;
pub mod reference;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use compressor::{Compressor, ScalePolicy};

pub use crate::dtype::WireFormat;

impl WireFormat {
    /// Largest finite value of the format, as f32.
    pub fn max(self) -> f32 {
        match self {
            WireFormat::F16 => <f16 as WireFloat>::MAX,
            WireFormat::Bf16 => <bf16 as WireFloat>::MAX,
        }
    }
}

/// What a compressing kernel had to do beyond plain rounding (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OverflowStats {
    /// Finite values beyond the wire range, sent as `±MAX`.
    pub overflow: u64,
    /// NaN or infinite values, passed on as NaN / `±inf`.
    pub nonfinite: u64,
}

impl OverflowStats {
    /// True when nothing was saturated and nothing non-finite was seen.
    pub fn is_clean(&self) -> bool {
        self.overflow == 0 && self.nonfinite == 0
    }
}

impl Add for OverflowStats {
    type Output = OverflowStats;
    fn add(self, o: OverflowStats) -> OverflowStats {
        OverflowStats {
            overflow: self.overflow + o.overflow,
            nonfinite: self.nonfinite + o.nonfinite,
        }
    }
}

impl AddAssign for OverflowStats {
    fn add_assign(&mut self, o: OverflowStats) {
        *self = *self + o;
    }
}

mod private {
    /// Seals [`super::WireFloat`] and carries the per-format SIMD lane conversions, which
    /// are implementation details of the fast paths.
    pub trait Sealed {
        /// 8 f32 lanes (finite, `|v| <= MAX`) to 8 wire values, round-to-nearest-even.
        ///
        /// # Safety
        /// The CPU must support AVX2 and F16C.
        #[cfg(target_arch = "x86_64")]
        unsafe fn narrow8(v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m128i;
        /// 8 wire values to 8 f32 lanes, exactly.
        ///
        /// # Safety
        /// The CPU must support AVX2 and F16C.
        #[cfg(target_arch = "x86_64")]
        unsafe fn widen8(h: std::arch::x86_64::__m128i) -> std::arch::x86_64::__m256;
    }
}

/// A 16-bit floating-point wire type: [`half::f16`] or [`half::bf16`].
///
/// Sealed: the kernels' numeric policy is written for exactly these two formats.
pub trait WireFloat:
    bytemuck::Pod + Default + PartialEq + fmt::Debug + Send + Sync + 'static + private::Sealed
{
    /// The runtime tag of this format.
    const FORMAT: WireFormat;
    /// Largest finite value, as f32.
    const MAX: f32;
    /// Bit pattern of the largest finite value.
    const MAX_BITS: u16;
    /// Bit pattern of +infinity.
    const INF_BITS: u16;
    /// Bit pattern of the canonical quiet NaN written for every NaN.
    const NAN_BITS: u16;

    /// Round-to-nearest-even of a finite `v` with `|v| <= MAX` (plain scalar code).
    fn round_rne(v: f32) -> Self;
    /// Exact widening to f32 (plain scalar code).
    fn widen(self) -> f32;
    /// The raw bits.
    fn to_bits(self) -> u16;
    /// From raw bits.
    fn from_bits(bits: u16) -> Self;
}

impl private::Sealed for f16 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn narrow8(v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m128i {
        x86::f16_narrow8(v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(h: std::arch::x86_64::__m128i) -> std::arch::x86_64::__m256 {
        x86::f16_widen8(h)
    }
}

impl WireFloat for f16 {
    const FORMAT: WireFormat = WireFormat::F16;
    const MAX: f32 = 65504.0;
    const MAX_BITS: u16 = 0x7BFF;
    const INF_BITS: u16 = 0x7C00;
    const NAN_BITS: u16 = 0x7E00;

    #[inline(always)]
    fn round_rne(v: f32) -> Self {
        // `_const` is half's portable software path, independent of the F16C fast path.
        f16::from_f32_const(v)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32_const()
    }
    #[inline(always)]
    fn to_bits(self) -> u16 {
        f16::to_bits(self)
    }
    #[inline(always)]
    fn from_bits(bits: u16) -> Self {
        f16::from_bits(bits)
    }
}

impl private::Sealed for bf16 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn narrow8(v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m128i {
        x86::bf16_narrow8(v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(h: std::arch::x86_64::__m128i) -> std::arch::x86_64::__m256 {
        x86::bf16_widen8(h)
    }
}

impl WireFloat for bf16 {
    const FORMAT: WireFormat = WireFormat::Bf16;
    const MAX: f32 = 3.389_531_4e38;
    const MAX_BITS: u16 = 0x7F7F;
    const INF_BITS: u16 = 0x7F80;
    const NAN_BITS: u16 = 0x7FC0;

    #[inline(always)]
    fn round_rne(v: f32) -> Self {
        bf16::from_f32_const(v)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        // A plain shift, also for NaN (the CUDA intrinsic does the same).
        f32::from_bits((bf16::to_bits(self) as u32) << 16)
    }
    #[inline(always)]
    fn to_bits(self) -> u16 {
        bf16::to_bits(self)
    }
    #[inline(always)]
    fn from_bits(bits: u16) -> Self {
        bf16::from_bits(bits)
    }
}

/// Applies the numeric policy to one value `v`; `inputs_finite` says whether every input
/// that went into `v` was finite. Returns the wire value and the new residual.
#[inline(always)]
pub(crate) fn encode<W: WireFloat>(
    v: f32,
    inputs_finite: bool,
    stats: &mut OverflowStats,
) -> (W, f32) {
    let sign = if v.is_sign_negative() { 0x8000 } else { 0 };
    if v.is_nan() {
        stats.nonfinite += 1;
        (W::from_bits(W::NAN_BITS), 0.0)
    } else if v.is_infinite() {
        if inputs_finite {
            stats.overflow += 1;
            (W::from_bits(W::MAX_BITS | sign), 0.0)
        } else {
            stats.nonfinite += 1;
            (W::from_bits(W::INF_BITS | sign), 0.0)
        }
    } else if v.abs() > W::MAX {
        stats.overflow += 1;
        (W::from_bits(W::MAX_BITS | sign), v - W::MAX.copysign(v))
    } else {
        let w = W::round_rne(v);
        (w, v - w.widen())
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn fast_path() -> bool {
    // The detection macro caches its answer; this is one relaxed load after the first call.
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
}

/// `dst = W(src*scale + residual)`, updating `residual` to what rounding left behind.
///
/// Returns what had to be saturated or passed on as non-finite (see the module docs).
pub fn compress<W: WireFloat>(
    src: &[f32],
    scale: f32,
    residual: Option<&mut [f32]>,
    dst: &mut [W],
) -> OverflowStats {
    debug_assert_eq!(src.len(), dst.len());
    debug_assert!(residual.as_ref().is_none_or(|r| r.len() == src.len()));
    #[cfg(target_arch = "x86_64")]
    if fast_path() {
        // SAFETY: AVX2 and F16C were detected just above.
        return unsafe { x86::compress(src, scale, residual, dst) };
    }
    reference::compress(src, scale, residual, dst)
}

/// `dst = f32(src)`.
pub fn decompress<W: WireFloat>(src: &[W], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if fast_path() {
        // SAFETY: AVX2 and F16C were detected just above.
        return unsafe { x86::decompress(src, dst) };
    }
    reference::decompress(src, dst)
}

/// `dst += f32(src)`.
pub fn decompress_add<W: WireFloat>(src: &[W], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if fast_path() {
        // SAFETY: AVX2 and F16C were detected just above.
        return unsafe { x86::decompress_add(src, dst) };
    }
    reference::decompress_add(src, dst)
}

/// The fused ring reduce step: `dst = W(f32(incoming) + (local*scale + residual))`, one
/// rounding, updating `residual` like [`compress`].
///
/// `incoming` is the partial sum received from the previous rank, `local` this rank's
/// unscaled contribution to the same chunk.
pub fn decompress_add_compress<W: WireFloat>(
    incoming: &[W],
    local: &[f32],
    scale: f32,
    residual: Option<&mut [f32]>,
    dst: &mut [W],
) -> OverflowStats {
    debug_assert_eq!(incoming.len(), dst.len());
    debug_assert_eq!(local.len(), dst.len());
    debug_assert!(residual.as_ref().is_none_or(|r| r.len() == dst.len()));
    #[cfg(target_arch = "x86_64")]
    if fast_path() {
        // SAFETY: AVX2 and F16C were detected just above.
        return unsafe { x86::decompress_add_compress(incoming, local, scale, residual, dst) };
    }
    reference::decompress_add_compress(incoming, local, scale, residual, dst)
}

/// [`compress`] to fp16 (twin of the CUDA kernel `fp16_compress`).
pub fn fp16_compress(
    src: &[f32],
    scale: f32,
    residual: Option<&mut [f32]>,
    dst: &mut [f16],
) -> OverflowStats {
    compress(src, scale, residual, dst)
}

/// [`decompress`] from fp16.
pub fn fp16_decompress(src: &[f16], dst: &mut [f32]) {
    decompress(src, dst)
}

/// [`decompress_add`] from fp16.
pub fn fp16_decompress_add(src: &[f16], dst: &mut [f32]) {
    decompress_add(src, dst)
}

/// [`decompress_add_compress`] on fp16.
pub fn fp16_decompress_add_compress(
    incoming: &[f16],
    local: &[f32],
    scale: f32,
    residual: Option<&mut [f32]>,
    dst: &mut [f16],
) -> OverflowStats {
    decompress_add_compress(incoming, local, scale, residual, dst)
}

/// [`compress`] to bf16.
pub fn bf16_compress(
    src: &[f32],
    scale: f32,
    residual: Option<&mut [f32]>,
    dst: &mut [bf16],
) -> OverflowStats {
    compress(src, scale, residual, dst)
}

/// [`decompress`] from bf16.
pub fn bf16_decompress(src: &[bf16], dst: &mut [f32]) {
    decompress(src, dst)
}

/// [`decompress_add`] from bf16.
pub fn bf16_decompress_add(src: &[bf16], dst: &mut [f32]) {
    decompress_add(src, dst)
}

/// [`decompress_add_compress`] on bf16.
pub fn bf16_decompress_add_compress(
    incoming: &[bf16],
    local: &[f32],
    scale: f32,
    residual: Option<&mut [f32]>,
    dst: &mut [bf16],
) -> OverflowStats {
    decompress_add_compress(incoming, local, scale, residual, dst)
}

#[cfg(test)]
mod tests;

/// Views wire bytes as `W`, copying only when they are misaligned.
fn wire_slice<W: WireFloat>(bytes: &[u8]) -> std::borrow::Cow<'_, [W]> {
    match bytemuck::try_cast_slice::<u8, W>(bytes) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => std::borrow::Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}

/// [`compress`] into raw wire bytes (`2 * src.len()` of them) of a runtime `format`:
/// the form the executor sends over a compressing link.
pub fn compress_bytes(
    format: WireFormat,
    src: &[f32],
    scale: f32,
    residual: Option<&mut [f32]>,
    dst: &mut [u8],
) -> OverflowStats {
    fn go<W: WireFloat>(
        src: &[f32],
        scale: f32,
        r: Option<&mut [f32]>,
        dst: &mut [u8],
    ) -> OverflowStats {
        match bytemuck::try_cast_slice_mut::<u8, W>(dst) {
            Ok(d) => compress(src, scale, r, d),
            Err(_) => {
                let mut tmp = vec![W::default(); src.len()];
                let s = compress(src, scale, r, &mut tmp);
                dst.copy_from_slice(bytemuck::cast_slice(&tmp));
                s
            }
        }
    }
    match format {
        WireFormat::F16 => go::<f16>(src, scale, residual, dst),
        WireFormat::Bf16 => go::<bf16>(src, scale, residual, dst),
    }
}

/// `dst = f32(wire)` from raw wire bytes.
pub fn decompress_bytes(format: WireFormat, src: &[u8], dst: &mut [f32]) {
    match format {
        WireFormat::F16 => decompress::<f16>(&wire_slice(src), dst),
        WireFormat::Bf16 => decompress::<bf16>(&wire_slice(src), dst),
    }
}

/// `dst += f32(wire)` from raw wire bytes.
pub fn decompress_add_bytes(format: WireFormat, src: &[u8], dst: &mut [f32]) {
    match format {
        WireFormat::F16 => decompress_add::<f16>(&wire_slice(src), dst),
        WireFormat::Bf16 => decompress_add::<bf16>(&wire_slice(src), dst),
    }
}
