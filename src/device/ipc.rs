//! The IPC path of [`DeviceComm`] (every rank on this host).
//!
//! Each rank owns one device scratch buffer allocated with `cuMemAlloc`
//! ([`DeviceAlloc`]), exports it with `cuIpcGetMemHandle`, and every rank maps every
//! peer's buffer with `cuIpcOpenMemHandle` ([`IpcMapping`]); the 64-byte handles travel
//! through the host communicator's `all_gather`. Ranks may share one GPU (separate
//! processes on one device may map each other's memory) or use different GPUs of the
//! host (peer access is enabled lazily by the driver). An all-reduce of `count` elements,
//! segment `q` being rank `q`'s `1/n` share, runs in two shots:
//!
//! ```text
//! copy input -> own scratch;                      fence   every scratch holds its input
//! rank r: out[seg r] = scratch_0[seg r] (op) scratch_1[seg r] (op) ... scratch_{n-1}[seg r]
//!         out[seg r] -> own scratch[seg r];       fence   every segment is reduced
//! rank r: out[seg q] <- scratch_q[seg q] for q != r;  drain, host barrier   nobody reads
//! ```
//!
//! or in one, where every rank reduces the whole message itself (small messages, and
//! every message when the ranks share one GPU; `HETCCL_DEVICE_ONE_SHOT_BYTES`; the
//! choice is [`device_all_reduce`](crate::algorithm::select::device_all_reduce)'s):
//!
//! ```text
//! copy input -> own scratch;                      fence
//! rank r: out = scratch_0 (op) scratch_1 (op) ... scratch_{n-1};  drain, host barrier
//! ```
//!
//! Every element is reduced in rank order, so every rank gets the same bits, in either
//! shape, and a rerun gets them again. The barrier at the end lets the next call
//! overwrite the scratch. Reduce-scatter and reduce are the one-shot form restricted to
//! what a rank keeps: for a reduce-scatter each rank copies in the blocks the others
//! keep and reduces its own block over every scratch (its own part read from its input),
//! for a reduce only the root reduces. Broadcast and all-gather are the copy-in /
//! copy-out halves of the same. The scratch is bounded by `HETCCL_DEVICE_SCRATCH_BYTES`
//! (64 MiB): a longer message runs these steps once per window of that size, with a
//! fence between windows.
//! Below the bound the scratch grows (a collective re-registration, which every rank
//! does at the same call because they all see the same size) to the largest window
//! seen, and stays that big until the `DeviceComm` is dropped.
//!
//! The fences between the phases are in `fence.rs`.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream, DeviceRepr};

use super::comm::{copy_dtod, DeviceComm, Laps};
use super::context::Stream;
use super::driver::{self, at, call_failed, device_error, DeviceAddr, DeviceAlloc, IpcMapping};
use super::fence::flag_bytes;
use super::kernels::{reduce_finalize_ptr, reduce_from_ptr, reduce_inplace_ptr, GpuElement};
use super::traffic::{ipc_one_shot, ipc_window, segment, windows};
use crate::dtype::{CollectiveOp, Element, ReduceOp};
use crate::error::{Error, Result};

/// Bytes of the scratch buffer for a message of `bytes`: whole 2 MiB pages (the
/// driver's allocation granularity for large buffers), at least one.
fn scratch_size(bytes: usize) -> usize {
    const PAGE: usize = 2 << 20;
    bytes.div_ceil(PAGE).max(1) * PAGE
}

/// What a rank tells the others about its scratch buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    handle: [u8; 64],
    /// The GPU's UUID: ranks that share one GPU see the same.
    uuid: [u8; 16],
    bytes: u64,
    pid: u64,
    ordinal: u64,
    host: String,
}

