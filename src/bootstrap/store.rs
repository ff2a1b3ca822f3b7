//! A small key-value store for bootstrap: served by rank 0 over TCP, used by every rank.
//!
//! Every connection first passes [`JobAuth`]'s handshake (the connector sends its rank);
//! then it carries length-prefixed frames, one request and one reply at a time:
//!
//! ```text
//! frame   = len:u32le body[len]                      (len <= 64 MiB)
//! request = op:u8 ...
//!   SET    op=1 key_len:u32le key value...           -> OK
//!   GET    op=2 timeout_ms:u64le n:u32le (key_len:u32le key){n}
//!                                                    -> VALUES n:u32le (len:u32le value){n}
//!                                                       | MISSING m:u32le (index:u32le){m}
//!   ADD    op=3 delta:i64le key...                   -> COUNTER value:i64le
//!   DELETE op=4 key...                               -> OK
//! reply   = status:u8 ...   OK=0 VALUES=1 MISSING=2 COUNTER=3 ERROR=4 (message...)
//! ```
//!
//! GET blocks on the server until every key is present or the client's timeout passes,
//! so a waiting rank costs one round trip, not a polling loop. Counters (ADD) are stored
//! as decimal text, so a GET of a counter reads like `"3"`.
//!
//! Each connection is served by its own thread, so a stranger that connects and stays
//! silent only occupies its own thread until the handshake timeout refuses it.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::auth::JobAuth;
use super::fmt_secs;
use crate::error::{Error, Result};

/// Largest frame either side accepts; bootstrap blobs are addresses and host names.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// Connections beyond `2 * world_size + EXTRA_CONNECTIONS` at once are refused, so a
/// flood of strangers cannot exhaust threads.
const EXTRA_CONNECTIONS: usize = 64;

/// How long the accept thread sleeps in `poll` before it looks at the stop flag.
const ACCEPT_POLL_MS: i32 = 100;

/// Time a reply may take beyond the server-side GET timeout before the client gives up
/// on rank 0 (stopped or hung process).
const REPLY_GRACE: Duration = Duration::from_secs(10);

/// Outcome of a blocking multi-key get.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GetOutcome {
    /// Every key was present; values in the order of the keys asked for.
    Values(Vec<Vec<u8>>),
    /// The timeout passed; indices (into the keys asked for) of those still absent.
    Missing(Vec<usize>),
}

/// Operations on the bootstrap store, the same for rank 0 (in-process) and the others (TCP).
pub trait Store: Send {
    /// Stores `value` under `key`, replacing any earlier value, and wakes waiting getters.
    fn set(&mut self, key: &str, value: &[u8]) -> Result<()>;
    /// Waits until every key is present or `timeout` passes.
    fn get_many(&mut self, keys: &[&str], timeout: Duration) -> Result<GetOutcome>;
    /// Adds `delta` to the counter at `key` (absent counts as 0); returns the new value.
    fn add(&mut self, key: &str, delta: i64) -> Result<i64>;
    /// Removes `key`; removing an absent key is not an error.
    fn delete(&mut self, key: &str) -> Result<()>;

