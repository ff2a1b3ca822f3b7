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
//!
//! Both passes run per block of the output, as the executor first and last touches it
//! ([`BlockPasses`]): a block is quantised just before its first send and rounded just
//! after its last receive, while it is in cache and while other blocks are still on the
//! wire, rather than in two sweeps over the whole buffer around the collective.

use std::ops::Range;

use crate::algorithm::executor::BlockPasses;
use crate::compression::{self, Compressor, WireFormat};
use crate::dtype::ReduceOp;
use crate::error::Result;

/// Elements per block: small enough that a block and its wire staging stay in L1/L2.
const STEP: usize = 8192;

/// The passes of one compressed all-reduce, applied block by block as the executor
/// reaches each block of the output (see [`BlockPasses`]).
pub(crate) struct Passes<'a> {
    comp: &'a mut Compressor,
    buffer: u64,
    /// The caller's input when it is not the output.
    input: Option<*const f32>,
    output: *mut f32,
    world: usize,
    /// The reduced values are multiplied by this at the end: `1/scale`, and `1/world`
    /// on top for `Avg`.
    unscale: f32,
    format: WireFormat,
    wire: Vec<u8>,
}

impl<'a> Passes<'a> {
    /// Passes over `output` (`n` f32), reading `input` first when it is a separate buffer.
    ///
    /// # Safety
    /// `output` must hold `n` f32 (and `input`, if given, too) that stay valid, and that
    /// nothing but the executor running these passes touches, until the passes are dropped.
    pub(crate) unsafe fn new(
        comp: &'a mut Compressor,
        buffer: u64,
        input: Option<*const f32>,
        output: *mut f32,
        world: usize,
        op: ReduceOp,
    ) -> Result<Self> {
        let scale = comp.scale(world)?;
        let unscale = if op == ReduceOp::Avg {
            1.0 / scale / world as f32
        } else {
            1.0 / scale
        };
        Ok(Passes {
            format: comp.format(),
            comp,
            buffer,
            input,
            output,
            world,
            unscale,
            wire: vec![0; 2 * STEP],
        })
    }

    fn elems(range: Range<usize>) -> Range<usize> {
        debug_assert!(range.start % 4 == 0 && range.end % 4 == 0);
        range.start / 4..range.end / 4
    }
}

