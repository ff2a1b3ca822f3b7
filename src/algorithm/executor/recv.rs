//! Receives: each link's receives in order, the pieces of a message landing straight in
//! their destination (copied, or reduced with what is there or with another region),
//! decompressed on the way when the link carries 16-bit values, and forwarded into the
//! next link's room when a send carries the result on (`forward.rs`).

use std::ptr::NonNull;

use super::context::{link_error, ExecCtx};
use super::forward::Committed;
use super::Run;
use crate::algorithm::schedule::{Combine, OpKind};
use crate::compression::{self, WireFormat};
use crate::error::{Error, Result};
use crate::reduce;
use crate::transport::{DirectDst, MsgHeader, RecvSink};

impl Run<'_, '_> {
    /// Advances link `p`'s receives as far as their dependencies and the link allow.
    /// Returns whether anything moved.
    #[inline]
    pub(super) fn recvs(&mut self, p: usize) -> Result<bool> {
        let Run {
            sched,
            bufs,
            ctx,
            links,
            deps,
            fwd,
            staging,
            blocks,
            ..
        } = self;
        let mut progressed = false;
        while let Some(i) = deps.recvs[p].head() {
            if !deps.ready(i) {
                break;
            }
            let OpKind::Recv { dst, combine, .. } = sched.ops[i].kind else {
                break;
            };
            if let Some(t) = blocks.as_mut() {
                t.start(i, &sched.ops[i].kind)?;
            }
            // Room in the next link for the send that forwards this receive's
            // result, if it is next there; `None`: wait a little for that room.
            let dst_ptr = bufs.ptr(&dst);
            let Some(forwarded) = fwd.prepare(i, p, deps, links, ctx, dst_ptr) else {
                break;
            };
            let mut sink = Sink {
                ctx,
                peer: p,
                dst: dst_ptr,
                len: dst.len,
                from: combine.operand().map(|src| bufs.ptr(&src) as *const u8),
                combine,
                wire: staging.format(p),
                forward: &fwd.spaces,
                forwarded,
                got: fwd.got[p],
                stream_result: ctx.stream_copies && !sched.reread.get(i).copied().unwrap_or(true),
            };
            let Some(link) = links[p].as_mut() else {
                break;
            };
            let r = link.poll_recv(&mut sink);
            let complete = r.map_err(|e| link_error(e, link.as_mut(), ctx))?;
            let (forwarded, got) = (sink.forwarded, sink.got);
            fwd.got[p] = if complete { 0 } else { got };
            match fwd.commit(forwarded, links, ctx)? {
                Committed::Nothing => {}
                Committed::Part => progressed = true,
                Committed::All(j, q) => {
                    // All of it was forwarded, so all of it has arrived: the receive
                    // completed in this very call and is marked below.
                    progressed = true;
                    deps.sent(j, q);
                }
            }
            if !complete {
                break;
            }
            if let Some(t) = blocks.as_mut() {
                t.finish(&sched.ops[i].kind)?;
            }
            deps.received(i, p);
            progressed = true;
        }
        Ok(progressed)
    }
}

/// Where the pieces of one receive's message land.
pub(super) struct Sink<'a> {
    pub(super) ctx: &'a ExecCtx,
    pub(super) peer: usize,
    pub(super) dst: *mut u8,
    pub(super) len: usize,
    pub(super) from: Option<*const u8>,
    pub(super) combine: Combine,
    pub(super) wire: Option<WireFormat>,
    /// Room in the next link's buffer for the message that forwards this receive's
    /// result, as `(message offset, space)` in order (see [`crate::transport::Link::send_space`]).
    pub(super) forward: &'a [(usize, DirectDst)],
    /// Message offset up to which `forward` has been written: pieces whose offset and
    /// length match the next space exactly go there too; the first that does not ends
    /// the forwarding for this call.
    pub(super) forwarded: usize,
    /// Payload bytes delivered so far (all pieces below this offset are in place).
    pub(super) got: usize,
    /// Write a reduced result with streaming stores: it is large and nothing in this
    /// call reads it again (a reduce-scatter's own block, out of place).
    pub(super) stream_result: bool,
}