const HOST_BYTES: usize = 64;
const RECORD_LEN: usize = 64 + 16 + 3 * 8 + HOST_BYTES;

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(RECORD_LEN);
        v.extend_from_slice(&self.handle);
        v.extend_from_slice(&self.uuid);
        v.extend_from_slice(&self.bytes.to_le_bytes());
        v.extend_from_slice(&self.pid.to_le_bytes());
        v.extend_from_slice(&self.ordinal.to_le_bytes());
        let mut host = [0u8; HOST_BYTES];
        let h = self.host.as_bytes();
        let n = h.len().min(HOST_BYTES);
        host[..n].copy_from_slice(&h[..n]);
        v.extend_from_slice(&host);
        v
    }

    fn decode(b: &[u8]) -> Option<Record> {
        if b.len() != RECORD_LEN {
            return None;
        }
        let word = |i: usize| -> Option<u64> {
            let s = b.get(80 + 8 * i..80 + 8 * (i + 1))?;
            Some(u64::from_le_bytes(s.try_into().ok()?))
        };
        let host = &b[80 + 24..];
        let end = host.iter().position(|&c| c == 0).unwrap_or(host.len());
        Some(Record {
            handle: b[..64].try_into().ok()?,
            uuid: b[64..80].try_into().ok()?,
            bytes: word(0)?,
            pid: word(1)?,
            ordinal: word(2)?,
            host: String::from_utf8_lossy(&host[..end]).into_owned(),
        })
    }
}

/// The host name as a [`Record`] carries it (truncated to 64 bytes).
fn record_host() -> String {
    let mut h = crate::topology::hostname();
    while h.len() > HOST_BYTES {
        h.pop();
    }
    h
}

/// This rank's IPC scratch buffer and its view of every peer's.
///
/// The allocation is `data` bytes of scratch followed by [`flag_bytes`] of progress
/// counters: word `q` of rank `p`'s counters is where rank `q` writes how many device
/// fences it has passed, for rank `p`'s stream to wait on ([`IpcScratch::fence`]).
pub(super) struct IpcScratch {
    /// This rank's allocation. Drop unmaps the peers' first; fields then drop in order,
    /// so the memory is freed before the auxiliary stream goes.
    own: DeviceAlloc,
    /// The peers' buffers mapped here, by rank (`None` for this rank, for ranks outside
    /// `members`, and until opened).
    peers: Vec<Option<IpcMapping>>,
    /// The ranks that share their scratch with each other, this one included, in rank
    /// order: every rank on the IPC path, the ranks of this host on the hierarchical one.
    pub(super) members: Vec<usize>,
    pub(super) ctx: Arc<CudaContext>,
    pub(super) rank: usize,
    /// Bytes of the whole allocation.
    pub(super) bytes: usize,
    /// Bytes of scratch, where the counters start.
    pub(super) data: usize,
    /// Every member's buffer as this process addresses it (`own` at `rank`); 0 until
    /// opened, and for ranks outside `members`.
    pub(super) ptrs: Vec<DeviceAddr>,
    /// Device fences queued so far on this scratch; the counters' next value is one more.
    pub(super) step: u32,
    /// A stream of its own for reading and raising the counters while the caller's
    /// stream waits on them (after a timeout).
    pub(super) aux: Arc<CudaStream>,
    /// Every member runs on this one GPU (the driver time-slices their contexts).
    pub(super) shared_device: bool,
}

