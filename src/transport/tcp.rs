//! TCP link between hosts: `K` sockets per peer (`HETCCL_NSOCKS_PERPEER`), messages
//! striped across them, since one TCP stream is bound by one core and one congestion
//! window.
//!
//! Wire format of one message of `len` bytes, stripe size `S` (a multiple of 64 that
//! both ends agree on):
//!
//! ```text
//! socket 0:  MsgHeader (32 bytes, native byte order), stripe 0, stripe K,   stripe 2K, ...
//! socket k:                                           stripe k, stripe K+k, ...
//! stripe g = payload bytes [g*S, min((g+1)*S, len))
//! ```
//!
//! Each socket carries its own stripes in order, so the receiver knows from the header
//! alone which bytes come next on which socket: no per-stripe framing. Sockets move
//! independently (a slow one does not stop the others) up to the receiver's staging:
//! one stripe per socket, delivered to the sink strictly in stripe order. Memory per
//! link is therefore `K * S` whatever the message size.
//!
//! Sockets are non-blocking; sends use `sendmsg(MSG_NOSIGNAL)` so a dead peer gives
//! `EPIPE` rather than killing the process with `SIGPIPE`. End of stream or a reset is
//! reported as [`Error::Link`] with `lost: true`.
//!
//! Abort: a side that gives up sends, when no message of its own is half sent, an abort
//! notice on socket 0 where the next header would go (a header-sized record with
//! [`super::ABORT_MAGIC`] and the cause, see [`MsgHeader::decode`]), then shuts every
//! socket down. The other side reads it like a header, or looks for it once the
//! connection closes, and so can tell a peer that gave up on another rank from one that
//! died. In the middle of a message there is no place for it: the peer sees the
//! connection close without a reason.
//!
//! Setup: the lower rank of a pair listens, the higher one connects `K` sockets; every
//! connection opens with [`JobAuth`]'s handshake (rank = connector's rank, channel =
//! socket index). The listener admits connections in their handshake by the store's rule
//! ([`Admission`]: a budget, a deadline, the oldest without a hello shed first) and runs
//! their handshakes on at most that many threads; a connector whose handshake is dropped
//! tries again until the setup deadline. See [`accept_links`] and [`connect_link`].

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::{AlignedBuf, DirectDst, Frame, Link, LinkKind, MsgHeader, RecvSink, HEADER_BYTES};
use crate::bootstrap::admission::{Admission, Ticket, PRE_AUTH_CONNECTIONS};
use crate::bootstrap::auth::{HandshakeFailure, JobAuth, Peer, Refusal, RefusalLog};
use crate::bootstrap::netif::{interface_ipv4, ipv4_interfaces};
use crate::bootstrap::Liveness;
use crate::config::{Config, TcpCongestion};
use crate::error::{AbortCause, Error, Result};

/// Iovecs per `sendmsg` call.
const MAX_IOV: usize = 8;
/// Longest a connection to a link listener may take to finish its handshake, from its
/// accept. A rank needs a few round trips; one whose handshake is cut connects again.
pub const LISTEN_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one try of a connector's handshake. Longer than the listener's deadline, which
/// starts only at the accept (a listener may not accept yet when the connection is made).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often link setup asks the bootstrap whether a rank is gone while it waits.
const LIVENESS_EVERY: Duration = Duration::from_millis(250);
/// Requested `SO_SNDBUF`/`SO_RCVBUF`. Setting a size turns off Linux's buffer
/// autotuning and is capped at `net.core.{w,r}mem_max`, so it is only set where that cap
/// allows the full size (otherwise autotuning does better than a capped value).
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Stripe size for `cfg`: a pipeline chunk split over the sockets, so one chunk keeps
/// every socket busy; a multiple of 64 from 16 KiB to 512 KiB. Must be equal on both
/// ends of a link.
pub fn stripe_bytes(cfg: &Config) -> usize {
    let k = cfg.nsocks_per_peer.max(1);
    (cfg.chunk_bytes / k / 64 * 64).clamp(16 << 10, 512 << 10)
}

/// Outgoing message progress.
struct TxState {
    active: bool,
    len: usize,
    header: [u8; HEADER_BYTES],
    /// Bytes of socket k's share (header included for socket 0) written so far.
    pos: Vec<usize>,
    /// Size of socket k's share.
    end: Vec<usize>,
}

/// Incoming message progress.
struct RxState {
    header: [u8; HEADER_BYTES],
    header_got: usize,
    active: bool,
    len: usize,
    nstripes: usize,
    /// Next stripe to hand to the sink.
    next: usize,
    /// Where the sink wants the payload written directly (no staging, no `data` calls).
    direct: Option<DirectDst>,
    socks: Vec<RxSock>,
}

/// Staging for the stripe a socket is reading.
struct RxSock {
    buf: AlignedBuf,
    fill: usize,
    stripe: Option<usize>,
}

/// A TCP [`Link`] over `K` sockets.
pub struct TcpLink {
    rank: usize,
    peer: usize,
    socks: Vec<TcpStream>,
    remote: String,
    stripe: usize,
    aborted: bool,
    /// The peer's abort notice, once read (`Some(None)`: it sent one with no cause this
    /// build understands).
    notice: Option<Option<AbortCause>>,
    tx: TxState,
    rx: RxState,
    /// Connection attempts and handshakes setup had to repeat (connector side).
    retries: u64,
}

fn stripe_len(len: usize, s: usize, g: usize) -> usize {
    (len - g * s).min(s)
}

/// Payload bytes socket `k` of `nsocks` carries for a message of `len` bytes.
fn sock_share(len: usize, s: usize, k: usize, nsocks: usize) -> usize {
    let n = len.div_ceil(s);
    if n <= k {
        return 0;
    }
    let count = (n - k).div_ceil(nsocks);
    let mut bytes = count * s;
    if (n - 1) % nsocks == k {
        bytes -= n * s - len;
    }
    bytes
}

