//! AVX2 + F16C fast paths, 8 elements per step.
//!
//! The in-range case (`|v| <= MAX`, finite) is done in registers: fp16 with `vcvtps2ph`
//! (round-to-nearest-even immediate), bf16 with the integer rounding trick
//! `(bits + 0x7fff + lsb) >> 16`. A group of 8 holding anything else (saturation, NaN,
//! infinity) is handed to the scalar reference, which owns the policy; that keeps the two
//! bitwise identical by construction. Unaligned loads/stores throughout: transport buffers
//! carry no alignment promise and on current cores `loadu` costs nothing extra when the
//! data happens to be aligned.

use std::arch::x86_64::*;

use super::{reference, OverflowStats, WireFloat};

#[inline(always)]
pub(super) unsafe fn f16_narrow8(v: __m256) -> __m128i {
    _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)
}

#[inline(always)]
pub(super) unsafe fn f16_widen8(h: __m128i) -> __m256 {
    _mm256_cvtph_ps(h)
}

#[inline(always)]
pub(super) unsafe fn bf16_narrow8(v: __m256) -> __m128i {
    let bits = _mm256_castps_si256(v);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    let rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
    let hi = _mm256_srli_epi32::<16>(rounded);
    // packus works per 128-bit half: [h0..h3 h0..h3 | h4..h7 h4..h7]; keep 64-bit
    // pieces 0 and 2 to get h0..h7 in order in the low 128 bits.
    let packed = _mm256_packus_epi32(hi, hi);
    _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b10_00_10_00>(packed))
}

#[inline(always)]
pub(super) unsafe fn bf16_widen8(h: __m128i) -> __m256 {
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

/// Lanes where `!(|v| <= max)`: beyond the range, infinite or NaN.
#[inline(always)]
unsafe fn out_of_range(v: __m256, max: __m256) -> i32 {
    let abs = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF)));
    _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NLE_UQ>(abs, max))
}

/// # Safety
/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn compress<W: WireFloat>(
    src: &[f32],
    scale: f32,
    residual: Option<&mut [f32]>,
    dst: &mut [W],
) -> OverflowStats {
    match residual {
        Some(res) => compress_body::<W, true>(src, scale, res, dst),
        None => compress_body::<W, false>(src, scale, &mut [], dst),
    }
}

#[target_feature(enable = "avx2,f16c")]
unsafe fn compress_body<W: WireFloat, const R: bool>(
    src: &[f32],
    scale: f32,
    res: &mut [f32],
    dst: &mut [W],
) -> OverflowStats {
    let mut n = src.len().min(dst.len());
    if R {
        n = n.min(res.len());
    }
    let (sp, dp, rp) = (src.as_ptr(), dst.as_mut_ptr(), res.as_mut_ptr());
    let scale8 = _mm256_set1_ps(scale);
    let max8 = _mm256_set1_ps(W::MAX);
    let mut stats = OverflowStats::default();
    let mut i = 0;
    while i + 8 <= n {
        let mut v = _mm256_mul_ps(_mm256_loadu_ps(sp.add(i)), scale8);
        if R {
            v = _mm256_add_ps(v, _mm256_loadu_ps(rp.add(i)));
        }
        if out_of_range(v, max8) == 0 {
            let h = W::narrow8(v);
            _mm_storeu_si128(dp.add(i) as *mut __m128i, h);
            if R {
                _mm256_storeu_ps(rp.add(i), _mm256_sub_ps(v, W::widen8(h)));
            }
        } else {
            let r = if R { Some(&mut res[i..i + 8]) } else { None };
            stats += reference::compress(&src[i..i + 8], scale, r, &mut dst[i..i + 8]);
        }
        i += 8;
    }
    let r = if R { Some(&mut res[i..n]) } else { None };
    stats + reference::compress(&src[i..n], scale, r, &mut dst[i..n])
}

/// # Safety
/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn decompress<W: WireFloat>(src: &[W], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm_loadu_si128(sp.add(i) as *const __m128i);
        _mm256_storeu_ps(dp.add(i), W::widen8(h));
        i += 8;
    }
    reference::decompress(&src[i..n], &mut dst[i..n]);
}

/// # Safety
/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn decompress_add<W: WireFloat>(src: &[W], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm_loadu_si128(sp.add(i) as *const __m128i);
        _mm256_storeu_ps(
            dp.add(i),
            _mm256_add_ps(_mm256_loadu_ps(dp.add(i)), W::widen8(h)),
        );
        i += 8;
    }
    reference::decompress_add(&src[i..n], &mut dst[i..n]);
}

/// # Safety
/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn decompress_add_compress<W: WireFloat>(
    incoming: &[W],
    local: &[f32],
    scale: f32,
    residual: Option<&mut [f32]>,
    dst: &mut [W],
) -> OverflowStats {
    match residual {
        Some(res) => fused_body::<W, true>(incoming, local, scale, res, dst),
        None => fused_body::<W, false>(incoming, local, scale, &mut [], dst),
    }
}

#[target_feature(enable = "avx2,f16c")]
unsafe fn fused_body<W: WireFloat, const R: bool>(
    incoming: &[W],
    local: &[f32],
    scale: f32,
    res: &mut [f32],
    dst: &mut [W],
) -> OverflowStats {
    let mut n = incoming.len().min(local.len()).min(dst.len());
    if R {
        n = n.min(res.len());
    }
    let (ip, lp, dp, rp) = (
        incoming.as_ptr(),
        local.as_ptr(),
        dst.as_mut_ptr(),
        res.as_mut_ptr(),
    );
    let scale8 = _mm256_set1_ps(scale);
    let max8 = _mm256_set1_ps(W::MAX);
    let mut stats = OverflowStats::default();
    let mut i = 0;
    while i + 8 <= n {
        let x = W::widen8(_mm_loadu_si128(ip.add(i) as *const __m128i));
        let mut t = _mm256_mul_ps(_mm256_loadu_ps(lp.add(i)), scale8);
        if R {
            t = _mm256_add_ps(t, _mm256_loadu_ps(rp.add(i)));
        }
        let v = _mm256_add_ps(x, t);
        if out_of_range(v, max8) == 0 {
            let h = W::narrow8(v);
            _mm_storeu_si128(dp.add(i) as *mut __m128i, h);
            if R {
                _mm256_storeu_ps(rp.add(i), _mm256_sub_ps(v, W::widen8(h)));
            }
        } else {
            let r = if R { Some(&mut res[i..i + 8]) } else { None };
            stats += reference::decompress_add_compress(
                &incoming[i..i + 8],
                &local[i..i + 8],
                scale,
                r,
                &mut dst[i..i + 8],
            );
        }
        i += 8;
    }
    let r = if R { Some(&mut res[i..n]) } else { None };
    stats
        + reference::decompress_add_compress(
            &incoming[i..n],
            &local[i..n],
            scale,
            r,
            &mut dst[i..n],
        )
}
