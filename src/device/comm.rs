//! Collectives on device buffers: [`DeviceComm`] pairs a host [`Communicator`] (which
//! finds the peers, carries small messages and barriers) with a GPU, and runs
//! `all_reduce`, `reduce_scatter`, `reduce`, `broadcast` and `all_gather` on
//! `CudaSlice`s.
//!
//! Every call is ordered on the caller's [`Stream`]: the first copy waits for the work
//! already queued there, and the call returns after the stream has drained, so the result
//! is ready for anything issued afterwards (on any stream). Calls block the host thread.
//!
//! Two ways to move the data, chosen once per `DeviceComm` ([`DevicePath`]):
//!
//! **CUDA IPC** (every rank on this host). Each rank owns one device scratch buffer
//! allocated with `cuMemAlloc`, exports it with `cuIpcGetMemHandle`, and every rank maps
//! every peer's buffer with `cuIpcOpenMemHandle`; the 64-byte handles travel through the
//! host communicator's `all_gather`. Ranks may share one GPU (separate processes on one
//! device may map each other's memory) or use different GPUs of the host (peer access
//! is enabled lazily by the driver). An all-reduce of `count` elements, segment `q`
//! being rank `q`'s `1/n` share, runs in two shots:
//!
//! ```text
//! copy input -> own scratch;                      fence   every scratch holds its input
//! rank r: out[seg r] = scratch_0[seg r] (op) scratch_1[seg r] (op) ... scratch_{n-1}[seg r]
//!         out[seg r] -> own scratch[seg r];       fence   every segment is reduced
//! rank r: out[seg q] <- scratch_q[seg q] for q != r;  drain, host barrier   nobody reads
//! ```
//!
//! or in one, where every rank reduces the whole message itself (small messages, and
//! every message when the ranks share one GPU; `HETCCL_DEVICE_ONE_SHOT_BYTES`):
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
//! A fence is queued on the stream, not waited for by the host: each rank's stream
//! writes how many fences it has passed into a counter in every peer's scratch, then
//! waits until every peer's counter in its own scratch has reached the same number
//! (`cuStreamWriteValue32` / `cuStreamWaitValue32`). The host queues a whole call and
//! waits once, at its end, at most `HETCCL_TIMEOUT`; a peer that stopped is then named.
//! With `HETCCL_DEVICE_FENCE=host` each fence is instead the host draining its stream
//! and meeting the peers at a barrier. With `HETCCL_DEBUG=trace` each call logs how long
//! its phases, drains and barriers took.
//!
//! **Staged** (ranks on several hosts, or asked for). The data passes through two pinned
//! host buffers of `HETCCL_DEVICE_STAGE_BYTES` (2 MiB) each, piece by piece: while the
//! host communicator reduces piece `k` in one buffer, the copy engine brings piece `k + 1`
//! into the other, and piece `k` goes back to the device as soon as its host collective
//! is done. Each piece is one host collective, itself pipelined in `HETCCL_CHUNK_BYTES`.
//!
//! Before moving anything every call exchanges a small header (sequence number,
//! collective, dtype, reduction, count, root) with all ranks, so a rank that calls
//! something else, or refuses its own call (buffer too small, stream of another device),
//! makes every rank return an error instead of corrupting data or hanging. A failure
//! after that point (a driver error, a peer gone) aborts the host communicator too, so
//! the peers stop within milliseconds instead of waiting for `HETCCL_TIMEOUT`; the
//! `DeviceComm` is unusable afterwards.

use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};

use super::context::{Device, Stream};
use super::driver::{
    self, at, call_failed, device_error, DeviceAddr, DeviceAlloc, IpcMapping, PinnedHost,
};
use super::kernels::{reduce_finalize_ptr, reduce_from_ptr, reduce_inplace_ptr, GpuElement};
use crate::communicator::Communicator;
use crate::config::DeviceFence;
use crate::dtype::{CollectiveOp, DataType, Element, ReduceOp};
use crate::error::{Error, Result};

/// Wall time of a call's phases, logged at trace level (`HETCCL_DEBUG=trace`): where a
/// device collective's time goes (the stream draining, or waiting for the peers).
struct Laps {
    last: Option<Instant>,
    laps: Vec<(&'static str, Duration)>,
}

impl Laps {
    fn start() -> Self {
        let on = tracing::enabled!(target: "hetccl::device", tracing::Level::TRACE);
        Laps {
            last: on.then(Instant::now),
            laps: Vec::new(),
        }
    }

    fn lap(&mut self, what: &'static str) {
        if let Some(last) = &mut self.last {
            let now = Instant::now();
            self.laps.push((what, now - *last));
            *last = now;
        }
    }

