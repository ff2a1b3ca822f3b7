//! Connection handshake: protocol version, job id, rank, and a mutual HMAC proof of the
//! job key. Used by the bootstrap store and by every transport connection.
//!
//! ```text
//! connector -> acceptor : Hello     { "HCCL", version, job hash, rank, channel, nonce_c }   48 bytes
//! acceptor  -> connector: Challenge { "HCCL", nonce_a, mac_a = HMAC(key, "A" nonce_c nonce_a hello) }
//!                       | Refusal   { "HCNO", code:u8, arg:u32le }                         9 bytes
//! connector -> acceptor : Proof     { mac_c = HMAC(key, "C" nonce_a nonce_c hello) }        32 bytes
//! acceptor  -> connector: Verdict   { "HCOK" } | Refusal
//! ```
//!
//! A stranger, a process of another job, or one holding a different key fails at the
//! first message it gets wrong; the acceptor refuses it and keeps serving the job. The
//! acceptor answers a hello of another job or version with a refusal saying so, and
//! sends nothing at all to bytes that are not a hello. The verdict tells an authenticated
//! connector whether it was admitted (the store turns away ranks beyond the world, or a
//! second connection for one rank), so a connector never takes a connection the acceptor
//! dropped for one that works. Every read has one deadline for the whole handshake, so a
//! peer that sends a byte at a time cannot hold an acceptor longer than the timeout.
//!
//! What the handshake does not do: nothing after it is authenticated or encrypted.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Bumped on any incompatible change of the wire protocol (2: refusals and the verdict).
pub const PROTOCOL_VERSION: u32 = 2;
const MAGIC: [u8; 4] = *b"HCCL";
const REFUSE: [u8; 4] = *b"HCNO";
const ADMIT: [u8; 4] = *b"HCOK";
/// Bytes of a hello.
pub const HELLO_LEN: usize = 4 + 4 + 16 + 4 + 4 + 16;
const CHALLENGE_LEN: usize = 4 + 16 + 32;
const REFUSAL_LEN: usize = 4 + 1 + 4;

type HmacSha256 = Hmac<Sha256>;

/// The identity and secret of one job.
#[derive(Clone)]
pub struct JobAuth {
    job_id: String,
    job_hash: [u8; 16],
    key: Vec<u8>,
}

impl fmt::Debug for JobAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobAuth")
            .field("job_id", &self.job_id)
            .finish_non_exhaustive()
    }
}

/// What the acceptor learns about an authenticated connector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The connector's rank (`u32::MAX` for clients that have no rank yet).
    pub rank: u32,
    /// Which connection this is, as chosen by the connector (e.g. socket index).
    pub channel: u32,
}

/// Why an acceptor turned a connector away, as it tells the connector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Too many connections are in their handshake at once; trying again may work.
    Busy,
    /// The hello names another job (a different job id).
    OtherJob,
    /// The connector speaks another protocol version; carries the acceptor's.
    Version(u32),
    /// The connector's proof does not match this job's key.
    WrongKey,
    /// The rank is not below the world size, which this carries.
    BeyondWorld(u32),
    /// Another connection already holds this rank.
    AlreadyConnected,
    /// This rank already left the job, or died.
    AlreadyGone,
}

impl Refusal {
    fn encode(self) -> [u8; REFUSAL_LEN] {
        let (code, arg) = match self {
            Refusal::Busy => (1u8, 0u32),
            Refusal::OtherJob => (2, 0),
            Refusal::Version(v) => (3, v),
            Refusal::WrongKey => (4, 0),
            Refusal::BeyondWorld(w) => (5, w),
            Refusal::AlreadyConnected => (6, 0),
            Refusal::AlreadyGone => (7, 0),
        };
        let mut out = [0u8; REFUSAL_LEN];
        out[..4].copy_from_slice(&REFUSE);
        out[4] = code;
        out[5..].copy_from_slice(&arg.to_le_bytes());
        out
    }

