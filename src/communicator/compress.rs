//! Compressed all-reduce: the passes around the schedule.
//!
//! ```text
//! before:  x = wire(x·scale + residual)          (Compressor: error feedback, overflow counts)
//! during:  compressing links carry 16-bit values; sums are formed in f32 (executor)
//! after:   x = f32(wire(x)) / scale  [/ world for avg]
//! ```
//!
//! The last pass rounds every rank's result through the wire format once more. A rank
//! that received a value over an exact link and one that received it compressed then
//! hold the same bits (rounding is idempotent), so results stay identical on every rank
//! even when only inter-node links compress.

use crate::compression::{self, Compressor, OverflowStats, WireFormat};
use crate::dtype::ReduceOp;
use crate::error::Result;

/// Elements per pass step: small enough that the wire staging stays in L1/L2.
const STEP: usize = 8192;

/// Scales and quantises `src` into `dst` (they may be the same memory only when passed
/// as `dst` alone, see [`pre_pass_inplace`]), feeding the rounding error back into the
/// compressor's residual for `buffer`.
pub(crate) fn pre_pass(
    comp: &mut Compressor,
    buffer: u64,
    src: &[f32],
    dst: &mut [f32],
    world: usize,
) -> Result<OverflowStats> {
    let mut stats = OverflowStats::default();
    let mut wire = vec![0u8; 2 * STEP.min(src.len())];
    for (i, (s, d)) in src.chunks(STEP).zip(dst.chunks_mut(STEP)).enumerate() {
        let w = &mut wire[..2 * s.len()];
        stats += comp.compress(buffer, i * STEP, s, world, w)?;
        compression::decompress_bytes(comp.format(), w, d);
    }
    Ok(stats)
}

/// [`pre_pass`] where source and destination are one buffer.
pub(crate) fn pre_pass_inplace(
    comp: &mut Compressor,
    buffer: u64,
    buf: &mut [f32],
    world: usize,
) -> Result<OverflowStats> {
    let mut stats = OverflowStats::default();
    let mut wire = vec![0u8; 2 * STEP.min(buf.len())];
    for (i, d) in buf.chunks_mut(STEP).enumerate() {
        let w = &mut wire[..2 * d.len()];
        stats += comp.compress(buffer, i * STEP, d, world, w)?;
        compression::decompress_bytes(comp.format(), w, d);
    }
    Ok(stats)
}

/// Rounds the reduced values through the wire format and undoes the pre-scaling.
pub(crate) fn post_pass(
    format: WireFormat,
    buf: &mut [f32],
    scale: f32,
    op: ReduceOp,
    world: usize,
) {
    let mut wire = vec![0u8; 2 * STEP.min(buf.len())];
    let unscale = 1.0 / scale;
    for d in buf.chunks_mut(STEP) {
        let w = &mut wire[..2 * d.len()];
        compression::compress_bytes(format, d, 1.0, None, w);
        compression::decompress_bytes(format, w, d);
        for x in d.iter_mut() {
            *x *= unscale;
            if op == ReduceOp::Avg {
                *x /= world as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compression::ScalePolicy;

    #[test]
    fn passes_round_trip_a_sum_within_fp16_precision() {
        let world = 4;
        let mut comp =
            Compressor::new(WireFormat::F16, ScalePolicy::InverseWorldSize, true).unwrap();
        let x: Vec<f32> = (0..20_000).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let mut y = vec![0.0f32; x.len()];
        let s = pre_pass(&mut comp, 7, &x, &mut y, world).unwrap();
        assert!(s.is_clean());
        // Each y is x/4 rounded to fp16; the residual holds exactly what was lost.
        let r = comp.residual(7).unwrap();
        for i in 0..x.len() {
            assert_eq!(y[i] + r[i], x[i] / 4.0, "element {i}");
        }
        // Pretend four identical ranks summed: 4 * y, then undo the scale.
        let mut sum: Vec<f32> = y.iter().map(|v| v * 4.0).collect();
        post_pass(WireFormat::F16, &mut sum, 0.25, ReduceOp::Sum, world);
        for i in 0..x.len() {
            let rel = ((sum[i] - 4.0 * x[i]) / (4.0 * x[i]).abs().max(1e-3)).abs();
            assert!(
                rel < 2.0 * 2f32.powi(-11),
                "element {i}: {} vs {}",
                sum[i],
                4.0 * x[i]
            );
        }
        // avg divides by the world size on top.
        let mut avg: Vec<f32> = y.iter().map(|v| v * 4.0).collect();
        post_pass(WireFormat::F16, &mut avg, 0.25, ReduceOp::Avg, world);
        assert_eq!(avg[1000], sum[1000] / 4.0);
    }
}
