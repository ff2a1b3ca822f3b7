//! Collectives on device buffers: [`DeviceComm`] pairs a host [`Communicator`] (which
//! finds the peers, carries small messages and barriers) with a GPU, and runs
//! `all_reduce`, `reduce_scatter`, `reduce`, `broadcast` and `all_gather` on
//! `CudaSlice`s.
//!
//! Every call is ordered on the caller's [`Stream`]: the first copy waits for the work
//! already queued there, and the call returns after the stream has drained, so the result
//! is ready for anything issued afterwards (on any stream). Calls block the host thread.
//!
//! Two ways to move the data, chosen once per `DeviceComm` ([`DevicePath`]), each in a
//! file of its own on top of the driver layer (`driver.rs`) and the kernels:
//!
//! - **CUDA IPC** (every rank on this host, `ipc.rs`): every rank maps every peer's
//!   device scratch buffer and reduces straight from it, in rank order; the ranks'
//!   streams meet at device fences between the phases of a call (`fence.rs`).
//! - **Staged** (ranks on several hosts, or asked for, `staged.rs`): the data passes
//!   piece by piece through two pinned host buffers and the host communicator's
//!   collectives, copies of the next piece overlapping the host's work on this one.
//!   An all-reduce across hosts of which one holds two or more ranks runs
//!   hierarchically instead (`hier.rs`, unless [`DevicePath::Staged`] was asked for):
//!   CUDA IPC inside each host, only each rank's shard through pinned memory and the
//!   host links.
//!
//! [`DeviceComm::link_bytes`] says what this rank's last call moved over each link
//! class: bytes read from peers' device memory over CUDA IPC, and copies device to host
//! and host to device on the staged paths (`traffic.rs` has the table per collective
//! and path; the hierarchical all-reduce counts its plan's). Every call that succeeds
//! adds them once to the host communicator's [`crate::Metrics`] in the device classes
//! (`DeviceIpc`, `DeviceStaged`); the host links' bytes of the staged paths are counted
//! by the host collectives in their own classes. A one-rank call moves nothing.
//!
//! This file holds what every call does whatever the path: the checks of its arguments,
//! the agreement below, and the guard that breaks the `DeviceComm` on a failure.
//!
//! Before moving anything every call exchanges a small header (the call's
//! [`CallHeader`]: sequence number, collective, dtype, reduction, count, root; and
//! whether this rank refused it) with all ranks and checks it with
//! [`crate::algorithm::call::check`], so a rank that calls
//! something else, or refuses its own call (buffer too small, stream of another device),
//! makes every rank return an error instead of corrupting data or hanging. A failure
//! after that point (a driver error, a peer gone) aborts the host communicator too, so
//! the peers stop within milliseconds instead of waiting for `HETCCL_TIMEOUT`; the
//! `DeviceComm` is unusable afterwards.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, DevicePtr, DevicePtrMut, DeviceRepr};

use super::context::{Device, Stream};
use super::driver::{call_failed, device_error, DeviceAddr};
use super::hier::HierStage;
use super::ipc::IpcScratch;
use super::kernels::{reduce_finalize_ptr, GpuElement};
use super::staged::Slot;
use super::traffic::{device_link_bytes, DeviceRoute};
use crate::algorithm::call::{check, Call, CallHeader, Engine, HEADER_WORDS};
use crate::algorithm::device_hier::LinkBytes;
use crate::algorithm::select::{self, DeviceAcrossHosts};
use crate::communicator::Communicator;
use crate::dtype::{CollectiveOp, Element, ReduceOp};
use crate::error::{Error, Result};

/// Wall time of a call's phases, logged at trace level (`HETCCL_DEBUG=trace`): where a
/// device collective's time goes (the stream draining, or waiting for the peers).
pub(super) struct Laps {
    last: Option<Instant>,
    laps: Vec<(&'static str, Duration)>,
}

impl Laps {
    pub(super) fn start() -> Self {
        let on = tracing::enabled!(target: "hetccl::device", tracing::Level::TRACE);
        Laps {
            last: on.then(Instant::now),
            laps: Vec::new(),
        }
    }

    pub(super) fn lap(&mut self, what: &'static str) {
        if let Some(last) = &mut self.last {
            let now = Instant::now();
            self.laps.push((what, now - *last));
            *last = now;
        }
    }

