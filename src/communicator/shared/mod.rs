//! Shared buffers ([`Communicator::alloc_shared`]) and the collectives that run through
//! shared memory when every rank shares one host.
//!
//! Each rank's [`SharedBuf`] lives in a segment every other rank of its host maps
//! (read-only), so a collective can read peers' data where it lies instead of moving it
//! through link rings: an all-reduce costs each rank one read of every input byte it
//! reduces, one write of its result and one copy of each other result, about 4 bytes
//! of memory traffic per payload byte against 5 or more through the rings.
//!
//! | file | holds |
//! | --- | --- |
//! | `control` | the control page each rank owns: layout, flags, futex waits, peers' states |
//! | `buffer` | [`SharedBuf`] and the registry that finds the allocation a slice lies in |
//! | `alloc` | the collective allocation protocol ([`Communicator::alloc_shared`]) |
//! | `direct` | the direct algorithms on shared buffers |
//! | `eager` | the eager algorithm: small all-reduces through the control pages |
//!
//! Which of the two runs a call, or neither (the call then runs over links), is the
//! selection's to say ([`crate::algorithm::select`]). The segments themselves, and
//! whether a peer's process still runs, are the transport's: [`crate::transport::shm`].

mod alloc;
mod buffer;
mod control;
mod direct;
mod eager;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::Communicator;
use crate::algorithm::executor::{Buffers, ExecCtx};
use crate::algorithm::{select, Call};
use crate::error::{Error, Result};

pub use buffer::SharedBuf;
pub(super) use buffer::SharedState;

/// A collective that runs through shared memory instead of links.
pub(super) struct Direct {
    state: Arc<SharedState>,
    path: Path,
}

enum Path {
    /// On shared buffers, read where they lie.
    Buffers(direct::Placement),
    /// A small all-reduce through the eager slots (buffers need not be shared).
    Eager,
}

impl Direct {
    /// A small all-reduce through the eager slots, which the selection picked
    /// ([`crate::algorithm::select`]).
    pub(super) fn eager(comm: &Communicator) -> Direct {
        let state = &comm.shared;
        // A load first: the swap (a write) happens once, not on every small call.
        if !state.eager_logged.load(Ordering::Relaxed)
            && !state.eager_logged.swap(true, Ordering::Relaxed)
            && comm.rank == 0
        {
            let n = comm.world_size;
            tracing::info!(
                rank = comm.rank,
                "all_reduce of at most {} bytes: eager algorithm through the control pages \
                 of {n} local ranks",
                select::eager_limit(n)
            );
        }
        Direct {
            state: state.clone(),
            path: Path::Eager,
        }
    }

    /// The direct algorithm for `call` when this rank's buffers are shared ones it can
    /// read where they lie ([`direct::Placement`]); the selection asks, and takes this
    /// path when there is one. Every rank decides from its own buffers; ranks that
    /// decide differently are caught in the entry step and get [`Error::Mismatch`].
    pub(super) fn on_buffers(
        comm: &Communicator,
        call: &Call,
        input: (*const u8, usize),
        output: (*mut u8, usize),
    ) -> Option<Direct> {
        let state = &comm.shared;
        let placement = direct::Placement::find(comm, call, input, output)?;
        let first = state
            .logged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(call.op);
        if first && comm.rank == 0 {
            tracing::info!(
                rank = comm.rank,
                "{} on shared buffers: direct algorithm over {} local ranks",
                call.op,
                comm.world_size
            );
        }
        Some(Direct {
            state: state.clone(),
            path: Path::Buffers(placement),
        })
    }

    /// Runs the collective; on error the caller breaks the communicator (which marks
    /// this rank aborted for the peers).
    pub(super) fn execute(&self, bufs: &Buffers, ctx: &ExecCtx, cancel: &AtomicBool) -> Result<()> {
        let Some(node) = self.state.ctl.get() else {
            return Err(Error::Shm(format!(
                "rank {}: direct {} without control pages",
                self.state.rank, ctx.op
            )));
        };
        match &self.path {
            Path::Eager => eager::all_reduce(node, bufs, ctx, cancel),
            Path::Buffers(p) => p.execute(&self.state, node, bufs, ctx, cancel),
        }
    }
}

/// In-process worlds on one pretend host, for the tests of this module's files.
#[cfg(test)]
mod testing {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::Communicator;
    use crate::config::{AlgoChoice, Config};