impl TcpLink {
    /// A link over already connected (and authenticated) sockets; socket `k` must be
    /// the peer's socket `k`. Sets them non-blocking with `TCP_NODELAY`.
    pub fn new(rank: usize, peer: usize, socks: Vec<TcpStream>, stripe: usize) -> Result<TcpLink> {
        if socks.is_empty() || stripe == 0 || stripe % 64 != 0 {
            return Err(Error::invalid(
                "TcpLink::new",
                format!(
                    "{} sockets, stripe {stripe}: need at least one socket and a stripe that \
                     is a positive multiple of 64",
                    socks.len()
                ),
            ));
        }
        for s in &socks {
            s.set_nodelay(true)
                .and_then(|_| s.set_nonblocking(true))
                .map_err(|e| {
                    Error::io(format!("rank {rank}: configuring socket to rank {peer}"), e)
                })?;
            tune_buffers(s.as_raw_fd());
        }
        let remote = socks[0]
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "<unknown>".into());
        let k = socks.len();
        Ok(TcpLink {
            rank,
            peer,
            remote,
            stripe,
            aborted: false,
            notice: None,
            retries: 0,
            tx: TxState {
                active: false,
                len: 0,
                header: [0; HEADER_BYTES],
                pos: vec![0; k],
                end: vec![0; k],
            },
            rx: RxState {
                header: [0; HEADER_BYTES],
                header_got: 0,
                active: false,
                len: 0,
                nstripes: 0,
                next: 0,
                direct: None,
                socks: (0..k)
                    .map(|_| RxSock {
                        buf: AlignedBuf::zeroed(stripe),
                        fill: 0,
                        stripe: None,
                    })
                    .collect(),
            },
            socks,
        })
    }

    /// Sets the congestion control of every socket of the link ([`TcpCongestion`]).
    pub fn set_congestion(&self, want: &TcpCongestion) -> Result<()> {
        let (name, required) = match want {
            TcpCongestion::System => return Ok(()),
            TcpCongestion::Auto => ("cubic", false),
            TcpCongestion::Named(n) => (n.as_str(), true),
        };
        for s in &self.socks {
            let Err(e) = set_congestion(s, name) else {
                continue;
            };
            if !required {
                tracing::debug!(
                    rank = self.rank,
                    peer = self.peer,
                    "keeping the system's TCP congestion control ({name}: {e})"
                );
                return Ok(());
            }
            let known = |f: &str| {
                std::fs::read_to_string(format!("/proc/sys/net/ipv4/{f}"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "unknown".into())
            };
            return Err(Error::Config {
                var: "HETCCL_TCP_CONGESTION".into(),
                value: name.into(),
                accepted: format!(
                    "an algorithm the kernel offers to this process (the socket refused it: {e}; \
                     available: {}; allowed without privileges: {})",
                    known("tcp_available_congestion_control"),
                    known("tcp_allowed_congestion_control")
                ),
            });
        }
        Ok(())
    }

    /// `ip:port` of the peer's end of socket 0.
    pub fn remote_addr(&self) -> &str {
        &self.remote
    }

    /// Sockets per link.
    pub fn nsocks(&self) -> usize {
        self.socks.len()
    }

    fn check_not_aborted(&self) -> Result<()> {
        if self.aborted {
            return Err(Error::Link {
                peer: self.peer,
                detail: format!("rank {} aborted this TCP link earlier", self.rank),
                lost: false,
            });
        }
        Ok(())
    }

    fn closed(&self, k: usize) -> Error {
        Error::Link {
            peer: self.peer,
            detail: format!(
                "peer {} closed the connection (socket {k} of {}, {}) without saying why: \
                 its process ended, or it gave up in the middle of a message",
                self.peer,
                self.socks.len(),
                self.remote
            ),
            lost: true,
        }
    }

    /// The error once the peer's abort notice has been read.
    fn gave_up(&self) -> Error {
        Error::Link {
            peer: self.peer,
            detail: format!("peer {} aborted the TCP link", self.peer),
            lost: true,
        }
    }

    /// Reads what has arrived of the next header on socket 0, when no message is being
    /// received; true once the whole header is buffered (for `poll_recv` to parse). On
    /// an abort notice, records it and fails.
    fn read_header(&mut self) -> Result<bool> {
        if self.notice.is_some() {
            return Err(self.gave_up());
        }
        if self.rx.active {
            return Ok(false);
        }
        while self.rx.header_got < HEADER_BYTES {
            match (&self.socks[0]).read(&mut self.rx.header[self.rx.header_got..]) {
                Ok(0) => return Err(self.closed(0)),
                Ok(n) => self.rx.header_got += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.failed(0, "receiving", e)),
            }
        }
        if let Ok(Frame::Abort(cause)) = MsgHeader::decode(&self.rx.header) {
            self.notice = Some(cause);
            return Err(self.gave_up());
        }
        Ok(true)
    }

    /// An error on an established socket: the connection is unusable either way.
    fn failed(&self, k: usize, what: &str, e: std::io::Error) -> Error {
        Error::Link {
            peer: self.peer,
            detail: format!(
                "{what} on socket {k} of {} to peer {} ({}): {e}",
                self.socks.len(),
                self.peer,
                self.remote
            ),
            lost: true,
        }
    }

    /// Iovecs for socket `k`'s share from position `pos`: the rest of the header (socket
    /// 0), then the following stripes. Returns how many entries are filled.
    fn fill_iov(
        &self,
        k: usize,
        pos: usize,
        data: &[u8],
        iov: &mut [libc::iovec; MAX_IOV],
    ) -> usize {
        let nsocks = self.socks.len();
        let s = self.stripe;
        let hdr = if k == 0 { HEADER_BYTES } else { 0 };
        let mut cnt = 0;
        if pos < hdr {
            iov[0] = libc::iovec {
                iov_base: self.tx.header[pos..].as_ptr() as *mut libc::c_void,
                iov_len: hdr - pos,
            };
            cnt = 1;
        }
        let mut q = pos.max(hdr) - hdr;
        let share = self.tx.end[k] - hdr;
        while cnt < MAX_IOV && q < share {
            let g = k + (q / s) * nsocks;
            let within = q % s;
            let off = g * s + within;
            let n = stripe_len(self.tx.len, s, g) - within;
            iov[cnt] = libc::iovec {
                iov_base: data[off..off + n].as_ptr() as *mut libc::c_void,
                iov_len: n,
            };
            cnt += 1;
            q += n;
        }
        cnt
    }
}

impl Link for TcpLink {
    fn peer(&self) -> usize {
        self.peer
    }

    fn kind(&self) -> LinkKind {
        LinkKind::Tcp
    }

    fn poll_send(&mut self, header: &MsgHeader, data: &[u8]) -> Result<bool> {
        self.check_not_aborted()?;
        let nsocks = self.socks.len();
        if !self.tx.active {
            if header.bytes != data.len() as u64 {
                return Err(Error::invalid(
                    "poll_send",
                    format!(
                        "header says {} bytes, payload has {}",
                        header.bytes,
                        data.len()
                    ),
                ));
            }
            self.tx.header.copy_from_slice(bytemuck::bytes_of(header));
            self.tx.len = data.len();
            for k in 0..nsocks {
                self.tx.pos[k] = 0;
                self.tx.end[k] = sock_share(data.len(), self.stripe, k, nsocks)
                    + if k == 0 { HEADER_BYTES } else { 0 };
            }
            self.tx.active = true;
        } else if data.len() != self.tx.len {
            return Err(Error::invalid(
                "poll_send",
                format!(
                    "payload changed from {} to {} bytes while the message was in flight",
                    self.tx.len,
                    data.len()
                ),
            ));
        }
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOV];
        let mut done = true;
        for k in 0..nsocks {
            while self.tx.pos[k] < self.tx.end[k] {
                let cnt = self.fill_iov(k, self.tx.pos[k], data, &mut iov);
                let want: usize = iov[..cnt].iter().map(|v| v.iov_len).sum();
                // SAFETY: msghdr is plain data; zeroed is a valid empty header.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = iov.as_mut_ptr();
                msg.msg_iovlen = cnt as _;
                // SAFETY: the iovecs point into `self.tx.header` and `data`, both alive
                // and unmodified for the duration of the call.
                let r = unsafe {
                    libc::sendmsg(
                        self.socks[k].as_raw_fd(),
                        &msg,
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                };
                if r < 0 {
                    let e = std::io::Error::last_os_error();
                    match e.kind() {
                        ErrorKind::WouldBlock => break,
                        ErrorKind::Interrupted => continue,
                        _ => return Err(self.failed(k, "sending", e)),
                    }
                }
                self.tx.pos[k] += r as usize;
                if (r as usize) < want {
                    // The socket buffer is full; the next call would say EAGAIN.
                    break;
                }
            }
            done &= self.tx.pos[k] == self.tx.end[k];
        }
        if done {
            self.tx.active = false;
        }
        Ok(done)
    }

