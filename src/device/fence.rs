//! Device fences: how the ranks' streams meet between the phases of an IPC call
//! without the host waiting.
//!
//! A fence is queued on the stream, not waited for by the host: each rank's stream
//! writes how many fences it has passed into a counter in the scratch of every rank it
//! shares scratch with (every rank on the IPC path, the host-mates on the hierarchical
//! one), then waits until each of their counters in its own scratch has reached the
//! same number
//! (`cuStreamWriteValue32` / `cuStreamWaitValue32`). The host queues a whole call and
//! waits once, at its end, at most `HETCCL_TIMEOUT`; a peer that stopped is then named.
//! With `HETCCL_DEVICE_FENCE=host` each fence is instead the host draining its stream
//! and meeting the peers at a barrier. With `HETCCL_DEBUG=trace` each call logs how long
//! its phases, drains and barriers took.

use std::ffi::c_void;
use std::time::{Duration, Instant};

use cudarc::driver::CudaStream;

use super::comm::{DeviceComm, Laps};
use super::context::Stream;
use super::driver::{self, call_failed, DeviceAddr};
use super::ipc::IpcScratch;
use crate::config::DeviceFence;
use crate::dtype::CollectiveOp;
use crate::error::{Error, Result};

/// Bytes at the end of every rank's IPC allocation that hold the device fences'
/// progress counters: one 32-bit word per rank, padded to 256 bytes.
pub(super) fn flag_bytes(world: usize) -> usize {
    (4 * world).next_multiple_of(256)
}

impl IpcScratch {
    /// Address of the counter that rank `from` writes in rank `owner`'s allocation.
    fn flag(&self, owner: usize, from: usize) -> DeviceAddr {
        self.ptrs[owner] + (self.data + 4 * from) as u64
    }

    /// Queues a device-side barrier on `stream`: the stream tells every peer that it has
    /// passed this fence (a write into the peer's counter, after a memory barrier that
    /// makes everything the stream wrote before visible), then waits until every peer
    /// has told it the same. Work queued after the fence therefore runs after every
    /// rank's work queued before it, and the host does not wait for anything.
    ///
    /// Every rank queues the same fences in the same order, so the counters only grow
    /// and a peer can be at most one fence ahead; waits compare cyclically, so the
    /// 32-bit counters may wrap.
    pub(super) fn fence(&mut self, stream: &CudaStream) -> Result<()> {
        self.step = self.step.wrapping_add(1);
        let (me, step) = (self.rank, self.step);
        let peers = self.members.iter().copied().filter(|&q| q != me);
        for q in peers.clone() {
            // SAFETY: the word lies in rank q's mapped allocation, which stays mapped
            // until every rank has drained its stream (the barrier at the end of a call).
            unsafe { driver::stream_write_u32(stream, self.flag(q, me), step) }.map_err(
                call_failed(format!("signal rank {q} (device fence {step})")),
            )?;
        }
        for q in peers {
            // SAFETY: the word lies in this rank's own allocation.
            unsafe { driver::stream_wait_geq_u32(stream, self.flag(me, q), step) }.map_err(
                call_failed(format!("wait for rank {q} (device fence {step})")),
            )?;
        }
        Ok(())
    }

    /// After a timeout: the peers whose counters here have not reached the last fence,
    /// read on the auxiliary stream; then raises every counter to it, so the caller's
    /// stream, which may be waiting on them, can drain.
    pub(super) fn release(&self) -> Result<Vec<usize>> {
        let n = self.ptrs.len();
        let mut words = vec![0u32; n];
        let base = self.flag(self.rank, 0);
        // SAFETY: `words` has room for the `n` counters at the end of the own
        // allocation; the stream is drained before `words` is read.
        unsafe {
            driver::copy_dtoh_async(&self.aux, words.as_mut_ptr().cast::<c_void>(), base, 4 * n)
        }
        .and_then(|()| driver::synchronize(&self.aux))
        .map_err(call_failed("read the device fences' counters"))?;
        let behind = (self.members.iter().copied())
            .filter(|&q| q != self.rank && (words[q].wrapping_sub(self.step) as i32) < 0)
            .collect();
        // SAFETY: as above, the counters at the end of the own allocation.
        unsafe { driver::memset_d32_async(&self.aux, base, self.step, n) }
            .and_then(|()| driver::synchronize(&self.aux))
            .map_err(call_failed("raise the device fences' counters"))?;
        Ok(behind)
    }
}