impl RecvSink for Sink<'_> {
    fn header(&mut self, h: &MsgHeader) -> Result<()> {
        self.check_header(h)
    }

    fn data(&mut self, offset: usize, bytes: &[u8]) -> Result<()> {
        if let Some(format) = self.wire {
            return self.wire_data(format, offset, bytes);
        }
        if offset + bytes.len() > self.len {
            return Err(Error::Link {
                peer: self.peer,
                detail: format!(
                    "payload overruns the expected {} bytes (offset {offset} + {})",
                    self.len,
                    bytes.len()
                ),
                lost: false,
            });
        }
        // SAFETY: [offset, offset+len) lies inside the destination region, which the
        // schedule's dependencies keep free of any other reader or writer meanwhile.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.dst.add(offset), bytes.len()) };
        self.got = offset + bytes.len();
        if let Some(space) = self.forward_space(offset, bytes.len()) {
            // SAFETY: `Link::send_space` gave this room to us alone until it is
            // committed, which happens after this call.
            let out = unsafe { space.slice_mut(0..bytes.len()) };
            if space.streaming() {
                // The room is to be written with streaming stores, which leave nothing
                // in cache: put the result in place, then stream it into the room from
                // there (still in cache), or from the link's bytes where it is a copy.
                self.land(dst, offset, bytes);
                let copied = matches!(
                    (self.combine, self.from),
                    (Combine::Copy, _) | (Combine::From(_) | Combine::FromAfter(_), None)
                );
                let result = if copied { bytes } else { &*dst };
                // SAFETY: `out` and `result` are valid for `bytes.len()` bytes and
                // distinct (the room, and the destination or another link's buffer).
                unsafe { reduce::copy_streaming(out.as_mut_ptr(), result.as_ptr(), out.len()) };
                self.forwarded += bytes.len();
                return Ok(());
            }
            // Compute the result once, into the forwarding link's buffer (it stays in
            // cache), then copy it into place: the send that forwards it need not read
            // the destination again.
            match (self.combine, self.from) {
                (Combine::Copy, _) | (Combine::From(_) | Combine::FromAfter(_), None) => {
                    out.copy_from_slice(bytes)
                }
                (Combine::Accumulate, _) => {
                    reduce::reduce_from_bytes(self.ctx.dtype, self.ctx.redop, out, dst, bytes)
                }
                (Combine::From(_) | Combine::FromAfter(_), Some(src)) => {
                    // SAFETY: the `From` region has the destination's length and was checked.
                    let a = unsafe { std::slice::from_raw_parts(src.add(offset), bytes.len()) };
                    let (l, r) = self.operands(a, bytes);
                    reduce::reduce_from_bytes(self.ctx.dtype, self.ctx.redop, out, l, r)
                }
            }
            // SAFETY: `dst` and `out` are valid for `bytes.len()` bytes and distinct (the
            // schedule's destination and a link's buffer).
            unsafe {
                reduce::copy_bytes(
                    dst.as_mut_ptr(),
                    out.as_ptr(),
                    out.len(),
                    self.ctx.stream_copies,
                )
            };
            self.forwarded += bytes.len();
            return Ok(());
        }
        self.land(dst, offset, bytes);
        Ok(())
    }

    fn direct_dst(&mut self) -> Option<DirectDst> {
        if self.wire.is_some() || !matches!(self.combine, Combine::Copy) {
            return None;
        }
        // SAFETY: `dst` is the receive's checked destination region of `len` bytes, which
        // the schedule's dependencies keep to this receive until it completes.
        NonNull::new(self.dst).map(|p| unsafe { DirectDst::new(p, self.len) })
    }
}