    pub(super) fn report(&self, call: &str, bytes: usize) {
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

pub use crate::algorithm::select::DevicePath;

/// Collectives on device buffers of one GPU per rank, coordinated by a host
/// [`Communicator`] (see the module documentation for the protocol).
///
/// Every rank of the communicator must create one and make the same calls in the same
/// order, as with the host collectives. Its calls run host collectives (barriers,
/// all-gathers of headers and handles) on the communicator, so they must also be ordered
/// the same way as any host collectives the program runs on it directly.
pub struct DeviceComm {
    pub(super) comm: Arc<Communicator>,
    pub(super) ctx: Arc<CudaContext>,
    pub(super) ordinal: usize,
    /// `Ipc` or `Staged`, never `Auto`.
    path: DevicePath,
    /// Calls made so far; the next call's number.
    pub(super) seq: u64,
    /// The IPC path's buffers, from the first call on.
    pub(super) ipc: Option<IpcScratch>,
    /// The staged path's two host buffers, from the first call on.
    pub(super) slots: Option<[Slot; 2]>,
    /// The ranks this one shares IPC scratch with, itself included: every rank on the
    /// IPC path, the ranks of its host on the hierarchical one.
    pub(super) ipc_members: Vec<usize>,
    /// Whether staged all-reduces run hierarchically (`hier.rs`).
    across: DeviceAcrossHosts,
    /// The hierarchical path's pinned buffer, from its first call on.
    pub(super) hier: Option<HierStage>,
    /// What the last call moved over each link class.
    link_bytes: LinkBytes,
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

/// Header words: the call's ([`CallHeader`]), then this rank's status.
const HEADER_LEN: usize = HEADER_WORDS + 1;
/// Status of a rank that refused its own call.
const REFUSED: u64 = 1;

/// What this rank tells the others about call number `seq` before it: the call, and
/// whether it accepts its own part (`ok`).
fn header(call: &Call, seq: u64, ok: bool) -> [u64; HEADER_LEN] {
    let mut h = [0; HEADER_LEN];
    h[..HEADER_WORDS].copy_from_slice(&call.header(seq).to_words());
    h[HEADER_WORDS] = if ok { 0 } else { REFUSED };
    h
}

/// Checks every rank's header (`all`, rank-major) against this rank's; the first peer
/// that refused its call or disagrees becomes the error.
fn check_headers(rank: usize, call: &Call, mine: &[u64], all: &[u64]) -> Result<()> {
    let stated = |h: &[u64]| CallHeader::from_words(std::array::from_fn(|i| h[i]));
    for (peer, theirs) in all.chunks_exact(HEADER_LEN).enumerate() {
        if peer == rank {
            continue;
        }
        let refused = theirs[HEADER_WORDS] == REFUSED;
        let (m, t) = (stated(mine), stated(theirs));
        check(rank, peer, &m, &t, Engine::Device { refused }).map_err(|detail| {
            Error::Mismatch {
                rank,
                peer,
                op: call.op,
                seq: m.seq,
                detail,
            }
        })?;
    }
    Ok(())
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

/// `cuMemcpyDtoDAsync` of `bytes` on the stream (nothing for 0).
///
/// # Safety
/// Both ranges must be valid device memory in the stream's context (or mapped into it)
/// until the copy has run.
pub(super) unsafe fn copy_dtod(
    s: &Stream,
    dst: DeviceAddr,
    src: DeviceAddr,
    bytes: usize,
) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: the caller vouches for both ranges.
    unsafe { super::driver::copy_dtod_async(s.cuda(), dst, src, bytes) }
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
        let asked = path;
        let Some(path) = select::device_path(path, all_local) else {
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
        };
        let topo = comm.topology();
        let sizes: Vec<usize> = topo.nodes.iter().map(|n| n.len()).collect();
        // Asked for by name, the staged path stays flat (to compare with).
        let across = match (path, asked) {
            (DevicePath::Staged, DevicePath::Auto) => select::device_across_hosts(&sizes, true),
            _ => DeviceAcrossHosts::Flat(select::FlatWhy::OneHost),
        };
        let ipc_members = match across {
            DeviceAcrossHosts::Hierarchical { .. } => topo
                .nodes
                .iter()
                .find(|n| n.contains(&rank))
                .cloned()
                .unwrap_or_else(|| vec![rank]),
            DeviceAcrossHosts::Flat(_) => (0..comm.world_size()).collect(),
        };
        tracing::info!(
            target: "hetccl::device",
            rank,
            world_size = comm.world_size(),
            device = device.ordinal(),
            name = device.name(),
            path = path.name(),
            across = ?across,
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
            ipc_members,
            across,
            hier: None,
            link_bytes: LinkBytes::default(),
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

    /// Whether all-reduces run hierarchically across hosts ([`select::device_across_hosts`]).
    pub fn across_hosts(&self) -> DeviceAcrossHosts {
        self.across
    }

    /// What this rank moved over each link class in its last call (every collective,
    /// every path; see the module documentation): reads of peers' device memory over
    /// CUDA IPC, copies to and from pinned host memory, and on the hierarchical path
    /// the bytes its inter-host rings sent. Zero after a call that moved nothing (one
    /// rank, no element) or failed.
    pub fn link_bytes(&self) -> LinkBytes {
        self.link_bytes
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
        let call = Call::new(CollectiveOp::AllReduce, T::DTYPE, buf.len()).with_redop(op);
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
        let call = Call::new(CollectiveOp::AllReduce, T::DTYPE, count).with_redop(op);
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
        let call = Call::new(CollectiveOp::Broadcast, T::DTYPE, count).with_root(root);
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
        self.counted(&call, |this| match this.path {
            _ if n == 1 => Ok(()),
            DevicePath::Ipc => this.ipc_broadcast::<T>(stream, p, count, root),
            _ => this.staged_broadcast::<T>(stream, p, count, root),
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
        let call = Call::new(CollectiveOp::AllGather, T::DTYPE, count);
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
        let bytes = count * std::mem::size_of::<T>();
        self.counted(&call, |this| match this.path {
            _ if n == 1 => {
                // SAFETY: `recv` holds at least `count` elements (checked), `send` `count`.
                unsafe { copy_dtod(stream, dst, src, bytes) }.and_then(|()| stream.synchronize())
            }
            DevicePath::Ipc => this.ipc_all_gather::<T>(stream, src, dst, count),
            _ => this.staged_all_gather::<T>(stream, src, dst, count),
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
        let call = Call::new(CollectiveOp::ReduceScatter, T::DTYPE, count).with_redop(op);
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
        self.counted(&call, |this| match this.path {
            _ if n == 1 => {
                // SAFETY: both buffers hold at least `count` elements (checked above).
                unsafe {
                    copy_dtod(stream, dst, src, count * size_of::<T>())?;
                    reduce_finalize_ptr::<T>(stream, op, dst, 1, count)?;
                }
                stream.synchronize()
            }
            DevicePath::Ipc => this.ipc_reduce_scatter::<T>(stream, src, dst, count, op),
            _ => this.staged_reduce_scatter::<T>(stream, src, dst, count, op),
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
        let call = Call::new(CollectiveOp::Reduce, T::DTYPE, count)
            .with_redop(op)
            .with_root(root);
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
        self.counted(&call, |this| match this.path {
            _ if n == 1 => {
                // SAFETY: both buffers hold at least `count` elements (checked above).
                unsafe {
                    copy_dtod(stream, dst, src, count * size_of::<T>())?;
                    reduce_finalize_ptr::<T>(stream, op, dst, 1, count)?;
                }
                stream.synchronize()
            }
            DevicePath::Ipc => this.ipc_reduce::<T>(stream, src, dst, count, op, root),
            _ => this.staged_reduce::<T>(stream, src, dst, count, op, root),
        })
    }

    /// Takes part in `call` only to refuse it, because a check of the caller's own failed
    /// before the collective could start (a buffer that does not fit, say): every rank's
    /// call fails, the others naming this rank, instead of leaving them waiting for it.
    /// Returns `why`. `call` must be the call the collective would have made.
    pub fn refuse(&mut self, call: Call, why: Error) -> Error {
        match self.agree(&call, Err(why)) {
            Err(e) => e,
            Ok(_) => Error::invalid("DeviceComm::refuse", "the refusal was not taken"),
        }
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
        let op = call.redop;
        let (n, count) = (self.world_size(), call.count);
        let bytes = count * std::mem::size_of::<T>();
        if n > 1
            && self.path != DevicePath::Ipc
            && matches!(self.across, DeviceAcrossHosts::Hierarchical { .. })
        {
            // It counts its own copies and reads as it queues them, window by window.
            return self.count_bytes(|this| this.hier_all_reduce::<T>(stream, src, dst, count, op));
        }
        self.counted(&call, |this| match this.path {
            _ if n == 1 => {
                if src != dst {
                    // SAFETY: both buffers hold `count` elements (checked by the caller).
                    unsafe { copy_dtod(stream, dst, src, bytes)? };
                }
                // SAFETY: `dst` holds `count` elements.
                unsafe { reduce_finalize_ptr::<T>(stream, op, dst, 1, count)? };
                stream.synchronize()
            }
            DevicePath::Ipc => this.ipc_all_reduce::<T>(stream, &mut laps, src, dst, count, op),
            _ => this.staged_all_reduce::<T>(stream, src, dst, count, op),
        })
    }

    /// Runs a call's data movement ([`DeviceComm::guarded`]) on the IPC or flat staged
    /// path, then counts what it moved there ([`device_link_bytes`]).
    fn counted(&mut self, call: &Call, f: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        self.count_bytes(|this| {
            f(this)?;
            // The IPC route is known once the call has registered the scratch (whether
            // the ranks share one GPU decides an all-reduce's shape).
            let config = this.comm.config();
            let route = match this.path {
                DevicePath::Ipc => DeviceRoute::Ipc {
                    scratch_bytes: config.device_scratch_bytes,
                    one_shot_bytes: config.device_one_shot_bytes,
                    shared_gpu: this.shared_gpu(),
                },
                _ => DeviceRoute::Staged,
            };
            Ok(device_link_bytes(
                call,
                this.world_size(),
                this.rank(),
                route,
            ))
        })
    }

    /// Runs a call's data movement ([`DeviceComm::guarded`]), which returns what it
    /// moved; keeps that for [`DeviceComm::link_bytes`] and adds it to the host
    /// communicator's counters in the device classes, once, if the call succeeded.
    fn count_bytes(&mut self, f: impl FnOnce(&mut Self) -> Result<LinkBytes>) -> Result<()> {
        let b = self.guarded(f)?;
        self.link_bytes = b;
        self.comm.count_device(
            b.ipc_read as u64,
            b.device_to_host as u64,
            b.host_to_device as u64,
        );
        Ok(())
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
    /// this rank refused, and a mismatch error if any rank disagrees or refused. Clears
    /// [`DeviceComm::link_bytes`]: until the call has moved its data, it moved nothing.
    fn agree(&mut self, call: &Call, local: Result<()>) -> Result<bool> {
        self.link_bytes = LinkBytes::default();
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
        let mine = header(call, seq, local.is_ok());
        let mut all = vec![0u64; HEADER_LEN * n];
        self.comm.all_gather(&mine, &mut all)?;
        local?;
        check_headers(self.rank(), call, &mine, &all)?;
        Ok(true)
    }

    /// Runs the data-moving part of a call; a failure there leaves the ranks at
    /// different steps, so it aborts the host communicator (peers fail fast) and marks
    /// this object unusable.
    fn guarded<R>(&mut self, f: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DataType;

    fn call(dtype: DataType, count: usize) -> Call {
        Call::new(CollectiveOp::AllReduce, dtype, count).with_redop(ReduceOp::Sum)
    }

    #[test]
    fn headers_that_agree_pass() {
        let c = call(DataType::F32, 1000);
        let all: Vec<u64> = (0..3).flat_map(|_| header(&c, 5, true)).collect();
        assert!(check_headers(1, &c, &header(&c, 5, true), &all).is_ok());
    }

    #[test]
    fn a_dtype_mismatch_names_the_peer_and_both_calls() {
        let mine = call(DataType::F32, 1000);
        let theirs = call(DataType::F16, 1000);
        let mut all: Vec<u64> = header(&mine, 2, true).to_vec();
        all.extend(header(&theirs, 2, true));
        let e = check_headers(0, &mine, &header(&mine, 2, true), &all).unwrap_err();
        assert_eq!(
            e.to_string(),
            "rank 0: all_reduce #2 does not match what peer 1 sent: this rank called \
             #2 all_reduce f32 x 1000 (sum), peer 1 called #2 all_reduce f16 x 1000 (sum)"
        );
    }

    #[test]
    fn a_refusing_peer_fails_every_rank() {
        let c = call(DataType::Bf16, 7);
        let mut all: Vec<u64> = header(&c, 0, false).to_vec();
        all.extend(header(&c, 0, true));
        let e = check_headers(1, &c, &header(&c, 0, true), &all).unwrap_err();
        assert_eq!(
            e.to_string(),
            "rank 1: all_reduce #0 does not match what peer 0 sent: peer 0 refused its \
             #0 all_reduce bf16 x 7 (sum) (its own error says why)"
        );
    }
}
