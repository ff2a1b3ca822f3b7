//! The hierarchical path of [`DeviceComm::all_reduce`] (ranks on several hosts, some
//! host holding two or more; [`select::device_across_hosts`]), after the plan of
//! [`DeviceHierPlan`]: per window of at most `HETCCL_DEVICE_SCRATCH_BYTES`,
//!
//! ```text
//! copy input -> own scratch;                         fence (host-mates)
//! 1. for each shard j this rank owns: out[j] = own[j] (op) mate_1[j] (op) ...  (IPC reads)
//! 2. out[j] -> pinned host memory, packed, block by block, an event after each block;
//!    the host path's inter-node rings over the packed buffer (Communicator::run_planned),
//!    a block entering the network once its event fired, and going back to out[j] as
//!    soon as the rings are done with it
//! 3. out[j] -> own scratch[j];                        fence (host-mates)
//!    for each shard j of a host-mate: out[j] <- owner's scratch[j]          (IPC reads)
//! drain, host barrier (as every IPC call ends), Avg's division on the device
//! ```
//!
//! The scratch is mapped between the ranks of one host only; its device fences join
//! only them. Phase 2 is one host collective of the whole world per window (ranks of a
//! host of one run it too), so every rank's sequence stays the same. Phase 1 never
//! divides (Avg sums, its division comes last, the same on every rank), and the ring
//! sums with the call's reduction; every rank ends with the owner's bits of each shard.
//!
//! A block's copy to the host runs behind phase 1's device fence; the host waits for it
//! at most `HETCCL_TIMEOUT`, then releases the fence and names a host-mate that never
//! reached it, as the IPC path's end of call does. The bytes each call moved per link
//! class are kept for [`DeviceComm::link_bytes`].

use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

use super::comm::{copy_dtod, DeviceComm, Laps};
use super::context::Stream;
use super::driver::{self, at, call_failed, device_error, DeviceAddr, PinnedHost};
use super::ipc::IpcScratch;
use super::kernels::{reduce_finalize_ptr, reduce_from_ptr, reduce_inplace_ptr, GpuElement};
use crate::algorithm::device_hier::{DeviceHierPlan, LinkBytes};
use crate::algorithm::executor::BlockPasses;
use crate::algorithm::schedule::OpKind;
use crate::algorithm::Call;
use crate::dtype::{CollectiveOp, ReduceOp};
use crate::error::{Error, Result};

/// Bytes of the packed host buffer staged per event: the unit in which copies to the
/// host and back overlap with the network.
const BLOCK: usize = 1 << 20;

/// The hierarchical path's pinned host buffer and one event per block of it, grown to
/// the largest packed shard seen.
pub(super) struct HierStage {
    host: PinnedHost,
    events: Vec<CudaEvent>,
}

impl HierStage {
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        ctx.bind_to_thread().map_err(device_error("bind context"))?;
        let bytes = bytes.max(BLOCK).next_multiple_of(BLOCK);
        let host = PinnedHost::new(ctx, bytes).map_err(call_failed(format!(
            "allocate {bytes} bytes of pinned host memory"
        )))?;
        let events = (0..bytes / BLOCK)
            .map(|_| ctx.new_event(None).map_err(device_error("create event")))
            .collect::<Result<Vec<_>>>()?;
        Ok(HierStage { host, events })
    }
}

/// Phase 2's passes around the packed buffer's blocks: a block may enter the network
/// once its copy to the host is done, and goes back to the device once the rings are
/// done with it. They may run on the communicator's progress thread.
struct Passes<'a> {
    ctx: &'a Arc<CudaContext>,
    /// To name the host-mate a copy waits for, past `timeout`.
    ipc: &'a IpcScratch,
    timeout: Duration,
    seq: u64,
    stream: &'a CudaStream,
    events: &'a [CudaEvent],
    host: *mut u8,
    plan: &'a DeviceHierPlan,
    rank: usize,
    dst: DeviceAddr,
    host_to_device: usize,
}

impl BlockPasses for Passes<'_> {
    fn block_bytes(&self) -> usize {
        BLOCK
    }

    fn before(&mut self, range: std::ops::Range<usize>) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(device_error("bind context"))?;
        // The copy waits behind the device fence of phase 1: a host-mate that never
        // reaches it must not hold this rank forever.
        let event = &self.events[range.start / BLOCK];
        let start = Instant::now();
        while !event
            .try_is_complete()
            .map_err(device_error("wait for a copy to host"))?
        {
            if start.elapsed() >= self.timeout {
                return Err(self.stuck());
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        Ok(())
    }

    // The driver acts on the calling thread's context, and the passes may run on the
    // progress thread: each binds it first.
    fn after(&mut self, range: std::ops::Range<usize>) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(device_error("bind context"))?;
        for (to, from, len) in self.plan.buffer_pieces(self.rank, range) {
            // SAFETY: `from..from + len` lies in the packed buffer (the plan's packed
            // length, which the buffer holds), which no op of the schedule touches any
            // more; `to` lies in the caller's window of the plan's length.
            unsafe {
                driver::copy_htod_async(
                    self.stream,
                    self.dst + to as u64,
                    self.host.add(from).cast::<c_void>().cast_const(),
                    len,
                )
            }
            .map_err(call_failed(format!("copy {len} bytes host to device")))?;
            self.host_to_device += len;
        }
        Ok(())
    }
}

