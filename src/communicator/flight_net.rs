//! The hang report across hosts. The flight recorder's dumps go to a directory of each
//! host (`crate::flight`), which the ranks of other hosts cannot read; so a job whose
//! ranks span hosts also shares its ranks' states over the network. Each process of such
//! a job listens on one more TCP port (one per process, made by its first communicator,
//! on the address its links would use) and a thread answers on it; the addresses travel
//! through the bootstrap at init, and [`flight::set_remote`] gives the flight recorder a
//! way to reach the ranks of other hosts.
//!
//! ```text
//! asker                                  answering thread of rank k's process
//!   connect, the job's handshake  ---->  accept; the handshake (job and key)
//!   b'S'                          ---->  state = flight::answer()
//!                                 <----  u32le length, the state as JSON
//!   b'F', u32le length, text      ---->  flight::told(text): the report was printed
//!                                        elsewhere, this is the job's first failure
//!   b'P', u32le length, state     ---->  flight::shared(state): the asker failed, and
//!                                        this is its state (sent to the lowest
//!                                        SHARE_WITH ranks of other hosts below it,
//!                                        which may print the report after it exits)
//! ```
//!
//! A process that is stopped (SIGSTOP, a debugger) still has its connections accepted by
//! the kernel but never answers: after [`flight::ASK_WITHIN`] the asker calls it silent.
//! One that is gone has its port closed, and its host refuses the connection. A
//! stranger, or a rank of another job, fails the handshake, is logged (rate-limited) and
//! dropped. Each connection is answered on a thread of its own (at most [`ANSWERING`] at
//! once) and has [`HANDSHAKE`] to finish, so a stranger that connects and sends nothing
//! delays no rank's answer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::bootstrap::auth::RefusalLog;
use crate::bootstrap::{Bootstrap, JobAuth};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::flight::{self, Answer};
use crate::topology::Topology;

/// The handshake's channel field on these connections ("FLIT"): not a link's socket.
const FLIGHT_CHANNEL: u32 = 0x464c_4954;

/// How long an accepted connection has to complete the handshake and its request.
const HANDSHAKE: Duration = Duration::from_millis(500);

/// How many ranks of other hosts below a failing rank get its state: the report is
/// printed by the lowest rank that failed, almost always among the lowest few.
const SHARE_WITH: usize = 8;

/// The most a state or a finding may take on the wire.
const MAX_MESSAGE: u32 = 16 << 20;

/// This process's listener: its address, made once.
static LISTENER: OnceLock<std::result::Result<SocketAddr, String>> = OnceLock::new();

/// The job whose handshake the answering thread expects: the first communicator's.
static SERVING: Mutex<Option<JobAuth>> = Mutex::new(None);

/// Shares this process's answering address with every rank when the ranks span more
/// than one host, and hands the flight recorder the others'. Collective (a bootstrap
/// all-gather) on such jobs; nothing on jobs of one host, where the dump directory is
/// shared. Every rank decides alike, from the topology they all hold.
pub(crate) fn start(
    cfg: &Config,
    auth: &JobAuth,
    boot: &mut dyn Bootstrap,
    topo: &Topology,
    rank: usize,
) -> Result<()> {
    let host = &topo.ranks[rank].hostname;
    if topo.ranks.iter().all(|r| &r.hostname == host) {
        return Ok(());
    }
    let addr = LISTENER.get_or_init(|| listen(cfg).map_err(|e| e.to_string()));
    let mine = match addr {
        Ok(a) => a.to_string(),
        Err(e) => {
            tracing::warn!(
                rank,
                "flight recorder: no listener for the ranks of other hosts ({e}); a hang \
                 report printed there will not have this rank's state"
            );
            String::new()
        }
    };
    let all = boot.all_gather(mine.as_bytes())?;
    let peers: Vec<Option<SocketAddr>> = all
        .iter()
        .map(|b| std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()))
        .collect();
    let remote: Vec<bool> = topo.ranks.iter().map(|r| &r.hostname != host).collect();
    {
        let mut serving = SERVING.lock().unwrap_or_else(|p| p.into_inner());
        if serving.is_none() {
            *serving = Some(auth.clone());
        }
    }
    flight::set_remote(Arc::new(Peers {
        rank,
        auth: auth.clone(),
        peers,
        remote,
    }));
    Ok(())
}