    /// The code and argument after a refusal's magic; `None` for unknown codes.
    fn decode(b: &[u8; 5]) -> Option<Refusal> {
        let arg = u32::from_le_bytes([b[1], b[2], b[3], b[4]]);
        Some(match b[0] {
            1 => Refusal::Busy,
            2 => Refusal::OtherJob,
            3 => Refusal::Version(arg),
            4 => Refusal::WrongKey,
            5 => Refusal::BeyondWorld(arg),
            6 => Refusal::AlreadyConnected,
            7 => Refusal::AlreadyGone,
            _ => return None,
        })
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Busy => write!(f, "too many connections in their handshake"),
            Refusal::OtherJob => write!(f, "belongs to another job (job id differs)"),
            Refusal::Version(v) => write!(
                f,
                "acceptor speaks protocol version {v}, this build {PROTOCOL_VERSION}"
            ),
            Refusal::WrongKey => write!(f, "wrong job key"),
            Refusal::BeyondWorld(w) => write!(f, "rank is not below the world size {w}"),
            Refusal::AlreadyConnected => write!(f, "another connection already holds this rank"),
            Refusal::AlreadyGone => write!(f, "this rank already left the job"),
        }
    }
}

/// How a connector's handshake failed, precisely enough to decide whether to try again.
#[derive(Debug)]
pub enum HandshakeFailure {
    /// The acceptor answered with a MAC of another key: it proved it holds a different key.
    KeyDiffers,
    /// The acceptor said why it refused.
    Refused(Refusal),
    /// The acceptor is not a hetccl endpoint (its reply has no hetccl magic).
    NotHetccl,
    /// The connection closed, reset or stalled before the verdict: an acceptor shedding
    /// load, a process that died, a port that changed hands. Says which.
    Dropped(String),
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeFailure::KeyDiffers => write!(f, "acceptor does not hold this job's key"),
            HandshakeFailure::Refused(r) => write!(f, "refused: {r}"),
            HandshakeFailure::NotHetccl => write!(f, "reply is not a hetccl handshake"),
            HandshakeFailure::Dropped(why) => write!(f, "{why}"),
        }
    }
}

/// A random key: 32 bytes from the OS generator, as 64 hex digits.
pub fn random_key() -> String {
    random_hex(32)
}

/// `bytes` random bytes as hex.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The fields of a hello that matter once its magic, version and job are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hello {
    rank: u32,
    channel: u32,
}

impl JobAuth {
    /// A job identity with its secret key. The job id is not secret (it names the job in
    /// logs and shared-memory names); the key must be, and must be the same on every rank.
    pub fn new(job_id: &str, key: &str) -> Self {
        let digest = Sha256::digest(job_id.as_bytes());
        let mut job_hash = [0u8; 16];
        job_hash.copy_from_slice(&digest[..16]);
        JobAuth {
            job_id: job_id.to_string(),
            job_hash,
            key: key.as_bytes().to_vec(),
        }
    }