    fn report(&self, call: &str, bytes: usize) {
        if self.last.is_some() {
            let phases: Vec<String> = self
                .laps
                .iter()
                .map(|(what, d)| format!("{what} {:.1}", d.as_secs_f64() * 1e6))
                .collect();
            tracing::trace!(target: "hetccl::device", "{call} {bytes} B, us: {}", phases.join(", "));
        }
    }
}

/// How device buffers travel between ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DevicePath {
    /// [`DevicePath::Ipc`] when every rank runs on this host, else [`DevicePath::Staged`].
    Auto,
    /// Peers read each other's device memory through CUDA IPC. Every rank must run on
    /// one host.
    Ipc,
    /// Chunks pass through pinned host memory and the host communicator's collectives.
    Staged,
}

impl DevicePath {
    /// `auto`, `ipc` or `staged`.
    pub fn name(self) -> &'static str {
        match self {
            DevicePath::Auto => "auto",
            DevicePath::Ipc => "ipc",
            DevicePath::Staged => "staged",
        }
    }

    /// Parses [`DevicePath::name`].
    pub fn parse(s: &str) -> Option<Self> {
        [DevicePath::Auto, DevicePath::Ipc, DevicePath::Staged]
            .into_iter()
            .find(|p| p.name() == s)
    }
}

impl fmt::Display for DevicePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Collectives on device buffers of one GPU per rank, coordinated by a host
/// [`Communicator`] (see the module documentation for the protocol).
///
/// Every rank of the communicator must create one and make the same calls in the same
/// order, as with the host collectives. Its calls run host collectives (barriers,
/// all-gathers of headers and handles) on the communicator, so they must also be ordered
/// the same way as any host collectives the program runs on it directly.
pub struct DeviceComm {
    comm: Arc<Communicator>,
    ctx: Arc<CudaContext>,
    ordinal: usize,
    /// `Ipc` or `Staged`, never `Auto`.
    path: DevicePath,
    /// Calls made so far; the next call's number.
    seq: u64,
    /// The IPC path's buffers, from the first call on.
    ipc: Option<IpcScratch>,
    /// The staged path's two host buffers, from the first call on.
    slots: Option<[Slot; 2]>,
    /// Set by a failure in the middle of a call.
    broken: Option<String>,
}

// Callers move a `DeviceComm` to other threads: every driver resource inside it (device
// and pinned host memory, IPC mappings, events, streams) is an owned handle that may be
// used from any thread once its context is bound, which every use does.
const _: () = {
    const fn is_send<T: Send>() {}
    is_send::<DeviceComm>();
};

impl fmt::Debug for DeviceComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceComm")
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("device", &self.ordinal)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What one call is, as every rank must agree on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Call {
    coll: CollectiveOp,
    dtype: DataType,
    op: Option<ReduceOp>,
    count: usize,
    root: Option<usize>,
}

/// Header fields: version, seq, collective, dtype, op, count, root, status.
const HEADER_LEN: usize = 8;
/// Changes whenever the header or the protocol after it changes.
const HEADER_VERSION: u64 = 0x6863_636c_6476_0001;
/// `op` and `root` when the collective has none.
const NONE: u64 = u64::MAX;
/// Status of a rank that refused its own call.
const REFUSED: u64 = 1;

impl Call {
    fn new(
        coll: CollectiveOp,
        dtype: DataType,
        count: usize,
        op: Option<ReduceOp>,
        root: Option<usize>,
    ) -> Call {
        Call {
            coll,
            dtype,
            op,
            count,
            root,
        }
    }

    fn header(&self, seq: u64, ok: bool) -> [u64; HEADER_LEN] {
        [
            HEADER_VERSION,
            seq,
            self.coll as u64,
            self.dtype as u64,
            self.op.map_or(NONE, |o| o as u64),
            self.count as u64,
            self.root.map_or(NONE, |r| r as u64),
            if ok { 0 } else { REFUSED },
        ]
    }
}

/// `f32 x 1000 (sum)` for one header, in mismatch messages.
fn describe(h: &[u64]) -> String {
    let coll = u8::try_from(h[2])
        .ok()
        .and_then(CollectiveOp::from_u8)
        .map_or_else(|| format!("collective {}", h[2]), |c| c.name().to_string());
    let dtype = u8::try_from(h[3])
        .ok()
        .and_then(DataType::from_u8)
        .map_or_else(|| format!("dtype {}", h[3]), |d| d.name().to_string());
    let mut s = format!("#{} {coll} {dtype} x {}", h[1], h[5]);
    if h[4] != NONE {
        let op = u8::try_from(h[4])
            .ok()
            .and_then(ReduceOp::from_u8)
            .map_or_else(|| format!("op {}", h[4]), |o| o.name().to_string());
        s.push_str(&format!(" ({op})"));
    }
    if h[6] != NONE {
        s.push_str(&format!(" root {}", h[6]));
    }
    s
}

