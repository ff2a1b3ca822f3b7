//! Who am I, and where are my peers.
//!
//! A [`Bootstrap`] knows this process's rank and the world size, and can all-gather
//! small blobs (listening addresses, host names) among all ranks. Implementations:
//! a TCP store served by rank 0 (`env://`, the launchers' variables), a rendezvous
//! directory on a shared filesystem (`file://`), and MPI (feature `mpi`).
//! Every TCP connection, here and in the transports, opens with [`auth`]'s handshake.
//!
//! [`from_config`] picks one from [`Config::init`] and the launcher's variables, and
//! returns the job's [`JobAuth`] for the transports' handshakes. The job key is a secret
//! under every launcher, never derived from addresses or ports:
//!
//! - `HETCCL_JOB_KEY` when set (`hetccl run` sets a random one for its ranks);
//! - else, when every rank runs on this host, a random key from rank 0, handed to the
//!   others through a file only this user can read ([`keyfile`]);
//! - else the MPI feature (rank 0's random key travels over MPI), or a `file://`
//!   rendezvous in a directory closed to other users (rank 0's key travels through it);
//! - else (ranks on several hosts, nothing private between them) it refuses to start,
//!   saying how to set `HETCCL_JOB_KEY`.

pub mod admission;
pub mod auth;
pub mod file;
pub mod keyfile;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod netif;
pub mod port;
pub mod store;
pub mod tcp;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

pub use auth::JobAuth;
pub use file::FileBootstrap;
pub use store::{GetOutcome, LocalStore, RankState, Store, StoreServer, TcpStoreClient};
pub use tcp::TcpBootstrap;

use crate::config::{Config, InitMethod};
use crate::error::{Error, Result};
use keyfile::{KeyFile, KeyFileContent};
use store::{NonLocalBind, StoreTarget, Whereabouts, STORE_HANDSHAKE_TIMEOUT};

/// Rank identity plus a way to exchange small blobs with every other rank.
pub trait Bootstrap: Send {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Every rank contributes `data`; returns all contributions in rank order.
    /// Collective: every rank must call it, in the same order.
    fn all_gather(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Returns when every rank has called it.
    fn barrier(&mut self) -> Result<()> {
        self.all_gather(&[]).map(|_| ())
    }
    /// A way for waits outside [`Bootstrap::all_gather`] (link setup) to learn that a
    /// rank died or left, when this bootstrap can tell; `None` when it cannot.
    fn liveness(&self) -> Option<Arc<dyn Liveness>> {
        None
    }
}

/// Whether every rank is still in the job, as far as the bootstrap knows. Cheap enough to
/// ask a few times a second.
pub trait Liveness: Send + Sync {
    /// `None` while no rank is known to be gone; else one line naming the ranks that died
    /// or left (or saying that the bootstrap itself is lost).
    fn gone(&self) -> Option<String>;
}

/// A world of one rank: nothing to exchange, no store, no files.
#[derive(Debug, Default)]
pub struct SoloBootstrap;

impl Bootstrap for SoloBootstrap {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_gather(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![data.to_vec()])
    }
}

/// The method [`from_config`] will use: `cfg.init`, except that a build with the `mpi`
/// feature started by `mpirun` (OpenMPI's variables, no `MASTER_ADDR`) defaults to MPI.
pub fn resolve_init(cfg: &Config) -> InitMethod {
    let started_by_mpirun = cfg.launch.source == "openmpi" && cfg.launch.master_addr.is_none();
    if cfg.init == InitMethod::Env && cfg!(feature = "mpi") && started_by_mpirun {
        return InitMethod::Mpi;
    }
    cfg.init.clone()
}