    fn poll_recv(&mut self, sink: &mut dyn RecvSink) -> Result<bool> {
        self.check_not_aborted()?;
        let nsocks = self.socks.len();
        let s = self.stripe;
        if !self.rx.active {
            if !self.read_header()? {
                return Ok(false);
            }
            self.rx.header_got = 0;
            let h = match MsgHeader::decode(&self.rx.header) {
                Ok(Frame::Message(h)) => h,
                // `read_header` took notices already.
                Ok(Frame::Abort(_)) => return Err(self.gave_up()),
                Err(e) => {
                    return Err(Error::Link {
                        peer: self.peer,
                        detail: format!("stream from peer {} is out of step: {e}", self.peer),
                        lost: false,
                    })
                }
            };
            sink.header(&h)?;
            self.rx.len = h.bytes as usize;
            self.rx.nstripes = self.rx.len.div_ceil(s);
            self.rx.next = 0;
            for (k, rs) in self.rx.socks.iter_mut().enumerate() {
                rs.fill = 0;
                rs.stripe = (k < self.rx.nstripes).then_some(k);
            }
            if self.rx.len == 0 {
                return Ok(true);
            }
            self.rx.direct = sink.direct_dst().filter(|d| d.len() == self.rx.len);
            self.rx.active = true;
        }
        loop {
            let mut progress = false;
            for k in 0..nsocks {
                let rs = &mut self.rx.socks[k];
                let Some(g) = rs.stripe else { continue };
                let want = stripe_len(self.rx.len, s, g);
                if rs.fill == want {
                    continue;
                }
                let into = match self.rx.direct {
                    // SAFETY: the sink handed this destination out for the message in
                    // progress; stripes are disjoint and this is the only live slice.
                    Some(d) => unsafe { d.slice_mut(g * s + rs.fill..g * s + want) },
                    None => &mut rs.buf.as_mut_slice()[rs.fill..want],
                };
                match (&self.socks[k]).read(into) {
                    Ok(0) => return Err(self.closed(k)),
                    Ok(n) => {
                        rs.fill += n;
                        progress = true;
                    }
                    Err(e)
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                    Err(e) => return Err(self.failed(k, "receiving", e)),
                }
            }
            // Hand complete stripes over in order; a later stripe waits in its socket's
            // staging buffer until the ones before it are delivered.
            loop {
                let g = self.rx.next;
                let rs = &mut self.rx.socks[g % nsocks];
                if rs.stripe != Some(g) || rs.fill != stripe_len(self.rx.len, s, g) {
                    break;
                }
                if self.rx.direct.is_none() {
                    sink.data(g * s, &rs.buf.as_slice()[..rs.fill])?;
                }
                rs.fill = 0;
                rs.stripe = (g + nsocks < self.rx.nstripes).then_some(g + nsocks);
                self.rx.next += 1;
                progress = true;
            }
            if self.rx.next == self.rx.nstripes {
                self.rx.active = false;
                self.rx.direct = None;
                return Ok(true);
            }
            if !progress {
                return Ok(false);
            }
        }
    }

    fn check_peer(&mut self) -> Result<()> {
        self.check_not_aborted()?;
        // A notice waits where the next header would be: read what is there of it (a
        // real header stays buffered for `poll_recv`).
        match self.read_header() {
            Err(e @ Error::Link { .. }) if self.notice.is_some() => return Err(e),
            _ => {}
        }
        let mut b = [0u8; 1];
        // A peer that sent its last stripe and exited closes its sockets one by one,
        // while stripes on the others may still be in flight (slow links queue a lot):
        // only when every socket is at its end can nothing more arrive.
        let mut ended = None;
        let mut n_ended = 0;
        for (k, sock) in self.socks.iter().enumerate() {
            // A zero-byte peek means end of stream with nothing left to read.
            // SAFETY: a one-byte peek into a local buffer.
            let r = unsafe {
                libc::recv(
                    sock.as_raw_fd(),
                    b.as_mut_ptr().cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if r == 0 {
                ended.get_or_insert(k);
                n_ended += 1;
            }
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) {
                    return Err(self.failed(k, "checking", e));
                }
            }
        }
        match ended {
            Some(k) if n_ended == self.socks.len() => Err(self.closed(k)),
            _ => Ok(()),
        }
    }

