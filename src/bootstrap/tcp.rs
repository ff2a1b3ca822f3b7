//! `env://` bootstrap: rank 0 serves a [`store`](super::store), every other rank connects
//! to it (at `MASTER_ADDR:MASTER_PORT`, or where rank 0's key file says).
//!
//! all_gather round `r` (a counter per bootstrap, so every rank names rounds alike):
//!
//! ```text
//! set  ag/<r>/<rank> = data
//! get  ag/<r>/0 .. ag/<r>/<n-1>       one blocking request, until all are present
//!                                     (or a rank is gone: then every rank fails, naming it)
//! add  ag/<r>/done += 1               tells rank 0 this rank has what it needs
//! del  ag/<r-1>/<rank>                safe: every rank has set round r, so all finished r-1
//! ```
//!
//! Rank 0, when dropped, keeps serving until every rank has counted itself into the last
//! round's `done` (or has disconnected, or `connect_timeout` passes), so the ranks still
//! reading the last round's values do not lose the store under their feet. A rank that is
//! dropped says goodbye to the store; one that dies without it is reported to every rank
//! waiting in a round (see [`store`](super::store)).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::keyfile::Published;
use super::store::{
    describe_gone, GetOutcome, NonLocalBind, RankState, Store, StoreServer, TcpStoreClient,
    STORE_HANDSHAKE_TIMEOUT,
};
use super::{fmt_secs, Bootstrap, Liveness};
use crate::bootstrap::auth::JobAuth;
use crate::error::{Error, Result};

/// The store handle, shared with [`Liveness`] checks made from other threads.
type SharedStore = Arc<Mutex<Box<dyn Store>>>;

fn lock(s: &SharedStore) -> MutexGuard<'_, Box<dyn Store>> {
    // A store handle holds a socket or an Arc: nothing a panicking holder leaves half-done.
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bootstrap through rank 0's TCP store.
pub struct TcpBootstrap {
    rank: usize,
    world_size: usize,
    round: u64,
    store: SharedStore,
    /// Present on rank 0 only.
    server: Option<StoreServer>,
    /// Rank 0's key file, when the job key went out through one; removed once every rank
    /// has joined (after the first round), or when the bootstrap is dropped.
    key_file: Option<Published>,
    addr: String,
    timeout: Duration,
}