/// Compares every rank's header (`all`, rank-major) with this rank's; the first peer
/// that refused its call or disagrees becomes the error.
fn check_headers(rank: usize, call: &Call, mine: &[u64], all: &[u64]) -> Result<()> {
    for (peer, theirs) in all.chunks_exact(HEADER_LEN).enumerate() {
        if peer == rank {
            continue;
        }
        let mismatch = |detail: String| Error::Mismatch {
            rank,
            peer,
            op: call.coll,
            seq: mine[1],
            detail,
        };
        if theirs[0] != HEADER_VERSION {
            return Err(mismatch(format!(
                "peer runs another device protocol version ({:#x}, this rank {:#x})",
                theirs[0], HEADER_VERSION
            )));
        }
        if theirs[7] == REFUSED {
            return Err(mismatch(format!(
                "peer {peer} refused its {} (its own error says why)",
                describe(theirs)
            )));
        }
        if theirs[1..7] != mine[1..7] {
            return Err(mismatch(format!(
                "this rank called {}, peer {peer} called {}",
                describe(mine),
                describe(theirs)
            )));
        }
    }
    Ok(())
}

/// Element range `[lo, lo + len)` of segment `q` when `count` elements are split among
/// `n` ranks. Segments start at multiples of 8 elements so the reduction kernels can use
/// their 16-byte vector path on every segment; trailing segments may be short or empty.
fn segment(count: usize, n: usize, q: usize) -> (usize, usize) {
    let per = count.div_ceil(n.max(1)).div_ceil(8) * 8;
    let lo = (q * per).min(count);
    (lo, per.min(count - lo))
}

/// `(offset, length)` of the consecutive windows of at most `window` elements that
/// cover `count` elements.
fn windows(count: usize, window: usize) -> impl Iterator<Item = (usize, usize)> {
    let window = window.max(1);
    (0..count)
        .step_by(window)
        .map(move |off| (off, window.min(count - off)))
}

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

/// Largest all-reduce window that every rank reduces whole by itself when the ranks
/// have GPUs of their own ("one shot": copy in, fence, each rank reads every scratch),
/// unless `HETCCL_DEVICE_ONE_SHOT_BYTES` says otherwise.
/// Reducing only its segment and gathering the others' ("two shots") reads
/// `2(n-1)/n` of the message from the peers instead of `n-1` but needs a second fence,
/// which is the larger cost for small messages. Ranks sharing one GPU always take one
/// shot: there each fence waits for the driver to switch between their contexts.
const ONE_SHOT_MAX_BYTES: usize = 256 << 10;

/// Bytes at the end of every rank's IPC allocation that hold the device fences'
/// progress counters: one 32-bit word per rank, padded to 256 bytes.
fn flag_bytes(world: usize) -> usize {
    (4 * world).next_multiple_of(256)
}

/// This rank's IPC scratch buffer and its view of every peer's.
///
/// The allocation is `data` bytes of scratch followed by [`flag_bytes`] of progress
/// counters: word `q` of rank `p`'s counters is where rank `q` writes how many device
/// fences it has passed, for rank `p`'s stream to wait on ([`IpcScratch::fence`]).
struct IpcScratch {
    /// This rank's allocation. Drop unmaps the peers' first; fields then drop in order,
    /// so the memory is freed before the auxiliary stream goes.
    own: DeviceAlloc,
    /// The peers' buffers mapped here, by rank (`None` for this rank, and until opened).
    peers: Vec<Option<IpcMapping>>,
    ctx: Arc<CudaContext>,
    rank: usize,
    /// Bytes of the whole allocation.
    bytes: usize,
    /// Bytes of scratch, where the counters start.
    data: usize,
    /// Every rank's buffer as this process addresses it (`own` at `rank`); 0 until opened.
    ptrs: Vec<DeviceAddr>,
    /// Device fences queued so far on this scratch; the counters' next value is one more.
    step: u32,
    /// A stream of its own for reading and raising the counters while the caller's
    /// stream waits on them (after a timeout).
    aux: Arc<CudaStream>,
    /// Every rank runs on this one GPU (the driver time-slices their contexts).
    shared_device: bool,
}