/// Finds this process's place in the job and connects it to the others, by
/// [`resolve_init`]'s method. Also returns the job's identity and key, which every
/// transport connection must present.
///
/// - `env://`: rank and world from the launcher's variables; rank 0 serves a TCP store
///   until the bootstrap is dropped, the others connect to it (retrying until
///   `HETCCL_CONNECT_TIMEOUT`). The store is at `MASTER_ADDR:MASTER_PORT`; without them,
///   on one host, rank 0 listens on 127.0.0.1 on a free port and writes the port with the
///   key in its key file. Under torchrun (`TORCHELASTIC_USE_AGENT_STORE`) `MASTER_PORT`
///   is its agent's, so hetccl's store goes to a free port on one host, `MASTER_PORT + 1`
///   across hosts. Job id: `HETCCL_JOB_ID`, else `env:<MASTER_ADDR>:<MASTER_PORT>` (so
///   every rank must be given the same spelling), else `<launcher>-<hash of its job
///   identity>`.
/// - `file:///dir`: rank and world from the launcher's variables; blobs go through files
///   under `dir`. Job id: `HETCCL_JOB_ID`, else `file:<dir>`.
/// - `mpi`: rank and world from `MPI_COMM_WORLD`. Rank 0's job id and key (random unless
///   `HETCCL_JOB_ID` / `HETCCL_JOB_KEY` are set) are sent to all ranks through MPI.
///
/// The key comes as the module documentation says. A world of one rank needs no store
/// (except under MPI, which is already there).
pub fn from_config(cfg: &Config) -> Result<(Box<dyn Bootstrap>, JobAuth)> {
    match resolve_init(cfg) {
        InitMethod::Mpi => mpi_bootstrap(cfg),
        InitMethod::Env => {
            let (rank, world) = rank_and_world(cfg)?;
            if world == 1 {
                return Ok(solo(cfg));
            }
            let master = match (&cfg.launch.master_addr, cfg.launch.master_port) {
                (Some(a), Some(p)) => Some((a.clone(), p)),
                _ => None,
            };
            let local = one_host(cfg, world, master.as_ref());
            let master = store_beside_agent(cfg, master, local.is_some(), rank)?;
            match (&cfg.job_key, local) {
                // One host and no store address: the key file carries the port.
                (Some(_), Some(why)) if master.is_none() => {
                    tracing::debug!("rank {rank}: all {world} ranks on this host ({why})");
                    env_with_key_file(cfg, master, rank, world)
                }
                (Some(key), _) => {
                    let Some((host, port)) = master else {
                        return Err(missing_master(cfg, rank, world));
                    };
                    let job_id = cfg
                        .job_id
                        .clone()
                        .unwrap_or_else(|| format!("env:{host}:{port}"));
                    let auth = JobAuth::new(&job_id, key);
                    let b = env_with_key(cfg, &host, port, &auth, rank, world)?;
                    Ok((Box::new(b), auth))
                }
                (None, Some(why)) => {
                    tracing::debug!("rank {rank}: all {world} ranks on this host ({why})");
                    env_with_key_file(cfg, master, rank, world)
                }
                (None, None) => Err(Error::Bootstrap(format!(
                    "rank {rank} of {world} (from {} variables): the ranks may run on several \
                     hosts and HETCCL_JOB_KEY is not set. {CROSS_HOST_KEY}",
                    cfg.launch.source
                ))),
            }
        }
        InitMethod::File(dir) => {
            let (rank, world) = rank_and_world(cfg)?;
            if world == 1 {
                return Ok(solo(cfg));
            }
            let job_id = cfg
                .job_id
                .clone()
                .unwrap_or_else(|| format!("file:{}", dir.display()));
            match &cfg.job_key {
                Some(key) => {
                    let b = FileBootstrap::new(&dir, &job_id, rank, world, cfg.connect_timeout)?;
                    Ok((Box::new(b), JobAuth::new(&job_id, key)))
                }
                None => file_with_private_key(cfg, &dir, &job_id, rank, world),
            }
        }
    }
}

/// Why the ranks of `cfg`'s job cannot start without `HETCCL_JOB_KEY`: the env method,
/// more than one rank, no key, and nothing says every rank is on this host (the case
/// [`from_config`] refuses). `None` when the bootstrap would start. For `hetccl
/// doctor`, which reports it with the fix ([`cross_host_key_fix`]) before trying.
pub fn missing_cross_host_key(cfg: &Config) -> Option<String> {
    if resolve_init(cfg) != InitMethod::Env || cfg.job_key.is_some() {
        return None;
    }
    let world = cfg.launch.world_size.filter(|&w| w > 1)?;
    let master = match (&cfg.launch.master_addr, cfg.launch.master_port) {
        (Some(a), Some(p)) => Some((a.clone(), p)),
        _ => None,
    };
    if one_host(cfg, world, master.as_ref()).is_some() {
        return None;
    }
    Some(format!(
        "{world} ranks (from {} variables) may run on several hosts: MASTER_ADDR is {}, \
         and the launcher does not say that every rank is on one host",
        cfg.launch.source,
        cfg.launch.master_addr.as_deref().unwrap_or("unset")
    ))
}

/// What to do about [`missing_cross_host_key`].
pub fn cross_host_key_fix() -> &'static str {
    CROSS_HOST_KEY
}

/// How to give ranks on several hosts a key, for the errors that need one.
const CROSS_HOST_KEY: &str = "Across hosts hetccl has no private channel to hand out a job \
     key, and a key derived from addresses or ports would let anyone who reaches the store \
     join the job. Set HETCCL_JOB_KEY to the same secret on every rank (e.g. `export \
     HETCCL_JOB_KEY=$(openssl rand -hex 32)`, then `mpirun -x HETCCL_JOB_KEY ...`; srun and \
     torchrun pass the environment on), or build hetccl with `--features mpi` so that MPI \
     hands out a key, or use HETCCL_INIT=file:///dir with a directory on a shared \
     filesystem that only you can read";

/// Why every rank of the job must be on this host, or `None` when the launcher does not
/// say so.
fn one_host(cfg: &Config, world: usize, master: Option<&(String, u16)>) -> Option<&'static str> {
    if cfg.launch.source == "slurm" && cfg.launch.nodes == Some(1) {
        return Some("Slurm runs the step on one node");
    }
    if cfg.launch.local_world_size == Some(world) {
        return Some("the launcher's local world size is the world size");
    }
    let loopback = master.is_some_and(|(h, _)| {
        h == "localhost" || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    });
    loopback.then_some("MASTER_ADDR is a loopback address")
}

/// Where hetccl's store goes when torchrun's agent serves its own on `MASTER_PORT`
/// (`TORCHELASTIC_USE_AGENT_STORE`): on one host nowhere fixed (rank 0 picks a free
/// loopback port and writes it in the key file); across hosts on the next port,
/// `MASTER_PORT + 1`. Otherwise `master` as given.
fn store_beside_agent(
    cfg: &Config,
    master: Option<(String, u16)>,
    one_host: bool,
    rank: usize,
) -> Result<Option<(String, u16)>> {
    let (true, Some((host, port))) = (cfg.launch.agent_store, &master) else {
        return Ok(master);
    };
    let (host, port) = (host.clone(), *port);
    if one_host {
        return Ok(None);
    }
    match port.checked_add(1) {
        Some(next) => {
            tracing::info!(
                "rank {rank}: torchrun's agent serves its store on {host}:{port}; hetccl's \
                 store uses {host}:{next}"
            );
            Ok(Some((host, next)))
        }
        None => Err(Error::Bootstrap(format!(
            "rank {rank}: torchrun's agent serves its store on MASTER_PORT {port}, and hetccl's \
             goes on the next port, which does not exist; pick a lower --master-port"
        ))),
    }
}