    /// Waits for one key; the error names it.
    fn get(&mut self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        match self.get_many(&[key], timeout)? {
            GetOutcome::Values(mut v) if v.len() == 1 => Ok(v.remove(0)),
            GetOutcome::Values(v) => Err(Error::Bootstrap(format!(
                "store answered {} values for one key {key:?}",
                v.len()
            ))),
            GetOutcome::Missing(_) => Err(Error::Bootstrap(format!(
                "key {key:?} did not appear in the store within {}",
                fmt_secs(timeout)
            ))),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Wire format

const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_ADD: u8 = 3;
const OP_DELETE: u8 = 4;

const ST_OK: u8 = 0;
const ST_VALUES: u8 = 1;
const ST_MISSING: u8 = 2;
const ST_COUNTER: u8 = 3;
const ST_ERROR: u8 = 4;

#[derive(Debug, PartialEq, Eq)]
enum Request {
    Set {
        key: String,
        value: Vec<u8>,
    },
    Get {
        keys: Vec<String>,
        timeout: Duration,
    },
    Add {
        key: String,
        delta: i64,
    },
    Delete {
        key: String,
    },
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Ok,
    Values(Vec<Vec<u8>>),
    Missing(Vec<usize>),
    Counter(i64),
    Error(String),
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    // Every length written here was checked against MAX_FRAME_BYTES, which fits in u32.
    out.extend_from_slice(&(n as u32).to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len());
    out.extend_from_slice(b);
}

/// Reads fields off the front of a frame body; `None` when the body is too short.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<usize> {
        let b = self.take(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    fn u64(&mut self) -> Option<u64> {
        let b: [u8; 8] = self.take(8)?.try_into().ok()?;
        Some(u64::from_le_bytes(b))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()?;
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

impl Request {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Request::Set { key, value } => {
                out.push(OP_SET);
                put_bytes(&mut out, key.as_bytes());
                out.extend_from_slice(value);
            }
            Request::Get { keys, timeout } => {
                out.push(OP_GET);
                let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
                out.extend_from_slice(&ms.to_le_bytes());
                put_u32(&mut out, keys.len());
                for k in keys {
                    put_bytes(&mut out, k.as_bytes());
                }
            }
            Request::Add { key, delta } => {
                out.push(OP_ADD);
                out.extend_from_slice(&delta.to_le_bytes());
                out.extend_from_slice(key.as_bytes());
            }
            Request::Delete { key } => {
                out.push(OP_DELETE);
                out.extend_from_slice(key.as_bytes());
            }
        }
        out
    }

    fn decode(body: &[u8]) -> Option<Request> {
        let mut f = Fields(body);
        let req = match f.u8()? {
            OP_SET => Request::Set {
                key: f.string()?,
                value: f.rest().to_vec(),
            },
            OP_GET => {
                let timeout = Duration::from_millis(f.u64()?);
                let n = f.u32()?;
                // Each key needs at least its 4-byte length, which bounds `n` by the body.
                if n > f.0.len() / 4 {
                    return None;
                }
                let keys = (0..n).map(|_| f.string()).collect::<Option<Vec<_>>>()?;
                Request::Get { keys, timeout }
            }
            OP_ADD => Request::Add {
                delta: f.u64()? as i64,
                key: String::from_utf8(f.rest().to_vec()).ok()?,
            },
            OP_DELETE => Request::Delete {
                key: String::from_utf8(f.rest().to_vec()).ok()?,
            },
            _ => return None,
        };
        f.0.is_empty().then_some(req)
    }
}

impl Reply {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Reply::Ok => out.push(ST_OK),
            Reply::Values(vals) => {
                out.push(ST_VALUES);
                put_u32(&mut out, vals.len());
                for v in vals {
                    put_bytes(&mut out, v);
                }
            }
            Reply::Missing(idx) => {
                out.push(ST_MISSING);
                put_u32(&mut out, idx.len());
                for &i in idx {
                    put_u32(&mut out, i);
                }
            }
            Reply::Counter(n) => {
                out.push(ST_COUNTER);
                out.extend_from_slice(&n.to_le_bytes());
            }
            Reply::Error(msg) => {
                out.push(ST_ERROR);
                out.extend_from_slice(msg.as_bytes());
            }
        }
        out
    }

    fn decode(body: &[u8]) -> Option<Reply> {
        let mut f = Fields(body);
        let reply = match f.u8()? {
            ST_OK => Reply::Ok,
            ST_VALUES => {
                let n = f.u32()?;
                if n > f.0.len() / 4 {
                    return None;
                }
                let vals = (0..n)
                    .map(|_| f.bytes().map(<[u8]>::to_vec))
                    .collect::<Option<Vec<_>>>()?;
                Reply::Values(vals)
            }
            ST_MISSING => {
                let n = f.u32()?;
                if n > f.0.len() / 4 {
                    return None;
                }
                Reply::Missing((0..n).map(|_| f.u32()).collect::<Option<Vec<_>>>()?)
            }
            ST_COUNTER => Reply::Counter(f.u64()? as i64),
            ST_ERROR => Reply::Error(String::from_utf8_lossy(f.rest()).into_owned()),
            _ => return None,
        };
        f.0.is_empty().then_some(reply)
    }
}

fn write_frame(s: &mut TcpStream, body: &[u8]) -> io::Result<()> {
    if body.len() > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "store message of {} bytes exceeds the {MAX_FRAME_BYTES}-byte limit",
                body.len()
            ),
        ));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    put_bytes(&mut frame, body);
    s.write_all(&frame)
}

