//! How the trainer talks to the other ranks: a small trait over the communicator.
//!
//! The trainer needs five things: the rank and world size, a gradient buffer, summing
//! gradient buckets while backward is still producing the next ones, summing a few f64
//! counters, and gathering one f64 per rank (throughput, for load balancing).
//! [`GradSync`] names exactly those. A communicator's gradient buffer lives in memory
//! the ranks of a host share ([`Communicator::alloc_shared`]), so that on one host
//! each bucket is summed straight from the peers' buffers.
//! [`SingleProcess`] is the world of one; [`ThreadGroup`] runs several ranks as threads of
//! one process (tests, demos). [`hetccl::Communicator`] implements it through its
//! non-blocking `scope` API: each bucket's all-reduce starts the moment backward hands it
//! over and runs on the communicator's progress thread while backward goes on.
//!
//! The parameters stay identical on every rank only if an all-reduce gives every rank
//! bitwise the same sum (hetccl's determinism rule).

use std::sync::{Arc, Condvar, Mutex, RwLock};

use crate::error::{Error, Result};
use hetccl::communicator::{Communicator, Compression, Handle, Scope, SharedBuf};
use hetccl::compression::{Compressor, ScalePolicy, WireFormat};
use hetccl::config::CompressMode;
use hetccl::dtype::ReduceOp;

/// Receives gradient buckets as backward completes them.
pub trait BucketSink<'g, T> {
    /// `grads` is final on this rank: start summing it across ranks. The sink owns the
    /// borrow until the enclosing [`GradSync::reduce_while`] returns.
    fn bucket_ready(&mut self, grads: &'g mut [T]) -> Result<()>;
}

/// A sink that does nothing: single process, or a micro-batch whose gradients are only
/// accumulated locally.
pub struct NoSync;

impl<'g, T> BucketSink<'g, T> for NoSync {
    fn bucket_ready(&mut self, _grads: &'g mut [T]) -> Result<()> {
        Ok(())
    }
}

/// The backward pass handed to [`GradSync::reduce_while`].
pub type BackwardFn<'a, 'g> =
    dyn FnMut(&'g mut [f32], &mut dyn BucketSink<'g, f32>) -> Result<()> + 'a;

/// What data-parallel training needs from a communicator.
pub trait GradSync {
    /// This rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Runs `backward(grads, sink)`; every bucket it passes to the sink is summed over all
    /// ranks (in place, every rank the same order of buckets). Returns when all are summed.
    fn reduce_while<'g>(
        &'g self,
        grads: &'g mut [f32],
        backward: &mut BackwardFn<'_, 'g>,
    ) -> Result<()>;
    /// A span on the communicator's timeline (`HETCCL_TRACE`), ended when dropped;
    /// nothing is recorded without one.
    fn span(&self, name: &'static str) -> hetccl::observe::Span<'_> {
        hetccl::observe::Span::off(name)
    }
    /// Blocking in-place sum over ranks of a few counters.
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()>;
    /// `recv[r*n..(r+1)*n]` = rank r's `send` (n = send.len()).
    fn all_gather(&self, send: &[f64], recv: &mut [f64]) -> Result<()>;
    /// What this rank must keep across a restart besides the model (error-feedback
    /// residuals), or `None` when it keeps nothing.
    fn save_state(&self) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }
    /// Takes back what [`GradSync::save_state`] returned on this rank.
    fn restore_state(&self, _state: &[u8]) -> Result<()> {
        Ok(())
    }
    /// The flat gradient buffer: `len` zeros. Collective: every rank calls it once, at
    /// the same point of its run. A plain `Vec` here; a communicator hands out memory
    /// the ranks of a host share, so that the buckets' all-reduces read the peers'
    /// gradients in place instead of copying them through link buffers.
    fn alloc_grads(&self, len: usize) -> Result<GradBuf> {
        Ok(GradBuf::Private(vec![0.0; len]))
    }
}

