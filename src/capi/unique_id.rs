//! `hetcclUniqueId`: what rank 0 hands every other rank out of band (MPI_Bcast, a
//! file, a pipe) so they can find its bootstrap store and prove they belong to the job.
//!
//! Layout of the 128 bytes (all multi-byte integers big-endian):
//!
//! ```text
//! offset  size  field
//!      0     4  magic "HCU1"
//!      4     2  store port
//!      6     8  job id (random; names shm segments and handshakes)
//!     14    32  job key (random; the HMAC secret of every connection handshake), or
//!                 all zero: every rank takes the key from its own `HETCCL_JOB_KEY`
//!     46     1  address length L, 1..=81
//!     47     L  store host (IP address or host name, ASCII)
//!   47+L     -  zero
//! ```
//!
//! The key travels inside the id, so the id is a secret of the job, as NCCL's is not:
//! share it only over channels the job's ranks own. An id made by `hetcclGetUniqueIdAt`
//! with `keyFromEnv` carries no key (zeros) and may travel over channels others read
//! (PyTorch's store): without the key it lets nobody join.

use rand::RngCore;

use crate::config::Config;
use crate::error::{Error, Result};

/// Bytes in a `hetcclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;

const MAGIC: &[u8; 4] = b"HCU1";
const ADDR_AT: usize = 47;
/// Longest store host an id can carry.
pub const MAX_ADDR_LEN: usize = UNIQUE_ID_BYTES - ADDR_AT;

/// `hetcclUniqueId` as C sees it.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct hetcclUniqueId {
    /// The encoded id; see the module documentation.
    pub internal: [std::ffi::c_char; UNIQUE_ID_BYTES],
}