impl IpcScratch {
    /// Allocates `bytes` of device memory, the last [`flag_bytes`] of them zeroed
    /// counters, and exports it.
    fn create(
        ctx: &Arc<CudaContext>,
        rank: usize,
        members: Vec<usize>,
        world: usize,
        bytes: usize,
    ) -> Result<(Self, [u8; 64])> {
        ctx.bind_to_thread().map_err(device_error("bind context"))?;
        let aux = ctx.new_stream().map_err(device_error("create stream"))?;
        // cuMemAlloc, not cudarc's stream-ordered allocator: memory from a pool cannot be
        // exported with cuIpcGetMemHandle.
        let own = DeviceAlloc::new(ctx, bytes).map_err(call_failed(format!(
            "allocate {bytes} bytes of IPC scratch"
        )))?;
        let mut ptrs = vec![0; world];
        ptrs[rank] = own.addr();
        let data = bytes - flag_bytes(world);
        let scratch = IpcScratch {
            own,
            peers: (0..world).map(|_| None).collect(),
            members,
            ctx: ctx.clone(),
            rank,
            bytes,
            data,
            ptrs,
            step: 0,
            aux,
            shared_device: false,
        };
        // The counters start at 0 before any peer can learn where they are.
        // SAFETY: the words lie at the end of the allocation just made.
        unsafe {
            driver::memset_d32_async(&scratch.aux, scratch.own.addr() + data as u64, 0, world)
        }
        .and_then(|()| driver::synchronize(&scratch.aux))
        .map_err(call_failed("zero the device fences' counters"))?;
        let handle = scratch
            .own
            .ipc_handle()
            .map_err(call_failed(format!("export {bytes} bytes of scratch")))?;
        Ok((scratch, handle))
    }

    /// Maps every other member's buffer, after checking that it can be mapped here.
    fn open_peers(&mut self, records: &[Record]) -> Result<()> {
        let me = &records[self.rank];
        self.ctx
            .bind_to_thread()
            .map_err(device_error("bind context"))?;
        for (peer, rec) in records.iter().enumerate() {
            if peer == self.rank || !self.members.contains(&peer) {
                continue;
            }
            let op = || {
                format!(
                    "open the IPC scratch of rank {peer} (host {}, pid {}, device {}) on rank {} (device {})",
                    rec.host, rec.pid, rec.ordinal, self.rank, me.ordinal
                )
            };
            if rec.host != me.host {
                return Err(Error::Device {
                    op: op(),
                    detail: format!(
                        "rank {peer} runs on host {:?} and this rank on {:?}: CUDA IPC only \
                         works between processes of one host (use DevicePath::Staged)",
                        rec.host, me.host
                    ),
                });
            }
            if rec.pid == me.pid {
                return Err(Error::Device {
                    op: op(),
                    detail: format!(
                        "rank {peer} is in this same process: CUDA IPC cannot map a \
                         process's own memory; run one rank per process"
                    ),
                });
            }
            if rec.bytes != me.bytes {
                return Err(Error::Device {
                    op: op(),
                    detail: format!(
                        "rank {peer} exported {} bytes, this rank {}: the ranks disagree on \
                         the message size",
                        rec.bytes, me.bytes
                    ),
                });
            }
            // The handle came from cuIpcGetMemHandle in another process of this host
            // (checked above); the mapping is closed by `close_peers`.
            let mapping = IpcMapping::open(&self.ctx, &rec.handle).map_err(call_failed(op()))?;
            self.ptrs[peer] = mapping.addr();
            self.peers[peer] = Some(mapping);
        }
        Ok(())
    }