/// The gradient buffer [`GradSync::alloc_grads`] hands out; a `[f32]` either way.
pub enum GradBuf {
    /// This process's own memory.
    Private(Vec<f32>),
    /// Memory the ranks of this host map ([`Communicator::alloc_shared`]).
    Shared(SharedBuf<f32>),
}

impl std::ops::Deref for GradBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            GradBuf::Private(v) => v,
            GradBuf::Shared(b) => b,
        }
    }
}

impl std::ops::DerefMut for GradBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        match self {
            GradBuf::Private(v) => v,
            GradBuf::Shared(b) => b,
        }
    }
}

/// A world of one rank: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl GradSync for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn reduce_while<'g>(
        &'g self,
        grads: &'g mut [f32],
        backward: &mut BackwardFn<'_, 'g>,
    ) -> Result<()> {
        backward(grads, &mut NoSync)
    }
    fn all_reduce_sum(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        if recv.len() != send.len() {
            return Err(Error::invalid(
                "all_gather",
                format!("recv holds {} values, expected {}", recv.len(), send.len()),
            ));
        }
        recv.copy_from_slice(send);
        Ok(())
    }
}

/// Several ranks as threads of one process, summing through shared memory.
///
/// Buckets are reduced by a second thread per rank while backward runs (like a real
/// communicator), in the order backward hands them over, and summed in rank order, so
/// every rank gets bitwise the same result. If one rank fails, [`ThreadGroup::abort`] wakes every waiting rank
/// with an error instead of leaving it blocked.
#[derive(Clone)]
pub struct ThreadGroup {
    shared: Arc<Shared>,
    rank: usize,
}

struct Shared {
    world: usize,
    state: Mutex<BarrierState>,
    cv: Condvar,
    slots32: Vec<RwLock<Vec<f32>>>,
    slots64: Vec<RwLock<Vec<f64>>>,
}

struct BarrierState {
    arrived: usize,
    generation: u64,
    aborted: Option<String>,
}

impl ThreadGroup {
    /// One handle per rank, `world` of them.
    pub fn new(world: usize) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(BarrierState {
                arrived: 0,
                generation: 0,
                aborted: None,
            }),
            cv: Condvar::new(),
            slots32: (0..world).map(|_| RwLock::new(Vec::new())).collect(),
            slots64: (0..world).map(|_| RwLock::new(Vec::new())).collect(),
        });
        (0..world)
            .map(|rank| ThreadGroup {
                shared: shared.clone(),
                rank,
            })
            .collect()
    }

    /// Makes every current and future collective of the group fail with `why`.
    pub fn abort(&self, why: &str) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.aborted
                .get_or_insert_with(|| format!("rank {}: {why}", self.rank));
        }
        self.shared.cv.notify_all();
    }

    fn broken(&self, why: &str) -> Error {
        hetccl::Error::Broken(format!("thread group rank {}: {why}", self.rank)).into()
    }

    fn barrier(&self) -> Result<()> {
        let mut st = self
            .shared
            .state
            .lock()
            .map_err(|_| self.broken("lock poisoned"))?;
        if let Some(why) = &st.aborted {
            return Err(self.broken(why));
        }
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == self.shared.world {
            st.arrived = 0;
            st.generation += 1;
            self.shared.cv.notify_all();
            return Ok(());
        }
        while st.generation == generation && st.aborted.is_none() {
            st = self
                .shared
                .cv
                .wait(st)
                .map_err(|_| self.broken("lock poisoned"))?;
        }
        match &st.aborted {
            // The barrier completed before the abort: this collective is whole.
            _ if st.generation != generation => Ok(()),
            Some(why) => Err(self.broken(why)),
            None => Ok(()),
        }
    }

    /// Deposit, barrier, sum the slots in rank order, barrier (so no slot is overwritten
    /// while a peer still reads it).
    fn sum_in_place<T: Copy + std::ops::AddAssign>(
        &self,
        slots: &[RwLock<Vec<T>>],
        buf: &mut [T],
    ) -> Result<()> {
        {
            let mut mine = slots[self.rank]
                .write()
                .map_err(|_| self.broken("slot poisoned"))?;
            mine.clear();
            mine.extend_from_slice(buf);
        }
        self.barrier()?;
        {
            let guards = slots
                .iter()
                .map(|s| s.read().map_err(|_| self.broken("slot poisoned")))
                .collect::<Result<Vec<_>>>()?;
            if let Some(g) = guards.iter().find(|g| g.len() != buf.len()) {
                let why = format!("ranks reduce different sizes: {} vs {}", g.len(), buf.len());
                drop(guards);
                self.abort(&why);
                return Err(self.broken(&why));
            }
            for (i, out) in buf.iter_mut().enumerate() {
                let mut acc = guards[0][i];
                for g in &guards[1..] {
                    acc += g[i];
                }
                *out = acc;
            }
        }
        self.barrier()
    }
}

