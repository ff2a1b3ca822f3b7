//! The staged path of [`DeviceComm`] (ranks on several hosts, or asked for).
//!
//! The data passes through two pinned host buffers of `HETCCL_DEVICE_STAGE_BYTES`
//! (2 MiB) each, piece by piece: while the host communicator reduces piece `k` in one
//! buffer, the copy engine brings piece `k + 1` into the other, and piece `k` goes back
//! to the device as soon as its host collective is done. Each piece is one host
//! collective, itself pipelined in `HETCCL_CHUNK_BYTES`.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaEvent, DeviceRepr};

use super::comm::DeviceComm;
use super::context::Stream;
use super::driver::{at, call_failed, device_error, DeviceAddr, PinnedHost};
use super::kernels::GpuElement;
use crate::communicator::Communicator;
use crate::dtype::{Element, ReduceOp};
use crate::error::{Error, Result};

/// One pinned host buffer of the staged path and the event that says when the copy
/// into it is done.
pub(super) struct Slot {
    /// Freed (after every call has drained its stream) before the event goes.
    host: PinnedHost,
    ready: CudaEvent,
}

impl Slot {
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Slot> {
        ctx.bind_to_thread().map_err(device_error("bind context"))?;
        let ready = ctx.new_event(None).map_err(device_error("create event"))?;
        let host = PinnedHost::new(ctx, bytes).map_err(call_failed(format!(
            "allocate {bytes} bytes of pinned host memory"
        )))?;
        Ok(Slot { host, ready })
    }
}

impl DeviceComm {
    /// [`DeviceComm::all_reduce`] through the staging slots.
    pub(super) fn staged_all_reduce<T: GpuElement>(
        &mut self,
        stream: &Stream,
        src: DeviceAddr,
        dst: DeviceAddr,
        count: usize,
        op: ReduceOp,
    ) -> Result<()> {
        let piece = self.slot_elems::<T>()?;
        self.staged::<T>(
            stream,
            count,
            piece,
            |off, len| vec![(at::<T>(src, off), 0, len)],
            |comm, slot, len| comm.all_reduce(&mut slot[..len], op),
            |off, len| vec![(at::<T>(dst, off), 0, len)],
        )
    }

    /// [`DeviceComm::broadcast`] through the staging slots.
    pub(super) fn staged_broadcast<T: Element + DeviceRepr>(
        &mut self,
        stream: &Stream,
        p: DeviceAddr,
        count: usize,
        root: usize,
    ) -> Result<()> {
        let rank = self.rank();
        let piece = self.slot_elems::<T>()?;
        let is_root = rank == root;
        self.staged::<T>(
            stream,
            count,
            piece,
            |off, len| {
                if is_root {
                    vec![(at::<T>(p, off), 0, len)]
                } else {
                    vec![]
                }
            },
            |comm, slot, len| comm.broadcast(&mut slot[..len], root),
            |off, len| {
                if is_root {
                    vec![]
                } else {
                    vec![(at::<T>(p, off), 0, len)]
                }
            },
        )
    }

    /// [`DeviceComm::all_gather`] through the staging slots.
    pub(super) fn staged_all_gather<T: Element + DeviceRepr>(
        &mut self,
        stream: &Stream,
        src: DeviceAddr,
        dst: DeviceAddr,
        count: usize,
    ) -> Result<()> {
        let n = self.world_size();
        // Each slot holds this rank's piece followed by the n gathered pieces.
        let piece = self.slot_elems::<T>()? / (n + 1);
        self.staged::<T>(
            stream,
            count,
            piece,
            |off, len| vec![(at::<T>(src, off), 0, len)],
            |comm, slot, len| {
                let (mine, all) = slot.split_at_mut(piece);
                comm.all_gather(&mine[..len], &mut all[..n * len])
            },
            |off, len| {
                (0..n)
                    .map(|q| (at::<T>(dst, q * count + off), piece + q * len, len))
                    .collect()
            },
        )
    }

    /// [`DeviceComm::reduce_scatter`] through the staging slots.
    pub(super) fn staged_reduce_scatter<T: GpuElement>(
        &mut self,
        stream: &Stream,
        src: DeviceAddr,
        dst: DeviceAddr,
        count: usize,
        op: ReduceOp,
    ) -> Result<()> {
        let (n, rank) = (self.world_size(), self.rank());
        // Each slot holds the piece's window of all n blocks; the host's in-place
        // reduce-scatter leaves this rank's block reduced where it was.
        let piece = self.slot_elems::<T>()? / n;
        self.staged::<T>(
            stream,
            count,
            piece,
            |off, len| {
                (0..n)
                    .map(|q| (at::<T>(src, q * count + off), q * len, len))
                    .collect()
            },
            |comm, slot, len| comm.reduce_scatter_in_place(&mut slot[..n * len], op),
            |off, len| vec![(at::<T>(dst, off), rank * len, len)],
        )
    }

