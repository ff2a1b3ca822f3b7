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