/// Waits until `stream` has run everything queued on it: `Ok(true)`, or `Ok(false)`
/// when `timeout` passes first. Polls, yielding the CPU between queries.
fn drain_within(stream: &CudaStream, timeout: Duration) -> Result<bool> {
    let start = Instant::now();
    let mut polls = 0u32;
    loop {
        if driver::stream_idle(stream).map_err(|e| call_failed("wait for the stream")(e))? {
            return Ok(true);
        }
        if start.elapsed() >= timeout {
            return Ok(false);
        }
        // Yield for about the first millisecond, then sleep: a collective that waits for
        // a slow peer should not hold a core.
        polls += 1;
        if polls < 1000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl DeviceComm {
    /// Drains the stream and meets the peers at a host barrier, timing the two apart.
    pub(super) fn timed_sync_and_barrier(
        &self,
        stream: &Stream,
        laps: &mut Laps,
        what: &'static str,
    ) -> Result<()> {
        stream.synchronize()?;
        laps.lap(what);
        self.comm.barrier()?;
        laps.lap("barrier");
        Ok(())
    }

    /// Orders the ranks' device work between two phases of an IPC call: a device fence
    /// ([`IpcScratch::fence`]), or the host draining the stream and meeting the peers at
    /// a barrier (`HETCCL_DEVICE_FENCE=host`).
    pub(super) fn ipc_step(
        &mut self,
        stream: &Stream,
        laps: &mut Laps,
        what: &'static str,
    ) -> Result<()> {
        match (self.comm.config().device_fence, self.ipc.as_mut()) {
            (DeviceFence::Device, Some(ipc)) => {
                ipc.fence(stream.cuda())?;
                laps.lap(what);
                Ok(())
            }
            _ => self.timed_sync_and_barrier(stream, laps, what),
        }
    }

    /// Ends an IPC call: drains the stream, then meets the peers at a barrier, after
    /// which nobody reads this rank's scratch or waits on its counters any more. Under
    /// device fences the stream may be waiting for a peer, so the drain gives up after
    /// `HETCCL_TIMEOUT`, naming the peers that stayed behind.
    pub(super) fn ipc_finish(
        &mut self,
        stream: &Stream,
        laps: &mut Laps,
        coll: CollectiveOp,
    ) -> Result<()> {
        if self.comm.config().device_fence == DeviceFence::Host {
            return self.timed_sync_and_barrier(stream, laps, "copy out");
        }
        let timeout = self.comm.config().timeout;
        if !drain_within(stream.cuda(), timeout)? {
            return Err(self.fence_timeout(stream, coll, timeout));
        }
        laps.lap("drain");
        self.comm.barrier()?;
        laps.lap("barrier");
        Ok(())
    }

    /// The error for a stream that did not drain in time under device fences; unblocks
    /// the stream first, as far as this rank can.
    fn fence_timeout(&self, stream: &Stream, coll: CollectiveOp, after: Duration) -> Error {
        let (rank, seq) = (self.rank(), self.seq.saturating_sub(1));
        let Some(ipc) = &self.ipc else {
            return Error::invalid("DeviceComm", "IPC scratch missing");
        };
        let behind = match ipc.release() {
            Ok(b) => b,
            Err(e) => return e,
        };
        // Raised counters let the stream pass its waits; what it computes now is
        // garbage, but it no longer holds the caller's later work back.
        let _ = drain_within(stream.cuda(), Duration::from_secs(1));
        match behind.first() {
            Some(&peer) => Error::Timeout {
                rank,
                peer,
                op: coll,
                seq,
                after,
                what: "to reach the same device fence",
                note: String::new(),
            },
            None => Error::Device {
                op: format!("{coll} #{seq} on the device"),
                detail: format!(
                    "the stream did not drain within {after:?}, although every peer passed \
                     the last device fence"
                ),
            },
        }
    }
}