fn read_frame(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {MAX_FRAME_BYTES}-byte limit"),
        ));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(body)
}

// ---------------------------------------------------------------------------------------
// The data, shared by the server's connection threads and rank 0's in-process client

#[derive(Default)]
struct State {
    map: HashMap<String, Vec<u8>>,
    /// Authenticated connections currently open.
    clients: usize,
    stopping: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic in a holder (every update is one
        // map operation), so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply(&self, req: Request) -> Reply {
        match req {
            Request::Set { key, value } => {
                self.lock().map.insert(key, value);
                self.changed.notify_all();
                Reply::Ok
            }
            Request::Get { keys, timeout } => self.wait_get(&keys, timeout),
            Request::Add { key, delta } => {
                let mut st = self.lock();
                let old = match st.map.get(&key) {
                    None => 0,
                    Some(v) => match std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()) {
                        Some(n) => n,
                        None => {
                            return Reply::Error(format!("key {key:?} does not hold a counter"))
                        }
                    },
                };
                let Some(new) = i64::checked_add(old, delta) else {
                    return Reply::Error(format!("counter {key:?} overflows ({old} + {delta})"));
                };
                st.map.insert(key, new.to_string().into_bytes());
                drop(st);
                self.changed.notify_all();
                Reply::Counter(new)
            }
            Request::Delete { key } => {
                self.lock().map.remove(&key);
                Reply::Ok
            }
        }
    }

    fn wait_get(&self, keys: &[String], timeout: Duration) -> Reply {
        let deadline = Instant::now().checked_add(timeout);
        let mut st = self.lock();
        loop {
            if keys.iter().all(|k| st.map.contains_key(k)) {
                return Reply::Values(
                    keys.iter()
                        .map(|k| st.map.get(k).cloned().unwrap_or_default())
                        .collect(),
                );
            }
            if st.stopping {
                return Reply::Error("rank 0's store is shutting down".into());
            }
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            if left.is_zero() {
                let missing = keys
                    .iter()
                    .enumerate()
                    .filter(|(_, k)| !st.map.contains_key(*k))
                    .map(|(i, _)| i)
                    .collect();
                return Reply::Missing(missing);
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

/// Rank 0's own handle on the store it serves: no socket, same semantics.
pub struct LocalStore(Arc<Shared>);

fn outcome(reply: Reply, what: &str) -> Result<GetOutcome> {
    match reply {
        Reply::Values(v) => Ok(GetOutcome::Values(v)),
        Reply::Missing(m) => Ok(GetOutcome::Missing(m)),
        Reply::Error(e) => Err(Error::Bootstrap(format!("{what}: {e}"))),
        other => Err(Error::Bootstrap(format!(
            "{what}: unexpected reply {other:?}"
        ))),
    }
}

fn ok_reply(reply: Reply, what: &str) -> Result<()> {
    match reply {
        Reply::Ok => Ok(()),
        Reply::Error(e) => Err(Error::Bootstrap(format!("{what}: {e}"))),
        other => Err(Error::Bootstrap(format!(
            "{what}: unexpected reply {other:?}"
        ))),
    }
}

fn counter_reply(reply: Reply, what: &str) -> Result<i64> {
    match reply {
        Reply::Counter(n) => Ok(n),
        Reply::Error(e) => Err(Error::Bootstrap(format!("{what}: {e}"))),
        other => Err(Error::Bootstrap(format!(
            "{what}: unexpected reply {other:?}"
        ))),
    }
}

impl Store for LocalStore {
    fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        let req = Request::Set {
            key: key.into(),
            value: value.to_vec(),
        };
        ok_reply(self.0.apply(req), "store set")
    }
    fn get_many(&mut self, keys: &[&str], timeout: Duration) -> Result<GetOutcome> {
        let keys = keys.iter().map(|k| k.to_string()).collect();
        outcome(self.0.apply(Request::Get { keys, timeout }), "store get")
    }
    fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        let req = Request::Add {
            key: key.into(),
            delta,
        };
        counter_reply(self.0.apply(req), "store add")
    }
    fn delete(&mut self, key: &str) -> Result<()> {
        ok_reply(
            self.0.apply(Request::Delete { key: key.into() }),
            "store delete",
        )
    }
}

// ---------------------------------------------------------------------------------------
// Server

/// Rank 0's store server: an accept thread plus one thread per connection.
/// Serves until [`StoreServer::stop`] or drop.
pub struct StoreServer {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    conns: Conns,
    accept: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

/// Open connections: a handle to shut each socket down, and its serving thread.
type Conns = Arc<Mutex<Vec<(TcpStream, JoinHandle<()>)>>>;

/// What a connection thread needs to know.
#[derive(Clone)]
struct ServeCtx {
    shared: Arc<Shared>,
    refused: Arc<AtomicUsize>,
    auth: JobAuth,
    world_size: usize,
    handshake_timeout: Duration,
    local: SocketAddr,
}

impl StoreServer {
    /// Listens on `addr` (every resolved address is tried in turn). Connections must pass
    /// `auth`'s handshake within `handshake_timeout` and present a rank below `world_size`.
    ///
    /// When no resolved address belongs to this host (`MASTER_ADDR` names it by an address
    /// it cannot bind: NAT, a service name), it listens on every interface on that port;
    /// the handshake keeps strangers out either way.
    pub fn bind(
        addr: &str,
        auth: JobAuth,
        world_size: usize,
        handshake_timeout: Duration,
    ) -> Result<StoreServer> {
        let candidates: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| Error::io(format!("resolving the store address {addr}"), e))?
            .collect();
        let mut last: Option<io::Error> = None;
        let mut listener = None;
        for a in &candidates {
            match TcpListener::bind(a) {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let (None, Some(e), Some(a)) = (&listener, &last, candidates.first()) {
            if e.kind() == io::ErrorKind::AddrNotAvailable {
                let any = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), a.port());
                tracing::info!("rank 0: {addr} is not an address of this host; listening on {any}");
                match TcpListener::bind(any) {
                    Ok(l) => listener = Some(l),
                    Err(e) => last = Some(e),
                }
            }
        }
        let listener = match (listener, last) {
            (Some(l), _) => l,
            (None, Some(e)) => {
                let hint = if e.kind() == io::ErrorKind::AddrInUse {
                    " (another job on this port? pick another MASTER_PORT)"
                } else {
                    ""
                };
                return Err(Error::Bootstrap(format!(
                    "rank 0 cannot serve the store on {addr}: {}{hint}",
                    e.kind()
                )));
            }
            (None, None) => {
                return Err(Error::Bootstrap(format!(
                    "rank 0 cannot serve the store: {addr} resolves to no address"
                )))
            }
        };
        Self::serve(listener, auth, world_size, handshake_timeout)
    }

    /// Serves on an already bound listener.
    pub fn serve(
        listener: TcpListener,
        auth: JobAuth,
        world_size: usize,
        handshake_timeout: Duration,
    ) -> Result<StoreServer> {
        let local = listener
            .local_addr()
            .map_err(|e| Error::io("store listener address", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("store listener", e))?;
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let ctx = ServeCtx {
            shared: shared.clone(),
            refused: refused.clone(),
            auth,
            world_size,
            handshake_timeout,
            local,
        };
        let accept = {
            let stop = stop.clone();
            let conns = conns.clone();
            std::thread::Builder::new()
                .name("hetccl-store".into())
                .spawn(move || accept_loop(listener, ctx, stop, conns))
                .map_err(|e| Error::io("starting the store thread", e))?
        };
        tracing::info!("store serving on {local} for {world_size} ranks");
        Ok(StoreServer {
            shared,
            stop,
            refused,
            conns,
            accept: Some(accept),
            addr: local,
        })
    }

    /// The address actually listened on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// An in-process handle on the served data.
    pub fn local_client(&self) -> LocalStore {
        LocalStore(self.shared.clone())
    }

    /// Connections refused so far (strangers, other jobs, wrong keys, bad requests).
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }

    /// Authenticated connections open now.
    pub fn clients(&self) -> usize {
        self.shared.lock().clients
    }

    /// Waits until the counter at `key` reaches `at_least`, or no client is connected any
    /// more, or `timeout` passes. Returns whether the counter got there.
    pub fn wait_counter(&self, key: &str, at_least: i64, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut st = self.shared.lock();
        loop {
            let n = st
                .map
                .get(key)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|s| s.parse::<i64>().ok())
                .unwrap_or(0);
            if n >= at_least {
                return true;
            }
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            if st.clients == 0 || left.is_zero() {
                return false;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Stops serving: blocked getters get an error, connections are closed, threads joined.
    pub fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        self.shared.lock().stopping = true;
        self.shared.changed.notify_all();
        if accept.join().is_err() {
            tracing::warn!("store accept thread on {} panicked", self.addr);
        }
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|p| p.into_inner()));
        for (s, _) in &conns {
            // Wakes the connection thread out of its blocking read.
            let _ = s.shutdown(Shutdown::Both);
        }
        for (_, h) in conns {
            let _ = h.join();
        }
        tracing::debug!("store on {} stopped", self.addr);
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: TcpListener, ctx: ServeCtx, stop: Arc<AtomicBool>, conns: Conns) {
    let max_conns = 2 * ctx.world_size + EXTRA_CONNECTIONS;
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and the count is 1;
        // the listener (and so the fd) outlives the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ACCEPT_POLL_MS) };
        if n <= 0 {
            continue;
        }
        let (stream, from) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!("store on {}: accept failed: {e}", ctx.local);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let mut list = conns.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|(_, h)| !h.is_finished());
        if list.len() >= max_conns {
            ctx.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "store on {}: refused {from}: already {} connections open",
                ctx.local,
                list.len()
            );
            continue;
        }
        let (Ok(()), Ok(keep)) = (stream.set_nonblocking(false), stream.try_clone()) else {
            tracing::warn!(
                "store on {}: cannot set up the connection from {from}",
                ctx.local
            );
            continue;
        };
        let c = ctx.clone();
        match std::thread::Builder::new()
            .name("hetccl-store-conn".into())
            .spawn(move || serve_conn(stream, from, c))
        {
            Ok(h) => list.push((keep, h)),
            Err(e) => tracing::warn!("store on {}: cannot serve {from}: {e}", ctx.local),
        }
    }
}

