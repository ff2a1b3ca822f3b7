//! Point-to-point links. A [`Link`] moves framed messages between two ranks and knows
//! nothing of collectives: the algorithm layer decides what to send, the link only
//! how. Links are driven by polling, so one thread can keep a send to the right and a
//! receive from the left moving at the same time without deadlock and without a
//! thread per link.
//!
//! | link | when |
//! | --- | --- |
//! | [`shm`] | two ranks on one host (unless `HETCCL_SHM_DISABLE=1`) |
//! | [`tcp`] | ranks on different hosts; several sockets per peer, chunks striped |
//! | [`mem`] | two threads of one process (tests of the algorithms) |
//!
//! [`shm`] also holds what every use of memory shared by the ranks of one host builds
//! on: its segments ([`shm::segment`]), which the shared buffers of
//! [`crate::Communicator::alloc_shared`] live in too, and whether a peer's process still
//! runs (`shm::liveness`).
//!
//! [`connect_all`] builds the full mesh of links at start-up.
//!
//! Every header-sized record read from a peer goes through [`MsgHeader::decode`]. A
//! link aborted after an error tells its peer why ([`crate::error::AbortCause`]: shm in
//! its control line, TCP in an abort notice where the next header would go), so a rank
//! that was waiting on a peer that gave up can say where the failure lies
//! ([`Link::abort_notice`]).

pub mod mem;
pub mod shm;
pub mod tcp;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Instant;

use crate::bootstrap::auth::JobAuth;
use crate::bootstrap::Bootstrap;
use crate::config::Config;
use crate::error::{AbortCause, Error, Result};

/// First field of every message header.
pub const MSG_MAGIC: u32 = 0x4843_4d31; // "HCM1"

/// Precedes every message on every link. The executor fills it and checks what it
/// receives against what it expects, so a rank running a different collective, count or
/// dtype than its peer is caught on the first message instead of corrupting data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MsgHeader {
    /// [`MSG_MAGIC`].
    pub magic: u32,
    /// `CollectiveOp` tag.
    pub op: u8,
    /// `DataType` tag.
    pub dtype: u8,
    /// `ReduceOp` tag (0 where none applies).
    pub redop: u8,
    /// Reserved flags (wire compression).
    pub flags: u8,
    /// The communicator's collective sequence number.
    pub seq: u64,
    /// Element count the caller passed to the collective.
    pub count: u64,
    /// Payload bytes following this header.
    pub bytes: u64,
}

/// Size of [`MsgHeader`] on the wire.
pub const HEADER_BYTES: usize = std::mem::size_of::<MsgHeader>();

/// First field of an abort notice: a record of a header's size and shape that a TCP
/// link sends in place of the next message's header when it gives up, with the cause
/// ([`AbortCause::to_word`]) in `seq` and every other field 0.
pub const ABORT_MAGIC: u32 = 0x4843_4131; // "HCA1"

/// What a header-sized record read from a peer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// The header of a message; its payload follows.
    Message(MsgHeader),
    /// The peer gave up on the link, and why (`None`: it did not say anything this
    /// build understands).
    Abort(Option<AbortCause>),
}

impl MsgHeader {
    /// Decodes a header-sized record a peer wrote (native byte order: both ends run on
    /// one architecture). Checks the framing only; whether the message is the one
    /// expected is the receiver's business (the executor compares every field).
    /// Allocates nothing.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Frame, String> {
        if bytes.len() != HEADER_BYTES {
            return Err(format!(
                "a message header is {HEADER_BYTES} bytes, this one {}",
                bytes.len()
            ));
        }
        let h: MsgHeader = bytemuck::pod_read_unaligned(bytes);
        match h.magic {
            MSG_MAGIC => Ok(Frame::Message(h)),
            ABORT_MAGIC => Ok(Frame::Abort(AbortCause::from_word(h.seq))),
            m => Err(format!(
                "header magic {m:#010x} is neither a message's ({MSG_MAGIC:#010x}) nor an \
                 abort notice's ({ABORT_MAGIC:#010x})"
            )),
        }
    }

    /// The abort notice for `cause` (see [`ABORT_MAGIC`]).
    pub fn abort_notice(cause: AbortCause) -> MsgHeader {
        MsgHeader {
            magic: ABORT_MAGIC,
            seq: cause.to_word(),
            ..MsgHeader::default()
        }
    }
}

/// What kind of link connects two ranks (also used by the topology and cost model).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum LinkKind {
    /// Shared-memory rings between processes on one host.
    Shm,
    /// TCP sockets.
    Tcp,
}

/// Receives an incoming message piece by piece.
pub trait RecvSink {
    /// Called once per message, before any payload; an error aborts the receive.
    fn header(&mut self, h: &MsgHeader) -> Result<()>;
    /// Called with the payload in order. `offset` is where `bytes` starts within the
    /// message. Pieces start at offsets that are multiples of 64 and every piece but
    /// the last of a message is a multiple of 64 bytes long, so no element is split.
    /// Every transport in this module also hands out `bytes` at a 64-byte aligned
    /// address, so the piece can be viewed as a slice of any element type.
    fn data(&mut self, offset: usize, bytes: &[u8]) -> Result<()>;
    /// For a receive that only copies the payload into place: where the payload
    /// belongs, so a link that reads from a kernel socket can read straight into it and
    /// skip its staging buffer (one copy less per byte). Asked once per message, after
    /// [`RecvSink::header`] accepted it; a link that uses it does not call `data`.
    fn direct_dst(&mut self) -> Option<DirectDst> {
        None
    }
}

