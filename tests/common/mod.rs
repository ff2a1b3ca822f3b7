//! Helpers for the multi-process tests: start ranks as separate processes with
//! torchrun-style variables (or through the launcher) and collect what they print,
//! killing anything still running at a deadline so no test can hang.
#![allow(dead_code)]

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../../src/test_skip.rs"]
mod test_skip;

/// Records that the calling test cannot run here, and why (see `src/test_skip.rs`).
pub fn skip(reason: &str) {
    test_skip::skip(reason);
}

/// What one process left behind.
#[derive(Debug)]
pub struct Outcome {
    /// Exit code (None: killed by a signal or by the deadline).
    pub code: Option<i32>,
    /// stdout and stderr, concatenated.
    pub output: String,
    /// True when the deadline killed it.
    pub hung: bool,
    /// How long it ran.
    pub elapsed: Duration,
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub fn check_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hetccl-check")
}

pub fn launcher() -> &'static str {
    env!("CARGO_BIN_EXE_hetccl")
}

/// Starts `n` ranks of `program args`, rank r with `env` plus `per_rank(r)`.
pub fn spawn_ranks(
    n: usize,
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
    per_rank: impl Fn(usize) -> Vec<(String, String)>,
) -> Vec<Child> {
    let port = free_port().to_string();
    let job = format!("test-{port}");
    (0..n)
        .map(|r| {
            let mut c = Command::new(program);
            c.args(args)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("HETCCL_JOB_ID", &job)
                .env("HETCCL_JOB_KEY", "test-key")
                .env("HETCCL_CONNECT_TIMEOUT", "20")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            for (k, v) in env {
                c.env(k, v);
            }
            for (k, v) in per_rank(r) {
                c.env(k, v);
            }
            c.spawn().expect("spawn rank")
        })
        .collect()
}