struct ChannelSink<'g> {
    tx: std::sync::mpsc::Sender<&'g mut [f32]>,
}

impl<'g> BucketSink<'g, f32> for ChannelSink<'g> {
    fn bucket_ready(&mut self, grads: &'g mut [f32]) -> Result<()> {
        self.tx.send(grads).map_err(|_| {
            hetccl::Error::Broken("gradient reduction thread has stopped".into()).into()
        })
    }
}

impl GradSync for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn reduce_while<'g>(
        &'g self,
        grads: &'g mut [f32],
        backward: &mut BackwardFn<'_, 'g>,
    ) -> Result<()> {
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel::<&'g mut [f32]>();
            let reducer = s.spawn(move || -> Result<()> {
                for bucket in rx {
                    self.sum_in_place(&self.shared.slots32, bucket)?;
                }
                Ok(())
            });
            let res = backward(grads, &mut ChannelSink { tx });
            if let Err(e) = &res {
                self.abort(&e.to_string());
            }
            // The sink (and so the sender) is gone: the reducer ends after the last bucket.
            let reduced = reducer
                .join()
                .unwrap_or_else(|_| Err(self.broken("reduction thread panicked")));
            res.and(reduced)
        })
    }
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        self.sum_in_place(&self.shared.slots64, buf)
    }
    fn all_gather(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        let n = send.len();
        if recv.len() != n * self.shared.world {
            return Err(Error::invalid(
                "all_gather",
                format!(
                    "recv holds {} values, expected {}",
                    recv.len(),
                    n * self.shared.world
                ),
            ));
        }
        // Each rank contributes its values at its offset, zeros elsewhere: a sum gathers.
        let mut full = vec![0.0; recv.len()];
        full[self.rank * n..][..n].copy_from_slice(send);
        self.sum_in_place(&self.shared.slots64, &mut full)?;
        recv.copy_from_slice(&full);
        Ok(())
    }
}

/// Starts an all-reduce per bucket inside a [`Communicator::scope`].
struct ScopeSink<'s, 'env> {
    scope: &'s Scope<'s, 'env>,
    handles: Vec<Handle<'s>>,
}

impl<'env> BucketSink<'env, f32> for ScopeSink<'_, 'env> {
    fn bucket_ready(&mut self, grads: &'env mut [f32]) -> Result<()> {
        tracing::debug!(target: "hetccl::trainer::sync", bytes = grads.len() * 4, "bucket all_reduce started");
        self.handles
            .push(self.scope.all_reduce(grads, ReduceOp::Sum)?);
        Ok(())
    }
}