    fn abort(&mut self, cause: AbortCause) {
        if !self.aborted && !self.tx.active {
            // Best effort and never blocking: a notice cut short by a full socket buffer
            // reads as a closed connection on the other side.
            let notice = MsgHeader::abort_notice(cause);
            let bytes = bytemuck::bytes_of(&notice);
            // SAFETY: a send of a local buffer of `bytes.len()` bytes on our socket.
            unsafe {
                libc::send(
                    self.socks[0].as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
        }
        self.aborted = true;
        for s in &self.socks {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn abort_notice(&mut self) -> Option<AbortCause> {
        if self.notice.is_none() {
            let _ = self.read_header();
        }
        self.notice.flatten()
    }

    /// Restarts each socket's congestion control from its initial state.
    ///
    /// The probe's short round trips teach the algorithm a tiny minimum RTT and low,
    /// app-limited delivery rates; BBR then paced every later message by them, and
    /// mid-sized all-reduces on loopback ran well below their speed without the probe
    /// until this reset (`docs/perf-log/2026-11-27-tcp-congestion-direct-receives.md`).
    fn setup_retries(&self) -> u64 {
        self.retries
    }

    fn end_probe(&mut self) {
        for s in &self.socks {
            let Some(name) = congestion(s) else { continue };
            // Setting the algorithm a socket already has is a no-op in Linux; going
            // through another one (reno is always there) re-initialises it.
            let other = if name == "reno" { "cubic" } else { "reno" };
            if set_congestion(s, other).is_ok() {
                let _ = set_congestion(s, &name);
            }
        }
    }

    /// Every socket, readable interest always; `want_write` for those with unsent bytes.
    fn wait_fds(&self, out: &mut Vec<(i32, bool)>) {
        for (k, s) in self.socks.iter().enumerate() {
            out.push((
                s.as_raw_fd(),
                self.tx.active && self.tx.pos[k] < self.tx.end[k],
            ));
        }
    }
}

/// Sets the socket's congestion control algorithm by name.
fn set_congestion(sock: &TcpStream, name: &str) -> std::io::Result<()> {
    // SAFETY: setsockopt with a byte string and its length on a socket we own.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The socket's congestion control algorithm.
fn congestion(sock: &TcpStream) -> Option<String> {
    let mut buf = [0u8; 16];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt into a buffer of `len` bytes on a socket we own.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return None;
    }
    let n = buf[..len as usize]
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(len as usize);
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Sets large socket buffers where the system lets them be large (see
/// [`SOCKET_BUFFER_BYTES`]).
fn tune_buffers(fd: i32) {
    static ALLOWED: OnceLock<(bool, bool)> = OnceLock::new();
    let (snd, rcv) = *ALLOWED.get_or_init(|| {
        let max = |p: &str| {
            std::fs::read_to_string(p)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .is_some_and(|m| m >= SOCKET_BUFFER_BYTES)
        };
        let allowed = (
            max("/proc/sys/net/core/wmem_max"),
            max("/proc/sys/net/core/rmem_max"),
        );
        if allowed != (true, true) {
            tracing::debug!(
                "net.core.wmem_max/rmem_max below {SOCKET_BUFFER_BYTES}: leaving TCP buffer \
                 sizes to kernel autotuning"
            );
        }
        allowed
    });
    let size = SOCKET_BUFFER_BYTES as libc::c_int;
    for (on, opt) in [(snd, libc::SO_SNDBUF), (rcv, libc::SO_RCVBUF)] {
        if on {
            // SAFETY: setsockopt with a c_int value on a socket we own.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
    }
}

/// The address other ranks will reach a store on this host at, when nothing names it:
/// `HETCCL_SOCKET_IFNAME`'s address, else the first interface that is up and not
/// loopback (ranks may be on other hosts), else loopback.
pub fn store_host(cfg: &Config) -> Result<String> {
    match listen_ip(cfg, true) {
        Ok(ip) => Ok(ip.to_string()),
        // Only a loopback interface: every rank must be on this host anyway.
        Err(Error::Bootstrap(_)) => Ok(Ipv4Addr::LOCALHOST.to_string()),
        Err(e) => Err(e),
    }
}

/// The address to listen on: `HETCCL_SOCKET_IFNAME`'s; loopback when every TCP peer is
/// on this host; else the local address of the route to `MASTER_ADDR` (the network the
/// bootstrap already uses); else the first interface that is up and not loopback.
pub fn listen_ip(cfg: &Config, remote_peers: bool) -> Result<IpAddr> {
    if let Some(name) = &cfg.socket_ifname {
        return interface_ipv4(name).map(IpAddr::V4);
    }
    if !remote_peers {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    if let Some(master) = &cfg.launch.master_addr {
        let port = cfg.launch.master_port.unwrap_or(1);
        let target = (master.as_str(), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.find(|a| a.is_ipv4() && !a.ip().is_loopback()));
        if let Some(target) = target {
            // Connecting a UDP socket sends nothing; it only picks the route.
            let local = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                .and_then(|u| u.connect(target).and_then(|_| u.local_addr()));
            if let Ok(a) = local {
                if !a.ip().is_unspecified() {
                    return Ok(a.ip());
                }
            }
        }
    }
    ipv4_interfaces()?
        .into_iter()
        .find(|(_, _, up, lo)| *up && !*lo)
        .map(|(_, ip, ..)| IpAddr::V4(ip))
        .ok_or_else(|| {
            Error::Bootstrap(
                "ranks on other hosts need a network address but no interface other than \
                 loopback is up; set HETCCL_SOCKET_IFNAME"
                    .into(),
            )
        })
}

/// A listener on `ip` with a free port. Accepted sockets inherit its buffer sizes.
pub fn listen(ip: IpAddr) -> Result<TcpListener> {
    let l = TcpListener::bind((ip, 0))
        .map_err(|e| Error::io(format!("binding a TCP listener on {ip}"), e))?;
    tune_buffers(l.as_raw_fd());
    Ok(l)
}

/// Accepts `nsocks` authenticated connections from each rank in `peers` (which connect
/// with [`connect_link`]) and returns their links, in the order of `peers`.
///
/// Connections in their handshake follow the store's admission rule ([`Admission`]): at
/// most [`PRE_AUTH_CONNECTIONS`] at once, each within [`LISTEN_HANDSHAKE_TIMEOUT`] of its
/// accept; one more sheds the oldest that has not sent a hello of this job, and a shed rank
/// connects again. The handshakes run on at most as many threads (`hetccl-accept`),
/// started as connections need them and each taking the next connection when its
/// handshake ends, so a flood of idle or slow strangers costs a bounded number of threads
/// and descriptors, not one of each per connection. Connections that fail the handshake
/// (strangers, other jobs, wrong key) or that claim an unexpected rank or socket are
/// logged (rate-limited, sheds included) and dropped, and accepting goes on. On return,
/// connections still in their handshake are shed, so the threads end at once. Fails at
/// `deadline`, naming the ranks still missing, or as soon as `live` says a rank is gone.
#[allow(clippy::too_many_arguments)]
pub fn accept_links(
    listener: &TcpListener,
    auth: &JobAuth,
    rank: usize,
    peers: &[usize],
    nsocks: usize,
    stripe: usize,
    deadline: Instant,
    live: Option<&dyn Liveness>,
) -> Result<Vec<TcpLink>> {
    if peers.is_empty() {
        return Ok(Vec::new());
    }
    let here = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "<unknown>".into());
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io(format!("rank {rank}: configuring the TCP listener"), e))?;
    let mut slots: BTreeMap<usize, Vec<Option<TcpStream>>> = peers
        .iter()
        .map(|&p| (p, (0..nsocks).map(|_| None).collect()))
        .collect();
    let mut missing = peers.len() * nsocks;
    let (tx, rx) = mpsc::channel::<Handshaken>();
    let refusals = RefusalLog::new(format!("rank {rank}: listener {here}"));
    let handshakes = Handshakes::new(auth.clone(), deadline, tx);
    let mut asked = Instant::now();
    while missing > 0 {
        while let Ok((res, stream, from)) = rx.try_recv() {
            let p = match res {
                Ok(p) => p,
                Err(e) => {
                    refusals.refused(&e);
                    continue;
                }
            };
            match slots
                .get_mut(&(p.rank as usize))
                .and_then(|v| v.get_mut(p.channel as usize))
            {
                Some(slot @ None) => {
                    *slot = Some(stream);
                    missing -= 1;
                }
                _ => refusals.refused(&format_args!(
                    "dropped a connection from {from} for rank {} socket {}: not expected \
                     here or already connected",
                    p.rank, p.channel
                )),
            }
        }
        if missing == 0 {
            break;
        }
        if let Some(gone) = live.and_then(|l| ask_liveness(l, &mut asked)) {
            let absent: Vec<usize> = slots
                .iter()
                .filter(|(_, v)| v.iter().any(Option::is_none))
                .map(|(p, _)| *p)
                .collect();
            return Err(Error::Bootstrap(format!(
                "rank {rank}: link setup stopped while waiting for rank(s) {absent:?} to \
                 connect to {here}: {gone}"
            )));
        }
        refusals.flush();
        let now = Instant::now();
        if now >= deadline {
            let absent: Vec<String> = slots
                .iter()
                .filter(|(_, v)| v.iter().any(Option::is_none))
                .map(|(p, v)| {
                    let got = v.iter().filter(|s| s.is_some()).count();
                    format!("{p} ({got} of {nsocks} sockets)")
                })
                .collect();
            return Err(Error::Bootstrap(format!(
                "rank {rank}: ranks {} did not connect to {here} in time \
                 (HETCCL_CONNECT_TIMEOUT)",
                absent.join(", ")
            )));
        }
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Short waits, so finished handshakes are collected promptly too.
        let wait = (deadline - now).min(Duration::from_millis(20));
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as libc::c_int) };
        // At most a budget's worth per round: a flood that keeps the listener readable must
        // not keep finished handshakes from being collected, nor the deadline from being
        // seen.
        for _ in 0..handshakes.admission.capacity() {
            match listener.accept() {
                Ok((stream, from)) => {
                    let (ticket, shed) = match handshakes.admission.enter(&stream) {
                        Ok(x) => x,
                        Err(e) => {
                            refusals.refused(&format_args!(
                                "cannot set up the connection from {from}: {e}"
                            ));
                            continue;
                        }
                    };
                    if let Some(shed) = shed {
                        refusals.refused(&shed);
                    }
                    // Shed on arrival (every older one has sent a hello): nothing to run.
                    if ticket.is_shed() {
                        continue;
                    }
                    if let Err(e) = handshakes.start(Pending {
                        stream,
                        from,
                        ticket,
                    }) {
                        refusals.refused(&format_args!(
                            "dropped a connection from {from}: no thread for its handshake: {e}"
                        ));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors and the like: rate-limited like the refusals, and
                    // no spinning on a listener that stays readable; keep trying until
                    // the deadline.
                    refusals.refused(&format_args!("accepting on {here} failed: {e}"));
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
    }
    slots
        .into_iter()
        .map(|(p, v)| TcpLink::new(rank, p, v.into_iter().flatten().collect(), stripe))
        .collect()
}

/// An accepted connection waiting for a handshake thread.
struct Pending {
    stream: TcpStream,
    from: SocketAddr,
    ticket: Ticket,
}

/// What a handshake thread hands back: who authenticated (or why not), and the socket.
type Handshaken = (Result<Peer>, TcpStream, SocketAddr);

/// The handshakes of one [`accept_links`]: the admission budget, and the threads that run
/// them, at most one per connection the budget holds. Dropping it sheds the connections
/// still in their handshake and lets the threads end.
struct Handshakes {
    admission: Admission,
    queue: Arc<HandshakeQueue>,
    auth: JobAuth,
    deadline: Instant,
    done: mpsc::Sender<Handshaken>,
}

struct HandshakeQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

struct QueueState {
    /// Accepted connections no thread has taken yet, oldest first.
    pending: VecDeque<Pending>,
    /// Threads waiting for a connection.
    idle: usize,
    threads: usize,
    closed: bool,
}

impl HandshakeQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Plain counters and a queue: a poisoned lock holds nothing inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Handshakes {
    fn new(auth: JobAuth, deadline: Instant, done: mpsc::Sender<Handshaken>) -> Handshakes {
        Handshakes {
            admission: Admission::new(PRE_AUTH_CONNECTIONS, LISTEN_HANDSHAKE_TIMEOUT),
            queue: Arc::new(HandshakeQueue {
                state: Mutex::new(QueueState {
                    pending: VecDeque::new(),
                    idle: 0,
                    threads: 0,
                    closed: false,
                }),
                ready: Condvar::new(),
            }),
            auth,
            deadline,
            done,
        }
    }

    /// Hands `p` to an idle thread, or to a new one while there are fewer than the budget;
    /// else it waits for the first thread whose handshake ends (a full budget sheds one).
    /// Fails when no thread can be started and none runs.
    fn start(&self, p: Pending) -> std::io::Result<()> {
        let mut st = self.queue.lock();
        st.pending.push_back(p);
        if st.pending.len() <= st.idle || st.threads >= self.admission.capacity() {
            drop(st);
            self.queue.ready.notify_one();
            return Ok(());
        }
        st.threads += 1;
        drop(st);
        let (queue, auth, deadline, done) = (
            self.queue.clone(),
            self.auth.clone(),
            self.deadline,
            self.done.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("hetccl-accept".into())
            .spawn(move || handshake_thread(&queue, &auth, deadline, &done));
        if let Err(e) = spawned {
            let mut st = self.queue.lock();
            st.threads -= 1;
            if st.threads == 0 {
                // Nobody would take them: they leave the budget and close.
                st.pending.clear();
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Drop for Handshakes {
    fn drop(&mut self) {
        {
            let mut st = self.queue.lock();
            st.closed = true;
            st.pending.clear();
        }
        self.queue.ready.notify_all();
        self.admission.shed_all();
    }
}

/// One `hetccl-accept` thread: runs the handshakes of queued connections one after the
/// other until the queue closes.
fn handshake_thread(
    queue: &HandshakeQueue,
    auth: &JobAuth,
    deadline: Instant,
    done: &mpsc::Sender<Handshaken>,
) {
    loop {
        let next = {
            let mut st = queue.lock();
            loop {
                if let Some(p) = st.pending.pop_front() {
                    break Some(p);
                }
                if st.closed {
                    break None;
                }
                st.idle += 1;
                st = queue.ready.wait(st).unwrap_or_else(|p| p.into_inner());
                st.idle -= 1;
            }
        };
        let Some(Pending {
            mut stream,
            from,
            ticket,
        }) = next
        else {
            break;
        };
        // Shed while it waited for a thread: counted and logged then.
        if ticket.is_shed() {
            continue;
        }
        let timeout = ticket
            .remaining()
            .min(deadline.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(100));
        let res = stream
            .set_nonblocking(false)
            .map_err(|e| Error::io("configuring an accepted socket", e))
            .and_then(|_| {
                auth.accept_handshake_with(&mut stream, timeout, Some(ticket.hello_seen()), |_| {
                    ticket.leave()
                })
            });
        if res.is_err() && ticket.was_shed() {
            continue;
        }
        // The receiver is gone once setup has ended.
        let _ = done.send((res, stream, from));
    }
    queue.lock().threads -= 1;
}

/// Connects `nsocks` sockets from `rank` to `peer`'s listener at `addr`, each
/// authenticated (channel = socket index), and returns the link. Until `deadline`, or
/// until `live` says a rank is gone, it retries a listener that is not up yet and a
/// handshake the listener dropped (it sheds connections when strangers crowd it, and cuts
/// slow handshakes). A listener that proved another key, serves another job or is not a
/// hetccl one ends it at once.
#[allow(clippy::too_many_arguments)]
pub fn connect_link(
    addr: SocketAddr,
    auth: &JobAuth,
    rank: usize,
    peer: usize,
    nsocks: usize,
    stripe: usize,
    deadline: Instant,
    live: Option<&dyn Liveness>,
) -> Result<TcpLink> {
    let stopped = |gone: String| {
        Error::Bootstrap(format!(
            "rank {rank}: link setup stopped while connecting to rank {peer} at {addr}: {gone}"
        ))
    };
    let mut socks = Vec::with_capacity(nsocks);
    let mut asked = Instant::now();
    let mut retries = 0u64;
    for k in 0..nsocks {
        let mut backoff = Duration::from_millis(10);
        let mut tries = 0u32;
        let s = loop {
            tries += 1;
            retries += u64::from(tries > 1);
            let mut s = connect_retry(addr, rank, peer, deadline, live, &mut retries)?;
            let timeout = HANDSHAKE_TIMEOUT
                .min(deadline.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(100));
            let failure =
                match auth.connect_handshake_detailed(&mut s, rank as u32, k as u32, timeout) {
                    Ok(()) => break s,
                    Err(f) => f,
                };
            let left = deadline.saturating_duration_since(Instant::now());
            let dropped = matches!(
                failure,
                HandshakeFailure::Dropped(_) | HandshakeFailure::Refused(Refusal::Busy)
            );
            if dropped && left > Duration::from_millis(100) {
                if let Some(gone) = live.and_then(|l| ask_liveness(l, &mut asked)) {
                    return Err(stopped(gone));
                }
                tracing::debug!(
                    rank,
                    peer,
                    "handshake on socket {k} with {addr} did not finish ({failure}); trying again"
                );
                std::thread::sleep(backoff.min(left));
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
            // A peer killed during its handshake resets it; say that it died if the
            // bootstrap can tell, rather than only that the handshake failed.
            if let Some(gone) = gone_after_failure(live) {
                return Err(stopped(gone));
            }
            let why = match failure {
                HandshakeFailure::KeyDiffers => format!(
                    "the listener there proved it holds a different job key, so it is not rank \
                     {peer}'s (another job's process on that port?)"
                ),
                HandshakeFailure::Refused(Refusal::OtherJob) => format!(
                    "the listener there serves another job, so it is not rank {peer}'s \
                     (another job's process on that port?)"
                ),
                HandshakeFailure::NotHetccl => {
                    "what listens there is not a hetccl link listener (another program on that \
                     port?)"
                        .to_string()
                }
                HandshakeFailure::Refused(r) if !dropped => format!("refused: {r}"),
                other => format!(
                    "{other}, still after {tries} {} until the deadline (HETCCL_CONNECT_TIMEOUT)",
                    if tries == 1 { "try" } else { "tries" }
                ),
            };
            return Err(Error::Link {
                peer,
                detail: format!(
                    "rank {rank}: handshake on socket {k} with rank {peer} at {addr}: {why}"
                ),
                lost: false,
            });
        };
        socks.push(s);
    }
    let mut link = TcpLink::new(rank, peer, socks, stripe)?;
    link.retries = retries;
    Ok(link)
}

/// `Some(why)` when `live` says a rank is gone; asks at most every [`LIVENESS_EVERY`]
/// (`asked` is when it last did).
fn ask_liveness(live: &dyn Liveness, asked: &mut Instant) -> Option<String> {
    if asked.elapsed() < LIVENESS_EVERY {
        return None;
    }
    *asked = Instant::now();
    live.gone()
}

/// After a failure talking to a peer: what `live` says is gone, if it learns it within a
/// second (a killed process's sockets and its store connection close together, but the
/// store may hear of it a moment later). `None`: nobody is known gone.
fn gone_after_failure(live: Option<&dyn Liveness>) -> Option<String> {
    let live = live?;
    let start = Instant::now();
    loop {
        if let Some(gone) = live.gone() {
            return Some(gone);
        }
        if start.elapsed() >= Duration::from_secs(1) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn connect_retry(
    addr: SocketAddr,
    rank: usize,
    peer: usize,
    deadline: Instant,
    live: Option<&dyn Liveness>,
    retries: &mut u64,
) -> Result<TcpStream> {
    let mut asked = Instant::now();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let res = TcpStream::connect_timeout(
            &addr,
            left.clamp(Duration::from_millis(100), Duration::from_secs(5)),
        );
        match res {
            Ok(s) => return Ok(s),
            Err(e)
                if left > Duration::from_millis(100)
                    && matches!(
                        e.kind(),
                        ErrorKind::ConnectionRefused | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) =>
            {
                if let Some(gone) = live.and_then(|l| ask_liveness(l, &mut asked)) {
                    return Err(Error::Bootstrap(format!(
                        "rank {rank}: link setup stopped while connecting to rank {peer} at \
                         {addr}: {gone}"
                    )));
                }
                *retries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                if let Some(gone) = gone_after_failure(live) {
                    return Err(Error::Bootstrap(format!(
                        "rank {rank}: link setup stopped while connecting to rank {peer} at \
                         {addr}: {gone}"
                    )));
                }
                return Err(Error::Link {
                    peer,
                    detail: format!("rank {rank} could not connect to rank {peer} at {addr}: {e}"),
                    lost: false,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::testing::*;
    use std::io::Write;

    fn auth() -> JobAuth {
        JobAuth::new("tcp-test", "key")
    }

    /// Links between rank 0 (listening) and rank 1 over loopback.
    fn pair(nsocks: usize, stripe: usize) -> (TcpLink, TcpLink) {
        let l = listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let addr = l.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let t = std::thread::spawn(move || {
            connect_link(addr, &auth(), 1, 0, nsocks, stripe, deadline, None)
        });
        let mut acc = accept_links(&l, &auth(), 0, &[1], nsocks, stripe, deadline, None).unwrap();
        let b = t.join().unwrap().unwrap();
        let a = acc.pop().unwrap();
        assert_eq!(
            (a.peer(), b.peer(), a.nsocks(), b.nsocks()),
            (1, 0, nsocks, nsocks)
        );
        (a, b)
    }

    /// Counts what it receives; allocates nothing, and refuses messages over 1 MiB.
    #[derive(Default)]
    struct CountSink {
        header: Option<MsgHeader>,
        got: usize,
    }

    impl RecvSink for CountSink {
        fn header(&mut self, h: &MsgHeader) -> Result<()> {
            if h.bytes > 1 << 20 {
                return Err(Error::invalid("CountSink", String::new()));
            }
            self.header = Some(*h);
            Ok(())
        }

        fn data(&mut self, offset: usize, bytes: &[u8]) -> Result<()> {
            assert_eq!(offset, self.got, "pieces in order");
            self.got += bytes.len();
            Ok(())
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Whatever a peer writes (a header, mutated or not, then anything, or only
        /// garbage) and then closing: the receive completes with exactly the message the
        /// header announced, or fails naming the problem; never a panic, and no
        /// allocation while it is under way whatever the header says.
        #[test]
        fn any_stream_is_received_or_refused_without_allocating(
            head in proptest::option::of((
                0usize..20_000,
                proptest::collection::vec((0usize..HEADER_BYTES, 1u8..=255), 0..2),
            )),
            rest in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000),
            second in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000),
        ) {
            let (mut a, b) = pair(2, 4096);
            let mut first = Vec::new();
            if let Some((n, flips)) = &head {
                first.extend_from_slice(bytemuck::bytes_of(&header(1, *n)));
                for &(at, x) in flips {
                    first[at] ^= x;
                }
            }
            first.extend_from_slice(&rest);
            (&b.socks[0]).write_all(&first).unwrap();
            (&b.socks[1]).write_all(&second).unwrap();
            drop(b);
            let mut sink = CountSink::default();
            let mut allocated = 0;
            let t0 = Instant::now();
            let r = loop {
                let (r, n) = crate::transport::alloc_meter::allocated_by(|| a.poll_recv(&mut sink));
                match r {
                    Ok(true) => break Ok(allocated + n),
                    Ok(false) => {
                        allocated += n;
                        proptest::prop_assert!(t0.elapsed() < Duration::from_secs(10), "stuck");
                        std::thread::yield_now();
                    }
                    Err(e) => break Err(e),
                }
            };
            match r {
                Ok(allocated) => {
                    proptest::prop_assert_eq!(allocated, 0);
                    let h = sink.header.unwrap();
                    proptest::prop_assert_eq!(h.magic, crate::transport::MSG_MAGIC);
                    proptest::prop_assert_eq!(sink.got as u64, h.bytes);
                }
                Err(e) => {
                    proptest::prop_assert_eq!(allocated, 0);
                    let text = e.to_string();
                    proptest::prop_assert!(
                        matches!(e, Error::InvalidArgument { op: "CountSink", .. })
                            || text.contains("closed the connection")
                            || text.contains("is out of step: header magic")
                            || text.contains("aborted the TCP link"),
                        "{}", text
                    );
                }
            }
        }
    }

    #[test]
    fn stripes_cover_the_message() {
        // 10 stripes of 64 over 4 sockets, the last one 8 bytes short.
        let shares: Vec<usize> = (0..4).map(|k| sock_share(632, 64, k, 4)).collect();
        assert_eq!(shares, vec![192, 192 - 8, 128, 128]);
        assert_eq!(sock_share(0, 64, 0, 4), 0);
        assert_eq!(sock_share(64, 64, 1, 4), 0);
        let cfg = Config {
            nsocks_per_peer: 4,
            ..Config::default()
        };
        assert_eq!(stripe_bytes(&cfg), 128 << 10);
    }

    #[test]
    fn one_socket_carries_messages_both_ways() {
        let (mut a, mut b) = pair(1, 64 << 10);
        duplex(&mut a, &mut b, &STANDARD_SIZES);
    }

    #[test]
    fn four_sockets_carry_messages_both_ways() {
        let (mut a, mut b) = pair(4, 4096);
        duplex(&mut a, &mut b, &STANDARD_SIZES);
        let (mut a, mut b) = pair(4, 128 << 10);
        duplex(&mut a, &mut b, &STANDARD_SIZES);
    }

    #[test]
    fn direct_receives_read_straight_into_the_destination() {
        // Every payload byte lands through the sink's direct destination: no piece
        // passes through `data`, at one socket and at four, down to odd tails.
        for (nsocks, stripe) in [(1, 64 << 10), (4, 4096)] {
            let (mut a, mut b) = pair(nsocks, stripe);
            let sizes = [STANDARD_SIZES.as_slice(), &[5_000_003, 64, 0, 1]].concat();
            assert_eq!(duplex_with(&mut a, &mut b, &sizes, true), (0, 0));
            // The same links still stage when the sink offers no destination.
            let (pa, pb) = duplex_with(&mut a, &mut b, &[100_000], false);
            assert!(pa > 0 && pb > 0, "staged pieces {pa}, {pb}");
        }
    }

    fn congestion_of(l: &TcpLink) -> String {
        congestion(&l.socks[0]).unwrap()
    }

    #[test]
    fn congestion_control_is_set_or_refused_by_name() {
        let (a, _b) = pair(1, 4096);
        // Reno is built into every kernel and allowed to everyone.
        a.set_congestion(&TcpCongestion::Named("reno".into()))
            .unwrap();
        assert_eq!(congestion_of(&a), "reno");
        a.set_congestion(&TcpCongestion::System).unwrap();
        assert_eq!(congestion_of(&a), "reno", "system leaves the socket alone");
        let e = a
            .set_congestion(&TcpCongestion::Named("no-such-cc".into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("HETCCL_TCP_CONGESTION")
                && e.contains("\"no-such-cc\"")
                && e.contains("available"),
            "{e}"
        );
        // After the probe a link keeps its algorithm (restarted, not replaced).
        let (mut c, mut d) = pair(2, 4096);
        c.set_congestion(&TcpCongestion::Named("reno".into()))
            .unwrap();
        duplex(&mut c, &mut d, &[1 << 20]);
        c.end_probe();
        assert_eq!(congestion_of(&c), "reno");
        assert_eq!(congestion(&c.socks[1]).as_deref(), Some("reno"));
        duplex(&mut c, &mut d, &[1 << 20, 3]);
        // Auto never fails: cubic where the process may pick it, else what the socket had.
        a.set_congestion(&TcpCongestion::Auto).unwrap();
        let listed = |f: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/ipv4/{f}"))
                .is_ok_and(|s| s.split_whitespace().any(|n| n == "cubic"))
        };
        // SAFETY: geteuid has no preconditions.
        let may = listed("tcp_allowed_congestion_control") || unsafe { libc::geteuid() } == 0;
        let want = if listed("tcp_available_congestion_control") && may {
            "cubic"
        } else {
            "reno"
        };
        assert_eq!(congestion_of(&a), want);
    }

    #[test]
    fn messages_far_larger_than_socket_buffers_do_not_deadlock() {
        // Socket buffers hold about 8 MiB each way; both sides send 40 MB at once.
        let (mut a, mut b) = pair(2, 256 << 10);
        duplex(&mut a, &mut b, &[40_000_001, 3]);
    }

    #[test]
    fn wait_fds_lists_every_socket() {
        let (a, _b) = pair(3, 4096);
        let mut fds = Vec::new();
        a.wait_fds(&mut fds);
        assert_eq!(fds.len(), 3);
        assert!(fds.iter().all(|(fd, w)| *fd >= 0 && !*w));
    }

    #[test]
    fn one_socket_at_its_end_is_not_a_lost_peer() {
        // The peer finished its part on socket 0 and closed it; socket 1 may still
        // carry a stripe, so the peer is not gone yet.
        let (mut a, b) = pair(2, 4096);
        b.socks[0].shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        a.check_peer().unwrap();
        b.socks[1].shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let e = a.check_peer().unwrap_err();
        assert!(
            e.to_string()
                .contains("peer 1 closed the connection (socket 0 of 2"),
            "{e}"
        );
    }

    #[test]
    fn closed_peer_is_lost() {
        let (mut a, b) = pair(2, 4096);
        drop(b);
        let mut sink = VecSink::default();
        let e = poll_until(|| a.poll_recv(&mut sink)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Link {
                    peer: 1,
                    lost: true,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("peer 1 closed the connection"),
            "{e}"
        );
        assert!(matches!(
            a.check_peer(),
            Err(Error::Link {
                peer: 1,
                lost: true,
                ..
            })
        ));
        // Sending into the closed connection fails too (EPIPE / reset), not SIGPIPE.
        let msg = pattern(1 << 20, 1);
        let e = poll_until(|| a.poll_send(&header(0, msg.len()), &msg)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Link {
                    peer: 1,
                    lost: true,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn aborted_peer_is_lost_and_says_why() {
        let cause = AbortCause::new(crate::error::AbortKind::TimedOut, 3);
        let (mut a, mut b) = pair(2, 4096);
        a.check_peer().unwrap();
        // A message first: the notice comes after it, where the next header would be.
        let msg = pattern(10_000, 4);
        poll_until(|| b.poll_send(&header(1, msg.len()), &msg)).unwrap();
        b.abort(cause);
        let mut sink = VecSink::default();
        assert!(poll_until(|| a.poll_recv(&mut sink)).unwrap());
        assert_eq!(sink.data, msg);
        let e = poll_until(|| a.poll_recv(&mut sink)).unwrap_err();
        assert_eq!(e.to_string(), "link to peer 1: peer 1 aborted the TCP link");
        assert!(matches!(
            e,
            Error::Link {
                peer: 1,
                lost: true,
                ..
            }
        ));
        assert_eq!(a.abort_notice(), Some(cause));
        let e = b.poll_recv(&mut sink).unwrap_err();
        assert_eq!(
            e.to_string(),
            "link to peer 0: rank 1 aborted this TCP link earlier"
        );

        // Nothing to receive: the check finds the notice.
        let (mut a, mut b) = pair(1, 4096);
        b.abort(cause);
        let t0 = Instant::now();
        let e = loop {
            match a.check_peer() {
                Err(e) => break e,
                Ok(()) => assert!(t0.elapsed() < Duration::from_secs(5)),
            }
        };
        assert_eq!(e.to_string(), "link to peer 1: peer 1 aborted the TCP link");
        assert_eq!(a.abort_notice(), Some(cause));
    }

    #[test]
    fn an_abort_in_the_middle_of_a_message_closes_without_a_notice() {
        let (mut a, mut b) = pair(2, 4096);
        // Far more than the socket buffers hold: the send stays in flight.
        let msg = pattern(40 << 20, 5);
        assert!(!b.poll_send(&header(1, msg.len()), &msg).unwrap());
        b.abort(AbortCause::new(crate::error::AbortKind::Failed, 1));
        let mut sink = VecSink::default();
        let e = poll_until(|| a.poll_recv(&mut sink)).unwrap_err();
        assert!(
            e.to_string()
                .contains("closed the connection (socket 0 of 2")
                || e.to_string()
                    .contains("closed the connection (socket 1 of 2"),
            "{e}"
        );
        assert!(
            e.to_string().ends_with(
                "without saying why: its process ended, or it gave up in the middle of a message"
            ),
            "{e}"
        );
        assert_eq!(a.abort_notice(), None);
    }

    #[test]
    fn strangers_are_refused_and_setup_completes() {
        let l = listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let addr = l.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        // A silent stranger (holds its connection open and says nothing), one writing
        // garbage, one from another job, and one with the wrong key; then the peer.
        let silent = TcpStream::connect(addr).unwrap();
        let mut garbage = TcpStream::connect(addr).unwrap();
        garbage.write_all(&[0xAB; 100]).unwrap();
        let other_job = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            JobAuth::new("other-job", "key").connect_handshake(&mut s, 1, 0, Duration::from_secs(5))
        });
        let wrong_key = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            JobAuth::new("tcp-test", "guess").connect_handshake(
                &mut s,
                1,
                0,
                Duration::from_secs(5),
            )
        });
        let t =
            std::thread::spawn(move || connect_link(addr, &auth(), 1, 0, 2, 4096, deadline, None));
        let mut acc = accept_links(&l, &auth(), 0, &[1], 2, 4096, deadline, None).unwrap();
        let mut b = t.join().unwrap().unwrap();
        assert!(other_job.join().unwrap().is_err());
        assert!(wrong_key.join().unwrap().is_err());
        let mut a = acc.pop().unwrap();
        duplex(&mut a, &mut b, &[1000]);
        drop((silent, garbage));
    }

    #[test]
    fn missing_ranks_are_named() {
        let l = listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let addr = l.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        let t =
            std::thread::spawn(move || connect_link(addr, &auth(), 1, 0, 2, 4096, deadline, None));
        let e = accept_links(&l, &auth(), 0, &[1, 2], 2, 4096, deadline, None)
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "bootstrap: rank 0: ranks 2 (0 of 2 sockets) did not connect to {addr} in time \
                 (HETCCL_CONNECT_TIMEOUT)"
            )
        );
        drop(t.join().unwrap());
    }

    /// A bootstrap that knows rank 2 died.
    struct Rank2Died;

    impl Liveness for Rank2Died {
        fn gone(&self) -> Option<String> {
            Some("rank 2 died (killed)".into())
        }
    }

    #[test]
    fn a_rank_known_dead_ends_link_setup_at_once() {
        // Accepting: rank 2 will never connect, and the bootstrap says why.
        let l = listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let addr = l.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let start = Instant::now();
        let e = accept_links(&l, &auth(), 0, &[2], 1, 4096, deadline, Some(&Rank2Died))
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "bootstrap: rank 0: link setup stopped while waiting for rank(s) [2] to connect \
                 to {addr}: rank 2 died (killed)"
            )
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        // Connecting: nobody listens any more.
        drop(l);
        let e = connect_link(addr, &auth(), 3, 2, 1, 4096, deadline, Some(&Rank2Died))
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "bootstrap: rank 3: link setup stopped while connecting to rank 2 at {addr}: \
                 rank 2 died (killed)"
            )
        );
        // A listener whose process dies during the handshake: the connection resets.
        let l = listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || drop(l.accept().unwrap()));
        let e = connect_link(addr, &auth(), 3, 2, 1, 4096, deadline, Some(&Rank2Died))
            .err()
            .unwrap();
        t.join().unwrap();
        assert!(e.to_string().ends_with("rank 2 died (killed)"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    /// Accepts connections on `l` until `stop`, reads each one's hello and closes it, as a
    /// listener shedding load does; returns how many it closed.
    fn shed_every_connection(l: TcpListener, stop: Arc<std::sync::atomic::AtomicBool>) -> usize {
        use crate::bootstrap::auth::HELLO_LEN;
        use std::sync::atomic::Ordering;
        l.set_nonblocking(true).unwrap();
        let mut shed = 0;
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let mut hello = [0u8; HELLO_LEN];
                    s.read_exact(&mut hello).unwrap();
                    shed += 1;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        shed
    }

    #[test]
    fn a_shed_connector_tries_again_until_the_deadline() {
        use std::sync::atomic::{AtomicBool, Ordering};
        // Shed twice, then served: the link forms.
        let l = listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let addr = l.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let t = std::thread::spawn(move || {
            for _ in 0..2 {
                let (mut s, _) = l.accept().unwrap();
                let mut hello = [0u8; crate::bootstrap::auth::HELLO_LEN];
                s.read_exact(&mut hello).unwrap();
            }
            accept_links(&l, &auth(), 0, &[1], 2, 4096, deadline, None)
        });
        let mut b = connect_link(addr, &auth(), 1, 0, 2, 4096, deadline, None).unwrap();
        let mut a = t.join().unwrap().unwrap().pop().unwrap();
        duplex(&mut a, &mut b, &[1000]);

        // Shed every time: the connector keeps trying until its deadline, and says so.
        let l = listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let t = {
            let stop = stop.clone();
            std::thread::spawn(move || shed_every_connection(l, stop))
        };
        let start = Instant::now();
        let deadline = start + Duration::from_millis(1500);
        let e = connect_link(addr, &auth(), 1, 0, 1, 4096, deadline, None)
            .err()
            .unwrap()
            .to_string();
        let took = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        let shed = t.join().unwrap();
        // The listener closed each try after the hello; the last one may instead have run
        // out of time before the listener got to it.
        let head = format!("link to peer 0: rank 1: handshake on socket 0 with rank 0 at {addr}: ");
        let rest = e.strip_prefix(&head).unwrap_or_else(|| panic!("{e}"));
        let tries = [
            "acceptor closed the connection during the handshake, still after ",
            "acceptor did not finish the handshake in time, still after ",
        ]
        .iter()
        .find_map(|why| rest.strip_prefix(why))
        .and_then(|r| r.strip_suffix(" tries until the deadline (HETCCL_CONNECT_TIMEOUT)"))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("{e}"));
        assert!(
            tries >= 3 && (tries - 1..=tries).contains(&shed),
            "{tries} tries, {shed} shed: {e}"
        );
        assert!(
            took >= Duration::from_millis(1300) && took < Duration::from_secs(6),
            "took {took:?}"
        );
    }

    #[test]
    fn only_a_listener_that_proves_another_key_is_blamed_for_it() {
        let l = listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let addr = l.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let other = JobAuth::new("tcp-test", "another key");
        let t = std::thread::spawn(move || {
            accept_links(
                &l,
                &other,
                0,
                &[1],
                1,
                4096,
                Instant::now() + Duration::from_secs(3),
                None,
            )
        });
        let start = Instant::now();
        let e = connect_link(addr, &auth(), 1, 0, 1, 4096, deadline, None)
            .err()
            .unwrap();
        // Refused at once, not retried until the deadline.
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(
            e.to_string(),
            format!(
                "link to peer 0: rank 1: handshake on socket 0 with rank 0 at {addr}: the \
                 listener there proved it holds a different job key, so it is not rank 0's \
                 (another job's process on that port?)"
            )
        );
        drop(t.join().unwrap());
    }
}