/// A destination that a link may write a message's payload into itself
/// ([`RecvSink::direct_dst`]).
#[derive(Clone, Copy, Debug)]
pub struct DirectDst {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    streaming: bool,
}

// SAFETY: a plain address; what makes writes through it sound is the contract of
// `DirectDst::new`, which does not depend on the thread doing the writing.
unsafe impl Send for DirectDst {}

impl DirectDst {
    /// # Safety
    /// `ptr` must be valid for writes of `len` bytes, and nothing else may read or write
    /// them, until the receive it is handed out for completes or fails.
    pub unsafe fn new(ptr: std::ptr::NonNull<u8>, len: usize) -> Self {
        DirectDst {
            ptr,
            len,
            streaming: false,
        }
    }

    /// The same destination, marked to be written with streaming stores (or not): a
    /// link's room that its peer reads from another cache domain
    /// ([`Link::send_space`]).
    pub fn with_streaming(self, streaming: bool) -> Self {
        DirectDst { streaming, ..self }
    }

    /// Whether writers should use streaming stores for this destination.
    pub fn streaming(&self) -> bool {
        self.streaming
    }

    /// Payload bytes the destination holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the destination is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The destination's bytes at `range`.
    ///
    /// # Safety
    /// The slice must not outlive the receive it was handed out for, and no other slice
    /// of the same bytes may be live at the same time.
    pub(crate) unsafe fn slice_mut<'a>(self, range: std::ops::Range<usize>) -> &'a mut [u8] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (asserted); validity and exclusivity are the caller's and
        // `new`'s contracts.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(range.start), range.len()) }
    }
}

/// A bidirectional, ordered, reliable message link to one peer.
///
/// At most one message is in flight per direction: the caller repeats `poll_send`
/// with the same header and payload until it returns `Ok(true)` before starting the
/// next message (likewise for `poll_recv`). Errors are [`crate::Error::Link`]; the
/// executor adds the collective's context. After an error (its own, or one a sink
/// returned) a link is unusable: the caller aborts it and drops it.
pub trait Link: Send {
    /// The rank at the other end.
    fn peer(&self) -> usize;
    /// Which transport this is.
    fn kind(&self) -> LinkKind;
    /// Moves the current outgoing message forward without blocking; `Ok(true)` once
    /// the whole message (header then `data`, `header.bytes == data.len()`) is handed off.
    fn poll_send(&mut self, header: &MsgHeader, data: &[u8]) -> Result<bool>;
    /// Moves the current incoming message forward without blocking; `Ok(true)` once
    /// the sink has seen the header and all payload.
    fn poll_recv(&mut self, sink: &mut dyn RecvSink) -> Result<bool>;
    /// Checks whether the peer is still there, for transports where a dead peer is
    /// silent (shared memory). Called by the executor while it waits.
    fn check_peer(&mut self) -> Result<()>;
    /// Tells the peer that this side gives up (after an error), and why where the
    /// transport can carry it; later calls on both sides fail promptly instead of
    /// waiting for a timeout.
    fn abort(&mut self, cause: AbortCause);
    /// Why the peer gave up, when it aborted the link and said so. Asked after the link
    /// reported the peer lost, to tell a peer that died from one that gave up on
    /// another rank.
    fn abort_notice(&mut self) -> Option<AbortCause> {
        None
    }
    /// What this link can see of the peer's process beyond the link itself, for a
    /// timeout's message: e.g. that it is stopped. Off the fast path.
    fn peer_note(&mut self) -> Option<String> {
        None
    }
    /// File descriptors to sleep on in `poll(2)` while waiting for this link
    /// (`(fd, want_write)`); empty for links that can only be polled by spinning.
    fn wait_fds(&self, _out: &mut Vec<(i32, bool)>) {}
    /// Called once the start-up probe is over, so the probe's traffic leaves nothing
    /// behind that shapes later transfers (TCP: the congestion control's estimates).
    fn end_probe(&mut self) {}
    /// Measures, at the end of start-up, what the link wants to know of the path
    /// before its first message (shared memory: how far apart the two cores are, which
    /// decides how it writes into its ring). Both ends call it at the same point while
    /// nothing else uses the link; every rank takes its links in ascending peer order,
    /// so the pairs of a host meet in one order. Nothing (the default) where the
    /// transport learns all it needs as it runs.
    fn probe_at_start(&mut self) {}
    /// Told during start-up, where the host runs more ranks than CPUs (and
    /// [`Link::probe_at_start`] is not called), whether the host's CPUs are mostly far
    /// apart (`crate::topology::distance`): any link of such a host joins two CPUs one
    /// moment and one the next. Nothing (the default) where the transport does not care.
    fn start_on_shared_cpus(&mut self, _far_apart: bool) {}
    /// Connection attempts and handshakes that setting this link up had to repeat.
    fn setup_retries(&self) -> u64 {
        0
    }
    /// Whether [`Link::send_space`] can offer room (the link has a buffer of its own
    /// that messages are written into).
    fn has_send_space(&self) -> bool {
        false
    }
    /// Room in the link's own buffer for the next bytes of the outgoing message
    /// `header` announces (the current one, or a new one when none is in flight), for a
    /// caller that produces those bytes in place instead of handing `poll_send` a
    /// finished payload: a receive that forwards what it reduces writes its result
    /// there, saving a pass over the result. Appends `(message offset, space)` for each
    /// free piece in order, from the first byte not yet sent. Taking room changes
    /// nothing; [`Link::commit_send`] publishes it. Room marked
    /// [`DirectDst::streaming`] is best written with streaming stores: the link has
    /// measured ordinary ones into it to cost more (its peer reads it from another
    /// cache domain). The default, for links without such a buffer (TCP), offers none.
    fn send_space(&mut self, _header: &MsgHeader, _out: &mut Vec<(usize, DirectDst)>) {}
    /// Publishes the pieces of the last [`Link::send_space`] below message offset
    /// `upto`, every byte of which the caller has written. `Ok(true)` once that
    /// completes the message. `poll_send` with the same header carries on after them.
    fn commit_send(&mut self, _header: &MsgHeader, _upto: usize) -> Result<bool> {
        Err(Error::invalid(
            "commit_send",
            "this link offers no room to write messages in place",
        ))
    }
}

