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
//!                                                       | RANKS (when a rank is gone)
//!   ADD    op=3 delta:i64le key...                   -> COUNTER value:i64le
//!   DELETE op=4 key...                               -> OK
//!   BYE    op=5                                      (no reply; the rank leaves on purpose)
//!   STATUS op=6                                      -> RANKS
//! reply   = status:u8 ...   OK=0 VALUES=1 MISSING=2 COUNTER=3 ERROR=4 (message...)
//!   RANKS=5 n:u32le (state:u8 [len:u32le why]){n}    state: 0 absent, 1 connected,
//!                                                    2 left (said BYE), 3 died (why)
//! ```
//!
//! GET blocks on the server until every key is present or the client's timeout passes,
//! so a waiting rank costs one round trip, not a polling loop. Counters (ADD) are stored
//! as decimal text, so a GET of a counter reads like `"3"`.
//!
//! Ranks that go away: the server knows each authenticated connection's rank. A rank whose
//! connection ends without a BYE (killed, crashed, or exited without closing its
//! bootstrap) is marked dead; one that said BYE has left. Either wakes every blocked GET,
//! which then answers RANKS instead of waiting for keys that will never come, so every
//! rank fails at once naming the one that is gone. STATUS lets waits outside the store
//! (link setup) ask the same question.
//!
//! Admission: each connection is served by its own thread. Connections that have not
//! finished the handshake have a budget of their own ([`PRE_AUTH_CONNECTIONS`]) and a
//! short deadline ([`STORE_HANDSHAKE_TIMEOUT`]); when the budget is full, a new connection
//! sheds the oldest one that has not even sent a hello of this job (else the oldest), so
//! idle strangers cannot keep a rank out, and a shed rank retries. The rule is
//! [`Admission`]'s, shared with the transports' link listeners. Authenticated ranks are
//! always admitted, one connection per rank below the world size.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use super::admission::PRE_AUTH_CONNECTIONS;
use super::admission::{Admission, Ticket};
use super::auth::{HandshakeFailure, JobAuth, Peer, Refusal, RefusalLog};
use super::fmt_secs;
use crate::error::{Error, Result};

/// Largest frame either side accepts; bootstrap blobs are addresses and host names.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// Longest a connection may take to finish its handshake with the store. A rank needs a
/// few round trips; a shed or timed-out rank connects again.
pub const STORE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Some keys are absent and a rank has left or died, so they may never come: every
    /// rank's state, by rank.
    RanksGone(Vec<RankState>),
}

/// What the store knows of a rank's connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RankState {
    /// Not connected (yet). Rank 0, which serves the store, counts as connected.
    Absent,
    /// Authenticated and connected.
    Connected,
    /// Said goodbye and closed its connection.
    Left,
    /// Its connection ended without a goodbye; how.
    Died(String),
}

/// One line naming every rank in `states` that died, then those that left (usually
/// because of a death: they come second so the cause leads); `None` when none did.
pub fn describe_gone(states: &[RankState]) -> Option<String> {
    let died = states.iter().enumerate().filter_map(|(r, s)| match s {
        RankState::Died(how) => Some(format!("rank {r} died ({how})")),
        _ => None,
    });
    let left = states.iter().enumerate().filter_map(|(r, s)| match s {
        RankState::Left => Some(format!(
            "rank {r} left the job (it closed its bootstrap before the others finished)"
        )),
        _ => None,
    });
    let gone: Vec<String> = died.chain(left).collect();
    (!gone.is_empty()).then(|| gone.join("; "))
}