impl IpcScratch {
    /// Allocates `bytes` of device memory, the last [`flag_bytes`] of them zeroed
    /// counters, and exports it.
    fn create(
        ctx: &Arc<CudaContext>,
        rank: usize,
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

    /// Maps every peer's buffer, after checking that it can be mapped here.
    fn open_peers(&mut self, records: &[Record]) -> Result<()> {
        let me = &records[self.rank];
        self.ctx
            .bind_to_thread()
            .map_err(device_error("bind context"))?;
        for (peer, rec) in records.iter().enumerate() {
            if peer == self.rank {
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
    fn fence(&mut self, stream: &CudaStream) -> Result<()> {
        self.step = self.step.wrapping_add(1);
        let (me, step) = (self.rank, self.step);
        let peers = (0..self.ptrs.len()).filter(|&q| q != me);
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
    fn release(&self) -> Result<Vec<usize>> {
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
        let behind = (0..n)
            .filter(|&q| q != self.rank && (words[q].wrapping_sub(self.step) as i32) < 0)
            .collect();
        // SAFETY: as above, the counters at the end of the own allocation.
        unsafe { driver::memset_d32_async(&self.aux, base, self.step, n) }
            .and_then(|()| driver::synchronize(&self.aux))
            .map_err(call_failed("raise the device fences' counters"))?;
        Ok(behind)
    }

    /// Unmaps every peer's buffer; returns the first failure after trying them all.
    fn close_peers(&mut self) -> Result<()> {
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

/// `Ok` when the caller's device buffers fit the call, else `func`'s refusal that says
/// which one is too small.
fn room(func: &'static str, fits: bool, detail: impl FnOnce() -> String) -> Result<()> {
    if fits {
        Ok(())
    } else {
        Err(Error::invalid(
            func,
            format!("device buffer too small: {}", detail()),
        ))
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

/// One pinned host buffer of the staged path and the event that says when the copy
/// into it is done.
struct Slot {
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

/// `cuMemcpyDtoDAsync` of `bytes` (nothing for 0).
///
/// # Safety
/// Both ranges must be valid device memory in the stream's context (or mapped into it)
/// until the copy has run.
unsafe fn copy_dtod(s: &Stream, dst: DeviceAddr, src: DeviceAddr, bytes: usize) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: the caller vouches for both ranges.
    unsafe { driver::copy_dtod_async(s.cuda(), dst, src, bytes) }
        .map_err(call_failed(format!("copy {bytes} bytes device to device")))
}

impl DeviceComm {
    /// A device communicator for `device` over `comm`, choosing the path with
    /// [`DevicePath::Auto`]. Every rank calls this (it exchanges nothing yet).
    pub fn new(comm: Arc<Communicator>, device: &Device) -> Result<Self> {
        Self::with_path(comm, device, DevicePath::Auto)
    }

    /// As [`DeviceComm::new`] with the path given. [`DevicePath::Ipc`] fails when some
    /// rank runs on another host, naming those ranks.
    pub fn with_path(comm: Arc<Communicator>, device: &Device, path: DevicePath) -> Result<Self> {
        let op = "DeviceComm::new";
        if let Err(detail) = super::available() {
            return Err(Error::Device {
                op: op.to_string(),
                detail,
            });
        }
        let rank = comm.rank();
        let all_local = comm.local_size() == comm.world_size();
        let path = match path {
            DevicePath::Auto if all_local => DevicePath::Ipc,
            DevicePath::Auto | DevicePath::Staged => DevicePath::Staged,
            DevicePath::Ipc if all_local => DevicePath::Ipc,
            DevicePath::Ipc => {
                let topo = comm.topology();
                let mine = topo.node_of[rank];
                let away: Vec<String> = (0..comm.world_size())
                    .filter(|&q| topo.node_of[q] != mine)
                    .map(|q| format!("{q} ({})", topo.ranks[q].hostname))
                    .collect();
                return Err(Error::Device {
                    op: op.to_string(),
                    detail: format!(
                        "CUDA IPC needs every rank on one host, but ranks {} run on other hosts \
                         than rank {rank} ({}); GPUs of different hosts need DevicePath::Staged \
                         (or Auto)",
                        away.join(", "),
                        topo.ranks[rank].hostname
                    ),
                });
            }
        };
        tracing::info!(
            target: "hetccl::device",
            rank,
            world_size = comm.world_size(),
            device = device.ordinal(),
            name = device.name(),
            path = path.name(),
            "device collectives ready"
        );
        Ok(DeviceComm {
            ctx: device.context().clone(),
            ordinal: device.ordinal(),
            comm,
            path,
            seq: 0,
            ipc: None,
            slots: None,
            broken: None,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The path in use ([`DevicePath::Ipc`] or [`DevicePath::Staged`]).
    pub fn path(&self) -> DevicePath {
        self.path
    }

    /// The host communicator underneath.
    pub fn communicator(&self) -> &Arc<Communicator> {
        &self.comm
    }

    /// Bytes of device scratch held for the IPC path (0 before its first call).
    pub fn scratch_bytes(&self) -> usize {
        self.ipc.as_ref().map_or(0, |s| s.bytes)
    }

    /// In-place all-reduce of `buf` on every rank, ordered on `stream`.
    pub fn all_reduce<T: GpuElement>(
        &mut self,
        stream: &Stream,
        buf: &mut impl DevicePtrMut<T>,
        op: ReduceOp,
    ) -> Result<()> {
        let call = Call::new(CollectiveOp::AllReduce, T::DTYPE, buf.len(), Some(op), None);
        let local = self.check_stream(stream);
        let (p, _g) = buf.device_ptr_mut(stream.cuda());
        self.all_reduce_ptrs::<T>(stream, call, local, p, p)
    }

    /// Out-of-place all-reduce: `recv[..send.len()]` becomes the reduction of every
    /// rank's `send`. `recv` must hold at least `send.len()` elements.
    pub fn all_reduce_into<T: GpuElement>(
        &mut self,
        stream: &Stream,
        send: &impl DevicePtr<T>,
        recv: &mut impl DevicePtrMut<T>,
        op: ReduceOp,
    ) -> Result<()> {
        let count = send.len();
        let call = Call::new(CollectiveOp::AllReduce, T::DTYPE, count, Some(op), None);
        let local = self.check_stream(stream).and(room(
            "DeviceComm::all_reduce_into",
            recv.len() >= count,
            || format!("recv holds {} elements, send {count}", recv.len()),
        ));
        let s = stream.cuda();
        let (src, _gs) = send.device_ptr(s);
        let (dst, _gd) = recv.device_ptr_mut(s);
        self.all_reduce_ptrs::<T>(stream, call, local, src, dst)
    }

    /// Broadcast of `buf` from rank `root` to every rank, ordered on `stream`.
    pub fn broadcast<T: Element + DeviceRepr>(
        &mut self,
        stream: &Stream,
        buf: &mut impl DevicePtrMut<T>,
        root: usize,
    ) -> Result<()> {
        let n = self.world_size();
        let count = buf.len();
        let call = Call::new(CollectiveOp::Broadcast, T::DTYPE, count, None, Some(root));
        let local = self.check_stream(stream).and(if root >= n {
            Err(Error::invalid(
                "DeviceComm::broadcast",
                format!("root {root} is not a rank of a world of {n}"),
            ))
        } else {
            Ok(())
        });
        let (p, _g) = buf.device_ptr_mut(stream.cuda());
        if !self.agree(&call, local)? {
            return Ok(());
        }
        let rank = self.rank();
        if self.world_size() == 1 {
            return Ok(());
        }
        self.guarded(|this| match this.path {
            DevicePath::Ipc => {
                let window = this.ipc_window::<T>(1).min(count);
                let ptrs = this.ipc_scratch(window * size_of::<T>())?;
                let (mut laps, last) = (Laps::start(), count.div_ceil(window) - 1);
                for (w, (off, len)) in windows(count, window).enumerate() {
                    let (p, bytes) = (at::<T>(p, off), len * size_of::<T>());
                    if rank == root {
                        // SAFETY: `[off, off + len)` lies in the caller's buffer of
                        // `count` elements, and the own scratch holds `window >= len`.
                        unsafe { copy_dtod(stream, ptrs[rank], p, bytes)? };
                    }
                    this.ipc_step(stream, &mut laps, "copy in")?;
                    if rank != root {
                        // SAFETY: the root's scratch holds the `bytes` it copied in above.
                        unsafe { copy_dtod(stream, p, ptrs[root], bytes)? };
                    }
                    if w < last {
                        this.ipc_step(stream, &mut laps, "copy out")?;
                    }
                }
                this.ipc_finish(stream, &mut laps, call.coll)?;
                laps.report("ipc broadcast", count * size_of::<T>());
                Ok(())
            }
            _ => {
                let piece = this.slot_elems::<T>()?;
                let is_root = rank == root;
                this.staged::<T>(
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
        })
    }

    /// All-gather: rank `q`'s `send` lands at elements `[q * send.len(), (q + 1) *
    /// send.len())` of every rank's `recv`, which must hold at least `world_size *
    /// send.len()` elements.
    pub fn all_gather<T: Element + DeviceRepr>(
        &mut self,
        stream: &Stream,
        send: &impl DevicePtr<T>,
        recv: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let n = self.world_size();
        let count = send.len();
        let call = Call::new(CollectiveOp::AllGather, T::DTYPE, count, None, None);
        let local = self.check_stream(stream).and(room(
            "DeviceComm::all_gather",
            recv.len() >= n * count,
            || {
                format!(
                    "recv holds {} elements, {n} ranks x {count} needed",
                    recv.len()
                )
            },
        ));
        let s = stream.cuda();
        let (src, _gs) = send.device_ptr(s);
        let (dst, _gd) = recv.device_ptr_mut(s);
        if !self.agree(&call, local)? {
            return Ok(());
        }
        let (rank, bytes) = (self.rank(), count * std::mem::size_of::<T>());
        if n == 1 {
            // SAFETY: `recv` holds at least `count` elements (checked), `send` `count`.
            return self.guarded(|_| {
                unsafe { copy_dtod(stream, dst, src, bytes) }.and_then(|()| stream.synchronize())
            });
        }
        self.guarded(|this| match this.path {
            DevicePath::Ipc => {
                let window = this.ipc_window::<T>(1).min(count);
                let ptrs = this.ipc_scratch(window * size_of::<T>())?;
                let (mut laps, last) = (Laps::start(), count.div_ceil(window) - 1);
                for (w, (off, len)) in windows(count, window).enumerate() {
                    let (src, bytes) = (at::<T>(src, off), len * size_of::<T>());
                    // SAFETY: the own scratch holds `window >= len` elements, and `[off,
                    // off + len)` lies within `send`.
                    unsafe { copy_dtod(stream, ptrs[rank], src, bytes)? };
                    this.ipc_step(stream, &mut laps, "copy in")?;
                    for (q, &from) in ptrs.iter().enumerate() {
                        let from = if q == rank { src } else { from };
                        // SAFETY: elements `q * count + [off, off + len)` of `recv` are in
                        // bounds (recv >= n * count); every scratch holds its rank's
                        // `bytes` of this window.
                        unsafe { copy_dtod(stream, at::<T>(dst, q * count + off), from, bytes)? };
                    }
                    if w < last {
                        this.ipc_step(stream, &mut laps, "copy out")?;
                    }
                }
                this.ipc_finish(stream, &mut laps, call.coll)?;
                laps.report("ipc all_gather", n * count * size_of::<T>());
                Ok(())
            }
            _ => {
                // Each slot holds this rank's piece followed by the n gathered pieces.
                let piece = this.slot_elems::<T>()? / (n + 1);
                this.staged::<T>(
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
        })
    }

    /// Reduce-scatter: `send` holds `world_size` blocks of `recv.len()` elements, and
    /// rank `r`'s `recv` becomes block `r` reduced over every rank's `send` (NCCL's
    /// `ncclReduceScatter`). On the IPC path the sum runs in rank order, so its bits are
    /// those of the same block of an all-reduce.
    pub fn reduce_scatter<T: GpuElement>(
        &mut self,
        stream: &Stream,
        send: &impl DevicePtr<T>,
        recv: &mut impl DevicePtrMut<T>,
        op: ReduceOp,
    ) -> Result<()> {
        let n = self.world_size();
        let count = recv.len();
        let call = Call::new(CollectiveOp::ReduceScatter, T::DTYPE, count, Some(op), None);
        let local = self.check_stream(stream).and(room(
            "DeviceComm::reduce_scatter",
            send.len() >= n * count,
            || {
                format!(
                    "send holds {} elements, {n} ranks x {count} needed",
                    send.len()
                )
            },
        ));
        let s = stream.cuda();
        let (src, _gs) = send.device_ptr(s);
        let (dst, _gd) = recv.device_ptr_mut(s);
        if !self.agree(&call, local)? {
            return Ok(());
        }
        let rank = self.rank();
        self.guarded(|this| match this.path {
            _ if n == 1 => {
                // SAFETY: both buffers hold at least `count` elements (checked above).
                unsafe {
                    copy_dtod(stream, dst, src, count * size_of::<T>())?;
                    reduce_finalize_ptr::<T>(stream, op, dst, 1, count)?;
                }
                stream.synchronize()
            }
            DevicePath::Ipc => {
                // Each scratch holds, per window, the window of every block but its
                // rank's own, block q at `q * len`; windows are multiples of 8 elements,
                // so every block starts on the reduction kernels' vector boundary.
                let window = (this.ipc_window::<T>(8 * n) / n).min(count);
                let ptrs = this.ipc_scratch(n * window * size_of::<T>())?;
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
                    this.ipc_step(stream, &mut laps, "copy in")?;
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
                        this.ipc_step(stream, &mut laps, "read")?;
                    }
                }
                this.ipc_finish(stream, &mut laps, call.coll)?;
                laps.report("ipc reduce_scatter", n * count * size_of::<T>());
                Ok(())
            }
            _ => {
                // Each slot holds the piece's window of all n blocks; the host's in-place
                // reduce-scatter leaves this rank's block reduced where it was.
                let piece = this.slot_elems::<T>()? / n;
                this.staged::<T>(
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
        })
    }

    /// Reduce to `root`: `root`'s `recv[..send.len()]` becomes the reduction of every
    /// rank's `send`. The other ranks' `recv` is neither read nor written and may be
    /// empty (NCCL's `ncclReduce`).
    pub fn reduce<T: GpuElement>(
        &mut self,
        stream: &Stream,
        send: &impl DevicePtr<T>,
        recv: &mut impl DevicePtrMut<T>,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        let (n, rank) = (self.world_size(), self.rank());
        let count = send.len();
        let call = Call::new(CollectiveOp::Reduce, T::DTYPE, count, Some(op), Some(root));
        let local = self.check_stream(stream).and(if root >= n {
            Err(Error::invalid(
                "DeviceComm::reduce",
                format!("root {root} is not a rank of a world of {n}"),
            ))
        } else {
            room(
                "DeviceComm::reduce",
                rank != root || recv.len() >= count,
                || {
                    format!(
                        "the root's recv holds {} elements, send {count}",
                        recv.len()
                    )
                },
            )
        });
        let s = stream.cuda();
        let (src, _gs) = send.device_ptr(s);
        let (dst, _gd) = recv.device_ptr_mut(s);
        if !self.agree(&call, local)? {
            return Ok(());
        }
        let is_root = rank == root;
        self.guarded(|this| match this.path {
            _ if n == 1 => {
                // SAFETY: both buffers hold at least `count` elements (checked above).
                unsafe {
                    copy_dtod(stream, dst, src, count * size_of::<T>())?;
                    reduce_finalize_ptr::<T>(stream, op, dst, 1, count)?;
                }
                stream.synchronize()
            }
            DevicePath::Ipc => {
                let window = this.ipc_window::<T>(8).min(count);
                let ptrs = this.ipc_scratch(window * size_of::<T>())?;
                let (mut laps, last) = (Laps::start(), count.div_ceil(window) - 1);
                for (w, (off, len)) in windows(count, window).enumerate() {
                    if !is_root {
                        // SAFETY: the own scratch holds `window >= len` elements, and
                        // `[off, off + len)` lies within `send`.
                        unsafe {
                            copy_dtod(stream, ptrs[rank], at::<T>(src, off), len * size_of::<T>())?
                        };
                    }
                    this.ipc_step(stream, &mut laps, "copy in")?;
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
                        this.ipc_step(stream, &mut laps, "read")?;
                    }
                }
                this.ipc_finish(stream, &mut laps, call.coll)?;
                laps.report("ipc reduce", count * size_of::<T>());
                Ok(())
            }
            _ => {
                let piece = this.slot_elems::<T>()?;
                this.staged::<T>(
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
        })
    }

    fn all_reduce_ptrs<T: GpuElement>(
        &mut self,
        stream: &Stream,
        call: Call,
        local: Result<()>,
        src: DeviceAddr,
        dst: DeviceAddr,
    ) -> Result<()> {
        let mut laps = Laps::start();
        if !self.agree(&call, local)? {
            return Ok(());
        }
        laps.lap("header");
        let op = call.op.unwrap_or(ReduceOp::Sum);
        let (n, rank, count) = (self.world_size(), self.rank(), call.count);
        let bytes = count * std::mem::size_of::<T>();
        if n == 1 {
            return self.guarded(|_| {
                if src != dst {
                    // SAFETY: both buffers hold `count` elements (checked by the caller).
                    unsafe { copy_dtod(stream, dst, src, bytes)? };
                }
                // SAFETY: `dst` holds `count` elements.
                unsafe { reduce_finalize_ptr::<T>(stream, op, dst, 1, count)? };
                stream.synchronize()
            });
        }
        self.guarded(|this| match this.path {
            DevicePath::Ipc => {
                // Window lengths are multiples of 8 elements per rank, so every segment
                // of every window starts on the reduction kernels' vector boundary.
                let window = this.ipc_window::<T>(8 * n).min(count);
                let ptrs = this.ipc_scratch(window * size_of::<T>())?;
                let last = count.div_ceil(window) - 1;
                let one_shot = match this.comm.config().device_one_shot_bytes {
                    Some(max) => window * size_of::<T>() <= max,
                    None => {
                        this.ipc.as_ref().is_some_and(|s| s.shared_device)
                            || window * size_of::<T>() <= ONE_SHOT_MAX_BYTES
                    }
                };
                for (w, (off, len)) in windows(count, window).enumerate() {
                    let (src, dst) = (at::<T>(src, off), at::<T>(dst, off));
                    // SAFETY: the own scratch holds `window >= len` elements, and `[off,
                    // off + len)` lies within `src` (and `dst`) of `count` elements.
                    unsafe { copy_dtod(stream, ptrs[rank], src, len * size_of::<T>())? };
                    this.ipc_step(stream, &mut laps, "copy in")?;
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
                            this.ipc_step(stream, &mut laps, "read")?;
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
                    this.ipc_step(stream, &mut laps, "reduce")?;

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
                        this.ipc_step(stream, &mut laps, "copy out")?;
                    }
                }
                this.ipc_finish(stream, &mut laps, call.coll)?;
                laps.report("ipc all_reduce", bytes);
                Ok(())
            }
            _ => {
                let piece = this.slot_elems::<T>()?;
                this.staged::<T>(
                    stream,
                    count,
                    piece,
                    |off, len| vec![(at::<T>(src, off), 0, len)],
                    |comm, slot, len| comm.all_reduce(&mut slot[..len], op),
                    |off, len| vec![(at::<T>(dst, off), 0, len)],
                )
            }
        })
    }

    fn check_stream(&self, stream: &Stream) -> Result<()> {
        let theirs = stream.cuda().context().ordinal();
        if theirs != self.ordinal {
            return Err(Error::invalid(
                "DeviceComm",
                format!(
                    "the stream belongs to device {theirs}, this DeviceComm to device {}",
                    self.ordinal
                ),
            ));
        }
        Ok(())
    }

    /// Exchanges the call's header with every rank. Returns `Ok(false)` when there is
    /// nothing to move (zero elements, like the host collectives), the local refusal if
    /// this rank refused, and a mismatch error if any rank disagrees or refused.
    fn agree(&mut self, call: &Call, local: Result<()>) -> Result<bool> {
        if let Some(why) = &self.broken {
            return Err(Error::Broken(why.clone()));
        }
        if call.count == 0 {
            return local.map(|()| false);
        }
        let seq = self.seq;
        self.seq += 1;
        let n = self.world_size();
        if n == 1 {
            return local.map(|()| true);
        }
        let mine = call.header(seq, local.is_ok());
        let mut all = vec![0u64; HEADER_LEN * n];
        self.comm.all_gather(&mine, &mut all)?;
        local?;
        check_headers(self.rank(), call, &mine, &all)?;
        Ok(true)
    }

    /// Runs the data-moving part of a call; a failure there leaves the ranks at
    /// different steps, so it aborts the host communicator (peers fail fast) and marks
    /// this object unusable.
    fn guarded(&mut self, f: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        // The raw driver calls below act on the calling thread's current context.
        let r = self
            .ctx
            .bind_to_thread()
            .map_err(device_error("bind context"))
            .and_then(|()| f(self));
        if let Err(e) = &r {
            tracing::error!(
                target: "hetccl::device",
                rank = self.rank(),
                device = self.ordinal,
                seq = self.seq.saturating_sub(1),
                "device collective failed: {e}"
            );
            self.broken = Some(e.to_string());
            self.comm.abort();
            // The abort takes effect (links closed) at the next host operation.
            let _ = self.comm.barrier();
        }
        r
    }

    /// Drains the stream and meets the peers at a host barrier, timing the two apart.
    fn timed_sync_and_barrier(
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
    fn ipc_step(&mut self, stream: &Stream, laps: &mut Laps, what: &'static str) -> Result<()> {
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
    fn ipc_finish(&mut self, stream: &Stream, laps: &mut Laps, coll: CollectiveOp) -> Result<()> {
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

    /// Every rank's scratch address for a message of `bytes`, growing (collectively) the
    /// buffers first when they are smaller.
    fn ipc_scratch(&mut self, bytes: usize) -> Result<Vec<DeviceAddr>> {
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
        let (mut scratch, handle) = IpcScratch::create(&self.ctx, rank, n, size)?;
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
        scratch.shared_device = records.iter().all(|r| r.uuid == uuid);
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
    fn ipc_window<T>(&self, multiple: usize) -> usize {
        let elems = self.comm.config().device_scratch_bytes / size_of::<T>();
        (elems / multiple * multiple).max(multiple)
    }

    /// Elements of `T` one staging slot holds, allocating the slots on first use.
    fn slot_elems<T>(&mut self) -> Result<usize> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_tile_the_buffer_on_vector_boundaries() {
        for count in [1usize, 7, 8, 1000, (1 << 20) + 3] {
            for n in 1..=8 {
                let mut next = 0;
                for q in 0..n {
                    let (lo, len) = segment(count, n, q);
                    assert_eq!(lo, next.min(count), "count {count} n {n} q {q}");
                    // Empty trailing segments sit at `count`, wherever that is.
                    assert!(lo % 8 == 0 || len == 0, "count {count} n {n} q {q}");
                    next = lo + len;
                }
                assert_eq!(next, count, "count {count} n {n}");
            }
        }
        assert_eq!(segment(1000, 4, 0), (0, 256));
        assert_eq!(segment(1000, 4, 3), (768, 232));
        assert_eq!(segment(1, 4, 0), (0, 1));
        assert_eq!(segment(1, 4, 1), (1, 0));
        assert_eq!(segment(1, 4, 3), (1, 0));
    }

    #[test]
    fn windows_cover_the_message_in_order() {
        let all = |count, window| windows(count, window).collect::<Vec<_>>();
        assert_eq!(all(10, 4), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(all(8, 4), vec![(0, 4), (4, 4)]);
        assert_eq!(all(3, 64), vec![(0, 3)]);
        assert_eq!(all(0, 4), vec![]);
    }

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

    fn call(dtype: DataType, count: usize) -> Call {
        Call::new(
            CollectiveOp::AllReduce,
            dtype,
            count,
            Some(ReduceOp::Sum),
            None,
        )
    }

    #[test]
    fn headers_that_agree_pass() {
        let c = call(DataType::F32, 1000);
        let all: Vec<u64> = (0..3).flat_map(|_| c.header(5, true)).collect();
        assert!(check_headers(1, &c, &c.header(5, true), &all).is_ok());
    }

    #[test]
    fn a_dtype_mismatch_names_the_peer_and_both_calls() {
        let mine = call(DataType::F32, 1000);
        let theirs = call(DataType::F16, 1000);
        let mut all: Vec<u64> = mine.header(2, true).to_vec();
        all.extend(theirs.header(2, true));
        let e = check_headers(0, &mine, &mine.header(2, true), &all).unwrap_err();
        assert_eq!(
            e.to_string(),
            "rank 0: all_reduce #2 does not match what peer 1 sent: this rank called \
             #2 all_reduce f32 x 1000 (sum), peer 1 called #2 all_reduce f16 x 1000 (sum)"
        );
    }

    #[test]
    fn a_refusing_peer_fails_every_rank() {
        let c = call(DataType::Bf16, 7);
        let mut all: Vec<u64> = c.header(0, false).to_vec();
        all.extend(c.header(0, true));
        let e = check_headers(1, &c, &c.header(0, true), &all).unwrap_err();
        assert_eq!(
            e.to_string(),
            "rank 1: all_reduce #0 does not match what peer 0 sent: peer 0 refused its \
             #0 all_reduce bf16 x 7 (sum) (its own error says why)"
        );
    }

    #[test]
    fn paths_parse_by_name() {
        for p in [DevicePath::Auto, DevicePath::Ipc, DevicePath::Staged] {
            assert_eq!(DevicePath::parse(p.name()), Some(p));
        }
        assert_eq!(DevicePath::parse("nvlink"), None);
    }
}