/// Heap memory whose first byte sits on a 64-byte boundary (one cache line), for the
/// staging buffers whose contents are handed to a [`RecvSink`].
pub(crate) struct AlignedBuf {
    lines: Vec<Line64>,
    len: usize,
}

#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Line64([u8; 64]);

impl AlignedBuf {
    /// `len` zero bytes.
    pub(crate) fn zeroed(len: usize) -> Self {
        AlignedBuf {
            lines: vec![Line64([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &bytemuck::cast_slice::<Line64, u8>(&self.lines)[..self.len]
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<Line64, u8>(&mut self.lines)[..self.len]
    }
}

/// What each rank publishes through the bootstrap while links are set up. The same
/// shape is exchanged three times (prepare, shm attached, tcp connected); `error` lets
/// a rank that failed tell every other rank, so all of them fail together instead of
/// waiting for a timeout.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct SetupBlob {
    error: Option<String>,
    /// `ip:port` of this rank's listener, where higher ranks connect over TCP.
    tcp_addr: Option<String>,
    nsocks: usize,
    stripe: usize,
    /// `(peer, segment name)` for the shm segments this rank created.
    shm: Vec<(usize, String)>,
}

/// Segments and listener made before anything is exchanged.
struct Prepared {
    shm: Vec<(usize, shm::ShmLink)>,
    listener: Option<std::net::TcpListener>,
    blob: SetupBlob,
}

/// Connects this rank to every other rank: shared memory to peers on the same host
/// (unless `cfg.shm_disable`), TCP to the rest. Collective over `boot`: every rank calls
/// it once, at the same point. Returns one entry per rank (`None` at this rank's index).
///
/// Protocol (each step is a `boot.all_gather`, so a rank that fails a step tells all the
/// others and every rank returns an error instead of some of them hanging):
///
/// 1. for each same-host pair the lower rank creates the segment; ranks with TCP
///    peers above them bind a listener; names and `ip:port` are exchanged;
/// 2. the higher rank of each pair maps the segment; after the exchange that follows,
///    both sides have mapped it and the creator unlinks it from `/dev/shm`;
/// 3. for each TCP pair the higher rank connects `cfg.nsocks_per_peer` sockets to the
///    lower one, each authenticated with `auth`; strangers are refused and logged;
/// 4. a last exchange confirms that every rank has all its links.
///
/// `same_host[j]` says whether rank `j` runs on this host; it must have `world_size`
/// entries and agree between the two ranks of every pair. `host_oversubscribed`: this
/// host runs more ranks than it has CPUs (it sets the rings' slots,
/// [`shm::ShmGeometry::from_config`]), the same on every rank of the host.
pub fn connect_all(
    cfg: &Config,
    boot: &mut dyn Bootstrap,
    auth: &JobAuth,
    same_host: &[bool],
    host_oversubscribed: bool,
) -> Result<Vec<Option<Box<dyn Link>>>> {
    let rank = boot.rank();
    let world = boot.world_size();
    if same_host.len() != world || rank >= world {
        return Err(Error::invalid(
            "connect_all",
            format!(
                "rank {rank}, world size {world}, but same_host has {} entries",
                same_host.len()
            ),
        ));
    }
    let kinds: Vec<LinkKind> = (0..world)
        .map(|j| {
            if same_host[j] && !cfg.shm_disable {
                LinkKind::Shm
            } else {
                LinkKind::Tcp
            }
        })
        .collect();
    // Config bounds the timeout to a day, which the clock always holds; were it not, setup
    // would time out at once rather than panic.
    let deadline = Instant::now()
        .checked_add(cfg.connect_timeout)
        .unwrap_or_else(Instant::now);
    let live = boot.liveness();

    // 1. Segments and listener.
    let prepared = prepare(cfg, rank, auth, &kinds, same_host, host_oversubscribed);
    let blob = match &prepared {
        Ok(p) => p.blob.clone(),
        Err(e) => SetupBlob {
            error: Some(e.to_string()),
            ..SetupBlob::default()
        },
    };
    let infos = exchange(boot, &blob)?;
    let Prepared {
        shm: mut created,
        listener,
        ..
    } = prepared?;
    others_ok(&infos, rank, "prepare its links")?;
    check_striping(&infos, &kinds, rank)?;

    // 2. Attach to the segments the lower ranks created, then unlink them all.
    let opened: Result<Vec<(usize, shm::ShmLink)>> = (0..rank)
        .filter(|&j| kinds[j] == LinkKind::Shm)
        .map(|j| {
            let name = infos[j]
                .shm
                .iter()
                .find(|(p, _)| *p == rank)
                .map(|(_, n)| n.clone())
                .ok_or_else(|| {
                    Error::Shm(format!(
                        "rank {j} published no segment for rank {rank}: the two ranks disagree \
                         on whether they share a host or on HETCCL_SHM_DISABLE"
                    ))
                })?;
            let mut link = shm::ShmLink::open(&name, rank, j)?;
            link.set_stores(cfg.shm_stores);
            Ok((j, link))
        })
        .collect();
    let status = SetupBlob {
        error: opened.as_ref().err().map(|e| e.to_string()),
        ..SetupBlob::default()
    };
    let attached = exchange(boot, &status);
    // Both sides of every segment have mapped it (or given up): the names can go,
    // so nothing is left in /dev/shm whatever happens to the processes later.
    for (_, link) in &mut created {
        link.unlink();
    }
    let attached = attached?;
    let mut opened = opened?;
    others_ok(&attached, rank, "attach its shared-memory segments")?;
    // Every peer has attached, so its pid is in the segment: watch it from now on (one
    // descriptor per link, opened here rather than at the first long wait).
    for (_, link) in created.iter_mut().chain(opened.iter_mut()) {
        link.watch_peer();
    }

    // 3. TCP: accept from higher ranks while connecting to lower ones.
    let higher: Vec<usize> = (rank + 1..world)
        .filter(|&j| kinds[j] == LinkKind::Tcp)
        .collect();
    let lower: Vec<usize> = (0..rank).filter(|&j| kinds[j] == LinkKind::Tcp).collect();
    let nsocks = blob.nsocks;
    let stripe = blob.stripe;
    let tcp_links: Result<Vec<tcp::TcpLink>> = std::thread::scope(|s| {
        let acceptor = s.spawn(|| match &listener {
            Some(l) => tcp::accept_links(
                l,
                auth,
                rank,
                &higher,
                nsocks,
                stripe,
                deadline,
                live.as_deref(),
            ),
            None => Ok(Vec::new()),
        });
        let mut links = Vec::new();
        let mut failed = None;
        for &j in &lower {
            let addr = infos[j]
                .tcp_addr
                .as_deref()
                .and_then(|a| a.parse::<SocketAddr>().ok());
            let res = match addr {
                Some(addr) => tcp::connect_link(
                    addr,
                    auth,
                    rank,
                    j,
                    nsocks,
                    stripe,
                    deadline,
                    live.as_deref(),
                ),
                None => Err(Error::Link {
                    peer: j,
                    detail: format!("rank {j} published no TCP listener address"),
                    lost: false,
                }),
            };
            match res {
                Ok(l) => links.push(l),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let accepted = acceptor
            .join()
            .unwrap_or_else(|_| Err(Error::Bootstrap("the TCP accept thread panicked".into())));
        match (failed, accepted) {
            (Some(e), _) => Err(e),
            (None, Err(e)) => Err(e),
            (None, Ok(mut acc)) => {
                links.append(&mut acc);
                Ok(links)
            }
        }
    });
    drop(listener);
    let tcp_links = tcp_links.and_then(|links| {
        for l in &links {
            l.set_congestion(&cfg.tcp_congestion)?;
        }
        Ok(links)
    });

    // 4. Everyone has every link, or everyone fails.
    let status = SetupBlob {
        error: tcp_links.as_ref().err().map(|e| e.to_string()),
        ..SetupBlob::default()
    };
    // This rank's own failure first: it names the peer it could not link with, where the
    // exchange can only say that a rank is gone.
    let done = exchange(boot, &status);
    let tcp_links = tcp_links?;
    others_ok(&done?, rank, "connect its TCP links")?;

    let mut links: Vec<Option<Box<dyn Link>>> = (0..world).map(|_| None).collect();
    for (j, l) in created.into_iter().chain(opened) {
        tracing::info!(
            rank,
            peer = j,
            bytes = l.segment_bytes(),
            "shm link (segment {}, {} slots x {} bytes per direction)",
            l.name(),
            l.geometry().nslots,
            l.geometry().slot_bytes
        );
        links[j] = Some(Box::new(l));
    }
    for l in tcp_links {
        let j = l.peer();
        tracing::info!(
            rank,
            peer = j,
            "tcp link ({} sockets, {} byte stripes, remote {})",
            nsocks,
            stripe,
            l.remote_addr()
        );
        links[j] = Some(Box::new(l));
    }
    if let Some(j) = (0..world).find(|&j| j != rank && links[j].is_none()) {
        return Err(Error::Link {
            peer: j,
            detail: format!("rank {rank} ended link setup without a link to rank {j}"),
            lost: false,
        });
    }
    Ok(links)
}

fn prepare(
    cfg: &Config,
    rank: usize,
    auth: &JobAuth,
    kinds: &[LinkKind],
    same_host: &[bool],
    host_oversubscribed: bool,
) -> Result<Prepared> {
    let world = kinds.len();
    let geom = shm::ShmGeometry::from_config(cfg, host_oversubscribed);
    let mut p = Prepared {
        shm: Vec::new(),
        listener: None,
        blob: SetupBlob {
            nsocks: cfg.nsocks_per_peer.max(1),
            stripe: tcp::stripe_bytes(cfg),
            ..SetupBlob::default()
        },
    };
    let shm_above = (rank + 1..world).filter(|&j| kinds[j] == LinkKind::Shm);
    for j in shm_above {
        let name = shm::segment_name(auth.job_id(), rank, j);
        let mut link = shm::ShmLink::create(&name, rank, j, geom)?;
        link.set_stores(cfg.shm_stores);
        p.shm.push((j, link));
        p.blob.shm.push((j, name));
    }
    if (rank + 1..world).any(|j| kinds[j] == LinkKind::Tcp) {
        // Only higher ranks connect here: loopback will do unless one of them is remote.
        let remote = (rank + 1..world).any(|j| kinds[j] == LinkKind::Tcp && !same_host[j]);
        let ip = tcp::listen_ip(cfg, remote)?;
        let l = tcp::listen(ip)?;
        let addr = l
            .local_addr()
            .map_err(|e| Error::io(format!("rank {rank}: address of the TCP listener"), e))?;
        p.blob.tcp_addr = Some(addr.to_string());
        p.listener = Some(l);
    }
    Ok(p)
}

fn exchange(boot: &mut dyn Bootstrap, blob: &SetupBlob) -> Result<Vec<SetupBlob>> {
    let bytes = serde_json::to_vec(blob)
        .map_err(|e| Error::Bootstrap(format!("encoding link setup data: {e}")))?;
    boot.all_gather(&bytes)?
        .iter()
        .enumerate()
        .map(|(r, b)| {
            serde_json::from_slice(b).map_err(|e| {
                Error::Bootstrap(format!("link setup data from rank {r} is unreadable: {e}"))
            })
        })
        .collect()
}

/// Fails when some other rank reported an error in the step just exchanged.
fn others_ok(infos: &[SetupBlob], rank: usize, what: &str) -> Result<()> {
    let failed: Vec<String> = infos
        .iter()
        .enumerate()
        .filter(|(r, _)| *r != rank)
        .filter_map(|(r, b)| b.error.as_ref().map(|e| format!("rank {r}: {e}")))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Bootstrap(format!(
            "{} rank(s) could not {what}; {}",
            failed.len(),
            failed.join("; ")
        )))
    }
}

/// Both ends of a TCP link must cut messages into the same stripes over the same number
/// of sockets, or the bytes would be reassembled in the wrong order.
fn check_striping(infos: &[SetupBlob], kinds: &[LinkKind], rank: usize) -> Result<()> {
    if !kinds
        .iter()
        .enumerate()
        .any(|(j, k)| j != rank && *k == LinkKind::Tcp)
    {
        return Ok(());
    }
    let mine = (infos[rank].nsocks, infos[rank].stripe);
    let differ: BTreeSet<usize> = infos
        .iter()
        .enumerate()
        .filter(|(_, b)| (b.nsocks, b.stripe) != mine)
        .map(|(r, _)| r)
        .collect();
    match differ.first() {
        None => Ok(()),
        Some(&r) => Err(Error::Bootstrap(format!(
            "rank {rank} stripes TCP messages over {} sockets in {} byte pieces but rank {r} \
             uses {} sockets and {} bytes; set HETCCL_NSOCKS_PERPEER and HETCCL_CHUNK_BYTES \
             alike on every rank",
            mine.0, mine.1, infos[r].nsocks, infos[r].stripe
        ))),
    }
}

/// Counts the bytes each thread allocates, so property tests can bound what a parser
/// allocates for input it does not trust (the library's unit tests only).
#[cfg(test)]
pub(crate) mod alloc_meter {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static ALLOCATED: Cell<usize> = const { Cell::new(0) };
    }

    fn add(bytes: usize) {
        // `try_with`: a thread being torn down may still free and allocate.
        let _ = ALLOCATED.try_with(|a| a.set(a.get().saturating_add(bytes)));
    }

    struct Meter;

    // SAFETY: every call is forwarded to the system allocator unchanged; the count is a
    // const-initialised thread-local without a destructor, which never allocates.
    unsafe impl GlobalAlloc for Meter {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            add(layout.size());
            // SAFETY: the caller's contract, forwarded.
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            add(layout.size());
            // SAFETY: the caller's contract, forwarded.
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: the caller's contract, forwarded.
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            add(new_size.saturating_sub(layout.size()));
            // SAFETY: the caller's contract, forwarded.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static METER: Meter = Meter;

    /// Runs `f` and returns what it returned and how many bytes this thread allocated
    /// meanwhile (growth of reallocations included, frees not subtracted).
    pub(crate) fn allocated_by<R>(f: impl FnOnce() -> R) -> (R, usize) {
        let before = ALLOCATED.with(Cell::get);
        let r = f();
        (r, ALLOCATED.with(Cell::get) - before)
    }
}

/// Shared by the transport tests: a bootstrap over threads, a checking sink, and a
/// driver that moves messages both ways at once like the executor does.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    /// Message sizes every transport must carry intact.
    pub(crate) const STANDARD_SIZES: [usize; 6] = [0, 1, 63, 64, 1000, 5_000_003];

    /// A header whose every field is distinct, so a mix-up shows.
    pub(crate) fn header(seq: u64, bytes: usize) -> MsgHeader {
        MsgHeader {
            magic: MSG_MAGIC,
            op: 3,
            dtype: 7,
            redop: 1,
            flags: 0x5a,
            seq,
            count: bytes as u64 / 4 + 11,
            bytes: bytes as u64,
        }
    }

    /// Deterministic bytes (xorshift64), different for every seed.
    pub(crate) fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Collects one message and checks the piece rules of [`RecvSink`]. With `direct`
    /// set it also offers its buffer through [`RecvSink::direct_dst`].
    #[derive(Default)]
    pub(crate) struct VecSink {
        pub(crate) header: Option<MsgHeader>,
        pub(crate) data: Vec<u8>,
        pub(crate) pieces: usize,
        pub(crate) direct: bool,
    }

    impl RecvSink for VecSink {
        fn header(&mut self, h: &MsgHeader) -> Result<()> {
            self.header = Some(*h);
            self.data.clear();
            if self.direct {
                self.data.resize(h.bytes as usize, 0);
            }
            self.pieces = 0;
            Ok(())
        }

        fn direct_dst(&mut self) -> Option<DirectDst> {
            let p = std::ptr::NonNull::new(self.data.as_mut_ptr())?;
            // SAFETY: the vector is neither read nor resized until the receive is over.
            self.direct
                .then(|| unsafe { DirectDst::new(p, self.data.len()) })
        }

        fn data(&mut self, offset: usize, bytes: &[u8]) -> Result<()> {
            if self.direct {
                // A link that does not write directly still delivers in order.
                self.data[offset..offset + bytes.len()].copy_from_slice(bytes);
                self.pieces += 1;
                return Ok(());
            }
            assert_eq!(
                offset,
                self.data.len(),
                "pieces arrive in order, back to back"
            );
            assert_eq!(
                offset % 64,
                0,
                "piece offset {offset} is not a multiple of 64"
            );
            assert_eq!(
                bytes.as_ptr() as usize % 64,
                0,
                "piece is not 64-byte aligned"
            );
            assert!(!bytes.is_empty(), "empty piece");
            self.data.extend_from_slice(bytes);
            self.pieces += 1;
            Ok(())
        }
    }

    /// Repeats `f` until it returns true or fails; panics after 30 s (a hang guard).
    pub(crate) fn poll_until(mut f: impl FnMut() -> Result<bool>) -> Result<bool> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if f()? {
                return Ok(true);
            }
            assert!(Instant::now() < deadline, "no progress in 30 s");
            std::thread::yield_now();
        }
    }