/// Operations on the bootstrap store, the same for rank 0 (in-process) and the others (TCP).
pub trait Store: Send {
    /// Stores `value` under `key`, replacing any earlier value, and wakes waiting getters.
    fn set(&mut self, key: &str, value: &[u8]) -> Result<()>;
    /// Waits until every key is present, a rank is gone, or `timeout` passes.
    fn get_many(&mut self, keys: &[&str], timeout: Duration) -> Result<GetOutcome>;
    /// Adds `delta` to the counter at `key` (absent counts as 0); returns the new value.
    fn add(&mut self, key: &str, delta: i64) -> Result<i64>;
    /// Removes `key`; removing an absent key is not an error.
    fn delete(&mut self, key: &str) -> Result<()>;
    /// Every rank's connection state, by rank.
    fn ranks(&mut self) -> Result<Vec<RankState>>;

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
            GetOutcome::RanksGone(states) => Err(Error::Bootstrap(format!(
                "key {key:?} is not in the store and will not come: {}",
                describe_gone(&states).unwrap_or_default()
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
const OP_BYE: u8 = 5;
const OP_STATUS: u8 = 6;

const ST_OK: u8 = 0;
const ST_VALUES: u8 = 1;
const ST_MISSING: u8 = 2;
const ST_COUNTER: u8 = 3;
const ST_ERROR: u8 = 4;
const ST_RANKS: u8 = 5;

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
    Bye,
    Status,
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Ok,
    Values(Vec<Vec<u8>>),
    Missing(Vec<usize>),
    Counter(i64),
    Error(String),
    Ranks(Vec<RankState>),
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
    /// A count of items each at least `min_bytes` long: refused when the rest of the body
    /// could not hold them, so a forged count never sizes an allocation.
    fn count(&mut self, min_bytes: usize) -> Option<usize> {
        let n = self.u32()?;
        (n <= self.0.len() / min_bytes).then_some(n)
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
            Request::Bye => out.push(OP_BYE),
            Request::Status => out.push(OP_STATUS),
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
                // Each key needs at least its 4-byte length.
                let n = f.count(4)?;
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
            OP_BYE => Request::Bye,
            OP_STATUS => Request::Status,
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
            Reply::Ranks(states) => {
                out.push(ST_RANKS);
                put_u32(&mut out, states.len());
                for s in states {
                    match s {
                        RankState::Absent => out.push(0),
                        RankState::Connected => out.push(1),
                        RankState::Left => out.push(2),
                        RankState::Died(why) => {
                            out.push(3);
                            put_bytes(&mut out, why.as_bytes());
                        }
                    }
                }
            }
        }
        out
    }

    fn decode(body: &[u8]) -> Option<Reply> {
        let mut f = Fields(body);
        let reply = match f.u8()? {
            ST_OK => Reply::Ok,
            ST_VALUES => {
                let n = f.count(4)?;
                let vals = (0..n)
                    .map(|_| f.bytes().map(<[u8]>::to_vec))
                    .collect::<Option<Vec<_>>>()?;
                Reply::Values(vals)
            }
            ST_MISSING => {
                let n = f.count(4)?;
                Reply::Missing((0..n).map(|_| f.u32()).collect::<Option<Vec<_>>>()?)
            }
            ST_COUNTER => Reply::Counter(f.u64()? as i64),
            ST_ERROR => Reply::Error(String::from_utf8_lossy(f.rest()).into_owned()),
            ST_RANKS => {
                let n = f.count(1)?;
                let states = (0..n)
                    .map(|_| {
                        Some(match f.u8()? {
                            0 => RankState::Absent,
                            1 => RankState::Connected,
                            2 => RankState::Left,
                            3 => RankState::Died(String::from_utf8_lossy(f.bytes()?).into_owned()),
                            _ => return None,
                        })
                    })
                    .collect::<Option<Vec<_>>>()?;
                Reply::Ranks(states)
            }
            _ => return None,
        };
        f.0.is_empty().then_some(reply)
    }
}

fn write_frame(s: &mut impl Write, body: &[u8]) -> io::Result<()> {
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

/// Reads one frame. The length prefix is checked against [`MAX_FRAME_BYTES`] before
/// anything is allocated, and the body buffer grows only with the bytes that actually
/// arrive, so a peer that announces a large frame and sends little costs little.
fn read_frame(s: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    read_frame_into(s, &mut body)?;
    Ok(body)
}

fn read_frame_into(s: &mut impl Read, body: &mut Vec<u8>) -> io::Result<()> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {MAX_FRAME_BYTES}-byte limit"),
        ));
    }
    body.clear();
    body.reserve(len.min(64 << 10));
    s.take(len as u64).read_to_end(body)?;
    if body.len() < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame ends after {} of its {len} bytes", body.len()),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The data, shared by the server's connection threads and rank 0's in-process client