/// Waits for every child until `deadline`, then kills the rest.
pub fn collect(children: Vec<Child>, deadline: Duration) -> Vec<Outcome> {
    let start = Instant::now();
    let mut children: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    let mut out: Vec<Option<Outcome>> = children.iter().map(|_| None).collect();
    // Drain pipes in threads so a chatty child never blocks on a full pipe.
    let readers: Vec<_> = children
        .iter_mut()
        .map(|c| {
            let c = c.as_mut().unwrap();
            let mut so = c.stdout.take().unwrap();
            let mut se = c.stderr.take().unwrap();
            std::thread::spawn(move || {
                let mut a = String::new();
                let mut b = String::new();
                let t = std::thread::spawn(move || {
                    let _ = se.read_to_string(&mut b);
                    b
                });
                let _ = so.read_to_string(&mut a);
                a + &t.join().unwrap_or_default()
            })
        })
        .collect();
    loop {
        let mut running = 0;
        for (i, c) in children.iter_mut().enumerate() {
            if let Some(ch) = c {
                match ch.try_wait().unwrap() {
                    Some(st) => {
                        out[i] = Some(Outcome {
                            code: st.code(),
                            output: String::new(),
                            hung: false,
                            elapsed: start.elapsed(),
                        });
                        *c = None;
                    }
                    None => running += 1,
                }
            }
        }
        if running == 0 {
            break;
        }
        if start.elapsed() > deadline {
            for (i, c) in children.iter_mut().enumerate() {
                if let Some(ch) = c {
                    let _ = ch.kill();
                    let _ = ch.wait();
                    out[i] = Some(Outcome {
                        code: None,
                        output: String::new(),
                        hung: true,
                        elapsed: start.elapsed(),
                    });
                    *c = None;
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    out.into_iter()
        .zip(readers)
        .map(|(o, r)| {
            let mut o = o.unwrap();
            o.output = r.join().unwrap_or_default();
            o
        })
        .collect()
}

/// Asserts every rank exited 0, printing all output otherwise.
pub fn assert_all_ok(outs: &[Outcome], what: &str) {
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.code == Some(0) && !o.hung,
            "{what}: rank {r} failed (code {:?}, hung {}):\n{}\n--- all ranks ---\n{}",
            o.code,
            o.hung,
            o.output,
            outs.iter()
                .enumerate()
                .map(|(i, o)| format!("[{i}] {}", o.output))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// `hetccl run -n n -- hetccl-check ARGS` with `env` and `HETCCL_TIMEOUT=60`, killed after
/// `deadline`; asserts that every rank exited cleanly and reported success ("checks
/// passed", or a "determinism hash" with `--determinism`). Returns the output.
pub fn launch_check(
    n: usize,
    args: &[&str],
    env: &[(&str, &str)],
    deadline: Duration,
    what: &str,
) -> String {
    let mut c = Command::new(launcher());
    c.args(["run", "-n", &n.to_string(), "--", check_bin()])
        .args(args)
        .env("HETCCL_TIMEOUT", "60")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let outs = collect(vec![c.spawn().unwrap()], deadline);
    assert_all_ok(&outs, what);
    let out = outs.into_iter().next().unwrap().output;
    let marker = if args.contains(&"--determinism") {
        "determinism hash"
    } else {
        "checks passed"
    };
    assert_eq!(
        out.matches(marker).count(),
        n,
        "{what}: expected {n} ranks to report success:\n{out}"
    );
    out
}

/// Makes this test process the parent of its orphans: a rank whose launcher was killed is
/// handed to us instead of to init, so a test can wait for it and read how it ended.
pub fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER only changes an attribute of this process.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);
}

/// Whether process `pid` exists (a zombie counts).
pub fn is_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Waits up to `limit` for `pid` to exit and reaps it. `pid` is this process's child or
/// one of its descendants: an orphan handed to it (see [`become_subreaper`]) is waited for
/// once it has been handed over. Past `limit` the process is killed and this is an error.
pub fn wait_pid(pid: i32, limit: Duration) -> Result<std::process::ExitStatus, String> {
    use std::os::unix::process::ExitStatusExt;
    let start = Instant::now();
    loop {
        let mut st = 0;
        // SAFETY: waitpid writes one status into `st`.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
        if r == pid {
            return Ok(std::process::ExitStatus::from_raw(st));
        }
        if r < 0 && !is_alive(pid) {
            return Err(format!("process {pid} ended but was reaped elsewhere"));
        }
        if start.elapsed() > limit {
            // SAFETY: `pid` is a process this test started (directly or not).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = wait_pid(pid, Duration::from_secs(5));
            return Err(format!("process {pid} still running after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether process `pid` runs a communicator already (its progress thread exists), i.e.
/// it is past bootstrap and into collectives.
pub fn has_communicator(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("comm"))
            .is_ok_and(|c| c.starts_with("hetccl-progress"))
    })
}

/// Reads `[rank K] pid P` lines from the launcher's stdout until every one of `n` ranks
/// has told its pid; returns them in rank order.
pub fn rank_pids(out: &mut std::io::BufReader<std::process::ChildStdout>, n: usize) -> Vec<i32> {
    let mut pids = vec![0; n];
    let mut seen = String::new();
    while pids.contains(&0) {
        let mut l = String::new();
        assert!(
            std::io::BufRead::read_line(out, &mut l).unwrap() > 0,
            "launcher output ended before every rank told its pid: {seen}"
        );
        if let Some((k, p)) = l
            .strip_prefix("[rank ")
            .and_then(|r| r.split_once("] pid "))
        {
            pids[k.parse::<usize>().unwrap()] = p.trim().parse().unwrap();
        }
        seen.push_str(&l);
    }
    pids
}

/// Waits until each of `pids` runs a communicator (past bootstrap, into collectives).
pub fn wait_for_communicators(pids: &[i32]) {
    let start = Instant::now();
    while !pids.iter().all(|&p| has_communicator(p)) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "ranks {pids:?} never got a communicator"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `hetccl run -n 2 -- sh -c SCRIPT PROGRAM ARGS...`, where the script prints
/// `pid P` of the process that runs the program; returns the launcher and those pids
/// once both have a communicator.
pub fn start_wrapped(
    script: &str,
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Child, Vec<i32>) {
    let mut cmd = Command::new(launcher());
    cmd.args(["run", "-n", "2", "--", "sh", "-c", script, program])
        .args(args)
        .env("HETCCL_TIMEOUT", "60")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let pids = rank_pids(&mut out, 2);
    // Whatever else the ranks print through the launcher, until it dies.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    wait_for_communicators(&pids);
    (child, pids)
}

/// Kills the launcher with SIGKILL; returns each of `pids`' status and how long after the
/// kill it ended.
pub fn kill_launcher(
    launcher: &mut Child,
    pids: &[i32],
) -> Vec<(std::process::ExitStatus, Duration)> {
    // SAFETY: signals the launcher this test started.
    assert_eq!(
        unsafe { libc::kill(launcher.id() as i32, libc::SIGKILL) },
        0
    );
    let t0 = Instant::now();
    launcher.wait().unwrap();
    pids.iter()
        .map(|&p| {
            let st = wait_pid(p, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
            (st, t0.elapsed())
        })
        .collect()
}
