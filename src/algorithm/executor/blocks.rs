//! Passes on the output block by block, around the ops that first and last touch each
//! block (a compressed all-reduce's quantisation and rounding).

use crate::algorithm::schedule::{BufId, OpKind, Schedule};
use crate::error::Result;

/// Work done on the output buffer block by block, just before the schedule first
/// touches a block and just after it last touches it. A compressed all-reduce quantises
/// its input and rounds its result this way: each pass runs on data that is hot in cache
/// and overlaps with waiting on the network, instead of being a sweep over the whole
/// buffer before and after the collective.
pub trait BlockPasses {
    /// Block size in bytes; the output splits into blocks of this size (the last may be
    /// shorter). A multiple of the element size.
    fn block_bytes(&self) -> usize;
    /// Prepares output bytes `range` before any op reads or writes them.
    fn before(&mut self, range: std::ops::Range<usize>) -> Result<()>;
    /// Finishes output bytes `range` once no op will read or write them again.
    fn after(&mut self, range: std::ops::Range<usize>) -> Result<()>;
}

/// Which output blocks are prepared, and how many op touches each still awaits.
pub(super) struct BlockTracker<'p> {
    passes: &'p mut dyn BlockPasses,
    block: usize,
    len: usize,
    prepared: Vec<bool>,
    remaining: Vec<u32>,
    started: Vec<bool>,
    /// `after` waits for the end when a finalize step still changes the output.
    defer: bool,
}

impl<'p> BlockTracker<'p> {
    pub(super) fn new(
        passes: &'p mut dyn BlockPasses,
        sched: &Schedule,
        output_len: usize,
    ) -> Self {
        let block = passes.block_bytes().max(1);
        let n = output_len.div_ceil(block);
        let mut t = BlockTracker {
            passes,
            block,
            len: output_len,
            prepared: vec![false; n],
            remaining: vec![0; n],
            started: vec![false; sched.ops.len()],
            defer: sched.finalize.is_some(),
        };
        for op in &sched.ops {
            for b in Self::blocks_of(block, &op.kind) {
                t.remaining[b] += 1;
            }
        }
        t
    }

    /// Output blocks of `block` bytes that `kind` touches, once per region touching them.
    fn blocks_of(block: usize, kind: &OpKind) -> impl Iterator<Item = usize> {
        let regions = match *kind {
            OpKind::Send { src, .. } => [Some(src), None],
            OpKind::Recv { dst, combine, .. } => [Some(dst), combine.operand()],
            OpKind::Copy { src, dst } | OpKind::Reduce { src, dst } => [Some(src), Some(dst)],
        };
        regions
            .into_iter()
            .flatten()
            .filter(|r| r.buf == BufId::Output && r.len > 0)
            .flat_map(move |r| r.offset / block..(r.offset + r.len).div_ceil(block))
    }

    fn range(&self, b: usize) -> std::ops::Range<usize> {
        b * self.block..((b + 1) * self.block).min(self.len)
    }

    /// Before op `i` first moves data: prepares the blocks it is the first to touch.
    pub(super) fn start(&mut self, i: usize, kind: &OpKind) -> Result<()> {
        if std::mem::replace(&mut self.started[i], true) {
            return Ok(());
        }
        for b in Self::blocks_of(self.block, kind) {
            if !std::mem::replace(&mut self.prepared[b], true) {
                let r = self.range(b);
                self.passes.before(r)?;
            }
        }
        Ok(())
    }

    /// After op `i` is done: finishes the blocks no later op touches.
    pub(super) fn finish(&mut self, kind: &OpKind) -> Result<()> {
        for b in Self::blocks_of(self.block, kind) {
            self.remaining[b] -= 1;
            if self.remaining[b] == 0 && !self.defer {
                let r = self.range(b);
                self.passes.after(r)?;
            }
        }
        Ok(())
    }

    /// After the last op (and the finalize step): blocks no op touched get both passes,
    /// deferred blocks their `after`.
    pub(super) fn flush(&mut self) -> Result<()> {
        for b in 0..self.prepared.len() {
            let r = self.range(b);
            if !self.prepared[b] {
                self.passes.before(r.clone())?;
                self.passes.after(r)?;
            } else if self.defer {
                self.passes.after(r)?;
            }
        }
        Ok(())
    }
}
