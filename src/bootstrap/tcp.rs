//! `env://` bootstrap: rank 0 serves a [`store`](super::store) on `MASTER_ADDR:MASTER_PORT`,
//! every other rank connects to it.
//!
//! all_gather round `r` (a counter per bootstrap, so every rank names rounds alike):
//!
//! ```text
//! set  ag/<r>/<rank> = data
//! get  ag/<r>/0 .. ag/<r>/<n-1>       one blocking request, until all are present
//! add  ag/<r>/done += 1               tells rank 0 this rank has what it needs
//! del  ag/<r-1>/<rank>                safe: every rank has set round r, so all finished r-1
//! ```
//!
//! Rank 0, when dropped, keeps serving until every rank has counted itself into the last
//! round's `done` (or has disconnected, or `connect_timeout` passes), so the ranks still
//! reading the last round's values do not lose the store under their feet.

use std::time::Duration;

use super::store::{GetOutcome, Store, StoreServer, TcpStoreClient};
use super::{fmt_secs, Bootstrap};
use crate::bootstrap::auth::JobAuth;
use crate::error::{Error, Result};

/// Bootstrap through rank 0's TCP store.
pub struct TcpBootstrap {
    rank: usize,
    world_size: usize,
    round: u64,
    store: Box<dyn Store>,
    /// Present on rank 0 only.
    server: Option<StoreServer>,
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
        if rank >= world_size {
            return Err(Error::invalid(
                "bootstrap",
                format!("rank {rank} is not below the world size {world_size}"),
            ));
        }
        let addr = format!("{host}:{port}");
        let handshake_timeout = timeout.min(Duration::from_secs(10));
        let (store, server): (Box<dyn Store>, _) = if rank == 0 {
            let server = StoreServer::bind(&addr, auth.clone(), world_size, handshake_timeout)?;
            (Box::new(server.local_client()), Some(server))
        } else {
            let c = TcpStoreClient::connect(host, port, auth, rank, timeout)?;
            (Box::new(c), None)
        };
        tracing::info!("rank {rank}/{world_size}: bootstrap through the store at {addr}");
        Ok(TcpBootstrap {
            rank,
            world_size,
            round: 0,
            store,
            server,
            addr,
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
        self.store.set(&format!("ag/{r}/{}", self.rank), data)?;
        let keys: Vec<String> = (0..n).map(|k| format!("ag/{r}/{k}")).collect();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let values = match self.store.get_many(&key_refs, self.timeout)? {
            GetOutcome::Values(v) if v.len() == n => v,
            GetOutcome::Values(v) => {
                return Err(Error::Bootstrap(format!(
                    "rank {}: all_gather #{r}: the store returned {} values for {n} ranks",
                    self.rank,
                    v.len()
                )))
            }
            GetOutcome::Missing(missing) => {
                return Err(Error::Bootstrap(format!(
                    "rank {}: all_gather #{r} timed out after {} waiting for rank(s) {missing:?} \
                     (store at {}; raise HETCCL_CONNECT_TIMEOUT if they start late)",
                    self.rank,
                    fmt_secs(self.timeout),
                    self.addr
                )))
            }
        };
        self.store.add(&format!("ag/{r}/done"), 1)?;
        if r > 0 {
            self.store.delete(&format!("ag/{}/{}", r - 1, self.rank))?;
            if self.rank == 0 {
                // Every rank's add to round r-1's counter precedes its set for round r.
                self.store.delete(&format!("ag/{}/done", r - 1))?;
            }
        }
        self.round += 1;
        tracing::debug!(
            "rank {}: all_gather #{r} done, {} bytes in, {} bytes out",
            self.rank,
            data.len(),
            values.iter().map(Vec::len).sum::<usize>()
        );
        Ok(values)
    }
}

impl Drop for TcpBootstrap {
    fn drop(&mut self) {
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
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn all_gather_across_four_threads() {
        let port = free_port();
        let auth = JobAuth::new("tcp-ag", Some("key"));
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
        let auth = JobAuth::new("tcp-guard", Some("right"));
        let t = Duration::from_secs(2);
        let mut r0 = TcpBootstrap::new("127.0.0.1", port, &auth, 0, 2, t).unwrap();

        // Garbage on the store port.
        let mut g = TcpStream::connect(("127.0.0.1", port)).unwrap();
        g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n0123456789012345678901234567890123456789")
            .unwrap();
        // A silent stranger: connects, says nothing, holds the connection.
        let silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
        // Same job, wrong key: the client sees rank 0 cannot prove the key it holds.
        let e = TcpStoreClient::connect(
            "127.0.0.1",
            port,
            &JobAuth::new("tcp-guard", Some("wrong")),
            1,
            t,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("refused this rank") && e.contains("does not hold this job's key"),
            "{e}"
        );
        // Another job on the port.
        let e = TcpStoreClient::connect(
            "127.0.0.1",
            port,
            &JobAuth::new("other-job", Some("right")),
            1,
            t,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("refused this rank"), "{e}");

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
        let auth = JobAuth::new("tcp-none", None);
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
        let auth = JobAuth::new("tcp-missing", None);
        let t = Duration::from_millis(300);
        let a = auth.clone();
        let mut r0 = TcpBootstrap::new("127.0.0.1", port, &auth, 0, 3, t).unwrap();
        let r1 = std::thread::spawn(move || {
            let mut b = TcpBootstrap::new("127.0.0.1", port, &a, 1, 3, t).unwrap();
            b.all_gather(b"x").err().unwrap().to_string()
        });
        let e0 = r0.all_gather(b"x").err().unwrap().to_string();
        assert!(
            e0.starts_with(
                "bootstrap: rank 0: all_gather #0 timed out after 0.3s waiting for rank(s) [2]"
            ),
            "{e0}"
        );
        let e1 = r1.join().unwrap();
        assert!(
            e1.starts_with(
                "bootstrap: rank 1: all_gather #0 timed out after 0.3s waiting for rank(s) [2]"
            ),
            "{e1}"
        );
    }

    #[test]
    fn a_taken_port_is_named() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let auth = JobAuth::new("tcp-taken", None);
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
        let auth = JobAuth::new("tcp-linger", None);
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
}