fn listen(cfg: &Config) -> Result<SocketAddr> {
    let ip = crate::transport::tcp::listen_ip(cfg, true)?;
    let l = TcpListener::bind((ip, 0))
        .map_err(|e| Error::io(format!("binding the flight listener on {ip}"), e))?;
    let addr = l
        .local_addr()
        .map_err(|e| Error::io("address of the flight listener", e))?;
    std::thread::Builder::new()
        .name("hetccl-flight-net".into())
        .spawn(move || serve(l, addr))
        .map_err(|e| Error::io("starting the flight listener's thread", e))?;
    Ok(addr)
}

/// Connections answered at once, each on a thread of its own for at most [`HANDSHAKE`]:
/// a stranger that connects and says nothing holds one of them, not the others' answers.
/// Beyond this, new connections are closed at once.
const ANSWERING: usize = 16;

/// Answers the ranks of other hosts for the process's life.
fn serve(l: TcpListener, addr: SocketAddr) {
    let refusals = Arc::new(RefusalLog::new(format!("flight listener on {addr}")));
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        let Some(auth) = SERVING.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            continue;
        };
        if busy.fetch_add(1, std::sync::atomic::Ordering::AcqRel) >= ANSWERING {
            busy.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            refusals.refused(&format_args!(
                "{ANSWERING} connections are being answered already; closed a new one"
            ));
            continue;
        }
        let (refusals, busy2) = (refusals.clone(), busy.clone());
        let spawned = std::thread::Builder::new()
            .name("hetccl-flight-answer".into())
            .spawn(move || {
                if let Err(e) = answer_one(&mut s, &auth) {
                    refusals.refused(&e);
                }
                busy2.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            });
        if spawned.is_err() {
            busy.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

fn answer_one(s: &mut TcpStream, auth: &JobAuth) -> Result<()> {
    let deadline = Instant::now() + HANDSHAKE;
    let peer = auth.accept_handshake(s, HANDSHAKE)?;
    let from = format!("rank {}", peer.rank);
    if peer.channel != FLIGHT_CHANNEL {
        return Err(Error::invalid(
            "flight listener",
            format!(
                "{from} connected for channel {}, not the flight's",
                peer.channel
            ),
        ));
    }
    let io = |e: std::io::Error| Error::io(format!("flight request of {from}"), e);
    set_deadline(s, deadline).map_err(io)?;
    let mut what = [0u8; 1];
    s.read_exact(&mut what).map_err(io)?;
    match what[0] {
        b'S' => {
            let text = serde_json::to_vec(&flight::answer()).map_err(|e| {
                Error::invalid("flight recorder", format!("cannot encode the state: {e}"))
            })?;
            s.write_all(&framed(None, &text)).map_err(io)
        }
        b'F' => {
            let text = read_message(s).map_err(io)?;
            flight::told(&String::from_utf8_lossy(&text));
            Ok(())
        }
        b'P' => {
            let text = read_message(s).map_err(io)?;
            let state: flight::report::RankState = serde_json::from_slice(&text).map_err(|e| {
                Error::invalid(
                    "flight listener",
                    format!("{from} sent an unreadable state: {e}"),
                )
            })?;
            if state.rank != peer.rank as usize {
                return Err(Error::invalid(
                    "flight listener",
                    format!("{from} sent the state of rank {}", state.rank),
                ));
            }
            flight::shared(state);
            Ok(())
        }
        b => Err(Error::invalid(
            "flight listener",
            format!("{from} sent request {b:#04x}, not 'S', 'F' or 'P'"),
        )),
    }
}

fn set_deadline(s: &TcpStream, deadline: Instant) -> std::io::Result<()> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left))?;
    s.set_write_timeout(Some(left))
}

