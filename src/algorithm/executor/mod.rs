//! Drives a [`Schedule`] over links: the only place where algorithms meet transports.
//!
//! One thread polls every link the schedule uses. Per link, sends and receives each
//! run in schedule order (links are FIFO); an op starts once its dependencies are
//! done. Because a send to the right and a receive from the left progress in the same
//! loop, no schedule can deadlock on buffer space. Received pieces are reduced
//! straight into their destination as they arrive (no staging copy of the message).
//!
//! While nothing moves the executor spins briefly, then yields, then sleeps in short
//! steps (while tracing, each such stretch counts as a wait on the peer it is blocked
//! on, `observe::waits`); it asks silent links whether their peer is still alive and
//! gives up after the configured timeout with an error naming the peer it was waiting
//! for, and what
//! the link sees of it (a stopped process), or that it may itself be waiting further
//! along. A peer that gave up and said why becomes
//! [`Error::PeerGaveUp`](crate::error::Error::PeerGaveUp), with the peer this rank was
//! waiting for when that was another one.
//!
//! | file | holds |
//! | --- | --- |
//! | `mod` | [`execute`]: local ops, sends and receives as far as they go, else wait |
//! | `deps` | the queues (per link, and the local ops) and which op may start |
//! | `local`, `send`, `recv` | each kind of op; the sink a receive's pieces land in |
//! | `forward` | a result written straight into the room of the link that sends it on |
//! | `staging` | 16-bit values on the wire: which links, a compressing send's staging |
//! | `blocks` | passes on output blocks around the ops that first and last touch them |
//! | `wait` | spin, yield, sleep; cancel, peer and timeout checks (both engines) |
//! | `agree` | the header every message carries; the check that peers run one call |
//! | `context` | the collective's context and the wording of its errors (both engines) |
//! | `buffers` | the raw buffers a schedule addresses |

mod agree;
mod blocks;
mod buffers;
mod context;
mod deps;
mod forward;
mod local;
mod recv;
mod send;
mod staging;
pub(crate) mod wait;

use std::sync::atomic::AtomicBool;

use super::schedule::Schedule;
use crate::compression::OverflowStats;
use crate::error::Result;
use crate::observe::LinkWaits;
use crate::reduce;
use crate::transport::Link;
use blocks::BlockTracker;
use deps::Deps;
use forward::Forwarder;
use staging::Staging;
use wait::{Ladder, Pause, Wait};

pub use blocks::BlockPasses;
pub use buffers::Buffers;
pub use context::ExecCtx;
pub use deps::PhaseEnds;
pub use staging::Wire;
pub use wait::spin_polls_for;

/// What [`execute`] runs, over which buffers, and what else it takes along.
pub struct Job<'a> {
    sched: &'a Schedule,
    bufs: &'a Buffers,
    ctx: &'a ExecCtx,
    wire: Option<&'a Wire>,
    passes: Option<&'a mut dyn BlockPasses>,
    cancel: Option<&'a AtomicBool>,
    phase_end: Option<&'a mut PhaseEnds>,
    waits: Option<&'a mut [u64]>,
}

impl<'a> Job<'a> {
    /// `sched` over `bufs` as collective `ctx`, uncompressed, with no block passes and
    /// no cancel flag.
    pub fn new(sched: &'a Schedule, bufs: &'a Buffers, ctx: &'a ExecCtx) -> Self {
        Job {
            sched,
            bufs,
            ctx,
            wire: None,
            passes: None,
            cancel: None,
            phase_end: None,
            waits: None,
        }
    }

    /// The run adds the time it waited on each peer into `per_peer` (by rank), in
    /// per-call clock ticks ([`crate::flight::Stamp`]).
    pub fn link_waits(mut self, per_peer: Option<&'a mut [u64]>) -> Self {
        self.waits = per_peer;
        self
    }

    /// A run that completes writes into `ends` when each phase of the schedule ended.
    pub fn phase_ends(mut self, ends: &'a mut PhaseEnds) -> Self {
        self.phase_end = Some(ends);
        self
    }

    /// Messages to the links `wire` names travel as 16-bit values.
    pub fn wire(mut self, wire: &'a Wire) -> Self {
        self.wire = Some(wire);
        self
    }

    /// `passes` run on each output block around the ops that touch it.
    pub fn passes(mut self, passes: &'a mut dyn BlockPasses) -> Self {
        self.passes = Some(passes);
        self
    }

    /// The run ends with an error within one check of its wait (50 ms) once `cancel`
    /// is set.
    pub fn cancel(mut self, cancel: &'a AtomicBool) -> Self {
        self.cancel = Some(cancel);
        self
    }
}