    /// `n` communicators in one process on one pretend host, joined by in-memory links.
    pub(super) fn world(n: usize, timeout: Duration) -> Vec<Communicator> {
        world_with(n, timeout, Config::default().stream_min_bytes)
    }

    pub(super) fn world_with(
        n: usize,
        timeout: Duration,
        stream_min_bytes: usize,
    ) -> Vec<Communicator> {
        let cfg = Config {
            timeout,
            stream_min_bytes,
            ..Config::default()
        };
        crate::communicator::testing::world(n, n, cfg)
    }

    /// `n` ranks on one pretend host with their control pages attached up front, as
    /// `Communicator::init` does, and the algorithm choice `algo`.
    pub(super) fn attached(n: usize, timeout: Duration, algo: AlgoChoice) -> Vec<Communicator> {
        let cfg = Config {
            timeout,
            algo,
            ..Config::default()
        };
        let mut comms = crate::communicator::testing::world(n, n, cfg);
        std::thread::scope(|s| {
            for c in comms.iter_mut() {
                s.spawn(move || c.attach_node().unwrap());
            }
        });
        // Numbering restarted: the caller's first collective is #0.
        assert!(comms.iter().all(|c| c.seq.load(Ordering::Relaxed) == 0));
        comms
    }

    /// This rank's flag: the last collective that ran on the direct path ended here.
    pub(super) fn last_direct(c: &Communicator) -> u64 {
        let node = c.shared.ctl.get().unwrap();
        node.page(node.me).flag.0.load(Ordering::Relaxed)
    }

    pub(super) fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{secs, world};
    use crate::ReduceOp;

    /// Random f32s of all magnitudes and signs, so any change in the order of a sum
    /// shows in the low bits (xorshift; the same on every run).
    fn noise(seed: u64, len: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let m = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                m * 2f32.powi((x % 24) as i32 - 12)
            })
            .collect()
    }

    /// Every rank's out-of-place all-reduce of `noise(rank)` over `len` elements, with
    /// pipeline chunks of `chunk` bytes configured.
    fn sums(n: usize, len: usize, chunk: usize) -> Vec<Vec<f32>> {
        let mut comms = world(n, secs(30));
        for c in comms.iter_mut() {
            c.cfg.chunk_bytes = chunk;
        }
        std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .enumerate()
                .map(|(r, c)| {
                    s.spawn(move || {
                        let input = noise(r as u64 + 1, len);
                        let mut out = vec![f32::NAN; len];
                        c.all_reduce_into(&input, &mut out, ReduceOp::Sum).unwrap();
                        out
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Whole-block pieces (what a 2-rank all-reduce over one host's links takes: the
    /// configured 512 KiB caps them) give bitwise the results of 64 KiB pieces on sizes
    /// that leave short last pieces and blocks of odd lengths, and both are exactly
    /// `a + b`. With 3 and 4 ranks (quarter blocks, as before) every rank holds the same
    /// bits, within rounding of the exact sum.
    #[test]
    fn whole_block_pieces_sum_bitwise_as_small_pieces_do() {
        // 100 001 elements: whole blocks of 200 064-byte chunks, not a multiple of 4096.
        for len in [100_001, 262_147, 300_001, 786_431] {
            let (a, b) = (noise(1, len), noise(2, len));
            for chunk in [512 << 10, 64 << 10] {
                let got = sums(2, len, chunk);
                for (r, out) in got.iter().enumerate() {
                    assert_eq!(out.len(), len);
                    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                        assert_eq!(
                            out[i].to_bits(),
                            (x + y).to_bits(),
                            "{len} elements, {chunk} B chunks: rank {r}, element {i}"
                        );
                    }
                }
            }
        }
        for n in 3..=4 {
            let len = 300_001;
            let got = sums(n, len, 512 << 10);
            let inputs: Vec<Vec<f32>> = (0..n).map(|r| noise(r as u64 + 1, len)).collect();
            for i in 0..len {
                let exact: f64 = inputs.iter().map(|v| v[i] as f64).sum();
                let scale: f64 = inputs.iter().map(|v| (v[i] as f64).abs()).sum();
                assert!(
                    (got[0][i] as f64 - exact).abs() <= scale * 1e-6,
                    "{n} ranks, element {i}: {} against {exact}",
                    got[0][i]
                );
                for (r, out) in got.iter().enumerate() {
                    assert_eq!(
                        out[i].to_bits(),
                        got[0][i].to_bits(),
                        "{n} ranks: rank {r}, element {i}"
                    );
                }
            }
        }
    }
}