    /// [`DeviceComm::reduce`] through the staging slots.
    pub(super) fn staged_reduce<T: GpuElement>(
        &mut self,
        stream: &Stream,
        src: DeviceAddr,
        dst: DeviceAddr,
        count: usize,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        let is_root = self.rank() == root;
        let piece = self.slot_elems::<T>()?;
        self.staged::<T>(
            stream,
            count,
            piece,
            |off, len| vec![(at::<T>(src, off), 0, len)],
            |comm, slot, len| comm.reduce_in_place(&mut slot[..len], op, root),
            |off, len| {
                if is_root {
                    vec![(at::<T>(dst, off), 0, len)]
                } else {
                    vec![]
                }
            },
        )
    }

    /// Elements of `T` one staging slot holds, allocating the slots on first use.
    pub(super) fn slot_elems<T>(&mut self) -> Result<usize> {
        if self.slots.is_none() {
            // At least room for a few elements per rank, for the all-gather's layout.
            let bytes = self
                .comm
                .config()
                .device_stage_bytes
                .max(64 * (self.world_size() + 1))
                .next_multiple_of(64);
            self.slots = Some([Slot::new(&self.ctx, bytes)?, Slot::new(&self.ctx, bytes)?]);
        }
        let bytes = self.slots.as_ref().map_or(0, |s| s[0].host.bytes());
        Ok(bytes / std::mem::size_of::<T>())
    }

    /// The staged pipeline over `count` elements in pieces of `piece`: for piece `k`
    /// (elements `off..off + len`), every `(device address, slot offset, elements)` that
    /// `ins(off, len)` lists is copied into slot `k % 2`, `host` runs the host collective
    /// on the slot, then every range that `outs(off, len)` lists is copied back. The
    /// copies of piece `k + 1` into the other slot are queued before the host works on
    /// piece `k`, so the two overlap.
    fn staged<T: Element>(
        &mut self,
        stream: &Stream,
        count: usize,
        piece: usize,
        ins: impl Fn(usize, usize) -> Vec<(DeviceAddr, usize, usize)>,
        mut host: impl FnMut(&Communicator, &mut [T], usize) -> Result<()>,
        outs: impl Fn(usize, usize) -> Vec<(DeviceAddr, usize, usize)>,
    ) -> Result<()> {
        if piece == 0 {
            return Err(Error::invalid(
                "DeviceComm",
                "the staging buffers hold no element (HETCCL_DEVICE_STAGE_BYTES too small)",
            ));
        }
        let size = std::mem::size_of::<T>();
        let comm = self.comm.clone();
        let Some(slots) = self.slots.as_mut() else {
            return Err(Error::invalid("DeviceComm", "staging buffers missing"));
        };
        let pieces = count.div_ceil(piece);
        let range = |k: usize| (k * piece, piece.min(count - k * piece));

        // Queues piece k's copies into `slot` and marks the slot ready after them. The
        // event also covers every earlier copy out of this slot (stream order), so once it
        // has fired the host may write the slot again, copies or none.
        let stage_in = |k: usize, slot: &Slot| -> Result<()> {
            let (off, len) = range(k);
            for (src, to, elems) in ins(off, len) {
                // SAFETY: `ins` names ranges of the caller's buffer that hold `elems`
                // elements (the slot's side is checked by the copy); no host reference
                // to the slot is alive.
                unsafe {
                    slot.host
                        .copy_from_device(stream.cuda(), to * size, src, elems * size)
                }
                .map_err(call_failed(format!(
                    "copy {} bytes device to host",
                    elems * size
                )))?;
            }
            slot.ready
                .record(stream.cuda())
                .map_err(device_error("record event"))
        };

        stream
            .cuda()
            .context()
            .bind_to_thread()
            .map_err(device_error("bind context"))?;
        stage_in(0, &slots[0])?;
        for k in 0..pieces {
            let b = k % 2;
            if k + 1 < pieces {
                stage_in(k + 1, &slots[1 - b])?;
            }
            let slot = &mut slots[b];
            slot.ready
                .synchronize()
                .map_err(device_error("wait for a copy to host"))?;
            let (off, len) = range(k);
            {
                // SAFETY: the event covered every copy into or out of this slot queued so
                // far, and the next one is queued only after this block.
                let data = unsafe { slot.host.as_mut_slice::<T>() };
                host(&comm, data, len)?;
            }
            for (dst, from, elems) in outs(off, len) {
                // SAFETY: `outs` names ranges of the caller's buffer that hold `elems`
                // elements (the slot's side is checked by the copy); the host writes
                // this slot again only after its event, which this copy precedes.
                unsafe {
                    slot.host
                        .copy_to_device(stream.cuda(), dst, from * size, elems * size)
                }
                .map_err(call_failed(format!(
                    "copy {} bytes host to device",
                    elems * size
                )))?;
            }
        }
        stream.synchronize()
    }
}