    /// The job id.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The key of a job made from this one (a communicator split off it), named by
    /// `child_id`: 64 hex digits of HMAC-SHA256 under this job's key, so every rank of
    /// this job derives it by itself and the secret never travels. Without this job's
    /// key it cannot be computed from the child's id.
    pub fn derive_key(&self, child_id: &str) -> String {
        self.mac(&[b"hetccl derived job key\0", child_id.as_bytes()])
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        // HMAC accepts keys of any length, so this never fails; an all-zero MAC would
        // simply fail verification.
        let Ok(mut m) = <HmacSha256 as Mac>::new_from_slice(&self.key) else {
            return [0u8; 32];
        };
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    /// Checks a hello against this job; the refusal to send back when it does not fit.
    /// `Err(None)`: not a hetccl hello at all (nothing is sent back).
    fn check_hello(&self, hello: &[u8]) -> std::result::Result<Hello, Option<Refusal>> {
        if hello.len() != HELLO_LEN || hello[..4] != MAGIC {
            return Err(None);
        }
        let u32_at =
            |i: usize| u32::from_le_bytes([hello[i], hello[i + 1], hello[i + 2], hello[i + 3]]);
        let version = u32_at(4);
        if version != PROTOCOL_VERSION {
            return Err(Some(Refusal::Version(PROTOCOL_VERSION)));
        }
        if hello[8..24] != self.job_hash {
            return Err(Some(Refusal::OtherJob));
        }
        Ok(Hello {
            rank: u32_at(24),
            channel: u32_at(28),
        })
    }

    /// Connector side. On success the stream is authenticated both ways and the acceptor
    /// admitted this connection.
    pub fn connect_handshake(
        &self,
        s: &mut TcpStream,
        rank: u32,
        channel: u32,
        timeout: Duration,
    ) -> Result<()> {
        let from = peer_name(s);
        self.connect_handshake_detailed(s, rank, channel, timeout)
            .map_err(|f| auth_err(&from, &f.to_string()))
    }

    /// [`JobAuth::connect_handshake`], saying precisely how it failed.
    pub fn connect_handshake_detailed(
        &self,
        s: &mut TcpStream,
        rank: u32,
        channel: u32,
        timeout: Duration,
    ) -> std::result::Result<(), HandshakeFailure> {
        let deadline = Instant::now().checked_add(timeout);
        let dropped = |e: io::Error| HandshakeFailure::Dropped(describe_read_error(&e));
        let mut nonce_c = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut nonce_c);
        let mut hello = Vec::with_capacity(HELLO_LEN);
        hello.extend_from_slice(&MAGIC);
        hello.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        hello.extend_from_slice(&self.job_hash);
        hello.extend_from_slice(&rank.to_le_bytes());
        hello.extend_from_slice(&channel.to_le_bytes());
        hello.extend_from_slice(&nonce_c);
        write_until(s, &hello, deadline).map_err(dropped)?;

        let mut ch = [0u8; CHALLENGE_LEN];
        read_until(s, &mut ch[..4], deadline).map_err(dropped)?;
        if ch[..4] == REFUSE {
            return Err(read_refusal(s, deadline));
        }
        if ch[..4] != MAGIC {
            return Err(HandshakeFailure::NotHetccl);
        }
        read_until(s, &mut ch[4..], deadline).map_err(dropped)?;
        let nonce_a = &ch[4..20];
        let want = self.mac(&[b"A", &nonce_c, nonce_a, &hello]);
        if !constant_time_eq(&want, &ch[20..52]) {
            return Err(HandshakeFailure::KeyDiffers);
        }
        let proof = self.mac(&[b"C", nonce_a, &nonce_c, &hello]);
        write_until(s, &proof, deadline).map_err(dropped)?;
        let mut verdict = [0u8; 4];
        read_until(s, &mut verdict, deadline).map_err(dropped)?;
        match verdict {
            ADMIT => {}
            REFUSE => return Err(read_refusal(s, deadline)),
            _ => return Err(HandshakeFailure::NotHetccl),
        }
        clear_timeouts(s).map_err(dropped)
    }

    /// Acceptor side: checks magic, version, job and key; returns who connected.
    pub fn accept_handshake(&self, s: &mut TcpStream, timeout: Duration) -> Result<Peer> {
        self.accept_handshake_with(s, timeout, None, |_| Ok(()))
    }