impl GradSync for Communicator {
    fn rank(&self) -> usize {
        Communicator::rank(self)
    }
    fn span(&self, name: &'static str) -> hetccl::observe::Span<'_> {
        Communicator::span(self, name)
    }
    fn world_size(&self) -> usize {
        Communicator::world_size(self)
    }
    fn reduce_while<'g>(
        &'g self,
        grads: &'g mut [f32],
        backward: &mut BackwardFn<'_, 'g>,
    ) -> Result<()> {
        self.scope(|s| {
            let mut sink = ScopeSink {
                scope: s,
                handles: Vec::new(),
            };
            let res = backward(grads, &mut sink);
            // Wait for every bucket that was started, also after an error, and report
            // the first failure.
            let mut waited = Ok(());
            for h in sink.handles {
                let r = h.wait().map_err(Error::from);
                if waited.is_ok() {
                    waited = r;
                }
            }
            res.and(waited)
        })
    }
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        Ok(self.all_reduce(buf, ReduceOp::Sum)?)
    }
    fn all_gather(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        Ok(Communicator::all_gather(self, send, recv)?)
    }
    fn alloc_grads(&self, len: usize) -> Result<GradBuf> {
        // Shared buffers come zero-filled.
        Ok(GradBuf::Shared(self.alloc_shared::<f32>(len)?))
    }
}

/// A communicator whose gradient buckets cross the links `mode` selects as 16-bit
/// values, with error feedback: each bucket (by its position in backward's order) has
/// a [`Compressor`] whose residual carries what rounding lost into the next step. The
/// residuals differ between ranks, so each rank saves its own ([`GradSync::save_state`]).
pub struct CompressedSync<'c> {
    comm: &'c Communicator,
    mode: CompressMode,
    format: WireFormat,
    /// One per bucket, in the order backward hands buckets over.
    comps: Mutex<Vec<Compressor>>,
}

impl<'c> CompressedSync<'c> {
    /// Compressed gradient sync over `comm`.
    pub fn new(comm: &'c Communicator, mode: CompressMode, format: WireFormat) -> Self {
        CompressedSync {
            comm,
            mode,
            format,
            comps: Mutex::new(Vec::new()),
        }
    }

    fn compressor(&self) -> Result<Compressor> {
        Ok(Compressor::new(
            self.format,
            ScalePolicy::InverseWorldSize,
            true,
        )?)
    }

    fn compression<'a>(&self, compressor: &'a mut Compressor) -> Compression<'a> {
        Compression {
            mode: self.mode,
            compressor,
            buffer: 0,
        }
    }
}

/// Starts a compressed all-reduce per bucket while there are compressors for it;
/// buckets beyond them (the first step's) wait for the end of backward.
struct CompressedSink<'s, 'l, 'g> {
    sync: &'s CompressedSync<'s>,
    scope: &'s Scope<'s, 'l>,
    comps: std::slice::IterMut<'l, Compressor>,
    handles: Vec<Handle<'s>>,
    late: Vec<&'g mut [f32]>,
}

impl<'g: 'l, 'l> BucketSink<'g, f32> for CompressedSink<'_, 'l, 'g> {
    fn bucket_ready(&mut self, grads: &'g mut [f32]) -> Result<()> {
        match self.comps.next() {
            Some(c) => {
                let c = self.sync.compression(c);
                self.handles
                    .push(self.scope.all_reduce_compressed(grads, ReduceOp::Sum, c)?);
            }
            None => self.late.push(grads),
        }
        Ok(())
    }
}

