//! Connection handshake: protocol version, job id, rank, and a mutual HMAC proof of the
//! job key. Used by the bootstrap store and by every transport connection.
//!
//! ```text
//! connector -> acceptor : Hello    { magic, version, job hash, rank, channel, nonce_c }
//! acceptor  -> connector: Challenge{ magic, nonce_a, mac_a = HMAC(key, "A" nonce_c nonce_a hello) }
//! connector -> acceptor : Proof    { mac_c = HMAC(key, "C" nonce_a nonce_c hello) }
//! ```
//!
//! A stranger, a process of another job, or one holding a different key fails at the
//! first message it gets wrong; the acceptor refuses it and keeps serving the job.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Bumped on any incompatible change of the wire protocol.
pub const PROTOCOL_VERSION: u32 = 1;
const MAGIC: [u8; 4] = *b"HCCL";
const HELLO_LEN: usize = 4 + 4 + 16 + 4 + 4 + 16;

type HmacSha256 = Hmac<Sha256>;

/// The identity and secret of one job.
#[derive(Clone)]
pub struct JobAuth {
    job_id: String,
    job_hash: [u8; 16],
    key: Vec<u8>,
}

impl std::fmt::Debug for JobAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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

impl JobAuth {
    /// A job identity. With no key, the job id itself is the key: this still keeps
    /// strangers and other jobs out, but not a deliberate attacker.
    pub fn new(job_id: &str, key: Option<&str>) -> Self {
        let digest = Sha256::digest(job_id.as_bytes());
        let mut job_hash = [0u8; 16];
        job_hash.copy_from_slice(&digest[..16]);
        JobAuth {
            job_id: job_id.to_string(),
            job_hash,
            key: key.unwrap_or(job_id).as_bytes().to_vec(),
        }
    }

    /// The job id.
    pub fn job_id(&self) -> &str {
        &self.job_id
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

    /// Connector side. On success the stream is authenticated both ways.
    pub fn connect_handshake(
        &self,
        s: &mut TcpStream,
        rank: u32,
        channel: u32,
        timeout: Duration,
    ) -> Result<()> {
        let from = peer_name(s);
        set_timeouts(s, Some(timeout))?;
        let mut nonce_c = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut nonce_c);
        let mut hello = Vec::with_capacity(HELLO_LEN);
        hello.extend_from_slice(&MAGIC);
        hello.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        hello.extend_from_slice(&self.job_hash);
        hello.extend_from_slice(&rank.to_le_bytes());
        hello.extend_from_slice(&channel.to_le_bytes());
        hello.extend_from_slice(&nonce_c);
        s.write_all(&hello)
            .map_err(|e| Error::io(format!("handshake with {from}"), e))?;

        let mut ch = [0u8; 4 + 16 + 32];
        read_exact(s, &mut ch, &from)?;
        if ch[..4] != MAGIC {
            return Err(auth_err(&from, "reply is not a hetccl handshake"));
        }
        let nonce_a = &ch[4..20];
        let want = self.mac(&[b"A", &nonce_c, nonce_a, &hello]);
        if !constant_time_eq(&want, &ch[20..52]) {
            return Err(auth_err(&from, "acceptor does not hold this job's key"));
        }
        let proof = self.mac(&[b"C", nonce_a, &nonce_c, &hello]);
        s.write_all(&proof)
            .map_err(|e| Error::io(format!("handshake with {from}"), e))?;
        set_timeouts(s, None)
    }

    /// Acceptor side: checks magic, version, job and key; returns who connected.
    pub fn accept_handshake(&self, s: &mut TcpStream, timeout: Duration) -> Result<Peer> {
        let from = peer_name(s);
        set_timeouts(s, Some(timeout))?;
        let mut hello = [0u8; HELLO_LEN];
        read_exact(s, &mut hello[..4], &from)?;
        if hello[..4] != MAGIC {
            return Err(auth_err(&from, "not a hetccl handshake (bad magic)"));
        }
        read_exact(s, &mut hello[4..], &from)?;
        let version = u32::from_le_bytes(hello[4..8].try_into().unwrap_or_default());
        if version != PROTOCOL_VERSION {
            return Err(auth_err(
                &from,
                &format!("protocol version {version}, this build speaks {PROTOCOL_VERSION}"),
            ));
        }
        if hello[8..24] != self.job_hash {
            return Err(auth_err(&from, "belongs to another job (job id differs)"));
        }
        let rank = u32::from_le_bytes(hello[24..28].try_into().unwrap_or_default());
        let channel = u32::from_le_bytes(hello[28..32].try_into().unwrap_or_default());
        let nonce_c = &hello[32..48];
        let mut nonce_a = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut nonce_a);
        let mac_a = self.mac(&[b"A", nonce_c, &nonce_a, &hello]);
        let mut ch = Vec::with_capacity(52);
        ch.extend_from_slice(&MAGIC);
        ch.extend_from_slice(&nonce_a);
        ch.extend_from_slice(&mac_a);
        s.write_all(&ch)
            .map_err(|e| Error::io(format!("handshake with {from}"), e))?;
        let mut proof = [0u8; 32];
        read_exact(s, &mut proof, &from)?;
        let want = self.mac(&[b"C", &nonce_a, nonce_c, &hello]);
        if !constant_time_eq(&want, &proof) {
            return Err(auth_err(&from, "wrong job key"));
        }
        set_timeouts(s, None)?;
        Ok(Peer { rank, channel })
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

fn read_exact(s: &mut TcpStream, buf: &mut [u8], from: &str) -> Result<()> {
    s.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => auth_err(from, "closed during the handshake"),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            auth_err(from, "sent no complete handshake in time")
        }
        _ => Error::io(format!("handshake with {from}"), e),
    })
}

fn set_timeouts(s: &TcpStream, t: Option<Duration>) -> Result<()> {
    s.set_read_timeout(t)
        .and_then(|_| s.set_write_timeout(t))
        .map_err(|e| Error::io("setting socket timeouts", e))
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
        let a = JobAuth::new("job-1", Some("secret"));
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
    fn wrong_key_and_other_job_are_refused() {
        let (srv, cli) = pair(
            JobAuth::new("job-1", Some("secret")),
            JobAuth::new("job-1", Some("guess")),
        );
        assert!(cli
            .unwrap_err()
            .to_string()
            .contains("does not hold this job's key"));
        assert!(srv.is_err());

        let (srv, _) = pair(
            JobAuth::new("job-1", Some("k")),
            JobAuth::new("job-2", Some("k")),
        );
        assert!(srv.unwrap_err().to_string().contains("another job"));
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
        let e = JobAuth::new("j", None)
            .accept_handshake(&mut s, Duration::from_secs(2))
            .unwrap_err();
        t.join().unwrap();
        assert!(e.to_string().contains("bad magic"), "{e}");
    }
}