    /// `a` and `b` each send one message of every size in `sizes` while receiving the
    /// other's, each driven by one thread that alternates send and receive polls.
    pub(crate) fn duplex(a: &mut dyn Link, b: &mut dyn Link, sizes: &[usize]) {
        duplex_with(a, b, sizes, false);
    }

    /// [`duplex`] with sinks that offer direct destinations when `direct` is set;
    /// returns how many pieces each side's sinks received through `data`.
    pub(crate) fn duplex_with(
        a: &mut dyn Link,
        b: &mut dyn Link,
        sizes: &[usize],
        direct: bool,
    ) -> (usize, usize) {
        std::thread::scope(|s| {
            let ta = s.spawn(|| drive(a, sizes, 1, 2, direct));
            let tb = s.spawn(|| drive(b, sizes, 2, 1, direct));
            (ta.join().unwrap(), tb.join().unwrap())
        })
    }

    fn drive(l: &mut dyn Link, sizes: &[usize], me: u64, other: u64, direct: bool) -> usize {
        let out: Vec<(MsgHeader, Vec<u8>)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (header(i as u64, n), pattern(n, me * 1000 + i as u64)))
            .collect();
        let (mut sent, mut got, mut pieces) = (0, 0, 0);
        let fresh = || VecSink {
            direct,
            ..VecSink::default()
        };
        let mut sink = fresh();
        let deadline = Instant::now() + Duration::from_secs(60);
        while sent < out.len() || got < sizes.len() {
            let mut progress = false;
            if sent < out.len() && l.poll_send(&out[sent].0, &out[sent].1).unwrap() {
                sent += 1;
                progress = true;
            }
            if got < sizes.len() && l.poll_recv(&mut sink).unwrap() {
                let n = sizes[got];
                assert_eq!(
                    sink.header,
                    Some(header(got as u64, n)),
                    "header of message {got}"
                );
                assert_eq!(sink.data.len(), n, "length of message {got}");
                assert!(
                    sink.data == pattern(n, other * 1000 + got as u64),
                    "bytes of message {got}"
                );
                pieces += sink.pieces;
                sink = fresh();
                got += 1;
                progress = true;
            }
            if !progress {
                assert!(
                    Instant::now() < deadline,
                    "stuck: sent {sent}, received {got}"
                );
                std::thread::yield_now();
            }
        }
        pieces
    }

    /// A [`Bootstrap`] among threads of this process.
    pub(crate) struct ThreadBoot {
        rank: usize,
        world: usize,
        shared: Arc<(Mutex<BootState>, Condvar)>,
    }

    struct BootState {
        round: u64,
        arrived: usize,
        slots: Vec<Vec<u8>>,
        result: Vec<Vec<u8>>,
    }

    /// One bootstrap per rank of a `world`-rank job.
    pub(crate) fn thread_boots(world: usize) -> Vec<ThreadBoot> {
        let shared = Arc::new((
            Mutex::new(BootState {
                round: 0,
                arrived: 0,
                slots: vec![Vec::new(); world],
                result: Vec::new(),
            }),
            Condvar::new(),
        ));
        (0..world)
            .map(|rank| ThreadBoot {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect()
    }

    impl Bootstrap for ThreadBoot {
        fn rank(&self) -> usize {
            self.rank
        }

        fn world_size(&self) -> usize {
            self.world
        }

        fn all_gather(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
            let (m, cv) = &*self.shared;
            let mut st = m.lock().unwrap();
            st.slots[self.rank] = data.to_vec();
            st.arrived += 1;
            if st.arrived == self.world {
                st.result = std::mem::replace(&mut st.slots, vec![Vec::new(); self.world]);
                st.arrived = 0;
                st.round += 1;
                cv.notify_all();
                return Ok(st.result.clone());
            }
            let round = st.round;
            while st.round == round {
                let (g, t) = cv.wait_timeout(st, Duration::from_secs(60)).unwrap();
                st = g;
                assert!(!t.timed_out() || st.round != round, "all_gather hung");
            }
            Ok(st.result.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::alloc_meter::allocated_by;
    use super::testing::*;
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    proptest! {
        /// Headers come from another process: any bytes decode to a frame or to an
        /// error that names the problem, without a panic and without allocating for a
        /// frame.
        #[test]
        fn any_bytes_decode_to_a_frame_or_a_named_problem(
            bytes in prop::collection::vec(any::<u8>(), 0..80)
        ) {
            let (r, allocated) = allocated_by(|| MsgHeader::decode(&bytes));
            match r {
                Ok(Frame::Message(h)) => {
                    prop_assert_eq!(bytemuck::bytes_of(&h), &bytes[..]);
                    prop_assert_eq!(h.magic, MSG_MAGIC);
                    prop_assert_eq!(allocated, 0);
                }
                Ok(Frame::Abort(cause)) => {
                    let h: MsgHeader = bytemuck::pod_read_unaligned(&bytes);
                    prop_assert_eq!(h.magic, ABORT_MAGIC);
                    prop_assert_eq!(cause, AbortCause::from_word(h.seq));
                    prop_assert_eq!(allocated, 0);
                }
                Err(e) if bytes.len() != HEADER_BYTES => {
                    prop_assert_eq!(
                        e,
                        format!("a message header is 32 bytes, this one {}", bytes.len())
                    );
                    prop_assert!(allocated < 256, "{} bytes for an error", allocated);
                }
                Err(e) => {
                    let magic = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                    prop_assert!(e.starts_with(&format!("header magic {magic:#010x} is neither")), "{}", e);
                    prop_assert!(allocated < 256, "{} bytes for an error", allocated);
                }
            }
        }

        /// A valid header with some bytes changed: only a changed magic is refused (the
        /// receiver compares the other fields with what it expects).
        #[test]
        fn mutated_headers_are_refused_only_for_their_magic(
            seq in any::<u64>(),
            len in 0usize..1 << 30,
            flips in prop::collection::vec((0usize..HEADER_BYTES, 1u8..=255), 1..4)
        ) {
            let mut bytes = bytemuck::bytes_of(&testing::header(seq, len)).to_vec();
            for (at, x) in flips {
                bytes[at] ^= x;
            }
            let magic = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            match MsgHeader::decode(&bytes) {
                Ok(Frame::Message(h)) => {
                    prop_assert_eq!(magic, MSG_MAGIC);
                    prop_assert_eq!(bytemuck::bytes_of(&h), &bytes[..]);
                }
                Ok(Frame::Abort(_)) => prop_assert_eq!(magic, ABORT_MAGIC),
                Err(e) => {
                    prop_assert!(magic != MSG_MAGIC && magic != ABORT_MAGIC);
                    prop_assert!(e.contains("header magic"), "{}", e);
                }
            }
        }
    }

    fn cfg(nsocks: usize) -> Config {
        Config {
            socket_ifname: Some("lo".into()),
            nsocks_per_peer: nsocks,
            connect_timeout: Duration::from_secs(20),
            ..Config::default()
        }
    }

    /// Runs `f(rank, boot)` on one thread per rank.
    fn run<T: Send>(
        boots: Vec<impl Bootstrap + 'static>,
        f: impl Fn(usize, &mut dyn Bootstrap) -> T + Sync,
    ) -> Vec<T> {
        std::thread::scope(|s| {
            let hs: Vec<_> = boots
                .into_iter()
                .enumerate()
                .map(|(r, mut b)| {
                    let f = &f;
                    s.spawn(move || f(r, &mut b))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Every rank sends `bytes(src, dst)` to every other rank while receiving from all.
    fn all_to_all(rank: usize, links: &mut [Option<Box<dyn Link>>]) {
        let world = links.len();
        let n = |src: usize, dst: usize| 1000 + 70_001 * src + 1_003 * dst;
        let out: Vec<Vec<u8>> = (0..world)
            .map(|d| pattern(n(rank, d), (rank * 100 + d) as u64))
            .collect();
        let mut sent = vec![false; world];
        let mut got = vec![false; world];
        sent[rank] = true;
        got[rank] = true;
        let mut sinks: Vec<VecSink> = (0..world).map(|_| VecSink::default()).collect();
        while !(sent.iter().all(|x| *x) && got.iter().all(|x| *x)) {
            for p in (0..world).filter(|&p| p != rank) {
                let l = links[p].as_mut().unwrap();
                if !sent[p] {
                    sent[p] = l
                        .poll_send(&header(rank as u64, out[p].len()), &out[p])
                        .unwrap();
                }
                if !got[p] && l.poll_recv(&mut sinks[p]).unwrap() {
                    got[p] = true;
                    assert_eq!(sinks[p].header, Some(header(p as u64, n(p, rank))));
                    assert!(sinks[p].data == pattern(n(p, rank), (p * 100 + rank) as u64));
                }
            }
            std::thread::yield_now();
        }
    }

    fn leftover_segments(job: &str) -> Vec<String> {
        std::fs::read_dir("/dev/shm")
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("hetccl-{job}-")))
            .collect()
    }

    #[test]
    fn two_hosts_of_two_ranks_get_shm_inside_and_tcp_across() {
        let job = format!("mesh{}", std::process::id());
        let auth = JobAuth::new(&job, "k");
        let host = |r: usize| r / 2;
        let kinds = run(thread_boots(4), |rank, boot| {
            let same: Vec<bool> = (0..4).map(|j| host(j) == host(rank)).collect();
            let mut links = connect_all(&cfg(2), boot, &auth, &same, false).unwrap();
            let kinds: Vec<Option<LinkKind>> =
                links.iter().map(|l| l.as_ref().map(|l| l.kind())).collect();
            for (p, l) in links.iter().enumerate() {
                assert_eq!(l.as_ref().map(|l| l.peer()), (p != rank).then_some(p));
            }
            all_to_all(rank, &mut links);
            kinds
        });
        use LinkKind::{Shm, Tcp};
        assert_eq!(kinds[0], vec![None, Some(Shm), Some(Tcp), Some(Tcp)]);
        assert_eq!(kinds[3], vec![Some(Tcp), Some(Tcp), Some(Shm), None]);
        assert_eq!(leftover_segments(&job), Vec::<String>::new());
    }

    #[test]
    fn shm_disabled_means_tcp_everywhere() {
        let auth = JobAuth::new("nosh", "k");
        let kinds = run(thread_boots(3), |rank, boot| {
            let c = Config {
                shm_disable: true,
                ..cfg(4)
            };
            let mut links = connect_all(&c, boot, &auth, &[true; 3], false).unwrap();
            all_to_all(rank, &mut links);
            links.iter().flatten().map(|l| l.kind()).collect::<Vec<_>>()
        });
        assert!(kinds.iter().all(|k| k == &vec![LinkKind::Tcp; 2]));
    }

    /// Forwards to a [`ThreadBoot`] and, after the first exchange, lets a stranger write
    /// garbage to this rank's listener before any peer has connected.
    struct StrangerBoot(ThreadBoot, bool);

    impl Bootstrap for StrangerBoot {
        fn rank(&self) -> usize {
            self.0.rank()
        }
        fn world_size(&self) -> usize {
            self.0.world_size()
        }
        fn all_gather(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
            let all = self.0.all_gather(data)?;
            if !self.1 {
                self.1 = true;
                let blob: SetupBlob = serde_json::from_slice(&all[self.rank()]).unwrap();
                let addr: SocketAddr = blob.tcp_addr.unwrap().parse().unwrap();
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                std::io::Write::write_all(&mut s, b"GET / HTTP/1.0\r\n\r\n").unwrap();
                std::mem::forget(s);
            }
            Ok(all)
        }
    }

    #[test]
    fn stranger_during_setup_is_refused_and_setup_completes() {
        let auth = JobAuth::new("strange", "k");
        let boots: Vec<StrangerBoot> = thread_boots(3)
            .into_iter()
            .map(|b| {
                let skip = b.rank() != 0;
                StrangerBoot(b, skip)
            })
            .collect();
        run(boots, |rank, boot| {
            let mut links = connect_all(&cfg(2), boot, &auth, &[false; 3], false).unwrap();
            all_to_all(rank, &mut links);
        });
    }

    #[test]
    fn ranks_that_disagree_on_striping_all_fail() {
        let auth = JobAuth::new("stripes", "k");
        let errs = run(thread_boots(2), |rank, boot| {
            let c = cfg(1 + rank);
            connect_all(&c, boot, &auth, &[false; 2], false)
                .err()
                .unwrap()
                .to_string()
        });
        assert!(
            errs[0].starts_with("bootstrap: rank 0 stripes TCP messages over 1 sockets"),
            "{}",
            errs[0]
        );
        assert!(
            errs[1].starts_with("bootstrap: rank 1 stripes TCP messages over 2 sockets"),
            "{}",
            errs[1]
        );
    }

    #[test]
    fn one_rank_failing_fails_every_rank() {
        let auth = JobAuth::new("fail", "k");
        let errs = run(thread_boots(2), |rank, boot| {
            let mut c = cfg(1);
            if rank == 0 {
                c.socket_ifname = Some("nosuchif0".into());
            }
            connect_all(&c, boot, &auth, &[false; 2], false)
                .err()
                .unwrap()
                .to_string()
        });
        assert!(
            errs[0].starts_with("invalid value \"nosuchif0\" for HETCCL_SOCKET_IFNAME"),
            "{}",
            errs[0]
        );
        assert!(
            errs[1].starts_with(
                "bootstrap: 1 rank(s) could not prepare its links; rank 0: invalid value"
            ),
            "{}",
            errs[1]
        );
    }
}