    /// [`JobAuth::accept_handshake`] that also asks `admit` whether the authenticated
    /// connector may stay, and tells it the answer. `hello_seen`, when given, is set once a
    /// hello of this job has arrived (listeners shed connections that have not sent one
    /// first, see [`super::admission`]).
    pub fn accept_handshake_with(
        &self,
        s: &mut TcpStream,
        timeout: Duration,
        hello_seen: Option<&std::sync::atomic::AtomicBool>,
        admit: impl FnOnce(Peer) -> std::result::Result<(), Refusal>,
    ) -> Result<Peer> {
        let from = peer_name(s);
        let deadline = Instant::now().checked_add(timeout);
        let read = |s: &mut TcpStream, buf: &mut [u8]| {
            read_until(s, buf, deadline).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => auth_err(&from, "closed during the handshake"),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    auth_err(&from, "sent no complete handshake in time")
                }
                _ => Error::io(format!("handshake with {from}"), e),
            })
        };
        let refuse = |s: &mut TcpStream, r: Refusal| {
            // Best effort: the connector may be gone already.
            let _ = write_until(s, &r.encode(), deadline);
            auth_err(&from, &r.to_string())
        };
        let mut hello = [0u8; HELLO_LEN];
        read(s, &mut hello[..4])?;
        if hello[..4] != MAGIC {
            return Err(auth_err(&from, "not a hetccl handshake (bad magic)"));
        }
        read(s, &mut hello[4..])?;
        let h = match self.check_hello(&hello) {
            Ok(h) => h,
            Err(Some(r)) => return Err(refuse(s, r)),
            Err(None) => return Err(auth_err(&from, "not a hetccl handshake (bad magic)")),
        };
        if let Some(seen) = hello_seen {
            seen.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let nonce_c = &hello[32..48];
        let mut nonce_a = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut nonce_a);
        let mac_a = self.mac(&[b"A", nonce_c, &nonce_a, &hello]);
        let mut ch = Vec::with_capacity(CHALLENGE_LEN);
        ch.extend_from_slice(&MAGIC);
        ch.extend_from_slice(&nonce_a);
        ch.extend_from_slice(&mac_a);
        write_until(s, &ch, deadline)
            .map_err(|e| Error::io(format!("handshake with {from}"), e))?;
        let mut proof = [0u8; 32];
        read(s, &mut proof)?;
        let want = self.mac(&[b"C", &nonce_a, nonce_c, &hello]);
        if !constant_time_eq(&want, &proof) {
            return Err(refuse(s, Refusal::WrongKey));
        }
        let peer = Peer {
            rank: h.rank,
            channel: h.channel,
        };
        if let Err(r) = admit(peer) {
            return Err(refuse(s, r));
        }
        write_until(s, &ADMIT, deadline)
            .map_err(|e| Error::io(format!("handshake with {from}"), e))?;
        clear_timeouts(s).map_err(|e| Error::io("setting socket timeouts", e))?;
        Ok(peer)
    }
}

fn read_refusal(s: &mut TcpStream, deadline: Option<Instant>) -> HandshakeFailure {
    let mut rest = [0u8; REFUSAL_LEN - 4];
    match read_until(s, &mut rest, deadline) {
        Ok(()) => Refusal::decode(&rest)
            .map(HandshakeFailure::Refused)
            .unwrap_or(HandshakeFailure::NotHetccl),
        Err(e) => HandshakeFailure::Dropped(describe_read_error(&e)),
    }
}

fn describe_read_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            "acceptor closed the connection during the handshake".into()
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            "acceptor did not finish the handshake in time".into()
        }
        _ => format!("handshake failed: {e}"),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn peer_name(s: &TcpStream) -> String {
    s.peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "<unknown>".into())
}

fn auth_err(from: &str, reason: &str) -> Error {
    Error::Auth {
        from: from.to_string(),
        reason: reason.to_string(),
    }
}

/// Time left before `deadline` (`None`: no deadline), as a socket timeout; an error once
/// it has passed.
fn left(deadline: Option<Instant>) -> io::Result<Option<Duration>> {
    let Some(d) = deadline else {
        return Ok(None);
    };
    let left = d.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    Ok(Some(left))
}