fn serve_conn(mut s: TcpStream, from: SocketAddr, ctx: ServeCtx) {
    serve_conn_inner(&mut s, from, &ctx);
    // The accept thread holds a clone of the socket, so dropping ours would not close it.
    let _ = s.shutdown(Shutdown::Both);
}

fn serve_conn_inner(s: &mut TcpStream, from: SocketAddr, ctx: &ServeCtx) {
    let peer = match ctx.auth.accept_handshake(s, ctx.handshake_timeout) {
        Ok(p) => p,
        Err(e) => {
            ctx.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("store on {}: {e}", ctx.local);
            return;
        }
    };
    let rank = peer.rank as usize;
    if rank >= ctx.world_size {
        ctx.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "store on {}: refused {from}: claims rank {rank} in a world of {}",
            ctx.local,
            ctx.world_size
        );
        return;
    }
    let _ = s.set_nodelay(true);
    tracing::debug!("store on {}: rank {rank} connected from {from}", ctx.local);
    ctx.shared.lock().clients += 1;
    loop {
        let body = match read_frame(s) {
            Ok(b) => b,
            Err(e) => {
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    tracing::debug!("store on {}: rank {rank} connection ended: {e}", ctx.local);
                }
                break;
            }
        };
        let Some(req) = Request::decode(&body) else {
            ctx.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "store on {}: rank {rank} ({from}) sent a malformed request of {} bytes; closing",
                ctx.local,
                body.len()
            );
            let _ = write_frame(s, &Reply::Error("malformed request".into()).encode());
            break;
        };
        let reply = ctx.shared.apply(req);
        if let Err(e) = write_frame(s, &reply.encode()) {
            tracing::debug!("store on {}: reply to rank {rank} failed: {e}", ctx.local);
            break;
        }
    }
    ctx.shared.lock().clients -= 1;
    ctx.shared.changed.notify_all();
}

