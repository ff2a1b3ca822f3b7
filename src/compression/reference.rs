//! Plain scalar twins of the compression kernels: one element at a time, no SIMD, no
//! hardware conversion instructions. They define the results; the fast paths in
//! [`super`] and the CUDA kernels are tested against them bit for bit.

use half::{bf16, f16};

use super::{encode, OverflowStats, WireFloat};

/// Scalar [`super::compress`].
pub fn compress<W: WireFloat>(
    src: &[f32],
    scale: f32,
    residual: Option<&mut [f32]>,
    dst: &mut [W],
) -> OverflowStats {
    let mut stats = OverflowStats::default();
    match residual {
        Some(res) => {
            for ((s, r), d) in src.iter().zip(res.iter_mut()).zip(dst.iter_mut()) {
                let v = *s * scale + *r;
                let (w, e) = encode::<W>(v, s.is_finite() && r.is_finite(), &mut stats);
                *d = w;
                *r = e;
            }
        }
        None => {
            for (s, d) in src.iter().zip(dst.iter_mut()) {
                let (w, _) = encode::<W>(*s * scale, s.is_finite(), &mut stats);
                *d = w;
            }
        }
    }
    stats
}

/// Scalar [`super::decompress`].
pub fn decompress<W: WireFloat>(src: &[W], dst: &mut [f32]) {
    for (s, d) in src.iter().zip(dst.iter_mut()) {
        *d = s.widen();
    }
}

/// Scalar [`super::decompress_add`].
pub fn decompress_add<W: WireFloat>(src: &[W], dst: &mut [f32]) {
    for (s, d) in src.iter().zip(dst.iter_mut()) {
        *d += s.widen();
    }
}

/// Scalar [`super::decompress_add_compress`].
pub fn decompress_add_compress<W: WireFloat>(
    incoming: &[W],
    local: &[f32],
    scale: f32,
    residual: Option<&mut [f32]>,
    dst: &mut [W],
) -> OverflowStats {
    let mut stats = OverflowStats::default();
    match residual {
        Some(res) => {
            let it = incoming
                .iter()
                .zip(local)
                .zip(res.iter_mut())
                .zip(dst.iter_mut());
            for (((i, l), r), d) in it {
                let x = i.widen();
                let v = x + (*l * scale + *r);
                let finite = x.is_finite() && l.is_finite() && r.is_finite();
                let (w, e) = encode::<W>(v, finite, &mut stats);
                *d = w;
                *r = e;
            }
        }
        None => {
            for ((i, l), d) in incoming.iter().zip(local).zip(dst.iter_mut()) {
                let x = i.widen();
                let v = x + *l * scale;
                let (w, _) = encode::<W>(v, x.is_finite() && l.is_finite(), &mut stats);
                *d = w;
            }
        }
    }
    stats
}

/// Scalar twin of `fp16_compress`.
pub fn fp16_compress(
    src: &[f32],
    scale: f32,
    residual: Option<&mut [f32]>,
    dst: &mut [f16],
) -> OverflowStats {
    compress(src, scale, residual, dst)
}

/// Scalar twin of `fp16_decompress`.
pub fn fp16_decompress(src: &[f16], dst: &mut [f32]) {
    decompress(src, dst)
}

/// Scalar twin of `fp16_decompress_add`.
pub fn fp16_decompress_add(src: &[f16], dst: &mut [f32]) {
    decompress_add(src, dst)
}

/// Scalar twin of `fp16_decompress_add_compress`.
pub fn fp16_decompress_add_compress(
    incoming: &[f16],
    local: &[f32],
    scale: f32,
    residual: Option<&mut [f32]>,
    dst: &mut [f16],
) -> OverflowStats {
    decompress_add_compress(incoming, local, scale, residual, dst)
}

/// Scalar twin of `bf16_compress`.
pub fn bf16_compress(
    src: &[f32],
    scale: f32,
    residual: Option<&mut [f32]>,
    dst: &mut [bf16],
) -> OverflowStats {
    compress(src, scale, residual, dst)
}

/// Scalar twin of `bf16_decompress`.
pub fn bf16_decompress(src: &[bf16], dst: &mut [f32]) {
    decompress(src, dst)
}

/// Scalar twin of `bf16_decompress_add`.
pub fn bf16_decompress_add(src: &[bf16], dst: &mut [f32]) {
    decompress_add(src, dst)
}

/// Scalar twin of `bf16_decompress_add_compress`.
pub fn bf16_decompress_add_compress(
    incoming: &[bf16],
    local: &[f32],
    scale: f32,
    residual: Option<&mut [f32]>,
    dst: &mut [bf16],
) -> OverflowStats {
    decompress_add_compress(incoming, local, scale, residual, dst)
}