/// `body` as it travels: the request byte `what` (none in an answer), its length as a
/// u32le, the body. [`read_message`] reads what follows the request byte.
fn framed(what: Option<u8>, body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(5 + body.len());
    msg.extend(what);
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    msg
}

fn read_message(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a message of {len} bytes, more than the {MAX_MESSAGE} allowed"),
        ));
    }
    let mut text = vec![0u8; len as usize];
    s.read_exact(&mut text)?;
    Ok(text)
}

/// The ranks of a job on other hosts, as the flight recorder asks them.
#[derive(Clone)]
struct Peers {
    rank: usize,
    auth: JobAuth,
    /// Each rank's answering address (`None`: it has none).
    peers: Vec<Option<SocketAddr>>,
    /// Whether each rank runs on another host than this process.
    remote: Vec<bool>,
}

impl Peers {
    /// Connects to rank `k` and passes the handshake by `deadline`.
    fn connect(&self, k: usize, deadline: Instant) -> std::result::Result<TcpStream, Answer> {
        let addr = self
            .peers
            .get(k)
            .copied()
            .flatten()
            .ok_or(Answer::Unreachable)?;
        let left = deadline.saturating_duration_since(Instant::now());
        let mut s =
            TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(1))).map_err(|e| {
                match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => Answer::Gone,
                    _ => Answer::Unreachable,
                }
            })?;
        let _ = s.set_nodelay(true);
        let left = deadline.saturating_duration_since(Instant::now());
        match self.auth.connect_handshake_detailed(
            &mut s,
            self.rank as u32,
            FLIGHT_CHANNEL,
            left.max(Duration::from_millis(1)),
        ) {
            Ok(()) => Ok(s),
            // The kernel took the connection; the process said nothing in time.
            Err(_) if Instant::now() >= deadline => Err(Answer::Silent),
            Err(_) => Err(Answer::Unreachable),
        }
    }

    fn ask_one(&self, k: usize, deadline: Instant) -> Answer {
        let mut s = match self.connect(k, deadline) {
            Ok(s) => s,
            Err(a) => return a,
        };
        let got = set_deadline(&s, deadline)
            .and_then(|()| s.write_all(b"S"))
            .and_then(|()| read_message(&mut s));
        match got {
            Ok(text) => match serde_json::from_slice(&text) {
                Ok(state) => Answer::State(Box::new(state)),
                Err(e) => {
                    tracing::debug!("flight recorder: rank {k}'s state is unreadable: {e}");
                    Answer::Unreachable
                }
            },
            Err(_) if Instant::now() >= deadline => Answer::Silent,
            Err(_) => Answer::Unreachable,
        }
    }
}

impl flight::Remote for Peers {
    fn is_remote(&self, k: usize) -> bool {
        self.remote.get(k).copied().unwrap_or(false)
    }

    fn ask(&self, ranks: &[usize], within: Duration) -> Vec<Answer> {
        let deadline = Instant::now() + within;
        std::thread::scope(|sc| {
            let asks: Vec<_> = ranks
                .iter()
                .map(|&k| sc.spawn(move || self.ask_one(k, deadline)))
                .collect();
            asks.into_iter()
                .map(|h| h.join().unwrap_or(Answer::Unreachable))
                .collect()
        })
    }

    fn tell(&self, finding: &str) {
        let far: Vec<usize> = (0..self.remote.len()).filter(|&k| self.remote[k]).collect();
        self.send(&far, b'F', finding.as_bytes());
    }

    fn share(&self, state: flight::report::RankState) {
        let Ok(text) = serde_json::to_vec(&state) else {
            return;
        };
        let below: Vec<usize> = (0..self.rank.min(self.remote.len()))
            .filter(|&k| self.remote[k])
            .take(SHARE_WITH)
            .collect();
        if below.is_empty() {
            return;
        }
        let me = self.clone();
        let sent = std::thread::Builder::new()
            .name("hetccl-flight-share".into())
            .spawn(move || me.send(&below, b'P', &text));
        if let Err(e) = sent {
            tracing::debug!("flight recorder: cannot start sharing this rank's state: {e}");
        }
    }
}