    /// Unmaps every peer's buffer; returns the first failure after trying them all.
    pub(super) fn close_peers(&mut self) -> Result<()> {
        let mut first = self
            .ctx
            .bind_to_thread()
            .map_err(device_error("bind context"));
        for (peer, mapping) in self.peers.iter_mut().enumerate() {
            let Some(mapping) = mapping.take() else {
                continue;
            };
            let r = mapping
                .close()
                .map_err(call_failed(format!("close the IPC scratch of rank {peer}")));
            self.ptrs[peer] = 0;
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl Drop for IpcScratch {
    fn drop(&mut self) {
        if let Err(e) = self.close_peers() {
            tracing::warn!(target: "hetccl::device", rank = self.rank, "{e}");
        }
        // `own` is freed next, by its own Drop. Every call ends with a barrier after the
        // peers' last read, so no peer touches it any more.
    }
}

/// `out = from(0) (op) from(1) (op) ... (op) from(n - 1)`, folded in rank order, then
/// the division of `Avg`: the one order every device reduction uses, so that a value
/// has the same bits whichever collective and rank produced it. `n` is at least 2.
///
/// # Safety
/// `out` and every `from(q)` must be addresses of `len` elements of `T` on the stream's
/// device; `out` may not overlap a `from(q)` that is read after the first step.
unsafe fn reduce_in_rank_order<T: GpuElement>(
    stream: &Stream,
    op: ReduceOp,
    out: DeviceAddr,
    n: usize,
    len: usize,
    from: impl Fn(usize) -> DeviceAddr,
) -> Result<()> {
    // SAFETY: the caller's promise.
    unsafe {
        reduce_from_ptr::<T>(stream, op, out, from(0), from(1), len)?;
        for q in 2..n {
            reduce_inplace_ptr::<T>(stream, op, out, from(q), len)?;
        }
        reduce_finalize_ptr::<T>(stream, op, out, n, len)
    }
}

impl DeviceComm {
    /// [`DeviceComm::all_reduce`] over CUDA IPC, window by window, in one shot or two.
    pub(super) fn ipc_all_reduce<T: GpuElement>(
        &mut self,
        stream: &Stream,
        laps: &mut Laps,
        src: DeviceAddr,
        dst: DeviceAddr,
        count: usize,
        op: ReduceOp,
    ) -> Result<()> {
        let (n, rank) = (self.world_size(), self.rank());
        let bytes = count * std::mem::size_of::<T>();
        // Window lengths are multiples of 8 elements per rank, so every segment
        // of every window starts on the reduction kernels' vector boundary.
        let window = self.ipc_window::<T>(8 * n).min(count);
        let ptrs = self.ipc_scratch(window * size_of::<T>())?;
        let last = count.div_ceil(window) - 1;
        let one_shot = self.one_shot(window * size_of::<T>());
        for (w, (off, len)) in windows(count, window).enumerate() {
            let (src, dst) = (at::<T>(src, off), at::<T>(dst, off));
            // SAFETY: the own scratch holds `window >= len` elements, and `[off,
            // off + len)` lies within `src` (and `dst`) of `count` elements.
            unsafe { copy_dtod(stream, ptrs[rank], src, len * size_of::<T>())? };
            self.ipc_step(stream, laps, "copy in")?;
            let reduce = |lo: usize, seg: usize| -> Result<()> {
                let out = at::<T>(dst, lo);
                let from = |q: usize| at::<T>(ptrs[q], lo);
                // SAFETY: every scratch holds this window's `len` elements and
                // `[lo, lo + seg)` lies within `len`, as does the same range of
                // the output window.
                unsafe { reduce_in_rank_order::<T>(stream, op, out, n, seg, from) }
            };
            if one_shot {
                // Every rank reduces the whole window itself, in the same order,
                // so all get the same bits with one fence less.
                reduce(0, len)?;
                laps.lap("reduce");
                if w < last {
                    self.ipc_step(stream, laps, "read")?;
                }
                continue;
            }

            // Reduce this rank's segment over every scratch, in rank order, into
            // the output, then publish it in the own scratch for the others.
            let (lo, seg) = segment(len, n, rank);
            if seg > 0 {
                reduce(lo, seg)?;
                // SAFETY: as in `reduce`; the own scratch's segment is read by
                // nobody until the next fence.
                unsafe {
                    copy_dtod(
                        stream,
                        at::<T>(ptrs[rank], lo),
                        at::<T>(dst, lo),
                        seg * size_of::<T>(),
                    )?
                };
            }
            self.ipc_step(stream, laps, "reduce")?;

            for (q, &base) in ptrs.iter().enumerate() {
                let (lo, seg) = segment(len, n, q);
                if q == rank || seg == 0 {
                    continue;
                }
                // SAFETY: segment q of rank q's scratch holds its reduced values
                // and lies within `len`, like the same range of the output.
                unsafe {
                    copy_dtod(
                        stream,
                        at::<T>(dst, lo),
                        at::<T>(base, lo),
                        seg * size_of::<T>(),
                    )?
                };
            }
            // The next window overwrites the scratch the peers read here.
            if w < last {
                self.ipc_step(stream, laps, "copy out")?;
            }
        }
        self.ipc_finish(stream, laps, CollectiveOp::AllReduce)?;
        laps.report("ipc all_reduce", bytes);
        Ok(())
    }

    /// Whether an all-reduce window of `bytes` runs in one shot
    /// ([`ipc_one_shot`]). Call after [`DeviceComm::ipc_scratch`].
    fn one_shot(&self, bytes: usize) -> bool {
        ipc_one_shot(
            bytes,
            self.shared_gpu(),
            self.comm.config().device_one_shot_bytes,
        )
    }

    /// Whether every member of the IPC scratch runs on this one GPU (false before the
    /// first IPC call).
    pub(super) fn shared_gpu(&self) -> bool {
        self.ipc.as_ref().is_some_and(|s| s.shared_device)
    }

    /// [`DeviceComm::broadcast`] over CUDA IPC: the root copies each window into its
    /// scratch, the others copy it out after a fence.
    pub(super) fn ipc_broadcast<T: Element + DeviceRepr>(
        &mut self,
        stream: &Stream,
        p: DeviceAddr,
        count: usize,
        root: usize,
    ) -> Result<()> {
        let rank = self.rank();
        let window = self.ipc_window::<T>(1).min(count);
        let ptrs = self.ipc_scratch(window * size_of::<T>())?;
        let (mut laps, last) = (Laps::start(), count.div_ceil(window) - 1);
        for (w, (off, len)) in windows(count, window).enumerate() {
            let (p, bytes) = (at::<T>(p, off), len * size_of::<T>());
            if rank == root {
                // SAFETY: `[off, off + len)` lies in the caller's buffer of
                // `count` elements, and the own scratch holds `window >= len`.
                unsafe { copy_dtod(stream, ptrs[rank], p, bytes)? };
            }
            self.ipc_step(stream, &mut laps, "copy in")?;
            if rank != root {
                // SAFETY: the root's scratch holds the `bytes` it copied in above.
                unsafe { copy_dtod(stream, p, ptrs[root], bytes)? };
            }
            if w < last {
                self.ipc_step(stream, &mut laps, "copy out")?;
            }
        }
        self.ipc_finish(stream, &mut laps, CollectiveOp::Broadcast)?;
        laps.report("ipc broadcast", count * size_of::<T>());
        Ok(())
    }

    /// [`DeviceComm::all_gather`] over CUDA IPC: each rank copies its window into its
    /// scratch, and after a fence every rank's out of theirs.
    pub(super) fn ipc_all_gather<T: Element + DeviceRepr>(
        &mut self,
        stream: &Stream,
        src: DeviceAddr,
        dst: DeviceAddr,
        count: usize,
    ) -> Result<()> {
        let (n, rank) = (self.world_size(), self.rank());
        let window = self.ipc_window::<T>(1).min(count);
        let ptrs = self.ipc_scratch(window * size_of::<T>())?;
        let (mut laps, last) = (Laps::start(), count.div_ceil(window) - 1);
        for (w, (off, len)) in windows(count, window).enumerate() {
            let (src, bytes) = (at::<T>(src, off), len * size_of::<T>());
            // SAFETY: the own scratch holds `window >= len` elements, and `[off,
            // off + len)` lies within `send`.
            unsafe { copy_dtod(stream, ptrs[rank], src, bytes)? };
            self.ipc_step(stream, &mut laps, "copy in")?;
            for (q, &from) in ptrs.iter().enumerate() {
                let from = if q == rank { src } else { from };
                // SAFETY: elements `q * count + [off, off + len)` of `recv` are in
                // bounds (recv >= n * count); every scratch holds its rank's
                // `bytes` of this window.
                unsafe { copy_dtod(stream, at::<T>(dst, q * count + off), from, bytes)? };
            }
            if w < last {
                self.ipc_step(stream, &mut laps, "copy out")?;
            }
        }
        self.ipc_finish(stream, &mut laps, CollectiveOp::AllGather)?;
        laps.report("ipc all_gather", n * count * size_of::<T>());
        Ok(())
    }

    /// [`DeviceComm::reduce_scatter`] over CUDA IPC: each rank stages the blocks the
    /// others keep, then reduces its own over every scratch.
    pub(super) fn ipc_reduce_scatter<T: GpuElement>(
        &mut self,
        stream: &Stream,
        src: DeviceAddr,
        dst: DeviceAddr,
        count: usize,
        op: ReduceOp,
    ) -> Result<()> {
        let (n, rank) = (self.world_size(), self.rank());
        // Each scratch holds, per window, the window of every block but its
        // rank's own, block q at `q * len`; windows are multiples of 8 elements,
        // so every block starts on the reduction kernels' vector boundary.
        let window = (self.ipc_window::<T>(8 * n) / n).min(count);
        let ptrs = self.ipc_scratch(n * window * size_of::<T>())?;
        let (mut laps, last) = (Laps::start(), count.div_ceil(window) - 1);
        for (w, (off, len)) in windows(count, window).enumerate() {
            let block = |q: usize| at::<T>(src, q * count + off);
            for q in (0..n).filter(|&q| q != rank) {
                // SAFETY: block q's window lies within `send` (n * count
                // elements), and the own scratch holds `n * window >= n * len`.
                unsafe {
                    copy_dtod(
                        stream,
                        at::<T>(ptrs[rank], q * len),
                        block(q),
                        len * size_of::<T>(),
                    )?
                };
            }
            self.ipc_step(stream, &mut laps, "copy in")?;
            // This rank's block from every rank, in rank order; its own from
            // `send` itself.
            let from = |q: usize| {
                if q == rank {
                    block(rank)
                } else {
                    at::<T>(ptrs[q], rank * len)
                }
            };
            let out = at::<T>(dst, off);
            // SAFETY: every scratch holds block `rank` of this window at `rank *
            // len`, `send` holds it at `block(rank)`, and `recv` holds `[off, off
            // + len)`.
            unsafe { reduce_in_rank_order::<T>(stream, op, out, n, len, from)? };
            laps.lap("reduce");
            // The next window overwrites the scratch the peers read here.
            if w < last {
                self.ipc_step(stream, &mut laps, "read")?;
            }
        }
        self.ipc_finish(stream, &mut laps, CollectiveOp::ReduceScatter)?;
        laps.report("ipc reduce_scatter", n * count * size_of::<T>());
        Ok(())
    }

    /// [`DeviceComm::reduce`] over CUDA IPC: the others stage their windows, the root
    /// reduces them.
    pub(super) fn ipc_reduce<T: GpuElement>(
        &mut self,
        stream: &Stream,
        src: DeviceAddr,
        dst: DeviceAddr,
        count: usize,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        let (n, rank) = (self.world_size(), self.rank());
        let is_root = rank == root;
        let window = self.ipc_window::<T>(8).min(count);
        let ptrs = self.ipc_scratch(window * size_of::<T>())?;
        let (mut laps, last) = (Laps::start(), count.div_ceil(window) - 1);
        for (w, (off, len)) in windows(count, window).enumerate() {
            if !is_root {
                // SAFETY: the own scratch holds `window >= len` elements, and
                // `[off, off + len)` lies within `send`.
                unsafe { copy_dtod(stream, ptrs[rank], at::<T>(src, off), len * size_of::<T>())? };
            }
            self.ipc_step(stream, &mut laps, "copy in")?;
            if is_root {
                // Every rank's window in rank order, the root's own from `send`.
                let from = |q: usize| {
                    if q == rank {
                        at::<T>(src, off)
                    } else {
                        ptrs[q]
                    }
                };
                let out = at::<T>(dst, off);
                // SAFETY: every peer's scratch holds this window's `len`
                // elements, and `send` and the root's `recv` hold `[off, off +
                // len)`.
                unsafe { reduce_in_rank_order::<T>(stream, op, out, n, len, from)? };
                laps.lap("reduce");
            }
            // The next window overwrites the scratch the root reads here.
            if w < last {
                self.ipc_step(stream, &mut laps, "read")?;
            }
        }
        self.ipc_finish(stream, &mut laps, CollectiveOp::Reduce)?;
        laps.report("ipc reduce", count * size_of::<T>());
        Ok(())
    }

    /// Every member's scratch address for a message of `bytes` (0 for other ranks),
    /// growing (collectively, with every rank of the world) the buffers first when they
    /// are smaller.
    pub(super) fn ipc_scratch(&mut self, bytes: usize) -> Result<Vec<DeviceAddr>> {
        if let Some(s) = &self.ipc {
            if s.data >= bytes {
                return Ok(s.ptrs.clone());
            }
        }
        let (rank, n) = (self.rank(), self.world_size());
        if let Some(mut old) = self.ipc.take() {
            // Nobody may still map a buffer when its owner frees it.
            old.close_peers()?;
            self.comm.barrier()?;
            drop(old);
        }
        let size = scratch_size(bytes + flag_bytes(n));
        let members = self.ipc_members.clone();
        let (mut scratch, handle) = IpcScratch::create(&self.ctx, rank, members, n, size)?;
        let uuid = self
            .ctx
            .uuid()
            .map_err(device_error("read the GPU's UUID"))?
            .bytes
            .map(|c| c as u8);
        let mine = Record {
            handle,
            uuid,
            bytes: size as u64,
            pid: u64::from(std::process::id()),
            ordinal: self.ordinal as u64,
            host: record_host(),
        }
        .encode();
        let mut all = vec![0u8; RECORD_LEN * n];
        self.comm.all_gather(&mine, &mut all)?;
        let records = all
            .chunks_exact(RECORD_LEN)
            .enumerate()
            .map(|(q, b)| {
                Record::decode(b).ok_or_else(|| Error::Device {
                    op: "exchange IPC handles".into(),
                    detail: format!("rank {q} sent an unreadable record"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        scratch.open_peers(&records)?;
        scratch.shared_device = scratch.members.iter().all(|&q| records[q].uuid == uuid);
        tracing::debug!(
            target: "hetccl::device",
            rank,
            device = self.ordinal,
            bytes = size,
            shared_device = scratch.shared_device,
            "IPC scratch registered and every peer's mapped"
        );
        let ptrs = scratch.ptrs.clone();
        self.ipc = Some(scratch);
        Ok(ptrs)
    }

    /// Elements of `T` that pass through the IPC scratch at once
    /// (`HETCCL_DEVICE_SCRATCH_BYTES`), a multiple of `multiple`.
    pub(super) fn ipc_window<T>(&self, multiple: usize) -> usize {
        ipc_window(
            self.comm.config().device_scratch_bytes,
            size_of::<T>(),
            multiple,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_grows_in_whole_2mib_pages() {
        assert_eq!(scratch_size(1), 2 << 20);
        assert_eq!(scratch_size(2 << 20), 2 << 20);
        assert_eq!(scratch_size((2 << 20) + 1), 4 << 20);
        assert_eq!(scratch_size(((1 << 20) + 3) * 4), 6 << 20);
    }

    #[test]
    fn records_round_trip() {
        let mut handle = [0u8; 64];
        handle
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = i as u8 ^ 0xA5);
        let r = Record {
            handle,
            uuid: *b"GPU-0123-4567-89",
            bytes: 6 << 20,
            pid: 4242,
            ordinal: 3,
            host: "gpu-node-07".into(),
        };
        let b = r.encode();
        assert_eq!(b.len(), RECORD_LEN);
        assert_eq!(Record::decode(&b), Some(r));
        assert_eq!(Record::decode(&b[1..]), None);
    }
}