impl Passes<'_> {
    /// The error for a copy to the host that did not run within the timeout; releases
    /// the stream's fence waits first, so it can drain.
    fn stuck(&self) -> Error {
        let (rank, after) = (self.ipc.rank, self.timeout);
        match self.ipc.release() {
            Err(e) => e,
            Ok(behind) => match behind.first() {
                Some(&peer) => Error::Timeout {
                    rank,
                    peer,
                    op: CollectiveOp::AllReduce,
                    seq: self.seq,
                    after,
                    what: "to reach the same device fence",
                    note: String::new(),
                },
                None => Error::Device {
                    op: format!("all_reduce #{} on the device", self.seq),
                    detail: format!(
                        "a copy to the host did not run within {after:?}, although every \
                         host-mate passed the last device fence"
                    ),
                },
            },
        }
    }
}

impl DeviceComm {
    /// The hierarchical all-reduce of `count` elements from `src` into `dst` (which may
    /// be the same), window by window.
    pub(super) fn hier_all_reduce<T: GpuElement>(
        &mut self,
        stream: &Stream,
        src: DeviceAddr,
        dst: DeviceAddr,
        count: usize,
        op: ReduceOp,
    ) -> Result<LinkBytes> {
        let mut laps = Laps::start();
        let size = size_of::<T>();
        let nodes = self.comm.topology().nodes.clone();
        // Every rank's window is the same (the registration is collective).
        let window = self.ipc_window::<T>(8).min(count);
        let ptrs = self.ipc_scratch(window * size)?;
        let last = count.div_ceil(window) - 1;
        let mut total = LinkBytes::default();
        for w in 0..=last {
            let off = w * window;
            let len = window.min(count - off);
            let plan = DeviceHierPlan::new(&nodes, len, size);
            let b = self.hier_window::<T>(
                stream,
                &mut laps,
                &plan,
                &ptrs,
                at::<T>(src, off),
                at::<T>(dst, off),
                op,
            )?;
            total.ipc_read += b.ipc_read;
            total.device_to_host += b.device_to_host;
            total.host_to_device += b.host_to_device;
            total.network_sent += b.network_sent;
            // The next window overwrites the scratch the host-mates read here.
            if w < last {
                self.ipc_step(stream, &mut laps, "copy out")?;
            }
        }
        self.ipc_finish(stream, &mut laps, CollectiveOp::AllReduce)?;
        // SAFETY: `dst` holds `count` elements; Avg divides once, after every phase.
        unsafe { reduce_finalize_ptr::<T>(stream, op, dst, self.world_size(), count)? };
        stream.synchronize()?;
        tracing::debug!(
            target: "hetccl::device",
            rank = self.rank(),
            seq = self.seq.saturating_sub(1),
            bytes = count * size,
            ipc_read = total.ipc_read,
            device_to_host = total.device_to_host,
            host_to_device = total.host_to_device,
            network_sent = total.network_sent,
            "hierarchical device all_reduce: bytes per link class"
        );
        laps.report("hier all_reduce", count * size);
        Ok(total)
    }