impl Peers {
    /// Sends request `what` with `body` to each of `ranks`, all at once, for at most
    /// [`flight::ASK_WITHIN`]; best effort.
    fn send(&self, ranks: &[usize], what: u8, body: &[u8]) {
        let deadline = Instant::now() + flight::ASK_WITHIN;
        let msg = framed(Some(what), body);
        std::thread::scope(|sc| {
            for &k in ranks {
                let msg = &msg;
                sc.spawn(move || {
                    if let Ok(mut s) = self.connect(k, deadline) {
                        let sent = set_deadline(&s, deadline).and_then(|()| s.write_all(msg));
                        if let Err(e) = sent {
                            tracing::debug!("flight recorder: request to rank {k}: {e}");
                        }
                    }
                });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flight::Remote as _;

    fn peers(addrs: Vec<Option<SocketAddr>>, auth: &JobAuth) -> Peers {
        Peers {
            rank: 0,
            auth: auth.clone(),
            remote: vec![true; addrs.len()],
            peers: addrs,
        }
    }

    #[test]
    fn a_rank_of_the_job_gets_the_state_and_a_stranger_an_error() {
        let auth = JobAuth::new("flight-test", "k1");
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = {
            let auth = auth.clone();
            std::thread::spawn(move || {
                (0..3)
                    .map(|_| {
                        let (mut s, _) = l.accept().unwrap();
                        answer_one(&mut s, &auth).map_err(|e| e.to_string())
                    })
                    .collect::<Vec<_>>()
            })
        };
        // A rank of the job.
        let got = peers(vec![Some(addr)], &auth).ask(&[0], Duration::from_secs(5));
        assert!(
            matches!(&got[0], Answer::State(s) if s.why == "asked" || s.why == "error"),
            "{got:?}"
        );
        // A stranger speaking another protocol.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        // A rank of another job (another key).
        let other = JobAuth::new("flight-test", "k2");
        let got = peers(vec![Some(addr)], &other).ask(&[0], Duration::from_secs(5));
        assert!(matches!(got[0], Answer::Unreachable), "{got:?}");
        let results = server.join().unwrap();
        assert!(results[0].is_ok(), "{results:?}");
        assert!(
            results[1]
                .as_ref()
                .unwrap_err()
                .ends_with("not a hetccl handshake (bad magic)"),
            "{results:?}"
        );
        // The other job's rank finds the key differs and hangs up.
        assert!(
            results[2]
                .as_ref()
                .unwrap_err()
                .ends_with("closed during the handshake"),
            "{results:?}"
        );
    }

    #[test]
    fn a_closed_port_is_gone_and_a_process_that_never_answers_is_silent() {
        let auth = JobAuth::new("flight-test", "k1");
        // A port nobody listens on any more.
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        // A listener whose process takes connections (the kernel does) and never answers.
        let mute = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = peers(
            vec![Some(closed), Some(mute.local_addr().unwrap()), None],
            &auth,
        );
        let t = Instant::now();
        let got = p.ask(&[0, 1, 2], Duration::from_millis(300));
        let took = t.elapsed();
        assert!(matches!(got[0], Answer::Gone), "{got:?}");
        assert!(matches!(got[1], Answer::Silent), "{got:?}");
        assert!(matches!(got[2], Answer::Unreachable), "{got:?}");
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[test]
    fn strangers_that_say_nothing_do_not_delay_the_answers() {
        let auth = JobAuth::new("flight-serve-test", "k");
        *SERVING.lock().unwrap() = Some(auth.clone());
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || serve(l, addr));
        // Three connections that never send a hello: answered one after the other, they
        // would hold the rank's question for 3 x HANDSHAKE = 1.5 s.
        let _mute: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        let got = peers(vec![Some(addr)], &auth).ask(&[0], Duration::from_secs(5));
        let took = t.elapsed();
        assert!(matches!(got[0], Answer::State(_)), "{got:?}");
        assert!(
            took < 3 * HANDSHAKE - Duration::from_millis(100),
            "{took:?}"
        );
    }
}
