//! Failure paths: every one must end in a specific error on every rank, never a hang
//! or wrong data.
//!
//! The fault matrix runs `hetccl-check --fault kill|stop` (one rank kills itself with
//! `SIGKILL` or stops itself with `SIGSTOP` after one good all-reduce) under every
//! algorithm (`HETCCL_ALGO` = ring, tree, hier, doubling, halving, auto) over shared
//! memory and over TCP (`HETCCL_SHM_DISABLE=1`), with 2 and 4 ranks, and asserts each
//! rank's exit status, its time to failure (as the rank measured it from the start of
//! the faulty all-reduce) and the rank its error names:
//!
//! - kill -9, reaped at once by the test: every survivor fails within 5 s although
//!   `HETCCL_TIMEOUT` is 300 s, naming the dead rank (as the peer it lost, or as the
//!   rank a peer that gave up had lost);
//! - the same, but the dead rank stays a zombie (the test does not reap it until the
//!   survivors are done): `kill(pid, 0)` still finds it, so only a liveness check that
//!   zombies do not fool ends the survivors in time;
//! - SIGSTOP with `HETCCL_TIMEOUT=2`: every survivor fails within the timeout and a
//!   margin, names the peer it waited on, and, when that peer is not the stopped rank,
//!   says the stall may be further along.
//!
//! Cases of one kind run six at a time (their ranks mostly wait), and a stopped rank is
//! killed as soon as the survivors are done, so the whole file takes seconds, not
//! minutes, on two cores. The soak (random collectives, memory and descriptors flat) is
//! in `tests/collectives.rs`.

mod common;

use common::*;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

fn no_rank_hung(outs: &[Outcome], except: Option<usize>) {
    for (r, o) in outs.iter().enumerate() {
        if Some(r) != except {
            assert!(!o.hung, "rank {r} hung:\n{}", o.output);
        }
    }
}

fn killed_rank(shm_disable: &str) {
    let children = spawn_ranks(
        3,
        check_bin(),
        &["--fault", "exit", "--fault-rank", "1"],
        &[
            ("HETCCL_TIMEOUT", "30"),
            ("HETCCL_SHM_DISABLE", shm_disable),
        ],
        |_| vec![],
    );
    let outs = collect(children, Duration::from_secs(25));
    no_rank_hung(&outs, None);
    assert_eq!(outs[1].code, Some(17));
    for r in [0, 2] {
        let o = &outs[r];
        assert_eq!(o.code, Some(1), "rank {r}:\n{}", o.output);
        assert!(
            o.output.contains("all_reduce #1"),
            "rank {r}:\n{}",
            o.output
        );
        // Either it saw the dead peer itself, or the neighbour that gave up on it.
        assert!(o.output.contains("is gone"), "rank {r}:\n{}", o.output);
        assert!(
            o.elapsed < Duration::from_secs(20),
            "rank {r} took {:?}",
            o.elapsed
        );
    }
}

#[test]
fn a_killed_rank_is_an_error_everywhere_shm() {
    killed_rank("0");
}

#[test]
fn a_killed_rank_is_an_error_everywhere_tcp() {
    killed_rank("1");
}

fn mismatch(fault: &str, expect: &str) {
    let children = spawn_ranks(
        2,
        check_bin(),
        &["--fault", fault, "--fault-rank", "1", "--counts", "1000"],
        &[("HETCCL_TIMEOUT", "10")],
        |_| vec![],
    );
    let outs = collect(children, Duration::from_secs(30));
    no_rank_hung(&outs, None);
    for (r, o) in outs.iter().enumerate() {
        assert_eq!(o.code, Some(1), "rank {r}:\n{}", o.output);
    }
    let all: String = outs.iter().map(|o| o.output.clone()).collect();
    assert!(all.contains("does not match what peer"), "{all}");
    assert!(all.contains(expect), "expected {expect:?} in:\n{all}");
}

#[test]
fn mismatched_counts_are_refused() {
    mismatch("count", "of 999 x f32");
}