/// The decoded content of an id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobTicket {
    /// Host of rank 0's store.
    pub host: String,
    /// Port of rank 0's store.
    pub port: u16,
    /// Job id, as the handshakes carry it.
    pub job_id: String,
    /// Job key, as the handshakes use it.
    pub job_key: String,
    /// The id carries no key: every rank uses its `HETCCL_JOB_KEY`.
    pub key_from_env: bool,
    id_bytes: [u8; 8],
    key_bytes: [u8; 32],
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl JobTicket {
    fn from_random(host: String, port: u16) -> Self {
        let mut id_bytes = [0u8; 8];
        let mut key_bytes = [0u8; 32];
        let mut rng = rand::thread_rng();
        rng.fill_bytes(&mut id_bytes);
        rng.fill_bytes(&mut key_bytes);
        Self::from_parts(host, port, id_bytes, key_bytes)
    }

    fn from_parts(host: String, port: u16, id_bytes: [u8; 8], key_bytes: [u8; 32]) -> Self {
        JobTicket {
            host,
            port,
            job_id: format!("uid-{}", hex(&id_bytes)),
            job_key: hex(&key_bytes),
            key_from_env: key_bytes == [0; 32],
            id_bytes,
            key_bytes,
        }
    }

    /// A new ticket for a job whose rank 0 runs in this process: the store goes on
    /// `MASTER_ADDR`/`MASTER_PORT` when they are set, else on this host's address (see
    /// [`store_host`](crate::transport::tcp::store_host)) and a port that is free right now.
    pub fn generate(cfg: &Config) -> Result<Self> {
        Self::generate_at(cfg, None, cfg.launch.master_port, false)
    }

    /// A new ticket whose store listens on `host` (else `MASTER_ADDR`, else
    /// [`store_host`](crate::transport::tcp::store_host)) and `port` (else a port free now). With `key_from_env` the ticket
    /// carries no key and every rank must have `HETCCL_JOB_KEY` (this one is checked now).
    pub fn generate_at(
        cfg: &Config,
        host: Option<String>,
        port: Option<u16>,
        key_from_env: bool,
    ) -> Result<Self> {
        if key_from_env && cfg.job_key.is_none() {
            return Err(Error::invalid(
                "hetcclGetUniqueIdAt",
                "keyFromEnv is set but HETCCL_JOB_KEY is not: set it to the same secret on \
                 every rank (e.g. export HETCCL_JOB_KEY=$(openssl rand -hex 32))",
            ));
        }
        let host = match host.or_else(|| cfg.launch.master_addr.clone()) {
            Some(a) => a,
            None => crate::transport::tcp::store_host(cfg)?,
        };
        let port = match port {
            Some(p) => p,
            None => crate::bootstrap::port::free_store_port()?,
        };
        if host.is_empty() || host.len() > MAX_ADDR_LEN || !host.is_ascii() {
            return Err(Error::invalid(
                "hetcclGetUniqueId",
                format!("store host {host:?} must be 1 to {MAX_ADDR_LEN} ASCII characters"),
            ));
        }
        let mut t = Self::from_random(host, port);
        if key_from_env {
            t = Self::from_parts(t.host, t.port, t.id_bytes, [0; 32]);
        }
        Ok(t)
    }

    /// The 128-byte form.
    pub fn encode(&self) -> hetcclUniqueId {
        let mut b = [0u8; UNIQUE_ID_BYTES];
        b[..4].copy_from_slice(MAGIC);
        b[4..6].copy_from_slice(&self.port.to_be_bytes());
        b[6..14].copy_from_slice(&self.id_bytes);
        b[14..46].copy_from_slice(&self.key_bytes);
        b[46] = self.host.len() as u8;
        b[ADDR_AT..ADDR_AT + self.host.len()].copy_from_slice(self.host.as_bytes());
        hetcclUniqueId {
            internal: b.map(|x| x as std::ffi::c_char),
        }
    }

    /// Reads an id; `func` names the C call in the error.
    pub fn decode(func: &'static str, id: &hetcclUniqueId) -> Result<Self> {
        let b = id.internal.map(|x| x as u8);
        let bad = |why: &str| {
            Error::invalid(
                func,
                format!(
                    "id is not a hetcclUniqueId from hetcclGetUniqueId ({why}); every rank must \
                     receive rank 0's id unchanged"
                ),
            )
        };
        if &b[..4] != MAGIC {
            return Err(bad(&format!(
                "it starts with {:02x?}, not \"HCU1\"",
                &b[..4]
            )));
        }
        let port = u16::from_be_bytes([b[4], b[5]]);
        let len = b[46] as usize;
        if port == 0 || len == 0 || len > MAX_ADDR_LEN {
            return Err(bad(&format!("port {port}, host length {len}")));
        }
        let host = std::str::from_utf8(&b[ADDR_AT..ADDR_AT + len])
            .ok()
            .filter(|h| h.is_ascii())
            .ok_or_else(|| bad("the host is not ASCII"))?
            .to_string();
        let mut id_bytes = [0u8; 8];
        let mut key_bytes = [0u8; 32];
        id_bytes.copy_from_slice(&b[6..14]);
        key_bytes.copy_from_slice(&b[14..46]);
        Ok(Self::from_parts(host, port, id_bytes, key_bytes))
    }

    /// `cfg` for rank `rank` of `nranks`, bootstrapping through this ticket's store
    /// whatever the environment's launcher variables say. A ticket without a key needs
    /// `HETCCL_JOB_KEY` in `cfg`; `func` names the C call in that error.
    pub fn apply(
        &self,
        func: &'static str,
        cfg: &mut Config,
        rank: usize,
        nranks: usize,
    ) -> Result<()> {
        if self.key_from_env && cfg.job_key.is_none() {
            return Err(Error::invalid(
                func,
                format!(
                    "rank {rank}: the id carries no job key (hetcclGetUniqueIdAt with \
                     keyFromEnv) and HETCCL_JOB_KEY is not set; set it to the same secret \
                     on every rank"
                ),
            ));
        }
        cfg.join_store(
            self.host.clone(),
            self.port,
            self.job_id.clone(),
            rank,
            nranks,
            "hetcclUniqueId",
        );
        if !self.key_from_env {
            cfg.job_key = Some(self.job_key.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_field() {
        let t = JobTicket::from_parts("10.1.2.3".into(), 29500, [1; 8], [0xab; 32]);
        let id = t.encode();
        let b = id.internal.map(|x| x as u8);
        assert_eq!(&b[..6], b"HCU1\x73\x3c"); // 29500 = 0x733c
        assert_eq!(b[46], 8);
        assert_eq!(&b[47..55], b"10.1.2.3");
        assert!(b[55..].iter().all(|&x| x == 0));
        let back = JobTicket::decode("hetcclCommInitRank", &id).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.job_id, "uid-0101010101010101");
        assert_eq!(back.job_key, "ab".repeat(32));
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let zero = hetcclUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        let e = JobTicket::decode("hetcclCommInitRank", &zero)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid argument to hetcclCommInitRank: id is not a hetcclUniqueId from \
             hetcclGetUniqueId (it starts with [00, 00, 00, 00], not \"HCU1\"); every rank \
             must receive rank 0's id unchanged"
        );
    }

    #[test]
    fn generate_uses_master_addr_and_port_and_fresh_secrets() {
        let mut cfg = Config::default();
        cfg.launch.master_addr = Some("127.0.0.1".into());
        cfg.launch.master_port = Some(4242);
        let a = JobTicket::generate(&cfg).unwrap();
        let b = JobTicket::generate(&cfg).unwrap();
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 4242));
        assert_ne!(a.job_key, b.job_key);
        assert_eq!(a.job_key.len(), 64);
        let mut applied = Config::default();
        applied.launch.local_rank = Some(5);
        a.apply("t", &mut applied, 1, 3).unwrap();
        assert_eq!(applied.launch.rank, Some(1));
        assert_eq!(applied.launch.world_size, Some(3));
        assert_eq!(applied.launch.local_rank, None);
        assert_eq!(applied.launch.master_port, Some(4242));
        assert_eq!(applied.job_key.as_deref(), Some(a.job_key.as_str()));
    }

    #[test]
    fn a_keyless_ticket_needs_and_uses_hetccl_job_key() {
        let mut cfg = Config::default();
        let e = JobTicket::generate_at(&cfg, Some("127.0.0.1".into()), Some(4243), true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("keyFromEnv is set but HETCCL_JOB_KEY is not"),
            "{e}"
        );
        cfg.job_key = Some("the-shared-secret".into());
        let t = JobTicket::generate_at(&cfg, Some("127.0.0.1".into()), Some(4243), true).unwrap();
        let b = t.encode().internal.map(|x| x as u8);
        assert!(
            b[14..46].iter().all(|&x| x == 0),
            "the key must not travel in the id"
        );
        let back = JobTicket::decode("t", &t.encode()).unwrap();
        assert!(back.key_from_env);
        let mut applied = cfg.clone();
        back.apply("t", &mut applied, 0, 2).unwrap();
        assert_eq!(applied.job_key.as_deref(), Some("the-shared-secret"));
        assert_eq!(applied.job_id.as_deref(), Some(t.job_id.as_str()));
        let mut without = Config::default();
        let e = back
            .apply("hetcclCommInitRank", &mut without, 1, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 1: the id carries no job key"), "{e}");
        assert!(e.contains("HETCCL_JOB_KEY is not set"), "{e}");
        // An ordinary ticket still carries its own key.
        let k = JobTicket::generate_at(&cfg, None, Some(4244), false).unwrap();
        assert!(!k.key_from_env);
        assert_ne!(k.job_key, "the-shared-secret");
    }
}