impl BlockPasses for Passes<'_> {
    fn block_bytes(&self) -> usize {
        4 * STEP
    }

    /// `x = wire(x·scale + residual)`, the rounding error fed back into the residual;
    /// what had to be saturated is counted in the compressor.
    fn before(&mut self, range: Range<usize>) -> Result<()> {
        let e = Self::elems(range);
        let n = e.len();
        // SAFETY: `e` lies inside the `n` f32 of the buffers (the executor only passes
        // ranges of the output's length), which only this executor uses meanwhile.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.output.add(e.start), n) };
        let w = &mut self.wire[..2 * n];
        match self.input {
            Some(inp) => {
                // SAFETY: as above; the input is a distinct buffer, only read.
                let src = unsafe { std::slice::from_raw_parts(inp.add(e.start), n) };
                self.comp
                    .compress(self.buffer, e.start, src, self.world, w)?
            }
            None => self
                .comp
                .compress(self.buffer, e.start, dst, self.world, w)?,
        };
        compression::decompress_bytes(self.format, w, dst);
        Ok(())
    }

    /// `x = f32(wire(x)) / scale` (and `/ world` for `Avg`). The rounding makes a value
    /// that arrived over an exact link equal to one that arrived compressed, so every
    /// rank ends with the same bits.
    fn after(&mut self, range: Range<usize>) -> Result<()> {
        let e = Self::elems(range);
        // SAFETY: as in `before`.
        let d = unsafe { std::slice::from_raw_parts_mut(self.output.add(e.start), e.len()) };
        let w = &mut self.wire[..2 * d.len()];
        compression::compress_bytes(self.format, d, 1.0, None, w);
        compression::decompress_bytes(self.format, w, d);
        for x in d.iter_mut() {
            *x *= self.unscale;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compression::ScalePolicy;

    /// Runs `before` on every block of `out` in the given block order.
    fn before_all(p: &mut Passes, n: usize, order: impl Iterator<Item = usize>) {
        let bb = p.block_bytes();
        for b in order {
            p.before(b * bb..((b + 1) * bb).min(4 * n)).unwrap();
        }
    }

    fn after_all(p: &mut Passes, n: usize) {
        let bb = p.block_bytes();
        for b in 0..(4 * n).div_ceil(bb) {
            p.after(b * bb..((b + 1) * bb).min(4 * n)).unwrap();
        }
    }

    #[test]
    fn passes_round_trip_a_sum_within_fp16_precision() {
        let world = 4;
        let mut comp =
            Compressor::new(WireFormat::F16, ScalePolicy::InverseWorldSize, true).unwrap();
        // Three blocks, the last one short; prepared out of order, as a schedule may.
        let x: Vec<f32> = (0..20_000).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let mut y = vec![0.0f32; x.len()];
        // SAFETY: both vectors hold x.len() f32 and outlive the passes.
        let mut p = unsafe {
            Passes::new(
                &mut comp,
                7,
                Some(x.as_ptr()),
                y.as_mut_ptr(),
                world,
                ReduceOp::Sum,
            )
        }
        .unwrap();
        before_all(&mut p, x.len(), [2, 0, 1].into_iter());
        assert!(comp.pending().is_clean());
        // Each y is x/4 rounded to fp16; the residual holds exactly what was lost.
        let r = comp.residual(7).unwrap();
        assert_eq!(r.len(), x.len());
        for i in 0..x.len() {
            assert_eq!(y[i] + r[i], x[i] / 4.0, "element {i}");
            assert_eq!(y[i], half::f16::from_f32(y[i]).to_f32(), "element {i}");
        }
        // Pretend four identical ranks summed: 4 * y, then undo the scale.
        let mut sum: Vec<f32> = y.iter().map(|v| v * 4.0).collect();
        // SAFETY: `sum` outlives the passes.
        let mut p = unsafe {
            Passes::new(&mut comp, 7, None, sum.as_mut_ptr(), world, ReduceOp::Sum).unwrap()
        };
        after_all(&mut p, x.len());
        for i in 0..x.len() {
            let rel = ((sum[i] - 4.0 * x[i]) / (4.0 * x[i]).abs().max(1e-3)).abs();
            assert!(
                rel < 2.0 * 2f32.powi(-11),
                "element {i}: {} vs {}",
                sum[i],
                4.0 * x[i]
            );
        }
        // avg divides by the world size on top: here the scale is exactly 1/4, so the
        // average is exactly a quarter of the sum.
        let mut avg: Vec<f32> = y.iter().map(|v| v * 4.0).collect();
        // SAFETY: `avg` outlives the passes.
        let mut p = unsafe {
            Passes::new(&mut comp, 7, None, avg.as_mut_ptr(), world, ReduceOp::Avg).unwrap()
        };
        after_all(&mut p, x.len());
        for i in [0, 1000, 19_999] {
            assert_eq!(avg[i], sum[i] / 4.0, "element {i}");
        }
    }

    #[test]
    fn in_place_before_feeds_the_residual_into_the_next_call() {
        let mut comp = Compressor::new(WireFormat::F16, ScalePolicy::Factor(1.0), true).unwrap();
        // 1 + 2^-12 lies between the fp16 neighbours 1 and 1 + 2^-10. Error feedback
        // carries the lost 2^-12 forward: 1 + 2^-11 is a tie (rounds to even, 1), then
        // 1 + 3·2^-12 rounds up, leaving -2^-12, and the fourth call is back to 1. Four
        // calls send exactly four times the input.
        let x = 1.0f32 + 2f32.powi(-12);
        let mut sent = Vec::new();
        for _ in 0..4 {
            let mut w = vec![x; 10];
            // SAFETY: `w` outlives the passes.
            let mut p = unsafe {
                Passes::new(&mut comp, 0, None, w.as_mut_ptr(), 1, ReduceOp::Sum).unwrap()
            };
            before_all(&mut p, w.len(), 0..1);
            assert!(w.iter().all(|&v| v == w[0]));
            sent.push(w[0]);
        }
        assert_eq!(sent, [1.0, 1.0, 1.0 + 2f32.powi(-10), 1.0]);
        assert_eq!(sent.iter().sum::<f32>(), 4.0 * x);
    }
}