/// One run of a schedule: its queues and what each concern keeps between polls.
struct Run<'j, 'l> {
    sched: &'j Schedule,
    bufs: &'j Buffers,
    ctx: &'j ExecCtx,
    links: &'l mut [Option<Box<dyn Link>>],
    deps: Deps<'j>,
    /// The links with ops of this schedule.
    active: Vec<usize>,
    fwd: Forwarder,
    staging: Staging<'j>,
    blocks: Option<BlockTracker<'j>>,
}

/// Runs `job` over `links` to completion; returns what compressing sends had to
/// saturate. On error the links may be mid-message: the caller must abort them (the
/// communicator does).
pub fn execute(links: &mut [Option<Box<dyn Link>>], job: Job<'_>) -> Result<OverflowStats> {
    let Job {
        sched,
        bufs,
        ctx,
        wire,
        passes,
        cancel,
        phase_end,
        waits,
    } = job;
    let mut waits = waits.map(LinkWaits::new);
    let deps = Deps::new(sched, links, bufs)?;
    let blocks = passes.map(|p| BlockTracker::new(p, sched, bufs.output_len));
    // Forwarding needs the receive to write exactly what the send carries: not with
    // block passes (they run on blocks as ops reach them) or compression on the wire.
    let forwarding = blocks.is_none() && wire.is_none();
    let mut run = Run {
        sched,
        bufs,
        ctx,
        active: deps.active(),
        deps,
        fwd: Forwarder::new(links.len(), forwarding),
        staging: Staging::new(wire, links.len()),
        links,
        blocks,
    };
    let mut wait = Wait::new(ctx, Ladder::links(ctx.spin_polls), cancel);
    wait.start();
    let mut fds = Vec::new();

    // The loop, so that an error can be told from where this rank itself was waiting.
    let ran = (|| -> Result<()> {
        while !run.deps.all_done() {
            // Every queue as far as its dependencies and links let it go: local ops,
            // then each link's sends and receives.
            let mut progressed = run.local_ops()?;
            for k in 0..run.active.len() {
                let p = run.active[k];
                progressed |= run.sends(p)?;
                progressed |= run.recvs(p)?;
            }
            if progressed {
                wait.progressed();
                if let Some(w) = waits.as_mut() {
                    w.moved();
                }
                continue;
            }
            if let Some(w) = waits.as_mut() {
                w.stalled(|| run.deps.blocked_on(&run.active).0);
            }
            // Nothing moved: spin, yield, or sleep on the links' sockets; then, now and
            // again, the cancel flag, the peers and the timeout.
            if let Pause::Sleep(idle) = wait.pause() {
                run.sleep_on_links(idle, &mut fds);
            }
            wait.check(&mut run)?;
        }
        Ok(())
    })();
    if let Err(e) = ran {
        return Err(run.waiting_note(e));
    }

    if let Some(f) = sched.finalize {
        bufs.check(&f)?;
        // SAFETY: all ops are done; nothing else touches the buffer now.
        let d = unsafe { std::slice::from_raw_parts_mut(bufs.ptr(&f), f.len) };
        reduce::reduce_finalize_bytes(ctx.dtype, ctx.redop, d, ctx.world_size);
    }
    if let Some(t) = run.blocks.as_mut() {
        t.flush()?;
    }
    if let Some(ends) = phase_end {
        *ends = run.deps.phase_end;
    }
    Ok(run.staging.stats)
}

#[cfg(test)]
mod testing {
    use std::time::Duration;

    use super::wait::spin_polls_for;
    use super::{execute, Buffers, ExecCtx, Job};
    use crate::algorithm::schedule::Schedule;
    use crate::dtype::{CollectiveOp, DataType, ReduceOp};
    use crate::error::Result;
    use crate::transport::Link;

    /// Rank `rank` of 3 in an all-gather of 4 bytes, #0, waiting up to 10 s.
    pub(super) fn ctx(rank: usize) -> ExecCtx {
        ExecCtx {
            rank,
            world_size: 3,
            seq: 0,
            op: CollectiveOp::AllGather,
            dtype: DataType::U8,
            redop: ReduceOp::Sum,
            count: 4,
            timeout: Duration::from_secs(10),
            stream_copies: false,
            spin_polls: spin_polls_for(1),
        }
    }

    /// Runs `sched` as rank `rank` of [`ctx`] on 4 input bytes of value `rank`, into 8
    /// output bytes.
    pub(super) fn run(
        sched: &Schedule,
        links: &mut [Option<Box<dyn Link>>],
        rank: usize,
    ) -> Result<Vec<u8>> {
        let input = [rank as u8; 4];
        let mut output = [0u8; 8];
        let bufs = Buffers {
            input: input.as_ptr(),
            input_len: 4,
            output: output.as_mut_ptr(),
            output_len: 8,
            scratch: std::ptr::null_mut(),
            scratch_len: 0,
        };
        execute(links, Job::new(sched, &bufs, &ctx(rank)))?;
        Ok(output.to_vec())
    }
}
