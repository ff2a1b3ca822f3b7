//! Helpers for the tests of the tools: the test kit's (ranks as processes, skips), and
//! the ones that start ranks through the launcher.
#![allow(dead_code, unused_imports)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use hetccl_testkit::ranks::*;
pub use hetccl_testkit::skip;

pub fn check_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hetccl-check")
}

pub fn launcher() -> &'static str {
    env!("CARGO_BIN_EXE_hetccl")
}

/// The repository: `configs/`, `data/`, `scripts/`.
pub fn repo() -> PathBuf {
    let tools = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    tools
        .parent()
        .expect("tools/ sits in the repository")
        .to_path_buf()
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