impl TcpBootstrap {
    /// Rank 0 serves the store on `host:port`; the others connect to it, retrying until
    /// `timeout`, which also bounds every all_gather's wait for the slowest rank.
    pub fn new(
        host: &str,
        port: u16,
        auth: &JobAuth,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<TcpBootstrap> {
        check_rank(rank, world_size)?;
        if rank == 0 {
            let server = StoreServer::bind(
                &format!("{host}:{port}"),
                auth.clone(),
                world_size,
                STORE_HANDSHAKE_TIMEOUT,
                NonLocalBind::Everywhere,
            )?;
            Self::serving(server, world_size, timeout, None)
        } else {
            let c = TcpStoreClient::connect(host, port, auth, rank, timeout)?;
            Self::joined(c, &format!("{host}:{port}"), rank, world_size, timeout)
        }
    }

    /// Rank 0's bootstrap around a server it started; `key_file`, if any, is removed once
    /// every rank has joined.
    pub(crate) fn serving(
        server: StoreServer,
        world_size: usize,
        timeout: Duration,
        key_file: Option<Published>,
    ) -> Result<TcpBootstrap> {
        let addr = server.local_addr().to_string();
        tracing::info!("rank 0/{world_size}: bootstrap through the store at {addr}");
        Ok(TcpBootstrap {
            rank: 0,
            world_size,
            round: 0,
            store: Arc::new(Mutex::new(Box::new(server.local_client()))),
            server: Some(server),
            key_file,
            addr,
            timeout,
        })
    }

    /// Another rank's bootstrap around its connection to the store at `addr`.
    pub(crate) fn joined(
        client: TcpStoreClient,
        addr: &str,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<TcpBootstrap> {
        check_rank(rank, world_size)?;
        tracing::info!("rank {rank}/{world_size}: bootstrap through the store at {addr}");
        Ok(TcpBootstrap {
            rank,
            world_size,
            round: 0,
            store: Arc::new(Mutex::new(Box::new(client))),
            server: None,
            key_file: None,
            addr: addr.to_string(),
            timeout,
        })
    }

    /// The store's address as `host:port`.
    pub fn store_addr(&self) -> &str {
        &self.addr
    }

    /// Rank 0's server (for its port and counters); `None` on other ranks.
    pub fn server(&self) -> Option<&StoreServer> {
        self.server.as_ref()
    }

    /// The error for a round that cannot complete because ranks are gone.
    fn gone_error(&self, r: u64, states: &[RankState]) -> Error {
        Error::Bootstrap(format!(
            "rank {}: all_gather #{r} cannot complete: {} (store at {})",
            self.rank,
            describe_gone(states).unwrap_or_else(|| "a rank is gone".into()),
            self.addr
        ))
    }

    /// The error for a round that timed out: which ranks never connected (they may start
    /// late) and which are connected but did not come.
    fn timeout_error(&self, r: u64, missing: &[usize]) -> Error {
        let states = lock(&self.store).ranks().unwrap_or_default();
        let (absent, stuck): (Vec<usize>, Vec<usize>) = missing
            .iter()
            .partition(|&&k| matches!(states.get(k), Some(RankState::Absent) | None));
        let mut parts = Vec::new();
        if !absent.is_empty() {
            parts.push(format!(
                "rank(s) {absent:?} never connected to the store (raise HETCCL_CONNECT_TIMEOUT \
                 if they start late)"
            ));
        }
        if !stuck.is_empty() {
            parts.push(format!(
                "rank(s) {stuck:?} are connected but did not reach this round (stuck, or busy \
                 elsewhere)"
            ));
        }
        Error::Bootstrap(format!(
            "rank {}: all_gather #{r} timed out after {} waiting for rank(s) {missing:?}: {} \
             (store at {})",
            self.rank,
            fmt_secs(self.timeout),
            parts.join("; "),
            self.addr
        ))
    }
}

fn check_rank(rank: usize, world_size: usize) -> Result<()> {
    if rank >= world_size {
        return Err(Error::invalid(
            "bootstrap",
            format!("rank {rank} is not below the world size {world_size}"),
        ));
    }
    Ok(())
}

/// [`Liveness`] through the store: asks it which ranks are gone.
struct StoreLiveness {
    store: SharedStore,
}

impl Liveness for StoreLiveness {
    fn gone(&self) -> Option<String> {
        match lock(&self.store).ranks() {
            Ok(states) => describe_gone(&states),
            Err(e) => Some(e.to_string()),
        }
    }
}

impl Bootstrap for TcpBootstrap {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_gather(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let r = self.round;
        let n = self.world_size;
        let mut store = lock(&self.store);
        store.set(&format!("ag/{r}/{}", self.rank), data)?;
        let keys: Vec<String> = (0..n).map(|k| format!("ag/{r}/{k}")).collect();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let got = store.get_many(&key_refs, self.timeout)?;
        drop(store);
        let values = match got {
            GetOutcome::Values(v) if v.len() == n => v,
            GetOutcome::Values(v) => {
                return Err(Error::Bootstrap(format!(
                    "rank {}: all_gather #{r}: the store returned {} values for {n} ranks",
                    self.rank,
                    v.len()
                )))
            }
            GetOutcome::RanksGone(states) => return Err(self.gone_error(r, &states)),
            GetOutcome::Missing(missing) => return Err(self.timeout_error(r, &missing)),
        };
        let mut store = lock(&self.store);
        store.add(&format!("ag/{r}/done"), 1)?;
        if r > 0 {
            store.delete(&format!("ag/{}/{}", r - 1, self.rank))?;
            if self.rank == 0 {
                // Every rank's add to round r-1's counter precedes its set for round r.
                store.delete(&format!("ag/{}/done", r - 1))?;
            }
        }
        drop(store);
        // Every rank has connected and read the key: the file has served its purpose.
        self.key_file = None;
        self.round += 1;
        tracing::debug!(
            "rank {}: all_gather #{r} done, {} bytes in, {} bytes out",
            self.rank,
            data.len(),
            values.iter().map(Vec::len).sum::<usize>()
        );
        Ok(values)
    }

    fn liveness(&self) -> Option<Arc<dyn Liveness>> {
        Some(Arc::new(StoreLiveness {
            store: self.store.clone(),
        }))
    }
}

impl Drop for TcpBootstrap {
    fn drop(&mut self) {
        self.key_file = None;
        let Some(server) = self.server.as_mut() else {
            return;
        };
        if self.round > 0 {
            let key = format!("ag/{}/done", self.round - 1);
            if !server.wait_counter(&key, self.world_size as i64, self.timeout)
                && server.clients() > 0
            {
                tracing::warn!(
                    "rank 0: closing the store at {} while {} rank(s) may still read round {}",
                    self.addr,
                    server.clients(),
                    self.round - 1
                );
            }
        }
        server.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    fn free_port() -> u16 {
        crate::bootstrap::port::free_store_port().unwrap()
    }

    #[test]
    fn all_gather_across_four_threads() {
        let port = free_port();
        let auth = JobAuth::new("tcp-ag", "key");
        let handles: Vec<_> = (0..4)
            .map(|rank| {
                let auth = auth.clone();
                std::thread::spawn(move || {
                    let mut b = TcpBootstrap::new(
                        "127.0.0.1",
                        port,
                        &auth,
                        rank,
                        4,
                        Duration::from_secs(20),
                    )
                    .unwrap();
                    let mut rounds = Vec::new();
                    for round in 0..3u8 {
                        // Rank k sends k+1 bytes of value 10*round + k.
                        rounds.push(
                            b.all_gather(&vec![10 * round + rank as u8; rank + 1])
                                .unwrap(),
                        );
                    }
                    b.barrier().unwrap();
                    rounds
                })
            })
            .collect();
        for h in handles {
            let rounds = h.join().unwrap();
            for (round, got) in rounds.iter().enumerate() {
                let want: Vec<Vec<u8>> = (0..4)
                    .map(|k| vec![10 * round as u8 + k as u8; k + 1])
                    .collect();
                assert_eq!(got, &want);
            }
        }
    }

    #[test]
    fn strangers_and_wrong_keys_are_refused_and_the_job_goes_on() {
        let port = free_port();
        let auth = JobAuth::new("tcp-guard", "right");
        let t = Duration::from_secs(2);
        let mut r0 = TcpBootstrap::new("127.0.0.1", port, &auth, 0, 2, t).unwrap();

        // Garbage on the store port.
        let mut g = TcpStream::connect(("127.0.0.1", port)).unwrap();
        g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n0123456789012345678901234567890123456789")
            .unwrap();
        // A silent stranger: connects, says nothing, holds the connection.
        let silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
        // Same job, wrong key: the client sees rank 0 cannot prove the key it holds.
        let e =
            TcpStoreClient::connect("127.0.0.1", port, &JobAuth::new("tcp-guard", "wrong"), 1, t)
                .err()
                .unwrap()
                .to_string();
        assert!(
            e.contains("refused this rank") && e.contains("proved it holds a different job key"),
            "{e}"
        );
        // Another job on the port.
        let e =
            TcpStoreClient::connect("127.0.0.1", port, &JobAuth::new("other-job", "right"), 1, t)
                .err()
                .unwrap()
                .to_string();
        assert!(e.ends_with("it serves another job: HETCCL_JOB_ID differs between the ranks, or another job serves port {port}".replace("{port}", &port.to_string()).as_str()), "{e}");

        let a = auth.clone();
        let r1 = std::thread::spawn(move || {
            let mut b = TcpBootstrap::new("127.0.0.1", port, &a, 1, 2, t).unwrap();
            b.all_gather(b"one").unwrap()
        });
        let got = r0.all_gather(b"zero").unwrap();
        assert_eq!(got, vec![b"zero".to_vec(), b"one".to_vec()]);
        assert_eq!(r1.join().unwrap(), got);

        // Garbage, wrong key, other job, and the silent one after its handshake timeout.
        let srv = r0.server().unwrap();
        for _ in 0..200 {
            if srv.refused() >= 4 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(srv.refused(), 4);
        drop(silent);
    }

    #[test]
    fn unreachable_rank0_names_the_address() {
        let port = free_port();
        let auth = JobAuth::new("tcp-none", "k");
        let e = TcpBootstrap::new("127.0.0.1", port, &auth, 1, 2, Duration::from_secs(1))
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            e,
            format!("bootstrap: rank 1: cannot reach rank 0's store at 127.0.0.1:{port} after 1s: connection refused")
        );
    }

    #[test]
    fn a_missing_rank_is_named_in_the_timeout() {
        let port = free_port();
        let auth = JobAuth::new("tcp-missing", "k");
        let t = Duration::from_millis(300);
        let a = auth.clone();
        let mut r0 = TcpBootstrap::new("127.0.0.1", port, &auth, 0, 3, t).unwrap();
        let r1 = std::thread::spawn(move || {
            let mut b = TcpBootstrap::new("127.0.0.1", port, &a, 1, 3, t).unwrap();
            b.all_gather(b"x").err().unwrap().to_string()
        });
        let e0 = r0.all_gather(b"x").err().unwrap().to_string();
        let tail = format!(
            "all_gather #0 timed out after 0.3s waiting for rank(s) [2]: rank(s) [2] never \
             connected to the store (raise HETCCL_CONNECT_TIMEOUT if they start late) (store at \
             127.0.0.1:{port})"
        );
        assert_eq!(e0, format!("bootstrap: rank 0: {tail}"));
        let e1 = r1.join().unwrap();
        assert_eq!(e1, format!("bootstrap: rank 1: {tail}"));
    }

    #[test]
    fn a_taken_port_is_named() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let auth = JobAuth::new("tcp-taken", "k");
        let e = TcpBootstrap::new("127.0.0.1", port, &auth, 0, 2, Duration::from_secs(1))
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            e,
            format!(
                "bootstrap: rank 0 cannot serve the store on 127.0.0.1:{port}: address in use \
                 (another job on this port? pick another MASTER_PORT)"
            )
        );
    }

    #[test]
    fn rank0_keeps_serving_until_every_rank_has_read_the_last_round() {
        let port = free_port();
        let auth = JobAuth::new("tcp-linger", "k");
        let t = Duration::from_secs(20);
        let mut r0 = TcpBootstrap::new("127.0.0.1", port, &auth, 0, 2, t).unwrap();
        // Rank 1 speaks the all_gather protocol by hand, so it can stop between its set
        // and its get while rank 0 finishes and drops its bootstrap.
        let mut r1 = TcpStoreClient::connect("127.0.0.1", port, &auth, 1, t).unwrap();
        r1.set("ag/0/1", b"one").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let rank0 = std::thread::spawn(move || {
            let got = r0.all_gather(b"zero").unwrap();
            tx.send(()).unwrap();
            drop(r0); // returns once rank 1 has counted itself done
            got
        });
        rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            r1.get_many(&["ag/0/0", "ag/0/1"], t).unwrap(),
            GetOutcome::Values(vec![b"zero".to_vec(), b"one".to_vec()])
        );
        assert_eq!(r1.add("ag/0/done", 1).unwrap(), 2);
        assert_eq!(
            rank0.join().unwrap(),
            vec![b"zero".to_vec(), b"one".to_vec()]
        );
    }