    /// One window of [`DeviceComm::hier_all_reduce`]; returns the bytes it moved.
    #[allow(clippy::too_many_arguments)]
    fn hier_window<T: GpuElement>(
        &mut self,
        stream: &Stream,
        laps: &mut Laps,
        plan: &DeviceHierPlan,
        ptrs: &[DeviceAddr],
        src: DeviceAddr,
        dst: DeviceAddr,
        op: ReduceOp,
    ) -> Result<LinkBytes> {
        let (rank, size) = (self.rank(), size_of::<T>());
        let len: usize = plan.shards.iter().map(|r| r.end - r.start).sum();
        let Some(k) = plan.host_of(rank) else {
            return Err(Error::invalid(
                "DeviceComm::all_reduce",
                format!("rank {rank} is on no host of the topology"),
            ));
        };
        let mut bytes = LinkBytes::default();
        // Avg sums here and divides at the end; the others reduce as asked.
        let ring_op = if op == ReduceOp::Avg {
            ReduceOp::Sum
        } else {
            op
        };

        // SAFETY: the own scratch holds the window (`ipc_scratch`), `src` its `len`
        // elements.
        unsafe { copy_dtod(stream, ptrs[rank], src, len * size)? };
        self.ipc_step(stream, laps, "copy in")?;

        // 1. Each owned shard reduced over the host, the owner's own value first.
        let owned = plan.owned(rank);
        for &j in &owned {
            let r = &plan.shards[j];
            let (lo, n) = (r.start, r.end - r.start);
            let sources = plan.reduce_sources(k, j);
            let out = at::<T>(dst, lo);
            let from = |q: usize| at::<T>(ptrs[q], lo);
            // SAFETY: every host-mate's scratch holds the window, of which shard j is a
            // part, as is the same range of `dst`; the own value is read from the own
            // scratch, so `dst` may be `src`.
            unsafe {
                match sources.split_first() {
                    None => copy_dtod(stream, out, from(rank), n * size)?,
                    Some((&first, rest)) => {
                        reduce_from_ptr::<T>(stream, ring_op, out, from(rank), from(first), n)?;
                        for &q in rest {
                            reduce_inplace_ptr::<T>(stream, ring_op, out, from(q), n)?;
                        }
                    }
                }
            }
            bytes.ipc_read += sources.len() * n * size;
        }
        laps.lap("reduce");

        // 2. The owned shards through pinned memory and the host links.
        let packed = plan.packed_len(rank) * size;
        if self.hier.as_ref().is_none_or(|h| h.host.bytes() < packed) {
            self.hier = None;
            self.hier = Some(HierStage::new(&self.ctx, packed)?);
        }
        let Some(stage) = self.hier.as_ref() else {
            return Err(Error::invalid("DeviceComm", "staging buffer missing"));
        };
        let host = stage.host.as_ptr();
        for (b, block) in (0..packed).step_by(BLOCK).enumerate() {
            for (from, to, n) in plan.buffer_pieces(rank, block..(block + BLOCK).min(packed)) {
                // SAFETY: `to..to + n` lies in the pinned buffer (it holds `packed`
                // bytes), which nothing reads before this block's event; `from` lies in
                // the window of `dst`.
                unsafe {
                    driver::copy_dtoh_async(
                        stream.cuda(),
                        host.add(to).cast::<c_void>(),
                        dst + from as u64,
                        n,
                    )
                }
                .map_err(call_failed(format!("copy {n} bytes device to host")))?;
                bytes.device_to_host += n;
            }
            stage.events[b]
                .record(stream.cuda())
                .map_err(device_error("record event"))?;
        }
        let chunk = self.comm.config().chunk_bytes;
        let sched = Arc::new(plan.inter_host_schedule(rank, chunk));
        bytes.network_sent = sched
            .ops
            .iter()
            .map(|o| match o.kind {
                OpKind::Send { src, .. } => src.len,
                _ => 0,
            })
            .sum();
        let call = Call::new(CollectiveOp::AllReduce, T::DTYPE, len).with_redop(ring_op);
        let Some(ipc) = self.ipc.as_ref() else {
            return Err(Error::invalid("DeviceComm", "IPC scratch missing"));
        };
        let mut passes = Passes {
            ctx: &self.ctx,
            ipc,
            timeout: self.comm.config().timeout,
            seq: self.seq.saturating_sub(1),
            stream: stream.cuda(),
            events: &stage.events,
            host,
            plan,
            rank,
            dst,
            host_to_device: 0,
        };
        // SAFETY: the pinned buffer holds `packed` bytes, which only the copies of the
        // passes touch besides the schedule, each block before or after its ops.
        unsafe {
            self.comm
                .run_planned(call, sched, host, packed, Some(&mut passes))?
        };
        bytes.host_to_device = passes.host_to_device;
        laps.lap("inter-host");

        // 3. Owned shards published in the own scratch, the others' read from theirs.
        for &j in &owned {
            let r = &plan.shards[j];
            // SAFETY: shard j lies in the window of `dst` and of the own scratch; the
            // host-mates read only their own shards of this scratch until the fence.
            unsafe {
                copy_dtod(
                    stream,
                    at::<T>(ptrs[rank], r.start),
                    at::<T>(dst, r.start),
                    (r.end - r.start) * size,
                )?
            };
        }
        self.ipc_step(stream, laps, "publish")?;
        for (j, r) in plan.shards.iter().enumerate() {
            let own = crate::algorithm::hierarchical::owner(&plan.nodes, k, j);
            if own == rank {
                continue;
            }
            let n = (r.end - r.start) * size;
            // SAFETY: the owner published shard j in its scratch before the fence.
            unsafe {
                copy_dtod(
                    stream,
                    at::<T>(dst, r.start),
                    at::<T>(ptrs[own], r.start),
                    n,
                )?
            };
            bytes.ipc_read += n;
        }
        Ok(bytes)
    }
}