struct State {
    map: HashMap<String, Vec<u8>>,
    /// By rank; rank 0 serves the store and counts as connected.
    ranks: Vec<RankState>,
    /// Authenticated connections currently open.
    clients: usize,
    stopping: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn new(world_size: usize) -> Shared {
        let mut ranks = vec![RankState::Absent; world_size];
        if let Some(r0) = ranks.first_mut() {
            *r0 = RankState::Connected;
        }
        Shared {
            state: Mutex::new(State {
                map: HashMap::new(),
                ranks,
                clients: 0,
                stopping: false,
            }),
            changed: Condvar::new(),
        }
    }

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
            Request::Status => Reply::Ranks(self.lock().ranks.clone()),
            // Handled by the connection itself.
            Request::Bye => Reply::Ok,
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
            // A rank that is gone will not set its keys: answer now rather than at the
            // timeout (values already there were returned above, so the ranks still
            // reading the last round are not failed by one that finished and left). This
            // comes before the stop below: rank 0 stops its store when it fails for the
            // same reason, and the others should hear the reason, not the stop.
            if st
                .ranks
                .iter()
                .any(|r| matches!(r, RankState::Left | RankState::Died(_)))
            {
                return Reply::Ranks(st.ranks.clone());
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

    /// Admits an authenticated connection for `rank`, or says why not.
    fn admit(&self, rank: u32) -> std::result::Result<(), Refusal> {
        let mut st = self.lock();
        let world = st.ranks.len();
        let Some(state) = st.ranks.get_mut(rank as usize) else {
            return Err(Refusal::BeyondWorld(
                u32::try_from(world).unwrap_or(u32::MAX),
            ));
        };
        match state {
            RankState::Absent => {
                *state = RankState::Connected;
                st.clients += 1;
                Ok(())
            }
            RankState::Connected => Err(Refusal::AlreadyConnected),
            RankState::Left | RankState::Died(_) => Err(Refusal::AlreadyGone),
        }
    }

    /// The connection of an admitted `rank` ended: it `left` (said BYE), died (`why`), or
    /// never got its verdict through (`None`, back to absent so it can connect again).
    fn depart(&self, rank: u32, outcome: Option<RankState>) {
        let mut st = self.lock();
        st.clients = st.clients.saturating_sub(1);
        let stopping = st.stopping;
        if let Some(state) = st.ranks.get_mut(rank as usize) {
            *state = match outcome {
                // Connections the server itself closes on stop are not deaths.
                Some(RankState::Died(_)) if stopping => RankState::Left,
                Some(s) => s,
                None => RankState::Absent,
            };
        }
        drop(st);
        self.changed.notify_all();
    }
}

/// Rank 0's own handle on the store it serves: no socket, same semantics.
pub struct LocalStore(Arc<Shared>);

fn outcome(reply: Reply, what: &str) -> Result<GetOutcome> {
    match reply {
        Reply::Values(v) => Ok(GetOutcome::Values(v)),
        Reply::Missing(m) => Ok(GetOutcome::Missing(m)),
        Reply::Ranks(r) => Ok(GetOutcome::RanksGone(r)),
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

fn ranks_reply(reply: Reply, what: &str) -> Result<Vec<RankState>> {
    match reply {
        Reply::Ranks(r) => Ok(r),
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
    fn ranks(&mut self) -> Result<Vec<RankState>> {
        ranks_reply(self.0.apply(Request::Status), "store status")
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
    log: Arc<RefusalLog>,
    admission: Admission,
    auth: JobAuth,
    local: SocketAddr,
}

impl ServeCtx {
    fn refuse(&self, why: &dyn std::fmt::Display) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.log.refused(why);
    }
}

/// Where rank 0's store listens when the address ranks are given (`MASTER_ADDR`) does not
/// belong to this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonLocalBind {
    /// This address (`HETCCL_SOCKET_IFNAME`'s), on the same port.
    At(IpAddr),
    /// Every interface, with a warning that says why and how to narrow it.
    Everywhere,
}

impl StoreServer {
    /// Listens on `addr` (every resolved address is tried in turn), which must be an
    /// address of this host, or else where `non_local` says. Connections must pass
    /// `auth`'s handshake within `handshake_timeout` (at most
    /// [`STORE_HANDSHAKE_TIMEOUT`]) and present a rank below `world_size`.
    pub fn bind(
        addr: &str,
        auth: JobAuth,
        world_size: usize,
        handshake_timeout: Duration,
        non_local: NonLocalBind,
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
                // MASTER_ADDR names this host by an address it cannot bind: NAT, a port
                // forward, a service address. The ranks' packets arrive on some interface
                // of this host; which one is known only to the user.
                let at = match non_local {
                    NonLocalBind::At(ip) => {
                        tracing::info!(
                            "rank 0: {addr} is not an address of this host; the store listens \
                             on {ip} (HETCCL_SOCKET_IFNAME)"
                        );
                        ip
                    }
                    NonLocalBind::Everywhere => {
                        let any = IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED);
                        tracing::warn!(
                            "rank 0: MASTER_ADDR {addr} is not an address of this host (NAT or \
                             a forwarded address?), so the store listens on every interface \
                             ({any}:{port}); set HETCCL_SOCKET_IFNAME to the interface the \
                             ranks reach this host through to listen there alone. Only ranks \
                             holding the job key get past the handshake either way",
                            port = a.port()
                        );
                        any
                    }
                };
                match TcpListener::bind(SocketAddr::new(at, a.port())) {
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
        let shared = Arc::new(Shared::new(world_size));
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let ctx = ServeCtx {
            shared: shared.clone(),
            refused: refused.clone(),
            log: Arc::new(RefusalLog::new(format!("store on {local}"))),
            admission: Admission::new(
                PRE_AUTH_CONNECTIONS,
                handshake_timeout.min(STORE_HANDSHAKE_TIMEOUT),
            ),
            auth,
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

    /// Connections refused or shed so far (strangers, other jobs, wrong keys, bad
    /// requests, load shedding).
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
            // Wakes the connection thread out of its blocking read, but lets it finish
            // the reply it may be writing (a blocked GET's answer, woken above), within a
            // bound: a client that does not read cannot hold the stop.
            let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
            let _ = s.shutdown(Shutdown::Read);
        }
        for (s, h) in conns {
            let _ = h.join();
            let _ = s.shutdown(Shutdown::Both);
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
    while !stop.load(Ordering::SeqCst) {
        ctx.log.flush();
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
                // Out of descriptors and the like: refusals, rate-limited like the others.
                ctx.refuse(&format_args!("accept failed: {e}"));
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let (Ok(()), Ok(keep)) = (stream.set_nonblocking(false), stream.try_clone()) else {
            ctx.refuse(&format_args!("cannot set up the connection from {from}"));
            continue;
        };
        let Ok((ticket, shed)) = ctx.admission.enter(&stream) else {
            ctx.refuse(&format_args!("cannot set up the connection from {from}"));
            continue;
        };
        if let Some(shed) = shed {
            ctx.refuse(&shed);
        }
        let mut list = conns.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|(_, h)| !h.is_finished());
        let c = ctx.clone();
        match std::thread::Builder::new()
            .name("hetccl-store-conn".into())
            .spawn(move || serve_conn(stream, from, c, ticket))
        {
            Ok(h) => list.push((keep, h)),
            // The ticket went with the thread that never started, and left the budget.
            Err(e) => ctx.refuse(&format_args!("cannot serve {from}: {e}")),
        }
    }
}

fn serve_conn(mut s: TcpStream, from: SocketAddr, ctx: ServeCtx, ticket: Ticket) {
    serve_conn_inner(&mut s, from, &ctx, &ticket);
    // The accept thread holds a clone of the socket, so dropping ours would not close it.
    let _ = s.shutdown(Shutdown::Both);
}

fn serve_conn_inner(s: &mut TcpStream, from: SocketAddr, ctx: &ServeCtx, ticket: &Ticket) {
    let mut admitted = None;
    let res = ctx.auth.accept_handshake_with(
        s,
        ticket.remaining(),
        Some(ticket.hello_seen()),
        |p: Peer| {
            // Leaving the budget comes before admission, and both before the verdict, so
            // a connection is never shed after it was admitted.
            ticket.leave()?;
            ctx.shared.admit(p.rank)?;
            admitted = Some(p.rank);
            Ok(())
        },
    );
    let shed = ticket.was_shed();
    let peer = match res {
        Ok(p) => p,
        Err(e) => {
            if let Some(rank) = admitted {
                // Admitted, but the verdict did not get through: the rank will retry.
                ctx.shared.depart(rank, None);
            }
            // A shed connection was counted and logged when it was shed.
            if !shed {
                ctx.refuse(&e);
            }
            return;
        }
    };
    let rank = peer.rank;
    let _ = s.set_nodelay(true);
    tracing::debug!("store on {}: rank {rank} connected from {from}", ctx.local);
    let end = loop {
        let body = match read_frame(s) {
            Ok(b) => b,
            Err(e) => {
                let how = if e.kind() == io::ErrorKind::UnexpectedEof {
                    "its connection to the store closed without a goodbye: killed, crashed, or \
                     exited without closing its communicator"
                        .to_string()
                } else {
                    format!("its connection to the store failed: {e}")
                };
                break RankState::Died(how);
            }
        };
        let Some(req) = Request::decode(&body) else {
            ctx.refuse(&format_args!(
                "rank {rank} ({from}) sent a malformed request of {} bytes; closing",
                body.len()
            ));
            let _ = write_frame(s, &Reply::Error("malformed request".into()).encode());
            break RankState::Died(format!(
                "it sent a malformed request of {} bytes",
                body.len()
            ));
        };
        if req == Request::Bye {
            break RankState::Left;
        }
        let reply = ctx.shared.apply(req);
        if let Err(e) = write_frame(s, &reply.encode()) {
            break RankState::Died(format!("the store's reply to it failed: {e}"));
        }
    };
    match &end {
        RankState::Left => tracing::debug!("store on {}: rank {rank} left", ctx.local),
        other => tracing::debug!("store on {}: rank {rank} ended: {other:?}", ctx.local),
    }
    ctx.shared.depart(rank, Some(end));
}

// ---------------------------------------------------------------------------------------
// Client

/// A rank's authenticated connection to rank 0's store.
pub struct TcpStoreClient {
    stream: TcpStream,
    addr: String,
    rank: usize,
}

/// Where a connecting rank finds rank 0's store, and with which identity.
pub(crate) struct StoreTarget {
    pub host: String,
    pub port: u16,
    pub auth: JobAuth,
    /// The address and key came from a key file, which may be an earlier job's: a store
    /// that proves another key, another job, or nothing at all means "read it again".
    pub may_be_stale: bool,
}

/// What a connecting rank knows about the store's whereabouts right now.
pub(crate) enum Whereabouts {
    /// Try this.
    At(StoreTarget),
    /// Not known yet (rank 0 has not published it); why, for the timeout message.
    NotYet(String),
}

impl TcpStoreClient {
    /// Connects to `host:port` and authenticates as `rank`, retrying until `timeout` while
    /// nobody listens yet (rank 0 may start later) and while the store sheds load. A
    /// store that proves a different key, serves another job, or refuses this rank is not
    /// retried: waiting does not fix those.
    pub fn connect(
        host: &str,
        port: u16,
        auth: &JobAuth,
        rank: usize,
        timeout: Duration,
    ) -> Result<TcpStoreClient> {
        Self::connect_to(rank, timeout, || {
            Ok(Whereabouts::At(StoreTarget {
                host: host.to_string(),
                port,
                auth: auth.clone(),
                may_be_stale: false,
            }))
        })
        .map(|(c, _)| c)
    }

    /// Connects to wherever `find` says the store is, asking again after each failed
    /// try, until `timeout`. Returns the client and the identity that got in.
    pub(crate) fn connect_to(
        rank: usize,
        timeout: Duration,
        mut find: impl FnMut() -> Result<Whereabouts>,
    ) -> Result<(TcpStoreClient, JobAuth)> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let left = timeout.saturating_sub(start.elapsed());
            // This try's failure: the address tried (if any) and what went wrong.
            let last: (Option<String>, String) = match find()? {
                Whereabouts::NotYet(why) => (None, why),
                Whereabouts::At(t) => {
                    let addr = format!("{}:{}", t.host, t.port);
                    let per_try = left.clamp(Duration::from_millis(1), Duration::from_secs(5));
                    match connect_once(&t.host, t.port, per_try) {
                        Err(e) => (Some(addr), e),
                        Ok(mut stream) => {
                            let _ = stream.set_nodelay(true);
                            let hs_timeout = left.max(Duration::from_secs(1));
                            match t.auth.connect_handshake_detailed(
                                &mut stream,
                                rank as u32,
                                0,
                                hs_timeout,
                            ) {
                                Ok(()) => {
                                    tracing::debug!(
                                        "rank {rank}: connected to the store at {addr} after \
                                         {attempts} attempt(s)"
                                    );
                                    let client = TcpStoreClient { stream, addr, rank };
                                    return Ok((client, t.auth));
                                }
                                Err(f) => {
                                    if let Some(e) = fatal(&f, &t, rank, &addr) {
                                        return Err(e);
                                    }
                                    (Some(addr), f.to_string())
                                }
                            }
                        }
                    }
                }
            };
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(Error::Bootstrap(match last {
                    (Some(addr), why) => format!(
                        "rank {rank}: cannot reach rank 0's store at {addr} after {}: {why}",
                        fmt_secs(timeout)
                    ),
                    (None, why) => format!(
                        "rank {rank}: found no store of rank 0 after {}: {why}",
                        fmt_secs(timeout)
                    ),
                }));
            }
            tracing::trace!(
                "rank {rank}: store not reachable yet ({}), attempt {attempts}",
                last.1
            );
            std::thread::sleep(backoff.min(left));
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Drops the connection without a goodbye, as a killed process would.
    #[cfg(test)]
    pub(crate) fn abandon(self) {
        let c = std::mem::ManuallyDrop::new(self);
        let _ = c.stream.shutdown(Shutdown::Both);
    }

    /// The store's address, `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
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

/// The error that ends a connecting rank's attempts, or `None` when trying again can help.
fn fatal(f: &HandshakeFailure, t: &StoreTarget, rank: usize, addr: &str) -> Option<Error> {
    let port = t.port;
    let why = match f {
        HandshakeFailure::Dropped(_) | HandshakeFailure::Refused(Refusal::Busy) => return None,
        // A key file of an earlier job names its store, which may now be anything.
        HandshakeFailure::KeyDiffers
        | HandshakeFailure::NotHetccl
        | HandshakeFailure::Refused(Refusal::OtherJob)
            if t.may_be_stale =>
        {
            return None
        }
        HandshakeFailure::KeyDiffers => format!(
            "it proved it holds a different job key: HETCCL_JOB_KEY differs between the ranks, \
             or another job with its own key serves port {port}"
        ),
        HandshakeFailure::Refused(Refusal::OtherJob) => format!(
            "it serves another job: HETCCL_JOB_ID differs between the ranks, or another job \
             serves port {port}"
        ),
        HandshakeFailure::NotHetccl => {
            format!("what listens there is not a hetccl store (another program on port {port}?)")
        }
        HandshakeFailure::Refused(r) => r.to_string(),
    };
    Some(Error::Bootstrap(format!(
        "rank {rank}: rank 0's store at {addr} refused this rank: {why}"
    )))
}

impl Drop for TcpStoreClient {
    fn drop(&mut self) {
        // The goodbye tells the store this rank leaves on purpose, not by dying. Best
        // effort, and never blocking for long: a full socket buffer means the store is
        // not reading anyway.
        let _ = self
            .stream
            .set_write_timeout(Some(Duration::from_millis(200)));
        let _ = write_frame(&mut self.stream, &Request::Bye.encode());
        let _ = self.stream.shutdown(Shutdown::Both);
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
    fn ranks(&mut self) -> Result<Vec<RankState>> {
        ranks_reply(
            self.request(&Request::Status, Duration::ZERO)?,
            "store status",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(auth: &JobAuth, world: usize) -> StoreServer {
        StoreServer::bind(
            "127.0.0.1:0",
            auth.clone(),
            world,
            Duration::from_secs(2),
            NonLocalBind::Everywhere,
        )
        .unwrap()
    }

    fn connect(srv: &StoreServer, auth: &JobAuth, rank: usize) -> Result<TcpStoreClient> {
        let port = srv.local_addr().port();
        TcpStoreClient::connect("127.0.0.1", port, auth, rank, Duration::from_secs(10))
    }

    /// The server's refusal count once it reaches `n` (it counts after it told the
    /// connector), or after 5 s.
    fn refused_reaches(srv: &StoreServer, n: usize) -> usize {
        let start = Instant::now();
        while srv.refused() < n && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        srv.refused()
    }

    fn die(c: TcpStoreClient) {
        c.abandon();
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
            Request::Bye,
            Request::Status,
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
            Reply::Ranks(vec![
                RankState::Connected,
                RankState::Absent,
                RankState::Left,
                RankState::Died("killed".into()),
            ]),
        ];
        for r in replies {
            assert_eq!(Reply::decode(&r.encode()), Some(r));
        }
        // Truncated, trailing garbage, unknown op, huge key count.
        assert_eq!(Request::decode(&[OP_SET, 5, 0, 0, 0, b'a']), None);
        assert_eq!(Request::decode(&[OP_DELETE, b'a', 0xff]), None);
        assert_eq!(Request::decode(&[9]), None);
        assert_eq!(Request::decode(&[OP_BYE, 0]), None);
        let mut huge = vec![OP_GET];
        huge.extend_from_slice(&0u64.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Request::decode(&huge), None);
        let mut huge = vec![ST_RANKS];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Reply::decode(&huge), None);
    }

    #[test]
    fn frame_lengths_are_checked_before_allocating() {
        // A 4 GiB length prefix: refused before a byte of body is allocated.
        let mut body = Vec::new();
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        let e = read_frame_into(&mut r, &mut body).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            e.to_string(),
            format!("frame of 4294967295 bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
        );
        assert_eq!(body.capacity(), 0);
        // A frame at the limit that sends 10 bytes costs about what arrived.
        let mut bytes = (MAX_FRAME_BYTES as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[7; 10]);
        let e = read_frame_into(&mut &bytes[..], &mut body).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(
            e.to_string(),
            format!("frame ends after 10 of its {MAX_FRAME_BYTES} bytes")
        );
        assert!(body.capacity() <= 128 << 10, "{}", body.capacity());
        // One past the limit is refused.
        let mut r: &[u8] = &((MAX_FRAME_BYTES as u32 + 1).to_le_bytes());
        assert_eq!(
            read_frame(&mut r).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(3000))]
        /// Any body decodes to a request or reply, or to nothing; never a panic, and a
        /// decoded one encodes back to the same bytes.
        #[test]
        fn any_bytes_decode_or_are_refused(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..96)) {
            if let Some(r) = Request::decode(&body) {
                proptest::prop_assert_eq!(Request::decode(&r.encode()), Some(r));
            }
            if let Some(r) = Reply::decode(&body) {
                proptest::prop_assert_eq!(Reply::decode(&r.encode()), Some(r));
            }
        }

        /// Valid requests with one byte changed or cut short never panic the decoder.
        #[test]
        fn mutated_requests_never_panic(
            keys in proptest::collection::vec("[a-z/0-9]{0,6}", 0..5),
            at in 0usize..200,
            xor in proptest::prelude::any::<u8>(),
            cut in 0usize..200,
        ) {
            let mut b = Request::Get { keys, timeout: Duration::from_millis(5) }.encode();
            let n = b.len();
            b[at % n] ^= xor;
            b.truncate(cut.max(1));
            let _ = Request::decode(&b);
            let _ = Reply::decode(&b);
        }

        /// Any byte stream read as frames: each frame is at most the limit, a length past
        /// the limit is an error, and the buffer never grows far beyond what arrived.
        #[test]
        fn any_stream_reads_as_bounded_frames(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut r = &bytes[..];
            let mut body = Vec::new();
            while read_frame_into(&mut r, &mut body).is_ok() {
                proptest::prop_assert!(body.len() <= MAX_FRAME_BYTES);
                proptest::prop_assert!(body.capacity() <= (128 << 10) + bytes.len());
            }
            proptest::prop_assert!(body.capacity() <= (128 << 10) + bytes.len());
        }
    }

    #[test]
    fn set_get_add_delete_over_tcp_and_in_process() {
        let auth = JobAuth::new("store-test", "k");
        let srv = server(&auth, 2);
        let mut c = connect(&srv, &auth, 1).unwrap();
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
        assert_eq!(
            c.ranks().unwrap(),
            vec![RankState::Connected, RankState::Connected]
        );
    }

    #[test]
    fn get_blocks_until_another_client_sets() {
        let auth = JobAuth::new("store-block", "k");
        let srv = server(&auth, 3);
        let port = srv.local_addr().port();
        let a = auth.clone();
        let waiter = std::thread::spawn(move || {
            let mut c =
                TcpStoreClient::connect("127.0.0.1", port, &a, 1, Duration::from_secs(5)).unwrap();
            c.get("late", Duration::from_secs(30)).unwrap()
        });
        let mut c2 = connect(&srv, &auth, 2).unwrap();
        c2.set("late", b"value").unwrap();
        assert_eq!(waiter.join().unwrap(), b"value");
    }

    #[test]
    fn ranks_beyond_the_world_and_second_connections_are_refused() {
        let auth = JobAuth::new("store-rank", "k");
        let srv = server(&auth, 2);
        let port = srv.local_addr().port();
        let e = connect(&srv, &auth, 2).err().unwrap().to_string();
        assert_eq!(
            e,
            format!(
                "bootstrap: rank 2: rank 0's store at 127.0.0.1:{port} refused this rank: rank \
                 is not below the world size 2"
            )
        );
        assert_eq!(refused_reaches(&srv, 1), 1);
        let _one = connect(&srv, &auth, 1).unwrap();
        let e = connect(&srv, &auth, 1).err().unwrap().to_string();
        assert!(
            e.ends_with("refused this rank: another connection already holds this rank"),
            "{e}"
        );
        // Rank 0 serves the store: nobody else may claim it.
        let e = connect(&srv, &auth, 0).err().unwrap().to_string();
        assert!(
            e.ends_with("refused this rank: another connection already holds this rank"),
            "{e}"
        );
        assert_eq!(refused_reaches(&srv, 3), 3);
    }

    #[test]
    fn a_dead_rank_fails_every_waiter_at_once_naming_it() {
        let auth = JobAuth::new("store-dead", "k");
        let srv = server(&auth, 3);
        let port = srv.local_addr().port();
        let a = auth.clone();
        let waiter = std::thread::spawn(move || {
            let mut c =
                TcpStoreClient::connect("127.0.0.1", port, &a, 1, Duration::from_secs(5)).unwrap();
            c.set("k1", b"1").unwrap();
            let start = Instant::now();
            let got = c.get_many(&["k1", "k2"], Duration::from_secs(60)).unwrap();
            (got, start.elapsed())
        });
        let c2 = connect(&srv, &auth, 2).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        die(c2);
        let (got, took) = waiter.join().unwrap();
        let GetOutcome::RanksGone(states) = got else {
            panic!("{got:?}")
        };
        assert!(matches!(states[2], RankState::Died(_)), "{states:?}");
        assert_eq!(
            describe_gone(&states).unwrap(),
            "rank 2 died (its connection to the store closed without a goodbye: killed, \
             crashed, or exited without closing its communicator)"
        );
        assert!(took < Duration::from_secs(5), "took {took:?}");
        // Rank 0 sees it too, and values already there are still served.
        let mut l = srv.local_client();
        assert_eq!(l.get("k1", Duration::from_secs(1)).unwrap(), b"1");
        let e = l
            .get("k2", Duration::from_secs(60))
            .unwrap_err()
            .to_string();
        // (Rank 1 may be listed too, after: it has closed its client, with a goodbye.)
        assert!(
            e.contains(
                "will not come: rank 2 died (its connection to the store closed without a \
                 goodbye: killed, crashed, or exited without closing its communicator)"
            ),
            "{e}"
        );
        // The dead rank cannot come back under its old number.
        let e = connect(&srv, &auth, 2).err().unwrap().to_string();
        assert!(
            e.ends_with("refused this rank: this rank already left the job"),
            "{e}"
        );
    }

    #[test]
    fn a_rank_that_says_goodbye_has_left() {
        let auth = JobAuth::new("store-bye", "k");
        let srv = server(&auth, 2);
        drop(connect(&srv, &auth, 1).unwrap());
        let mut l = srv.local_client();
        let start = Instant::now();
        let got = l.get_many(&["never"], Duration::from_secs(60)).unwrap();
        assert_eq!(
            got,
            GetOutcome::RanksGone(vec![RankState::Connected, RankState::Left])
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(srv.clients(), 0);
    }

    #[test]
    fn idle_strangers_and_garbage_do_not_keep_a_rank_out() {
        let auth = JobAuth::new("store-flood", "k");
        let srv = server(&auth, 3);
        let port = srv.local_addr().port();
        // Far more idle connections than the handshake budget, and a stream of garbage.
        let idle: Vec<TcpStream> = (0..200)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flood = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                        let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n");
                        n += 1;
                    }
                }
                n
            })
        };
        let start = Instant::now();
        let c1 = connect(&srv, &auth, 1).unwrap();
        let c2 = connect(&srv, &auth, 2).unwrap();
        let took = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        let garbage = flood.join().unwrap();
        assert!(took < Duration::from_secs(8), "took {took:?}");
        assert_eq!(srv.clients(), 2);
        assert!(garbage > 0);
        assert!(
            srv.refused() >= 200 - PRE_AUTH_CONNECTIONS,
            "{}",
            srv.refused()
        );
        drop((c1, c2, idle));
    }
}
