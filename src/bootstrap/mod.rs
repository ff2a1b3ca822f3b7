//! Who am I, and where are my peers.
//!
//! A [`Bootstrap`] knows this process's rank and the world size, and can all-gather
//! small blobs (listening addresses, host names) among all ranks. Implementations:
//! a TCP store served by rank 0 (`env://`, torchrun's variables), a rendezvous
//! directory on a shared filesystem (`file://`), and MPI (feature `mpi`).
//! Every TCP connection, here and in the transports, opens with [`auth`]'s handshake.
//!
//! [`from_config`] picks one from [`Config::init`] and the launcher's variables, and
//! returns the job's [`JobAuth`] for the transports' handshakes.

pub mod auth;
pub mod file;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod store;
pub mod tcp;

use std::time::Duration;

pub use auth::JobAuth;
pub use file::FileBootstrap;
pub use store::{GetOutcome, LocalStore, Store, StoreServer, TcpStoreClient};
pub use tcp::TcpBootstrap;

use crate::config::{Config, InitMethod};
use crate::error::{Error, Result};

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
/// - `env://`: rank and world from the launcher's variables; rank 0 serves a TCP store on
///   `MASTER_ADDR:MASTER_PORT` until the bootstrap is dropped, the others connect to it
///   (retrying until `HETCCL_CONNECT_TIMEOUT`). Job id: `HETCCL_JOB_ID`, else
///   `env:<MASTER_ADDR>:<MASTER_PORT>` (so every rank must be given the same spelling).
/// - `file:///dir`: rank and world from the launcher's variables; blobs go through files
///   under `dir`. Job id: `HETCCL_JOB_ID`, else `file:<dir>`.
/// - `mpi`: rank and world from `MPI_COMM_WORLD`. Rank 0's job id and key (random unless
///   `HETCCL_JOB_ID` / `HETCCL_JOB_KEY` are set) are sent to all ranks through MPI.
///
/// A world of one rank needs no store (except under MPI, which is already there).
pub fn from_config(cfg: &Config) -> Result<(Box<dyn Bootstrap>, JobAuth)> {
    let key = cfg.job_key.as_deref();
    match resolve_init(cfg) {
        InitMethod::Mpi => mpi_bootstrap(cfg),
        InitMethod::Env => {
            let (rank, world) = rank_and_world(cfg)?;
            if world == 1 {
                return Ok(solo(cfg));
            }
            let (host, port) = master_addr(cfg, rank, world)?;
            let job_id = cfg
                .job_id
                .clone()
                .unwrap_or_else(|| format!("env:{host}:{port}"));
            let auth = JobAuth::new(&job_id, key);
            let b = TcpBootstrap::new(&host, port, &auth, rank, world, cfg.connect_timeout)?;
            Ok((Box::new(b), auth))
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
            let auth = JobAuth::new(&job_id, key);
            let b = FileBootstrap::new(&dir, &job_id, rank, world, cfg.connect_timeout)?;
            Ok((Box::new(b), auth))
        }
    }
}

fn solo(cfg: &Config) -> (Box<dyn Bootstrap>, JobAuth) {
    let job_id = cfg
        .job_id
        .clone()
        .unwrap_or_else(|| format!("solo:{}", std::process::id()));
    (
        Box::new(SoloBootstrap),
        JobAuth::new(&job_id, cfg.job_key.as_deref()),
    )
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

fn master_addr(cfg: &Config, rank: usize, world: usize) -> Result<(String, u16)> {
    match (&cfg.launch.master_addr, cfg.launch.master_port) {
        (Some(a), Some(p)) => Ok((a.clone(), p)),
        (a, p) => {
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
            Err(Error::Bootstrap(format!(
                "rank {rank} of {world} (from {} variables) needs rank 0's store address, but {} \
                 not set; set MASTER_ADDR to rank 0's host and MASTER_PORT to a free port, \
                 or use HETCCL_INIT=file:///shared/dir{hint}",
                cfg.launch.source,
                if unset.len() == 1 {
                    format!("{} is", unset.join(""))
                } else {
                    format!("{} are", unset.join(" and "))
                }
            )))
        }
    }
}

#[cfg(feature = "mpi")]
fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
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
            .unwrap_or_else(|| format!("mpi-{}", random_hex(8)));
        let key = cfg.job_key.clone().unwrap_or_else(|| random_hex(32));
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
    Ok((Box::new(b), JobAuth::new(&id, Some(&key))))
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
    use std::net::TcpListener;

    fn cfg(pairs: &[(&str, &str)]) -> Config {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_vars(&m).unwrap()
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
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
        ]))
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.starts_with("bootstrap: rank 1 of 2 (from torchrun variables) needs rank 0's store address, but MASTER_ADDR is not set;"),
            "{e}"
        );
        let e = from_config(&cfg(&[("RANK", "0"), ("WORLD_SIZE", "2")]))
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
        ]))
        .err()
        .unwrap()
        .to_string();
        assert_eq!(
            e,
            format!("bootstrap: rank 1: cannot reach rank 0's store at 127.0.0.1:{port} after 1s: connection refused")
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
        let root = std::env::temp_dir().join(format!("hetccl-mod-file-{}", std::process::id()));
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
        std::fs::remove_dir_all(&root).unwrap();
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
        let e = from_config(&cfg(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
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
}