/// Where rank 0's store listens when `MASTER_ADDR` is not an address of this host.
fn non_local_bind(cfg: &Config) -> Result<NonLocalBind> {
    match &cfg.socket_ifname {
        Some(name) => Ok(NonLocalBind::At(IpAddr::V4(netif::interface_ipv4(name)?))),
        None => Ok(NonLocalBind::Everywhere),
    }
}

/// `env://` with a key every rank was given.
fn env_with_key(
    cfg: &Config,
    host: &str,
    port: u16,
    auth: &JobAuth,
    rank: usize,
    world: usize,
) -> Result<TcpBootstrap> {
    let timeout = cfg.connect_timeout;
    if rank == 0 {
        let server = StoreServer::bind(
            &format!("{host}:{port}"),
            auth.clone(),
            world,
            STORE_HANDSHAKE_TIMEOUT,
            non_local_bind(cfg)?,
        )?;
        TcpBootstrap::serving(server, world, timeout, None)
    } else {
        let c = TcpStoreClient::connect(host, port, auth, rank, timeout)?;
        TcpBootstrap::joined(c, &format!("{host}:{port}"), rank, world, timeout)
    }
}

/// The key file through which rank 0 hands the job key to the ranks of a one-host job
/// (see [`keyfile`]), named from the launcher's job identity and the store address;
/// `None` when the launcher gives neither. Makes the private directory if missing.
pub fn key_file(cfg: &Config) -> Result<Option<KeyFile>> {
    let master = cfg
        .launch
        .master_addr
        .as_ref()
        .zip(cfg.launch.master_port)
        .map(|(h, p)| format!("{h}:{p}"));
    if cfg.launch.job_identity.is_none() && master.is_none() {
        return Ok(None);
    }
    let identity = format!(
        "{}|{}|{}",
        cfg.launch.source,
        cfg.launch.job_identity.as_deref().unwrap_or(""),
        master.unwrap_or_default()
    );
    KeyFile::new(&keyfile::key_dir(cfg), cfg.launch.source, &identity).map(Some)
}

/// `env://` on one host with no key given (or no store address): rank 0 makes a key
/// (or takes `HETCCL_JOB_KEY`) and publishes it, with its store's port, in the job's key
/// file; the others wait for the file and connect (with `HETCCL_JOB_KEY` when given).
fn env_with_key_file(
    cfg: &Config,
    master: Option<(String, u16)>,
    rank: usize,
    world: usize,
) -> Result<(Box<dyn Bootstrap>, JobAuth)> {
    let source = cfg.launch.source;
    let Some(kf) = key_file(cfg)? else {
        return Err(Error::Bootstrap(format!(
            "rank {rank} of {world} (from {source} variables): with no MASTER_ADDR and \
             MASTER_PORT the ranks find each other by the launcher's name for the job, and \
             the {source} variables carry none; set MASTER_ADDR=127.0.0.1 and MASTER_PORT \
             to a free port, or HETCCL_JOB_KEY with them"
        )));
    };
    let job_id = match (&cfg.job_id, &master) {
        (Some(id), _) => id.clone(),
        (None, Some((h, p))) => format!("env:{h}:{p}"),
        (None, None) => kf
            .path()
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| source.to_string()),
    };
    let timeout = cfg.connect_timeout;
    let given = cfg.job_key.as_deref();
    // With HETCCL_JOB_KEY every rank holds the key already: the file then carries only
    // a digest of it, which tells this job's file from an earlier job's.
    let digest = given.map(key_digest);
    if rank == 0 {
        let key = given.map_or_else(auth::random_key, str::to_string);
        let auth = JobAuth::new(&job_id, &key);
        let (addr, non_local) = match &master {
            Some((h, p)) => (format!("{h}:{p}"), non_local_bind(cfg)?),
            // Every rank is on this host: loopback is the only interface they need.
            None => ("127.0.0.1:0".to_string(), NonLocalBind::Everywhere),
        };
        let server = StoreServer::bind(
            &addr,
            auth.clone(),
            world,
            STORE_HANDSHAKE_TIMEOUT,
            non_local,
        )?;
        let port = server.local_addr().port();
        let published = kf.publish(&KeyFileContent {
            port,
            key: digest.clone().unwrap_or(key),
        })?;
        let b = TcpBootstrap::serving(server, world, timeout, Some(published))?;
        return Ok((Box::new(b), auth));
    }
    let host = master
        .as_ref()
        .map(|(h, _)| h.clone())
        .unwrap_or_else(|| "127.0.0.1".into());
    let want_port = master.as_ref().map(|(_, p)| *p);
    let path = kf.path().display().to_string();
    let store = match want_port {
        Some(p) => format!(" for its store at {host}:{p}"),
        None => String::new(),
    };
    let (client, auth) = TcpStoreClient::connect_to(rank, timeout, || {
        Ok(match kf.read()? {
            None => {
                Whereabouts::NotYet(format!("rank 0 has not written the key file {path}{store}"))
            }
            Some(c) if want_port.is_some_and(|p| p != c.port) => Whereabouts::NotYet(format!(
                "the key file {path} names port {}, not MASTER_PORT {} (left by an earlier job?)",
                c.port,
                want_port.unwrap_or_default()
            )),
            Some(c) if digest.as_ref().is_some_and(|d| *d != c.key) => {
                Whereabouts::NotYet(format!(
                    "the key file {path} was written for another HETCCL_JOB_KEY (left by an \
                     earlier job?)"
                ))
            }
            Some(c) => Whereabouts::At(StoreTarget {
                host: host.clone(),
                port: c.port,
                auth: JobAuth::new(&job_id, given.unwrap_or(&c.key)),
                may_be_stale: true,
            }),
        })
    })?;
    let addr = client.addr().to_string();
    let b = TcpBootstrap::joined(client, &addr, rank, world, timeout)?;
    Ok((Box::new(b), auth))
}