    #[test]
    fn a_rank_that_dies_between_rounds_fails_the_others_at_once() {
        let port = free_port();
        let auth = JobAuth::new("tcp-dead", "k");
        // The default connect timeout: the failure must not wait for it.
        let t = Duration::from_secs(60);
        let mut r0 = TcpBootstrap::new("127.0.0.1", port, &auth, 0, 3, t).unwrap();
        let a = auth.clone();
        let r1 = std::thread::spawn(move || {
            let mut b = TcpBootstrap::new("127.0.0.1", port, &a, 1, 3, t).unwrap();
            b.all_gather(b"one").unwrap();
            let start = std::time::Instant::now();
            (
                b.all_gather(b"again").err().unwrap().to_string(),
                start.elapsed(),
            )
        });
        // Rank 2 takes part in round 0 by hand, then dies without a goodbye.
        let mut r2 = TcpStoreClient::connect("127.0.0.1", port, &auth, 2, t).unwrap();
        r2.set("ag/0/2", b"two").unwrap();
        let got = r0.all_gather(b"zero").unwrap();
        assert_eq!(got[2], b"two");
        r2.abandon();
        let start = std::time::Instant::now();
        let e0 = r0.all_gather(b"again").err().unwrap().to_string();
        let took0 = start.elapsed();
        let (e1, took1) = r1.join().unwrap();
        let why = "rank 2 died (its connection to the store closed without a goodbye: killed, \
                   crashed, or exited without closing its communicator)";
        // (Rank 1 may have left by the time rank 0 looks: it would be named after.)
        assert!(
            e0.starts_with(&format!(
                "bootstrap: rank 0: all_gather #1 cannot complete: {why}"
            )) && e0.ends_with(&format!("(store at 127.0.0.1:{port})")),
            "{e0}"
        );
        assert_eq!(
            e1,
            format!("bootstrap: rank 1: all_gather #1 cannot complete: {why} (store at 127.0.0.1:{port})")
        );
        assert!(!e0.contains("HETCCL_CONNECT_TIMEOUT"));
        for took in [took0, took1] {
            assert!(took < Duration::from_secs(5), "took {took:?}");
        }
        // Link setup, which waits outside the store, hears it too (and that rank 1 has
        // left since, with a goodbye).
        let gone = r0.liveness().unwrap().gone().unwrap();
        assert!(gone.starts_with(why), "{gone}");
    }
}