impl Sink<'_> {
    /// Writes the piece `bytes` that arrived at message `offset` into its place `dst`
    /// (the destination's bytes at that offset), as the receive combines it.
    fn land(&self, dst: &mut [u8], offset: usize, bytes: &[u8]) {
        match (self.combine, self.from) {
            // SAFETY: `dst` and `bytes` are valid for `bytes.len()` bytes and distinct
            // (a link's buffer and the schedule's destination).
            (Combine::Copy, _) => unsafe {
                let (d, s, n) = (dst.as_mut_ptr(), bytes.as_ptr(), bytes.len());
                reduce::copy_bytes(d, s, n, self.ctx.stream_copies)
            },
            (Combine::Accumulate, _) => {
                reduce::reduce_inplace_bytes(self.ctx.dtype, self.ctx.redop, dst, bytes)
            }
            (Combine::From(_) | Combine::FromAfter(_), Some(src)) => {
                // SAFETY: the `From` region has the destination's length and was checked.
                let a = unsafe { std::slice::from_raw_parts(src.add(offset), bytes.len()) };
                let (l, r) = self.operands(a, bytes);
                let (dtype, op) = (self.ctx.dtype, self.ctx.redop);
                if self.stream_result {
                    reduce::reduce_from_bytes_streaming(dtype, op, dst, l, r)
                } else {
                    reduce::reduce_from_bytes(dtype, op, dst, l, r)
                }
            }
            (Combine::From(_) | Combine::FromAfter(_), None) => dst.copy_from_slice(bytes),
        }
    }

    /// The operands of a `From` receive in their order: the region `a` on the left of
    /// the operator and the incoming bytes on the right, or the other way round for
    /// `FromAfter`.
    fn operands<'b>(&self, a: &'b [u8], incoming: &'b [u8]) -> (&'b [u8], &'b [u8]) {
        if matches!(self.combine, Combine::FromAfter(_)) {
            (incoming, a)
        } else {
            (a, incoming)
        }
    }

    /// The forwarding space for the piece at `offset` of `len` bytes, if it is the next
    /// one and the same size.
    fn forward_space(&self, offset: usize, len: usize) -> Option<DirectDst> {
        if offset != self.forwarded || len == 0 {
            return None;
        }
        self.forward
            .iter()
            .find(|(o, _)| *o == offset)
            .and_then(|&(_, space)| (space.len() == len).then_some(space))
    }

    /// A piece of 16-bit wire values landing in an f32 destination.
    fn wire_data(&mut self, format: WireFormat, offset: usize, bytes: &[u8]) -> Result<()> {
        let (off, len) = (offset * 2, bytes.len() * 2);
        if off + len > self.len || bytes.len() % 2 != 0 {
            return Err(Error::Link {
                peer: self.peer,
                detail: format!(
                    "compressed payload overruns the expected {} bytes (offset {offset} + {})",
                    self.len / 2,
                    bytes.len()
                ),
                lost: false,
            });
        }
        // SAFETY: [off, off+len) lies inside the destination region (checked above and by
        // `Buffers::check`), which dependencies keep to this receive alone.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.dst.add(off), len) };
        // Compressed calls are sums, whose operands commute: `FromAfter` is `From` here.
        let from = match (self.combine, self.from) {
            // SAFETY: the `From` region has the destination's length and was checked.
            (Combine::From(_) | Combine::FromAfter(_), Some(src)) => {
                Some(unsafe { std::slice::from_raw_parts(src.add(off), len) })
            }
            _ => None,
        };
        let combine = self.combine;
        let apply = |out: &mut [f32]| match (combine, from) {
            (Combine::Accumulate, _) => compression::decompress_add_bytes(format, bytes, out),
            (Combine::From(_) | Combine::FromAfter(_), Some(a)) => {
                bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(a);
                compression::decompress_add_bytes(format, bytes, out);
            }
            _ => compression::decompress_bytes(format, bytes, out),
        };
        if (dst.as_ptr() as usize) % std::mem::align_of::<f32>() == 0 {
            apply(bytemuck::cast_slice_mut(dst));
        } else {
            let mut tmp: Vec<f32> = bytemuck::pod_collect_to_vec(dst);
            apply(&mut tmp);
            dst.copy_from_slice(bytemuck::cast_slice(&tmp));
        }
        Ok(())
    }
}