/// 64 hex digits naming `key` without revealing it.
fn key_digest(key: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(format!("hetccl key file digest\n{key}").as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `file://` with no key given: the directory must be closed to other users; rank 0's
/// random key then goes to the others through it, in the first round.
fn file_with_private_key(
    cfg: &Config,
    dir: &std::path::Path,
    job_id: &str,
    rank: usize,
    world: usize,
) -> Result<(Box<dyn Bootstrap>, JobAuth)> {
    let what = format!("HETCCL_INIT=file://{}: the directory", dir.display());
    keyfile::ensure_private_dir(
        dir,
        &what,
        "without HETCCL_JOB_KEY the job key passes through it, so make it private \
         (chmod 700) or set HETCCL_JOB_KEY to the same secret on every rank",
    )?;
    let mut b = FileBootstrap::new(dir, job_id, rank, world, cfg.connect_timeout)?;
    let mine = if rank == 0 {
        auth::random_key()
    } else {
        String::new()
    };
    let all = b.all_gather(mine.as_bytes())?;
    let key = all
        .first()
        .and_then(|k| std::str::from_utf8(k).ok())
        .filter(|k| k.len() == 64 && k.bytes().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| {
            Error::Bootstrap(format!(
                "rank {rank}: rank 0's job key in {} is not 64 hex digits",
                b.dir().display()
            ))
        })?
        .to_string();
    Ok((Box::new(b), JobAuth::new(job_id, &key)))
}

fn solo(cfg: &Config) -> (Box<dyn Bootstrap>, JobAuth) {
    let job_id = cfg
        .job_id
        .clone()
        .unwrap_or_else(|| format!("solo:{}", std::process::id()));
    let key = cfg.job_key.clone().unwrap_or_else(auth::random_key);
    (Box::new(SoloBootstrap), JobAuth::new(&job_id, &key))
}

/// The variables [`crate::config`] reads rank and world size from, by launcher.
const RANK_VARIABLES: &str = "RANK and WORLD_SIZE (torchrun, hetccl run), \
     OMPI_COMM_WORLD_RANK and OMPI_COMM_WORLD_SIZE (OpenMPI's mpirun), \
     PMI_RANK and PMI_SIZE (MPICH, Intel MPI), SLURM_PROCID and SLURM_NTASKS (srun)";

fn rank_and_world(cfg: &Config) -> Result<(usize, usize)> {
    match (cfg.launch.rank, cfg.launch.world_size) {
        (Some(r), Some(w)) => Ok((r, w)),
        _ => Err(Error::Bootstrap(format!(
            "cannot tell this process's rank and world size: looked for {RANK_VARIABLES}, and none \
             is set; start the program with `hetccl run -n N`, torchrun, mpirun or srun, or set \
             RANK and WORLD_SIZE"
        ))),
    }
}

/// The error for a job key given without the store's address.
fn missing_master(cfg: &Config, rank: usize, world: usize) -> Error {
    let a = &cfg.launch.master_addr;
    let p = cfg.launch.master_port;
    let unset: Vec<&str> = [("MASTER_ADDR", a.is_none()), ("MASTER_PORT", p.is_none())]
        .iter()
        .filter(|(_, missing)| *missing)
        .map(|(n, _)| *n)
        .collect();
    let hint = if cfg.launch.source == "openmpi" && !cfg!(feature = "mpi") {
        "; or rebuild hetccl with `--features mpi` to bootstrap through mpirun itself"
    } else {
        ""
    };
    Error::Bootstrap(format!(
        "rank {rank} of {world} (from {} variables) needs rank 0's store address, but {} \
         not set; set MASTER_ADDR to rank 0's host and MASTER_PORT to a free port, \
         or use HETCCL_INIT=file:///shared/dir{hint}",
        cfg.launch.source,
        if unset.len() == 1 {
            format!("{} is", unset.join(""))
        } else {
            format!("{} are", unset.join(" and "))
        }
    ))
}

#[cfg(feature = "mpi")]
fn mpi_bootstrap(cfg: &Config) -> Result<(Box<dyn Bootstrap>, JobAuth)> {
    let mut b = mpi::MpiBootstrap::new()?;
    // MPI is a trusted channel: rank 0's identity and key (random unless configured)
    // reach every rank through it, so TCP handshakes get a real secret.
    let mine = if b.rank() == 0 {
        let id = cfg
            .job_id
            .clone()
            .unwrap_or_else(|| format!("mpi-{}", auth::random_hex(8)));
        let key = cfg.job_key.clone().unwrap_or_else(auth::random_key);
        let mut blob = (id.len() as u64).to_le_bytes().to_vec();
        blob.extend_from_slice(id.as_bytes());
        blob.extend_from_slice(key.as_bytes());
        blob
    } else {
        Vec::new()
    };
    let all = b.all_gather(&mine)?;
    let blob = all.first().map(Vec::as_slice).unwrap_or_default();
    let parsed = blob
        .get(..8)
        .and_then(|l| l.try_into().ok())
        .map(|l| u64::from_le_bytes(l) as usize)
        .and_then(|n| {
            let id = std::str::from_utf8(blob.get(8..8usize.checked_add(n)?)?).ok()?;
            let key = std::str::from_utf8(blob.get(8 + n..)?).ok()?;
            Some((id.to_string(), key.to_string()))
        });
    let Some((id, key)) = parsed else {
        return Err(Error::Bootstrap(format!(
            "rank {}: malformed job identity ({} bytes) from rank 0 over MPI",
            b.rank(),
            blob.len()
        )));
    };
    Ok((Box::new(b), JobAuth::new(&id, &key)))
}

#[cfg(not(feature = "mpi"))]
fn mpi_bootstrap(_cfg: &Config) -> Result<(Box<dyn Bootstrap>, JobAuth)> {
    Err(Error::Bootstrap(
        "HETCCL_INIT=mpi needs hetccl built with MPI support: rebuild with \
         `cargo build --features mpi` (needs OpenMPI's headers and libclang)"
            .into(),
    ))
}

/// `1s`, `0.3s`, `60s`: durations as users wrote them in `HETCCL_*_TIMEOUT`.
pub(crate) fn fmt_secs(d: Duration) -> String {
    let s = format!("{:.3}", d.as_secs_f64());
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}s")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Config {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_vars(&m).unwrap()
    }

    fn free_port() -> u16 {
        port::free_store_port().unwrap()
    }

    #[test]
    fn durations_print_like_the_variables() {
        assert_eq!(fmt_secs(Duration::from_secs(60)), "60s");
        assert_eq!(fmt_secs(Duration::from_millis(300)), "0.3s");
        assert_eq!(fmt_secs(Duration::from_millis(1250)), "1.25s");
    }

    #[test]
    fn no_launcher_variables_is_a_clear_error() {
        let e = from_config(&cfg(&[])).err().unwrap().to_string();
        assert_eq!(
            e,
            format!(
                "bootstrap: cannot tell this process's rank and world size: looked for {RANK_VARIABLES}, \
                 and none is set; start the program with `hetccl run -n N`, torchrun, mpirun or srun, \
                 or set RANK and WORLD_SIZE"
            )
        );
    }

    #[test]
    fn missing_master_address_is_named() {
        let e = from_config(&cfg(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_PORT", "1234"),
            ("HETCCL_JOB_KEY", "k"),
        ]))
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.starts_with("bootstrap: rank 1 of 2 (from torchrun variables) needs rank 0's store address, but MASTER_ADDR is not set;"),
            "{e}"
        );
        let e = from_config(&cfg(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("HETCCL_JOB_KEY", "k"),
        ]))
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("but MASTER_ADDR and MASTER_PORT are not set"),
            "{e}"
        );
    }

    #[test]
    fn a_world_of_one_needs_no_store() {
        // No MASTER_ADDR, and a file path that does not exist: neither is touched.
        for init in ["env://", "file:///nonexistent/hetccl-rdv"] {
            let (mut b, auth) = from_config(&cfg(&[
                ("RANK", "0"),
                ("WORLD_SIZE", "1"),
                ("HETCCL_INIT", init),
                ("HETCCL_JOB_ID", "one"),
            ]))
            .unwrap();
            assert_eq!((b.rank(), b.world_size()), (0, 1));
            assert_eq!(b.all_gather(b"me").unwrap(), vec![b"me".to_vec()]);
            assert_eq!(auth.job_id(), "one");
        }
    }

    #[test]
    fn unreachable_master_fails_within_the_connect_timeout() {
        let port = free_port();
        let p = port.to_string();
        let e = from_config(&cfg(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &p),
            ("HETCCL_CONNECT_TIMEOUT", "1"),
            ("HETCCL_JOB_KEY", "k"),
        ]))
        .err()
        .unwrap()
        .to_string();
        assert_eq!(
            e,
            format!("bootstrap: rank 1: cannot reach rank 0's store at 127.0.0.1:{port} after 1s: connection refused")
        );
        // Without a key the rank waits for rank 0's key file first, and says so.
        let c = cfg(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &p),
            ("HETCCL_CONNECT_TIMEOUT", "1"),
        ]);
        let path = key_file(&c).unwrap().unwrap().path().display().to_string();
        let e = from_config(&c).err().unwrap().to_string();
        assert_eq!(
            e,
            format!(
                "bootstrap: rank 1: found no store of rank 0 after 1s: rank 0 has not written \
                 the key file {path} for its store at 127.0.0.1:{port}"
            )
        );
    }

    #[test]
    fn env_all_gather_across_four_threads() {
        let p = free_port().to_string();
        let handles: Vec<_> = (0..4)
            .map(|rank| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let r = rank.to_string();
                    let c = cfg(&[
                        ("RANK", &r),
                        ("WORLD_SIZE", "4"),
                        ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", &p),
                        ("HETCCL_JOB_KEY", "s3cret"),
                    ]);
                    let (mut b, auth) = from_config(&c).unwrap();
                    assert_eq!((b.rank(), b.world_size()), (rank, 4));
                    let got = b.all_gather(format!("host-{rank}").as_bytes()).unwrap();
                    (got, auth.job_id().to_string())
                })
            })
            .collect();
        for h in handles {
            let (got, id) = h.join().unwrap();
            let want: Vec<Vec<u8>> = (0..4).map(|k| format!("host-{k}").into_bytes()).collect();
            assert_eq!(got, want);
            assert_eq!(id, format!("env:127.0.0.1:{p}"));
        }
    }

    #[test]
    fn file_method_through_the_config() {
        let top = std::env::temp_dir().join(format!("hetccl-mod-file-{}", std::process::id()));
        // Missing parents are made too.
        let root = top.join("rdv");
        let init = format!("file://{}", root.display());
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let init = init.clone();
                std::thread::spawn(move || {
                    let r = rank.to_string();
                    let c = cfg(&[("RANK", &r), ("WORLD_SIZE", "3"), ("HETCCL_INIT", &init)]);
                    let (mut b, auth) = from_config(&c).unwrap();
                    (
                        b.all_gather(&[rank as u8]).unwrap(),
                        auth.job_id().to_string(),
                    )
                })
            })
            .collect();
        for h in handles {
            let (got, id) = h.join().unwrap();
            assert_eq!(got, vec![vec![0], vec![1], vec![2]]);
            assert_eq!(id, format!("file:{}", root.display()));
        }
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn mpirun_without_master_addr_picks_mpi_only_in_mpi_builds() {
        let c = cfg(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "2")]);
        let want = if cfg!(feature = "mpi") {
            InitMethod::Mpi
        } else {
            InitMethod::Env
        };
        assert_eq!(resolve_init(&c), want);
        let c = cfg(&[
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
        ]);
        assert_eq!(resolve_init(&c), InitMethod::Env);
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn mpi_without_the_feature_says_how_to_rebuild() {
        let e = from_config(&cfg(&[("HETCCL_INIT", "mpi")]))
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            e,
            "bootstrap: HETCCL_INIT=mpi needs hetccl built with MPI support: rebuild with \
             `cargo build --features mpi` (needs OpenMPI's headers and libclang)"
        );
        // Without a key or a store address, mpirun's ranks on several hosts are told how
        // to get a key, the MPI feature among the ways.
        let e = from_config(&cfg(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "1"),
        ]))
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("build hetccl with `--features mpi`"), "{e}");
        let e = from_config(&cfg(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("HETCCL_JOB_KEY", "k"),
        ]))
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.ends_with(
                "or rebuild hetccl with `--features mpi` to bootstrap through mpirun itself"
            ),
            "{e}"
        );
    }

    /// Runs `n` ranks as threads with `vars` plus their rank variable `rank_var`, each
    /// calling `each(rank, bootstrap, auth)`.
    fn ranks<T: Send + 'static>(
        n: usize,
        rank_var: &'static str,
        vars: &[(&str, &str)],
        each: impl Fn(usize, Box<dyn Bootstrap>, JobAuth) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let each = Arc::new(each);
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                let mut vars = vars.clone();
                let each = each.clone();
                std::thread::spawn(move || {
                    vars.push((rank_var.into(), rank.to_string()));
                    let pairs: Vec<(&str, &str)> =
                        vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    let (b, auth) = from_config(&cfg(&pairs)).unwrap();
                    each(rank, b, auth)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn mode(p: &std::path::Path) -> u32 {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn key_file_of(c: &Config) -> KeyFile {
        key_file(c).unwrap().unwrap()
    }

    #[test]
    fn under_torchrun_the_agents_port_is_left_to_its_store() {
        // torchrun's agent already listens on MASTER_PORT (its own TCPStore).
        let agent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        agent.set_nonblocking(true).unwrap();
        let p = agent.local_addr().unwrap().port().to_string();
        let run_id = format!("agent-store-test-{p}");
        let vars = [
            ("WORLD_SIZE", "2"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", p.as_str()),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RUN_ID", run_id.as_str()),
        ];
        let got = ranks(2, "RANK", &vars, |rank, mut b, _| {
            b.all_gather(&[rank as u8 + 10]).unwrap()
        });
        assert_eq!(got, vec![vec![vec![10], vec![11]]; 2]);
        // Nobody knocked on the agent's port.
        assert_eq!(
            agent.accept().err().map(|e| e.kind()),
            Some(std::io::ErrorKind::WouldBlock)
        );
    }

    #[test]
    fn across_hosts_torchrun_puts_the_store_on_the_next_port() {
        let base = [
            ("RANK", "1"),
            ("WORLD_SIZE", "8"),
            ("MASTER_ADDR", "node0"),
            ("HETCCL_JOB_KEY", "k"),
        ];
        let at = |port: &str, agent: &str| {
            let c = cfg(&[
                &base[..],
                &[
                    ("MASTER_PORT", port),
                    ("TORCHELASTIC_USE_AGENT_STORE", agent),
                ],
            ]
            .concat());
            store_beside_agent(
                &c,
                Some(("node0".into(), c.launch.master_port.unwrap())),
                false,
                1,
            )
        };
        assert_eq!(at("29500", "True").unwrap(), Some(("node0".into(), 29501)));
        assert_eq!(at("29500", "False").unwrap(), Some(("node0".into(), 29500)));
        assert_eq!(
            at("65535", "True").unwrap_err().to_string(),
            "bootstrap: rank 1: torchrun's agent serves its store on MASTER_PORT 65535, and \
             hetccl's goes on the next port, which does not exist; pick a lower --master-port"
        );
    }

    #[test]
    fn one_host_ranks_without_a_key_share_one_through_a_private_file() {
        let p = free_port().to_string();
        let vars = [
            ("WORLD_SIZE", "3"),
            ("LOCAL_WORLD_SIZE", "3"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", p.as_str()),
        ];
        let c = cfg(&[&vars[..], &[("RANK", "0")]].concat());
        let path = key_file_of(&c).path().to_path_buf();
        let seen = ranks(3, "RANK", &vars, move |rank, mut b, auth| {
            // Before the first round every rank has read the file, and it is still there.
            let file = (rank == 1).then(|| {
                let dir = path.parent().unwrap();
                (mode(dir), mode(&path), path.clone())
            });
            let got = b.all_gather(&[rank as u8]).unwrap();
            assert_eq!(got, vec![vec![0], vec![1], vec![2]]);
            (file, auth.job_id().to_string())
        });
        let (dir_mode, file_mode, path) = seen[1].0.clone().unwrap();
        assert_eq!((dir_mode, file_mode), (0o700, 0o600));
        assert!(!path.exists(), "{} outlived the job", path.display());
        for (_, id) in seen {
            assert_eq!(id, format!("env:127.0.0.1:{p}"));
        }
    }

    #[test]
    fn mpirun_ranks_on_one_host_need_nothing_but_its_variables() {
        let hnp = format!("1.0;tcp://127.0.0.1:{}", free_port());
        let vars = [
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "3"),
            ("OMPI_MCA_ess_base_jobid", "77"),
            ("OMPI_MCA_orte_hnp_uri", hnp.as_str()),
        ];
        let seen = ranks(3, "OMPI_COMM_WORLD_RANK", &vars, |rank, mut b, auth| {
            let addr = b.all_gather(b"").map(|_| ());
            assert!(addr.is_ok(), "{addr:?}");
            let got = b.all_gather(format!("r{rank}").as_bytes()).unwrap();
            assert_eq!(got, vec![b"r0".to_vec(), b"r1".to_vec(), b"r2".to_vec()]);
            auth.job_id().to_string()
        });
        assert!(seen[0].starts_with("openmpi-"), "{}", seen[0]);
        assert!(seen.iter().all(|id| id == &seen[0]), "{seen:?}");
    }

    #[test]
    fn a_given_key_on_one_host_needs_no_store_address_and_stays_out_of_the_file() {
        let hnp = format!("1.0;tcp://127.0.0.1:{}", free_port());
        let vars = [
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("OMPI_MCA_ess_base_jobid", "78"),
            ("OMPI_MCA_orte_hnp_uri", hnp.as_str()),
            ("HETCCL_JOB_KEY", "my-own-secret"),
        ];
        let c = cfg(&[&vars[..], &[("OMPI_COMM_WORLD_RANK", "1")]].concat());
        let path = key_file_of(&c).path().to_path_buf();
        let seen = ranks(2, "OMPI_COMM_WORLD_RANK", &vars, move |rank, mut b, _| {
            let text = (rank == 1).then(|| std::fs::read_to_string(&path).unwrap());
            b.all_gather(&[rank as u8]).unwrap();
            text
        });
        let text = seen[1].clone().unwrap();
        assert!(!text.contains("my-own-secret"), "{text}");
        assert!(
            text.ends_with(&format!("key {}\n", key_digest("my-own-secret"))),
            "{text}"
        );
    }

    #[test]
    fn a_stranger_who_computes_the_old_job_id_is_refused() {
        let port = free_port();
        let p = port.to_string();
        let vars = [
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", p.as_str()),
        ];
        let (mut b0, _) = from_config(&cfg(&vars)).unwrap();
        // Before, the key was the job id `env:<MASTER_ADDR>:<MASTER_PORT>`.
        let old = format!("env:127.0.0.1:{port}");
        let e = TcpStoreClient::connect(
            "127.0.0.1",
            port,
            &JobAuth::new(&old, &old),
            1,
            Duration::from_secs(5),
        )
        .err()
        .unwrap()
        .to_string();
        assert_eq!(
            e,
            format!(
                "bootstrap: rank 1: rank 0's store at 127.0.0.1:{port} refused this rank: it \
                 proved it holds a different job key: HETCCL_JOB_KEY differs between the ranks, \
                 or another job with its own key serves port {port}"
            )
        );
        // The real rank 1 still joins.
        let r1 = std::thread::spawn(move || {
            let v = [
                ("RANK", "1"),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", p.as_str()),
            ];
            let (mut b, _) = from_config(&cfg(&v)).unwrap();
            b.all_gather(b"one").unwrap()
        });
        assert_eq!(b0.all_gather(b"zero").unwrap(), r1.join().unwrap());
    }

    #[test]
    fn a_stale_key_file_is_read_again_until_rank_0_replaces_it() {
        let port = free_port();
        let p = port.to_string();
        let vars = [
            ("WORLD_SIZE", "2"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", p.as_str()),
            ("HETCCL_CONNECT_TIMEOUT", "20"),
        ];
        let c = cfg(&[&vars[..], &[("RANK", "1")]].concat());
        let kf = key_file_of(&c);
        let path = kf.path().to_path_buf();
        // A crashed earlier job of the same name left its file: same port, another key.
        let stale = KeyFileContent {
            port,
            key: "0".repeat(64),
        };
        std::mem::forget(kf.publish(&stale).unwrap());
        let r1 = std::thread::spawn(move || {
            let (mut b, _) = from_config(&c).unwrap();
            b.all_gather(b"one").unwrap()
        });
        // Rank 1 is reading the stale file and trying; rank 0 comes late.
        std::thread::sleep(Duration::from_millis(700));
        let (mut b0, _) = from_config(&cfg(&[&vars[..], &[("RANK", "0")]].concat())).unwrap();
        assert_eq!(b0.all_gather(b"zero").unwrap(), r1.join().unwrap());
        drop(b0);
        assert!(!path.exists());
    }

    #[test]
    fn ranks_on_several_hosts_need_a_key_and_are_told_how() {
        let cases: [&[(&str, &str)]; 3] = [
            &[
                ("OMPI_COMM_WORLD_RANK", "1"),
                ("OMPI_COMM_WORLD_SIZE", "4"),
                ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ],
            &[
                ("SLURM_PROCID", "1"),
                ("SLURM_NTASKS", "4"),
                ("SLURM_JOB_ID", "5"),
                ("SLURM_NNODES", "2"),
            ],
            &[
                ("RANK", "1"),
                ("WORLD_SIZE", "4"),
                ("MASTER_ADDR", "192.0.2.1"),
                ("MASTER_PORT", "29500"),
            ],
        ];
        for (vars, source) in cases.iter().zip(["openmpi", "slurm", "torchrun"]) {
            let e = from_config(&cfg(vars)).err().unwrap().to_string();
            assert_eq!(
                e,
                format!(
                    "bootstrap: rank 1 of 4 (from {source} variables): the ranks may run on \
                     several hosts and HETCCL_JOB_KEY is not set. {CROSS_HOST_KEY}"
                )
            );
        }
        // One Slurm node needs no key; nor does a launcher naming no job but giving a
        // loopback store address.
        let c = cfg(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_STEP_NUM_NODES", "1"),
        ]);
        assert!(one_host(&c, 2, None).is_some());
        // PMI names no job: without a store address the ranks cannot find each other.
        let e = from_config(&cfg(&[
            ("PMI_RANK", "1"),
            ("PMI_SIZE", "2"),
            ("MPI_LOCALNRANKS", "2"),
        ]))
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.starts_with(
                "bootstrap: rank 1 of 2 (from pmi variables): with no MASTER_ADDR and \
                 MASTER_PORT the ranks find each other by the launcher's name for the job"
            ),
            "{e}"
        );
    }

    #[derive(Clone, Default)]
    struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for LogBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Runs `f` with this thread's log lines going to the returned text.
    fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
        let buf = LogBuf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let out = tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
        (out, text)
    }

    #[test]
    fn the_store_binds_only_the_interface_that_reaches_the_ranks() {
        let listen = |vars: &[(&str, &str)]| {
            let c = cfg(vars);
            let (host, port) = (
                c.launch.master_addr.clone().unwrap(),
                c.launch.master_port.unwrap(),
            );
            let auth = JobAuth::new("bind", "k");
            logged(|| {
                env_with_key(&c, &host, port, &auth, 0, 2)
                    .map(|b| b.server().unwrap().local_addr().to_string())
            })
        };
        let p = free_port();
        let ps = p.to_string();
        let (addr, _) = listen(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &ps),
        ]);
        assert_eq!(addr.unwrap(), format!("127.0.0.1:{p}"));
        // MASTER_ADDR of another host (a documentation address): HETCCL_SOCKET_IFNAME's.
        let p = free_port();
        let ps = p.to_string();
        let (addr, log) = listen(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "192.0.2.1"),
            ("MASTER_PORT", &ps),
            ("HETCCL_SOCKET_IFNAME", "lo"),
        ]);
        assert_eq!(addr.unwrap(), format!("127.0.0.1:{p}"));
        assert!(!log.contains("WARN"), "{log}");
        // Without it, every interface, with a warning that says why and how to narrow it.
        let p = free_port();
        let ps = p.to_string();
        let (addr, log) = listen(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "192.0.2.1"),
            ("MASTER_PORT", &ps),
        ]);
        assert_eq!(addr.unwrap(), format!("0.0.0.0:{p}"));
        assert!(
            log.contains("WARN")
                && log.contains(&format!(
                    "rank 0: MASTER_ADDR 192.0.2.1:{p} is not an address of this host (NAT or a \
                     forwarded address?), so the store listens on every interface (0.0.0.0:{p}); \
                     set HETCCL_SOCKET_IFNAME to the interface the ranks reach this host through \
                     to listen there alone"
                )),
            "{log}"
        );
        // One host with no store address: loopback, on a port of its own.
        let hnp = format!("1.0;tcp://127.0.0.1:{}", free_port());
        let (b, log) = logged(|| {
            from_config(&cfg(&[
                ("OMPI_COMM_WORLD_RANK", "0"),
                ("OMPI_COMM_WORLD_SIZE", "2"),
                ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
                ("OMPI_MCA_ess_base_jobid", "5"),
                ("OMPI_MCA_orte_hnp_uri", &hnp),
            ]))
            .unwrap()
        });
        assert!(log.contains("store serving on 127.0.0.1:"), "{log}");
        drop(b);
    }

    #[test]
    fn a_file_rendezvous_without_a_key_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!("hetccl-mod-open-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o750)).unwrap();
        let init = format!("file://{}", root.display());
        let e = from_config(&cfg(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("HETCCL_INIT", &init),
        ]))
        .err()
        .unwrap()
        .to_string();
        assert_eq!(
            e,
            format!(
                "bootstrap: HETCCL_INIT=file://{0}: the directory {0} is open to other users \
                 (mode 0750): another user could read or replace the job key there; without \
                 HETCCL_JOB_KEY the job key passes through it, so make it private (chmod 700) \
                 or set HETCCL_JOB_KEY to the same secret on every rank",
                root.display()
            )
        );
        // With a key, the directory's mode is the user's business.
        let (b0, auth) = from_config(&cfg(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("HETCCL_INIT", &init),
            ("HETCCL_JOB_KEY", "k"),
        ]))
        .unwrap();
        assert_eq!(auth.job_id(), format!("file:{}", root.display()));
        drop(b0);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