#[test]
fn mismatched_dtypes_are_refused() {
    mismatch("dtype", "x f64");
}

#[test]
fn mismatched_collectives_are_refused() {
    mismatch("op", "broadcast #1");
}

#[test]
fn a_stranger_writing_garbage_to_the_store_port_does_not_disturb_the_job() {
    let port = free_port();
    let port_s = port.to_string();
    let mut children = Vec::new();
    for r in 0..2 {
        let mut c = std::process::Command::new(check_bin());
        c.args(["--counts", "7"])
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port_s)
            .env("HETCCL_JOB_ID", "stranger-test")
            .env("HETCCL_CONNECT_TIMEOUT", "20")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        children.push(c.spawn().unwrap());
        if r == 0 {
            // Once rank 0 listens, write garbage at it before rank 1 arrives.
            let t0 = std::time::Instant::now();
            loop {
                if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                    let _ = s.write_all(
                        b"GET / HTTP/1.0\r\n\r\n\x00\x01garbage garbage garbage garbage",
                    );
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "rank 0 never listened"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let outs = collect(children, Duration::from_secs(60));
    assert_all_ok(&outs, "stranger");
}

#[test]
fn a_rank_with_the_wrong_job_key_is_refused() {
    let children = spawn_ranks(
        2,
        check_bin(),
        &["--counts", "7"],
        &[("HETCCL_CONNECT_TIMEOUT", "3")],
        |r| {
            if r == 1 {
                vec![("HETCCL_JOB_KEY".into(), "not-the-key".into())]
            } else {
                vec![]
            }
        },
    );
    let outs = collect(children, Duration::from_secs(30));
    no_rank_hung(&outs, None);
    for (r, o) in outs.iter().enumerate() {
        assert_eq!(o.code, Some(1), "rank {r}:\n{}", o.output);
    }
    assert!(outs[1].output.contains("key"), "{}", outs[1].output);
}

#[test]
fn an_unreachable_master_is_named() {
    let port = free_port();
    let mut c = std::process::Command::new(check_bin());
    c.env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("HETCCL_CONNECT_TIMEOUT", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let outs = collect(vec![c.spawn().unwrap()], Duration::from_secs(20));
    assert_eq!(outs[0].code, Some(1), "{}", outs[0].output);
    assert!(
        outs[0].output.contains(&format!("127.0.0.1:{port}")),
        "{}",
        outs[0].output
    );
    assert!(outs[0].elapsed < Duration::from_secs(10));
}

#[test]
fn bad_environment_values_are_refused_at_init() {
    for (var, val, accepted) in [
        (
            "HETCCL_ALGO",
            "fast",
            "auto, ring, tree, hier, doubling, halving",
        ),
        ("HETCCL_TIMEOUT", "soon", "seconds"),
        ("HETCCL_SHM_DISABLE", "maybe", "0, 1"),
        ("WORLD_SIZE", "two", "integer"),
    ] {
        let mut c = std::process::Command::new(check_bin());
        c.env("RANK", "0")
            .env("WORLD_SIZE", "1")
            .env(var, val)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let outs = collect(vec![c.spawn().unwrap()], Duration::from_secs(20));
        let o = &outs[0];
        assert_eq!(o.code, Some(1), "{var}={val}:\n{}", o.output);
        assert!(
            o.output.contains(var) && o.output.contains(accepted),
            "{var}:\n{}",
            o.output
        );
    }
}

/// What the faulty rank does after the first all-reduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// `SIGKILL`; the test reaps it at once.
    Kill,
    /// `SIGKILL`; the test leaves it unreaped (a zombie) until the survivors are done.
    Zombie,
    /// `SIGSTOP`; the test kills it once the survivors are done.
    Stop,
}

const ALGOS: [&str; 6] = ["ring", "tree", "hier", "doubling", "halving", "auto"];

/// One job of the matrix.
#[derive(Clone, Copy, Debug)]
struct Case {
    fault: Fault,
    algo: &'static str,
    tcp: bool,
    n: usize,
    /// Buffers from `alloc_shared` (the direct shared-buffer algorithms on one host).
    shared: bool,
}

impl Case {
    /// The faulty rank: inside the ring for 4 ranks, so its neighbours are not the only
    /// ranks that wait.
    fn victim(&self) -> usize {
        if self.n == 2 {
            1
        } else {
            2
        }
    }

    fn timeout(&self) -> &'static str {
        match self.fault {
            Fault::Kill | Fault::Zombie => "300",
            Fault::Stop => "2",
        }
    }

    /// Longest a survivor may take from the start of the faulty all-reduce to its error.
    fn bound(&self) -> Duration {
        match self.fault {
            // Death is seen within ~0.1 s; the rest is a margin for a loaded machine.
            Fault::Kill | Fault::Zombie => Duration::from_secs(5),
            // The 2 s timeout, then the notices of those who gave up first.
            Fault::Stop => Duration::from_secs(10),
        }
    }
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} {} {} n={}{}",
            self.fault,
            self.algo,
            if self.tcp { "tcp" } else { "shm" },
            self.n,
            if self.shared { " shared" } else { "" }
        )
    }
}

