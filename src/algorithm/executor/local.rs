//! Local ops: copies and reductions between this rank's own buffers, in schedule order.
//! A copy whose result a send carries on goes through that send's link room
//! (`forward.rs`), reading its source once.

use super::forward::Committed;
use super::Run;
use crate::algorithm::schedule::OpKind;
use crate::error::Result;
use crate::reduce;

impl Run<'_, '_> {
    /// Runs the local ops whose dependencies are done: one per call while links have
    /// work, all of them otherwise. Returns whether anything moved.
    #[inline]
    pub(super) fn local_ops(&mut self) -> Result<bool> {
        let Run {
            sched,
            bufs,
            ctx,
            links,
            deps,
            fwd,
            blocks,
            active,
            ..
        } = self;
        let mut progressed = false;
        while let Some(i) = deps.locals.head() {
            if !deps.ready(i) {
                break;
            }
            // Whether this op also sent a whole message (a copy through a link's room).
            let mut sent = false;
            if let Some(t) = blocks.as_mut() {
                t.start(i, &sched.ops[i].kind)?;
            }
            match sched.ops[i].kind {
                OpKind::Copy { src, dst } if src.len > 0 => {
                    let (d, s) = (bufs.ptr(&dst), bufs.ptr(&src) as *const u8);
                    // A copy whose result a send forwards goes through that link's
                    // room when it has some, reading the source once.
                    let Some((through, committed)) = fwd.copy_through(i, deps, links, ctx, s, d)?
                    else {
                        break;
                    };
                    // SAFETY: both regions were checked; dependencies guarantee no
                    // concurrent writer of `src` or user of `dst`; they do not overlap
                    // (input vs output, or disjoint scratch ranges). `copy_through`
                    // wrote the bytes `through`; the rest is copied here.
                    unsafe {
                        reduce::copy_bytes(d, s, through.start, ctx.stream_copies);
                        reduce::copy_bytes(
                            d.add(through.end),
                            s.add(through.end),
                            src.len - through.end,
                            ctx.stream_copies,
                        );
                    }
                    if let Committed::All(j, q) = committed {
                        deps.sent(j, q);
                        sent = true;
                    }
                }
                OpKind::Reduce { src, dst } if src.len > 0 => {
                    // SAFETY: as for the copy; `dst` is the only region written.
                    let (a, d) = unsafe {
                        (
                            bufs.slice(&src),
                            std::slice::from_raw_parts_mut(bufs.ptr(&dst), dst.len),
                        )
                    };
                    reduce::reduce_inplace_bytes(ctx.dtype, ctx.redop, d, a);
                }
                _ => {}
            }
            if let Some(t) = blocks.as_mut() {
                t.finish(&sched.ops[i].kind)?;
            }
            deps.ran(i);
            progressed = true;
            // One local op per pass while links have work: an all-gather's copy of its
            // own block then runs piece by piece between sends and receives, in the time
            // spent waiting for peers, instead of before the first send. A copy that went
            // out through a link whole was link work itself: the next one may follow.
            if !active.is_empty() && !sent {
                break;
            }
        }
        Ok(progressed)
    }
}