// ---------------------------------------------------------------------------------------
// Client

/// A rank's authenticated connection to rank 0's store.
pub struct TcpStoreClient {
    stream: TcpStream,
    addr: String,
    rank: usize,
}

impl TcpStoreClient {
    /// Connects to `host:port`, retrying with backoff while nobody listens yet (rank 0 may
    /// start later), until `timeout`; then authenticates as `rank`. A refused handshake is
    /// not retried: it means another job or another key, which waiting does not fix.
    pub fn connect(
        host: &str,
        port: u16,
        auth: &JobAuth,
        rank: usize,
        timeout: Duration,
    ) -> Result<TcpStoreClient> {
        let addr = format!("{host}:{port}");
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        let mut attempts = 0u32;
        let mut stream = loop {
            attempts += 1;
            let left = timeout.saturating_sub(start.elapsed());
            let err = match connect_once(
                host,
                port,
                left.clamp(Duration::from_millis(1), Duration::from_secs(5)),
            ) {
                Ok(s) => break s,
                Err(e) => e,
            };
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(Error::Bootstrap(format!(
                    "rank {rank}: cannot reach rank 0's store at {addr} after {}: {err}",
                    fmt_secs(timeout)
                )));
            }
            tracing::trace!(
                "rank {rank}: store at {addr} not reachable yet ({err}), attempt {attempts}"
            );
            std::thread::sleep(backoff.min(left));
            backoff = (backoff * 2).min(Duration::from_millis(500));
        };
        let _ = stream.set_nodelay(true);
        let hs_timeout = timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_secs(1));
        auth.connect_handshake(&mut stream, rank as u32, 0, hs_timeout)
            .map_err(|e| {
                Error::Bootstrap(format!(
                    "rank {rank}: rank 0's store at {addr} refused this rank: {e} \
                     (another job on MASTER_PORT {port}, or a different HETCCL_JOB_ID/HETCCL_JOB_KEY?)"
                ))
            })?;
        tracing::debug!(
            "rank {rank}: connected to the store at {addr} after {attempts} attempt(s)"
        );
        Ok(TcpStoreClient { stream, addr, rank })
    }

    fn request(&mut self, req: &Request, wait: Duration) -> Result<Reply> {
        let lost = |e: io::Error, addr: &str, rank: usize| {
            Error::Bootstrap(format!(
                "rank {rank}: lost the connection to rank 0's store at {addr}: {}",
                describe_io(&e)
            ))
        };
        let read_timeout = wait.saturating_add(REPLY_GRACE);
        self.stream
            .set_read_timeout(Some(read_timeout))
            .map_err(|e| lost(e, &self.addr, self.rank))?;
        write_frame(&mut self.stream, &req.encode()).map_err(|e| lost(e, &self.addr, self.rank))?;
        let body = read_frame(&mut self.stream).map_err(|e| {
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                Error::Bootstrap(format!(
                    "rank {}: rank 0's store at {} did not answer within {}",
                    self.rank,
                    self.addr,
                    fmt_secs(read_timeout)
                ))
            } else {
                lost(e, &self.addr, self.rank)
            }
        })?;
        Reply::decode(&body).ok_or_else(|| {
            Error::Bootstrap(format!(
                "rank {}: malformed reply ({} bytes) from rank 0's store at {}",
                self.rank,
                body.len(),
                self.addr
            ))
        })
    }
}

fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            "connection closed (rank 0 exited or stopped its store)".into()
        }
        _ => e.to_string(),
    }
}

fn connect_once(
    host: &str,
    port: u16,
    per_try: Duration,
) -> std::result::Result<TcpStream, String> {
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    let mut last = format!("{host} resolves to no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, per_try) {
            Ok(s) => return Ok(s),
            Err(e) => last = e.kind().to_string(),
        }
    }
    Err(last)
}

impl Store for TcpStoreClient {
    fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        let req = Request::Set {
            key: key.into(),
            value: value.to_vec(),
        };
        ok_reply(self.request(&req, Duration::ZERO)?, "store set")
    }
    fn get_many(&mut self, keys: &[&str], timeout: Duration) -> Result<GetOutcome> {
        let req = Request::Get {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            timeout,
        };
        outcome(self.request(&req, timeout)?, "store get")
    }
    fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        let req = Request::Add {
            key: key.into(),
            delta,
        };
        counter_reply(self.request(&req, Duration::ZERO)?, "store add")
    }
    fn delete(&mut self, key: &str) -> Result<()> {
        let req = Request::Delete { key: key.into() };
        ok_reply(self.request(&req, Duration::ZERO)?, "store delete")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(auth: &JobAuth, world: usize) -> StoreServer {
        StoreServer::bind("127.0.0.1:0", auth.clone(), world, Duration::from_secs(2)).unwrap()
    }

    #[test]
    fn requests_and_replies_round_trip() {
        let reqs = [
            Request::Set {
                key: "a".into(),
                value: vec![1, 2, 3],
            },
            Request::Get {
                keys: vec!["a".into(), "bb".into(), String::new()],
                timeout: Duration::from_millis(1500),
            },
            Request::Add {
                key: "n".into(),
                delta: -7,
            },
            Request::Delete { key: "x".into() },
        ];
        for r in reqs {
            assert_eq!(Request::decode(&r.encode()), Some(r));
        }
        let replies = [
            Reply::Ok,
            Reply::Values(vec![vec![], vec![9; 5]]),
            Reply::Missing(vec![0, 3]),
            Reply::Counter(i64::MIN),
            Reply::Error("nope".into()),
        ];
        for r in replies {
            assert_eq!(Reply::decode(&r.encode()), Some(r));
        }
        // Truncated, trailing garbage, unknown op, huge key count.
        assert_eq!(Request::decode(&[OP_SET, 5, 0, 0, 0, b'a']), None);
        assert_eq!(Request::decode(&[OP_DELETE, b'a', 0xff]), None);
        assert_eq!(Request::decode(&[9]), None);
        let mut huge = vec![OP_GET];
        huge.extend_from_slice(&0u64.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Request::decode(&huge), None);
    }

    #[test]
    fn set_get_add_delete_over_tcp_and_in_process() {
        let auth = JobAuth::new("store-test", Some("k"));
        let srv = server(&auth, 2);
        let port = srv.local_addr().port();
        let mut c =
            TcpStoreClient::connect("127.0.0.1", port, &auth, 1, Duration::from_secs(5)).unwrap();
        let mut l = srv.local_client();

        c.set("x", b"hello").unwrap();
        assert_eq!(l.get("x", Duration::from_secs(1)).unwrap(), b"hello");
        l.set("y", b"").unwrap();
        assert_eq!(
            c.get_many(&["y", "x"], Duration::from_secs(1)).unwrap(),
            GetOutcome::Values(vec![vec![], b"hello".to_vec()])
        );
        assert_eq!(c.add("n", 5).unwrap(), 5);
        assert_eq!(l.add("n", -2).unwrap(), 3);
        assert_eq!(c.get("n", Duration::from_secs(1)).unwrap(), b"3");
        let e = c.add("x", 1).unwrap_err().to_string();
        assert_eq!(e, "bootstrap: store add: key \"x\" does not hold a counter");
        c.delete("x").unwrap();
        assert_eq!(
            c.get_many(&["y", "x", "z"], Duration::from_millis(50))
                .unwrap(),
            GetOutcome::Missing(vec![1, 2])
        );
        let e = l
            .get("x", Duration::from_millis(20))
            .unwrap_err()
            .to_string();
        assert!(e.contains("key \"x\" did not appear"), "{e}");
        assert_eq!(srv.clients(), 1);
    }

    #[test]
    fn get_blocks_until_another_client_sets() {
        let auth = JobAuth::new("store-block", None);
        let srv = server(&auth, 3);
        let port = srv.local_addr().port();
        let a = auth.clone();
        let waiter = std::thread::spawn(move || {
            let mut c =
                TcpStoreClient::connect("127.0.0.1", port, &a, 1, Duration::from_secs(5)).unwrap();
            c.get("late", Duration::from_secs(30)).unwrap()
        });
        let mut c2 =
            TcpStoreClient::connect("127.0.0.1", port, &auth, 2, Duration::from_secs(5)).unwrap();
        c2.set("late", b"value").unwrap();
        assert_eq!(waiter.join().unwrap(), b"value");
    }

    #[test]
    fn a_rank_beyond_the_world_is_refused() {
        let auth = JobAuth::new("store-rank", None);
        let srv = server(&auth, 2);
        let port = srv.local_addr().port();
        let mut c =
            TcpStoreClient::connect("127.0.0.1", port, &auth, 2, Duration::from_secs(5)).unwrap();
        // The handshake succeeds, then the server closes the connection.
        let e = c.set("a", b"b").unwrap_err().to_string();
        assert!(e.contains("lost the connection to rank 0's store"), "{e}");
        assert_eq!(srv.refused(), 1);
    }
}
