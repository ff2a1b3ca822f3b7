//! Sends: each link's sends in order, each message polled until the link has taken all
//! of it; a compressing link's payload goes through its staging buffer (`staging.rs`).

use super::context::link_error;
use super::Run;
use crate::algorithm::schedule::OpKind;
use crate::error::Result;

impl Run<'_, '_> {
    /// Advances link `p`'s sends as far as their dependencies and the link allow.
    /// Returns whether anything moved.
    #[inline]
    pub(super) fn sends(&mut self, p: usize) -> Result<bool> {
        let Run {
            sched,
            bufs,
            ctx,
            links,
            deps,
            staging,
            blocks,
            ..
        } = self;
        let Some(link) = links[p].as_mut() else {
            return Ok(false);
        };
        let mut progressed = false;
        while let Some(i) = deps.sends[p].head() {
            if !deps.ready(i) {
                break;
            }
            let OpKind::Send { src, .. } = sched.ops[i].kind else {
                break;
            };
            if let Some(t) = blocks.as_mut() {
                t.start(i, &sched.ops[i].kind)?;
            }
            // SAFETY: checked region; dependencies keep writers away while it is sent.
            let mut data = unsafe { bufs.slice(&src) };
            let format = staging.format(p);
            if let Some(f) = format {
                data = staging.stage(p, i, f, data);
            }
            let r = link.poll_send(&ctx.header(data.len(), format), data);
            if !r.map_err(|e| link_error(e, link.as_mut(), ctx))? {
                break;
            }
            if let Some(t) = blocks.as_mut() {
                t.finish(&sched.ops[i].kind)?;
            }
            deps.sent(i, p);
            progressed = true;
        }
        Ok(progressed)
    }
}