impl GradSync for CompressedSync<'_> {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn span(&self, name: &'static str) -> hetccl::observe::Span<'_> {
        self.comm.span(name)
    }
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    fn reduce_while<'g>(
        &'g self,
        grads: &'g mut [f32],
        backward: &mut BackwardFn<'_, 'g>,
    ) -> Result<()> {
        let mut comps = self.comps.lock().unwrap_or_else(|p| p.into_inner());
        let known = comps.len();
        let (res, late) = self.comm.scope(|s| {
            let mut sink = CompressedSink {
                sync: self,
                scope: s,
                comps: comps.iter_mut(),
                handles: Vec::new(),
                late: Vec::new(),
            };
            let res = backward(grads, &mut sink);
            let mut waited = Ok(());
            for h in sink.handles {
                let r = h.wait_stats().map(|_| ()).map_err(Error::from);
                if waited.is_ok() {
                    waited = r;
                }
            }
            (res.and(waited), sink.late)
        });
        res?;
        if late.is_empty() {
            return Ok(());
        }
        // New buckets (the first step, or a model that grew): compressors for them,
        // then their all-reduces, still in bucket order.
        for _ in 0..late.len() {
            comps.push(self.compressor()?);
        }
        self.comm.scope(|s| {
            let handles = comps[known..]
                .iter_mut()
                .zip(late)
                .map(|(c, g)| s.all_reduce_compressed(g, ReduceOp::Sum, self.compression(c)))
                .collect::<hetccl::Result<Vec<_>>>()?;
            Ok(handles.into_iter().try_for_each(|h| h.wait())?)
        })
    }
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        Ok(self.comm.all_reduce(buf, ReduceOp::Sum)?)
    }
    fn all_gather(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        Ok(self.comm.all_gather(send, recv)?)
    }
    /// Layout: u64 bucket count, then each bucket's [`Compressor::save`] in order.
    fn save_state(&self) -> Result<Option<Vec<u8>>> {
        let comps = self.comps.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = (comps.len() as u64).to_le_bytes().to_vec();
        for c in comps.iter() {
            c.save(&mut out)?;
        }
        Ok(Some(out))
    }
    fn restore_state(&self, state: &[u8]) -> Result<()> {
        let bad = |what: String| Error::invalid("CompressedSync::restore_state", what);
        let (n, mut rest) = state
            .split_first_chunk::<8>()
            .ok_or_else(|| bad(format!("{} bytes, too short for a count", state.len())))?;
        let n = u64::from_le_bytes(*n);
        let mut comps = Vec::new();
        for _ in 0..n {
            let c = Compressor::load(&mut rest)?;
            if c.format() != self.format {
                return Err(bad(format!(
                    "saved residuals are {}, this run compresses to {}",
                    c.format(),
                    self.format
                )));
            }
            comps.push(c);
        }
        if !rest.is_empty() {
            return Err(bad(format!("{} bytes after {n} compressors", rest.len())));
        }
        *self.comps.lock().unwrap_or_else(|p| p.into_inner()) = comps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One step on every rank of `comms` through `syncs[r]`: rank r's gradient is
    /// `g(r, i)`, handed over as three buckets of unequal size.
    fn compressed_step(
        comms: &[Communicator],
        syncs: &[CompressedSync<'_>],
        step: usize,
    ) -> Vec<Vec<f32>> {
        let n = 3000;
        hetccl_testkit::on_all(comms, |c| {
            let r = c.rank();
            let mut grads: Vec<f32> = (0..n)
                .map(|i| ((i * (r + 1) + step * 7) as f32 * 0.013).sin() * 0.37)
                .collect();
            syncs[r]
                .reduce_while(&mut grads, &mut |g, sink| {
                    let (a, rest) = g.split_at_mut(1000);
                    let (b, c) = rest.split_at_mut(1500);
                    sink.bucket_ready(a)?;
                    sink.bucket_ready(b)?;
                    sink.bucket_ready(c)
                })
                .unwrap();
            grads
        })
    }

    #[test]
    fn compressed_buckets_sum_within_fp16_and_residuals_survive_a_restart() {
        use hetccl::Config;
        // Two pretend nodes of one rank: `inter` compresses the one link.
        let comms = hetccl_testkit::world(2, 1, Config::default());
        let syncs: Vec<_> = comms
            .iter()
            .map(|c| CompressedSync::new(c, CompressMode::Inter, WireFormat::F16))
            .collect();
        // Step 0 meets the buckets for the first time, step 1 overlaps them.
        for step in 0..2 {
            let outs = compressed_step(&comms, &syncs, step);
            assert_eq!(outs[0], outs[1], "step {step}: ranks disagree");
            for i in (0..3000).step_by(101) {
                let exact: f32 = (0..2)
                    .map(|r| ((i * (r + 1) + step * 7) as f32 * 0.013).sin() * 0.37)
                    .sum();
                assert!(
                    (outs[0][i] - exact).abs() <= 4.0 * 2f32.powi(-11) * exact.abs().max(0.5),
                    "step {step} [{i}]: {} vs {exact}",
                    outs[0][i]
                );
            }
        }
        assert_eq!(syncs[0].comps.lock().unwrap().len(), 3);
        // Save after step 1, restore into fresh syncs: step 2 from the restored state
        // equals step 2 of the running ones, bit for bit, and differs from a start
        // with empty residuals.
        let states: Vec<Vec<u8>> = syncs
            .iter()
            .map(|s| s.save_state().unwrap().unwrap())
            .collect();
        let restored: Vec<_> = comms
            .iter()
            .zip(&states)
            .map(|(c, st)| {
                let s = CompressedSync::new(c, CompressMode::Inter, WireFormat::F16);
                s.restore_state(st).unwrap();
                s
            })
            .collect();
        let fresh: Vec<_> = comms
            .iter()
            .map(|c| CompressedSync::new(c, CompressMode::Inter, WireFormat::F16))
            .collect();
        let from_restored = compressed_step(&comms, &restored, 2);
        let from_fresh = compressed_step(&comms, &fresh, 2);
        let continued = compressed_step(&comms, &syncs, 2);
        assert_eq!(from_restored, continued);
        assert_ne!(from_fresh, continued);
        // Damaged or foreign state is refused with the reason.
        let s = CompressedSync::new(&comms[0], CompressMode::Inter, WireFormat::Bf16);
        let e = s.restore_state(&states[0]).unwrap_err().to_string();
        assert!(
            e.contains("saved residuals are fp16, this run compresses to bf16"),
            "{e}"
        );
        let e = s.restore_state(&states[0][..5]).unwrap_err().to_string();
        assert!(e.contains("5 bytes, too short for a count"), "{e}");
        let mut bad = states[0].clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(s.restore_state(&bad).is_err());
    }

    #[test]
    fn thread_group_sums_buckets_in_rank_order() {
        let world = 3;
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = ThreadGroup::new(world)
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        let r = g.rank() as f32;
                        let mut grads: Vec<f32> = (0..10).map(|i| r * 100.0 + i as f32).collect();
                        g.reduce_while(&mut grads, &mut |gr, sink| {
                            let (a, b) = gr.split_at_mut(4);
                            sink.bucket_ready(b)?;
                            sink.bucket_ready(a)
                        })
                        .unwrap();
                        grads
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Σ_r (100 r + i) = 300 + 3 i for r = 0, 1, 2.
        let want: Vec<f32> = (0..10).map(|i| 300.0 + 3.0 * i as f32).collect();
        for r in results {
            assert_eq!(r, want);
        }
    }

    #[test]
    fn thread_group_gathers_and_sums_counters() {
        let out: Vec<(Vec<f64>, Vec<f64>)> = std::thread::scope(|s| {
            let hs: Vec<_> = ThreadGroup::new(2)
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        let mut recv = vec![0.0; 4];
                        let r = g.rank() as f64;
                        g.all_gather(&[r, 10.0 + r], &mut recv).unwrap();
                        let mut sum = [1.0, r];
                        g.all_reduce_sum(&mut sum).unwrap();
                        (recv, sum.to_vec())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (recv, sum) in out {
            assert_eq!(recv, [0.0, 10.0, 1.0, 11.0]);
            assert_eq!(sum, [2.0, 1.0]);
        }
    }

    #[test]
    fn abort_wakes_a_waiting_rank() {
        let group = ThreadGroup::new(2);
        let (g0, g1) = (group[0].clone(), group[1].clone());
        let waiter = std::thread::spawn(move || g1.all_reduce_sum(&mut [1.0]));
        std::thread::sleep(std::time::Duration::from_millis(20));
        g0.abort("backward failed");
        let err = waiter.join().unwrap().unwrap_err();
        assert_eq!(
            err.to_string(),
            "communicator is unusable after an earlier error: thread group rank 1: rank 0: backward failed"
        );
    }
}