/// The faulty rank's process: killed and reaped when dropped, so a failed assertion
/// leaves no stopped process behind.
struct Victim {
    child: Option<Child>,
    /// Set by the reaper thread of a `Kill` case.
    reaped: Option<std::thread::JoinHandle<(ExitStatus, String)>>,
}

impl Victim {
    fn new(mut child: Child, fault: Fault) -> Victim {
        if fault != Fault::Kill {
            return Victim {
                child: Some(child),
                reaped: None,
            };
        }
        // Reaped the moment it dies: the survivors must notice a process that is gone.
        let reaper = std::thread::spawn(move || {
            let status = child.wait().expect("wait for the killed rank");
            (status, output_of(&mut child))
        });
        Victim {
            child: None,
            reaped: Some(reaper),
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The state letter in `/proc/<pid>/stat` (`Z` for a zombie, `T` when stopped).
    fn state(&self) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()?)).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .next()?
            .chars()
            .next()
    }

    /// Kills (a no-op on a dead one) and reaps it.
    fn end(mut self) -> (ExitStatus, String) {
        if let Some(r) = self.reaped.take() {
            return r.join().expect("reaper thread");
        }
        let mut c = self.child.take().expect("victim process");
        let _ = c.kill();
        let status = c.wait().expect("wait for the faulty rank");
        (status, output_of(&mut c))
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn output_of(c: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut o) = c.stdout.take() {
        let _ = o.read_to_string(&mut s);
    }
    if let Some(mut e) = c.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// A case whose ranks are running.
struct Started {
    case: Case,
    survivors: Vec<(usize, Child)>,
    victim: Victim,
}

fn start(case: Case) -> Started {
    let fault = if case.fault == Fault::Stop {
        "stop"
    } else {
        "kill"
    };
    let victim = case.victim().to_string();
    let mut args = vec![
        "--fault",
        fault,
        "--fault-rank",
        &victim,
        "--counts",
        "1000",
    ];
    if case.shared {
        args.push("--shared");
    }
    let env = [
        ("HETCCL_TIMEOUT", case.timeout()),
        ("HETCCL_ALGO", case.algo),
        ("HETCCL_SHM_DISABLE", if case.tcp { "1" } else { "0" }),
    ];
    let mut children = spawn_ranks(case.n, check_bin(), &args, &env, |_| vec![]);
    let v = children.remove(case.victim());
    let survivors = (0..case.n)
        .filter(|&r| r != case.victim())
        .zip(children)
        .collect();
    Started {
        case,
        survivors,
        victim: Victim::new(v, case.fault),
    }
}

/// The peer a survivor's error says it waited on or lost, and the error itself (the
/// line `hetccl-check` ends with).
fn error_of(r: usize, output: &str) -> Option<String> {
    let tag = format!("hetccl-check: rank {r}: FAILED: ");
    output
        .lines()
        .find_map(|l| l.strip_prefix(&tag))
        .map(str::to_string)
}

/// The seconds from the start of the faulty all-reduce to its error, as the rank says.
fn time_to_failure(r: usize, output: &str) -> Option<Duration> {
    let tag = format!("rank {r}: faulty collective returned after ");
    let line = output.lines().find_map(|l| l.strip_prefix(&tag))?;
    let secs: f64 = line.split_once('s')?.0.parse().ok()?;
    Some(Duration::from_secs_f64(secs))
}

/// The first number after `prefix` in `s`.
fn number_after(s: &str, prefix: &str) -> Option<usize> {
    let at = s.find(prefix)? + prefix.len();
    let digits: String = s[at..].chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Waits for the survivors, then ends the faulty rank; checks everything the module
/// docs promise. Returns each survivor's error, for tests that look closer.
fn finish(s: Started) -> Vec<(usize, String)> {
    let Started {
        case,
        survivors,
        victim,
    } = s;
    let v = case.victim();
    let (ranks, children): (Vec<usize>, Vec<Child>) = survivors.into_iter().unzip();
    let outs = collect(children, Duration::from_secs(60));
    // Before the faulty rank is reaped or killed: it is still what the case says.
    let state = victim.state();
    let (status, vout) = victim.end();
    let all = || {
        ranks
            .iter()
            .zip(&outs)
            .map(|(r, o)| format!("--- rank {r}\n{}", o.output))
            .collect::<String>()
            + &format!("--- rank {v} (faulty)\n{vout}")
    };
    match case.fault {
        Fault::Kill => assert_eq!(status.signal(), Some(9), "{case}: {status:?}\n{}", all()),
        Fault::Zombie => {
            assert_eq!(state, Some('Z'), "{case}: a zombie all along\n{}", all());
            assert_eq!(status.signal(), Some(9), "{case}: {status:?}\n{}", all());
        }
        Fault::Stop => {
            assert_eq!(state, Some('T'), "{case}: stopped all along\n{}", all());
        }
    }
    let mut errors = Vec::new();
    for (&r, o) in ranks.iter().zip(&outs) {
        assert!(!o.hung, "{case}: rank {r} hung\n{}", all());
        assert_eq!(o.code, Some(1), "{case}: rank {r}\n{}", all());
        let took = time_to_failure(r, &o.output)
            .unwrap_or_else(|| panic!("{case}: rank {r} gave no time\n{}", all()));
        assert!(
            took < case.bound(),
            "{case}: rank {r} took {took:?}\n{}",
            all()
        );
        let e = error_of(r, &o.output)
            .unwrap_or_else(|| panic!("{case}: rank {r} reported no error\n{}", all()));
        match case.fault {
            Fault::Kill | Fault::Zombie => {
                // Lost it itself, or heard it from a peer that did.
                let named = e.contains(&format!("peer {v} is gone"))
                    || e.contains(&format!("after losing rank {v} "))
                    || e.contains(&format!("on news that rank {v} was lost"));
                assert!(
                    named,
                    "{case}: rank {r} does not name rank {v}: {e}\n{}",
                    all()
                );
                assert!(!e.contains("timed out"), "{case}: rank {r}: {e}\n{}", all());
            }
            Fault::Stop => {
                let waited = number_after(&e, "waiting for peer ")
                    .or_else(|| {
                        e.contains(" is gone during ")
                            .then(|| number_after(&e, ": peer "))
                            .flatten()
                    })
                    .unwrap_or_else(|| {
                        panic!(
                            "{case}: rank {r} names no peer it waited on: {e}\n{}",
                            all()
                        )
                    });
                assert_ne!(waited, r, "{case}: {e}");
                if waited != v {
                    assert!(
                        e.contains("further along"),
                        "{case}: rank {r} waited on peer {waited}, not the stopped rank {v}, \
                         and does not say the stall may be further along: {e}\n{}",
                        all()
                    );
                }
            }
        }
        errors.push((r, e));
    }
    errors
}

/// Runs `cases` at once and checks each.
fn run_all(cases: &[Case]) -> Vec<Vec<(usize, String)>> {
    let started: Vec<Started> = cases.iter().map(|&c| start(c)).collect();
    started.into_iter().map(finish).collect()
}

fn matrix(fault: Fault, tcp: bool) -> Vec<Case> {
    [2, 4]
        .into_iter()
        .flat_map(|n| {
            ALGOS.into_iter().map(move |algo| Case {
                fault,
                algo,
                tcp,
                n,
                shared: false,
            })
        })
        .collect()
}

/// Runs the matrix for `fault` in batches of six jobs at once.
fn run_matrix(cases: &[Case]) {
    let t0 = Instant::now();
    for batch in cases.chunks(6) {
        run_all(batch);
    }
    eprintln!(
        "{} cases in {:.1}s",
        cases.len(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn kill9_every_algorithm_over_shm() {
    run_matrix(&matrix(Fault::Kill, false));
}

#[test]
fn kill9_every_algorithm_over_tcp() {
    run_matrix(&matrix(Fault::Kill, true));
}

#[test]
fn zombie_peer_every_algorithm_over_shm_and_shared_buffers() {
    let mut cases = matrix(Fault::Zombie, false);
    // The direct algorithms on buffers from alloc_shared wait on control pages, not
    // links: a zombie must not fool them either.
    for n in [2, 4] {
        cases.push(Case {
            fault: Fault::Zombie,
            algo: "auto",
            tcp: false,
            n,
            shared: true,
        });
    }
    run_matrix(&cases);
}

#[test]
fn zombie_peer_every_algorithm_over_tcp() {
    run_matrix(&matrix(Fault::Zombie, true));
}

#[test]
fn sigstop_every_algorithm_over_shm() {
    run_matrix(&matrix(Fault::Stop, false));
}

#[test]
fn sigstop_every_algorithm_over_tcp() {
    run_matrix(&matrix(Fault::Stop, true));
}

#[test]
fn a_stopped_rank_is_named_by_the_ranks_that_wait_on_it() {
    // Two ranks on one host: the eager slots; the survivor sees the stopped process.
    let errs = run_all(&[Case {
        fault: Fault::Stop,
        algo: "auto",
        tcp: false,
        n: 2,
        shared: false,
    }]);
    let e = &errs[0][0].1;
    assert!(
        e.starts_with("rank 0: all_reduce #1 timed out after"),
        "{e}"
    );
    assert!(
        e.contains("waiting for peer 1 to start the collective; its process (pid ")
            && e.contains(") is stopped (SIGSTOP or job control)"),
        "{e}"
    );
    // The job-wide finding comes last, from the stopped rank's process state.
    assert!(
        e.ends_with(
            "; the job's first failure: rank 1 in all_reduce #1: rank 1 is stopped \
             (SIGSTOP or a debugger) and cannot answer"
        ),
        "{e}"
    );
    // A ring of four over TCP: rank 3 waits on the stopped rank 2; ranks 0 and 1 wait on
    // waiters and say so, or learn from the rank that gave up where the stall is.
    let errs = run_all(&[Case {
        fault: Fault::Stop,
        algo: "ring",
        tcp: true,
        n: 4,
        shared: false,
    }]);
    let e3 = &errs[0].iter().find(|(r, _)| *r == 3).unwrap().1;
    assert!(
        e3.contains("waiting for peer 2 to send data")
            || e3.contains("waiting for peer 2 to accept data"),
        "{e3}"
    );
    for (r, e) in &errs[0] {
        if *r != 3 {
            assert!(
                e.contains("further along") && !e.contains("waiting for peer 2"),
                "rank {r}: {e}"
            );
        }
    }
}