/// `read_exact` with one deadline for the whole buffer, however the bytes trickle in.
fn read_until(s: &mut TcpStream, mut buf: &mut [u8], deadline: Option<Instant>) -> io::Result<()> {
    while !buf.is_empty() {
        s.set_read_timeout(left(deadline)?)?;
        match s.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_until(s: &mut TcpStream, mut buf: &[u8], deadline: Option<Instant>) -> io::Result<()> {
    while !buf.is_empty() {
        s.set_write_timeout(left(deadline)?)?;
        match s.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn clear_timeouts(s: &TcpStream) -> io::Result<()> {
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)
}

/// How many refusals each interval logs one line each; the rest are counted.
const REFUSALS_SHOWN: u32 = 5;
/// The interval of [`RefusalLog`].
const REFUSAL_INTERVAL: Duration = Duration::from_secs(10);

/// Warnings about refused connections, rate-limited so a flood of strangers costs a few
/// lines: the first five of every 10 s one line each, then one line with
/// the count of the others when the interval ends ([`RefusalLog::flush`] or the next
/// refusal) or the log is dropped.
pub struct RefusalLog {
    what: String,
    state: Mutex<RefusalWindow>,
}

struct RefusalWindow {
    start: Instant,
    shown: u32,
    hidden: u64,
}

impl RefusalLog {
    /// A log whose lines start with `what` (e.g. `store on 127.0.0.1:29500`).
    pub fn new(what: impl Into<String>) -> RefusalLog {
        RefusalLog {
            what: what.into(),
            state: Mutex::new(RefusalWindow {
                start: Instant::now(),
                shown: 0,
                hidden: 0,
            }),
        }
    }

    fn window(&self) -> std::sync::MutexGuard<'_, RefusalWindow> {
        // Counters only: a poisoned lock holds nothing inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn roll(&self, w: &mut RefusalWindow, now: Instant) {
        if now.saturating_duration_since(w.start) < REFUSAL_INTERVAL {
            return;
        }
        if w.hidden > 0 {
            tracing::warn!(
                "{}: refused {} more connection(s) in the last {}s (strangers, other jobs, wrong \
                 keys or load shedding; the first ones are logged above)",
                self.what,
                w.hidden,
                REFUSAL_INTERVAL.as_secs()
            );
        }
        *w = RefusalWindow {
            start: now,
            shown: 0,
            hidden: 0,
        };
    }

    /// Records one refusal, logging it if this interval has not shown enough yet.
    pub fn refused(&self, why: &dyn fmt::Display) {
        let mut w = self.window();
        self.roll(&mut w, Instant::now());
        if w.shown < REFUSALS_SHOWN {
            w.shown += 1;
            tracing::warn!("{}: {why}", self.what);
        } else {
            w.hidden += 1;
        }
    }

    /// Logs the count of unlogged refusals once their interval is over.
    pub fn flush(&self) {
        let mut w = self.window();
        self.roll(&mut w, Instant::now());
    }
}

impl Drop for RefusalLog {
    fn drop(&mut self) {
        let w = self.window();
        if w.hidden > 0 {
            tracing::warn!(
                "{}: refused {} more connection(s) (strangers, other jobs, wrong keys or load \
                 shedding; the first ones are logged above)",
                self.what,
                w.hidden
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(server: JobAuth, client: JobAuth) -> (Result<Peer>, Result<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            client.connect_handshake(&mut s, 5, 2, Duration::from_secs(2))
        });
        let (mut s, _) = l.accept().unwrap();
        let r = server.accept_handshake(&mut s, Duration::from_secs(2));
        drop(s);
        (r, t.join().unwrap())
    }

    #[test]
    fn same_job_same_key_is_accepted() {
        let a = JobAuth::new("job-1", "secret");
        let (srv, cli) = pair(a.clone(), a);
        assert_eq!(
            srv.unwrap(),
            Peer {
                rank: 5,
                channel: 2
            }
        );
        cli.unwrap();
    }

    #[test]
    fn a_derived_key_is_the_hmac_of_the_child_id_under_the_job_key() {
        let a = JobAuth::new("job-1", "secret");
        // HMAC-SHA256(b"secret", b"hetccl derived job key\0split-0011223344556677"), as
        // Python's hmac module computes it.
        let want = "60e1df9ee867ff19df7381c079de1864a4350da0c27ebcce848c71c6335f2d28";
        assert_eq!(a.derive_key("split-0011223344556677"), want);
        // The job id plays no part; the key and the child's id do.
        let same_key = JobAuth::new("job-2", "secret");
        assert_eq!(same_key.derive_key("split-0011223344556677"), want);
        assert_ne!(
            JobAuth::new("job-1", "other").derive_key("split-0011223344556677"),
            want
        );
        assert_ne!(a.derive_key("split-0011223344556678"), want);
    }

    #[test]
    fn wrong_key_and_other_job_are_refused() {
        let (srv, cli) = pair(
            JobAuth::new("job-1", "secret"),
            JobAuth::new("job-1", "guess"),
        );
        assert!(cli
            .unwrap_err()
            .to_string()
            .contains("does not hold this job's key"));
        assert!(srv.is_err());

        let (srv, cli) = pair(JobAuth::new("job-1", "k"), JobAuth::new("job-2", "k"));
        assert!(srv.unwrap_err().to_string().contains("another job"));
        // The connector hears why.
        assert!(cli
            .unwrap_err()
            .to_string()
            .ends_with("refused: belongs to another job (job id differs)"),);
    }

    #[test]
    fn garbage_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nxxxxxxxxxxxxxxxxxxx")
                .unwrap();
        });
        let (mut s, _) = l.accept().unwrap();
        let e = JobAuth::new("j", "k")
            .accept_handshake(&mut s, Duration::from_secs(2))
            .unwrap_err();
        t.join().unwrap();
        assert!(e.to_string().contains("bad magic"), "{e}");
    }

    #[test]
    fn admission_is_told_to_the_connector() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let a = JobAuth::new("adm", "k");
        let c = a.clone();
        let t = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            c.connect_handshake_detailed(&mut s, 9, 0, Duration::from_secs(5))
        });
        let (mut s, _) = l.accept().unwrap();
        let e = a
            .accept_handshake_with(&mut s, Duration::from_secs(5), None, |p| {
                assert_eq!(p.rank, 9);
                Err(Refusal::BeyondWorld(4))
            })
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("rank is not below the world size 4"), "{e}");
        match t.join().unwrap() {
            Err(HandshakeFailure::Refused(Refusal::BeyondWorld(4))) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_trickling_peer_is_cut_at_the_deadline() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let a = JobAuth::new("slow", "k");
        let t = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            // A valid start, then one byte every 100 ms: each read would succeed in time.
            let _ = s.write_all(&MAGIC);
            for _ in 0..40 {
                if s.write_all(&[0]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let (mut s, _) = l.accept().unwrap();
        let start = Instant::now();
        let e = a
            .accept_handshake(&mut s, Duration::from_millis(500))
            .unwrap_err()
            .to_string();
        let took = start.elapsed();
        assert!(e.ends_with("sent no complete handshake in time"), "{e}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
        drop(s);
        t.join().unwrap();
    }

    #[test]
    fn refusals_round_trip() {
        for r in [
            Refusal::Busy,
            Refusal::OtherJob,
            Refusal::Version(7),
            Refusal::WrongKey,
            Refusal::BeyondWorld(3),
            Refusal::AlreadyConnected,
            Refusal::AlreadyGone,
        ] {
            let b = r.encode();
            assert_eq!(b[..4], REFUSE);
            assert_eq!(Refusal::decode(&b[4..].try_into().unwrap()), Some(r));
        }
        assert_eq!(Refusal::decode(&[0, 0, 0, 0, 0]), None);
        assert_eq!(Refusal::decode(&[200, 1, 2, 3, 4]), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2000))]
        /// Any 48 bytes are a hello of this job or refused, never a panic; only the exact
        /// magic, version and job hash pass.
        #[test]
        fn any_hello_bytes_are_checked(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let a = JobAuth::new("prop", "k");
            match a.check_hello(&bytes) {
                Ok(_) => {
                    proptest::prop_assert_eq!(bytes.len(), HELLO_LEN);
                    proptest::prop_assert_eq!(&bytes[..4], &MAGIC[..]);
                    proptest::prop_assert_eq!(&bytes[8..24], &a.job_hash[..]);
                }
                Err(Some(Refusal::Version(v))) => proptest::prop_assert_eq!(v, PROTOCOL_VERSION),
                Err(Some(Refusal::OtherJob)) => proptest::prop_assert_ne!(&bytes[8..24], &a.job_hash[..]),
                Err(Some(r)) => proptest::prop_assert!(false, "unexpected refusal {r}"),
                Err(None) => proptest::prop_assert!(bytes.len() != HELLO_LEN || bytes[..4] != MAGIC),
            }
        }

        /// A valid hello with one byte changed is refused unless the byte is in the rank,
        /// channel or nonce.
        #[test]
        fn mutated_hellos_are_refused(at in 0usize..HELLO_LEN, xor in 1u8..=255) {
            let a = JobAuth::new("prop", "k");
            let mut h = Vec::new();
            h.extend_from_slice(&MAGIC);
            h.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            h.extend_from_slice(&a.job_hash);
            h.extend_from_slice(&[0u8; 24]);
            proptest::prop_assert!(a.check_hello(&h).is_ok());
            h[at] ^= xor;
            proptest::prop_assert_eq!(a.check_hello(&h).is_ok(), at >= 24);
        }

        /// Any 5 bytes after a refusal's magic decode to a refusal or to nothing.
        #[test]
        fn any_refusal_bytes_decode_or_not(b in proptest::prelude::any::<[u8; 5]>()) {
            match Refusal::decode(&b) {
                Some(r) => {
                    let e = r.encode();
                    proptest::prop_assert_eq!(e[4], b[0]);
                    if matches!(r, Refusal::Version(_) | Refusal::BeyondWorld(_)) {
                        proptest::prop_assert_eq!(&e[5..], &b[1..]);
                    }
                }
                None => proptest::prop_assert!(b[0] == 0 || b[0] > 7),
            }
        }
    }

    /// Random and mutated bytes through a real socket: the acceptor refuses every one
    /// within its deadline, with an error, never a panic or a hang.
    #[test]
    fn random_streams_are_refused_by_the_acceptor() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let a = JobAuth::new("stream", "k");
        let mut valid = Vec::new();
        valid.extend_from_slice(&MAGIC);
        valid.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        valid.extend_from_slice(&a.job_hash);
        valid.extend_from_slice(&[1u8; 24]);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let strategy = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            (
                0..HELLO_LEN,
                any::<u8>(),
                proptest::collection::vec(any::<u8>(), 0..40)
            )
                .prop_map(move |(at, x, tail)| {
                    let mut v = valid.clone();
                    v[at] ^= x;
                    v.extend(tail);
                    v
                }),
        ];
        let mut runner = TestRunner::new(Config::with_cases(48));
        runner
            .run(&strategy, |bytes| {
                let t = std::thread::spawn(move || {
                    let mut s = TcpStream::connect(addr).unwrap();
                    let _ = s.write_all(&bytes);
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink);
                });
                let (mut s, _) = l.accept().unwrap();
                let start = Instant::now();
                let r = a.accept_handshake(&mut s, Duration::from_millis(300));
                drop(s);
                t.join().unwrap();
                // Without the key nobody gets through, whatever the bytes.
                prop_assert!(r.is_err());
                prop_assert!(start.elapsed() < Duration::from_secs(3));
                Ok(())
            })
            .unwrap();
    }

    /// Random bytes from a fake acceptor: the connector fails (it cannot be fooled into
    /// success without the key) within its deadline, never panics or hangs.
    #[test]
    fn random_replies_fail_the_connector() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let a = JobAuth::new("stream", "k");
        let l = std::sync::Arc::new(TcpListener::bind("127.0.0.1:0").unwrap());
        let addr = l.local_addr().unwrap();
        let strategy = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..120),
            // A refusal's magic, then anything.
            proptest::collection::vec(any::<u8>(), 0..12).prop_map(|t| {
                let mut v = REFUSE.to_vec();
                v.extend(t);
                v
            }),
            // A challenge's magic, then anything.
            proptest::collection::vec(any::<u8>(), 0..80).prop_map(|t| {
                let mut v = MAGIC.to_vec();
                v.extend(t);
                v
            }),
        ];
        let mut runner = TestRunner::new(Config::with_cases(48));
        runner
            .run(&strategy, |bytes| {
                let l = l.clone();
                let t = std::thread::spawn(move || {
                    let (mut s, _) = l.accept().unwrap();
                    let mut hello = [0u8; HELLO_LEN];
                    let _ = s.read_exact(&mut hello);
                    let _ = s.write_all(&bytes);
                    // Nothing more comes: the connector sees the end at once.
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest);
                });
                let mut s = TcpStream::connect(addr).unwrap();
                let start = Instant::now();
                let r = a.connect_handshake_detailed(&mut s, 1, 0, Duration::from_millis(300));
                drop(s);
                t.join().unwrap();
                prop_assert!(r.is_err());
                prop_assert!(start.elapsed() < Duration::from_secs(3));
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn refusal_log_shows_a_few_then_counts() {
        let log = RefusalLog::new("test");
        for _ in 0..1000 {
            log.refused(&"stranger");
        }
        let w = log.window();
        assert_eq!(
            (w.shown, w.hidden),
            (REFUSALS_SHOWN, 1000 - REFUSALS_SHOWN as u64)
        );
    }
}
