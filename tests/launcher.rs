//! `hetccl run`: environment, output prefixes, failure propagation, signals.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

const HETCCL: &str = env!("CARGO_BIN_EXE_hetccl");

/// Waits for `child`; past `limit` it is killed and the test fails (the launcher hung).
fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: hetccl run still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(HETCCL);
    cmd.arg("run").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.wait_with_output().unwrap()
}

fn lines(b: &[u8]) -> Vec<String> {
    let mut v: Vec<String> = String::from_utf8_lossy(b)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn is_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Pids printed by the ranks as `pid <n>`, from `[rank K] pid <n>` lines.
fn pids(out: &str) -> Vec<i32> {
    out.lines()
        .filter_map(|l| {
            l.split_once("] pid ")
                .and_then(|(_, p)| p.trim().parse().ok())
        })
        .collect()
}

#[test]
fn every_line_is_prefixed_with_its_rank() {
    let out = run(
        &[
            "-n",
            "3",
            "--",
            "sh",
            "-c",
            "echo hi $RANK; echo oops $RANK >&2",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        lines(&out.stdout),
        ["[rank 0] hi 0", "[rank 1] hi 1", "[rank 2] hi 2"]
    );
    assert_eq!(
        lines(&out.stderr),
        ["[rank 0] oops 0", "[rank 1] oops 1", "[rank 2] oops 2"]
    );
}

#[test]
fn ranks_get_their_identity_and_the_rest_is_inherited() {
    let script = "echo $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT \
                  ${#HETCCL_JOB_KEY} $HETCCL_NODE_ID $HETCCL_JOB_ID";
    let out = run(
        &[
            "-n",
            "2",
            "--master-port",
            "29517",
            "--",
            "sh",
            "-c",
            script,
        ],
        &[("HETCCL_NODE_ID", "node-a")],
    );
    assert_eq!(out.status.code(), Some(0));
    let got = lines(&out.stdout);
    let job: Vec<&str> = got.iter().map(|l| l.rsplit(' ').next().unwrap()).collect();
    assert!(job[0].starts_with("run-") && job[0].len() == 20, "{got:?}");
    assert_eq!(job[0], job[1]);
    assert_eq!(
        got,
        [
            format!("[rank 0] 0 2 0 2 127.0.0.1 29517 32 node-a {}", job[0]),
            format!("[rank 1] 1 2 1 2 127.0.0.1 29517 32 node-a {}", job[0]),
        ]
    );
}

#[test]
fn a_failing_rank_stops_the_others_and_is_named() {
    // Ranks 0 and 1 would sleep for 5 minutes; rank 2 fails after they have started.
    let script = "echo pid $$; if [ $RANK = 2 ]; then sleep 0.5; exit 3; fi; exec sleep 300";
    let mut child = Command::new(HETCCL)
        .args(["run", "-n", "3", "--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let st = wait_bounded(&mut child, Duration::from_secs(10), "rank 2 exited 3");
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(st.code(), Some(3), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "hetccl run: rank 2 exited with status 3; stopping the others"
    );
    let pids = pids(&stdout);
    assert_eq!(pids.len(), 3, "{stdout}");
    for p in pids {
        assert!(!is_alive(p), "rank process {p} survived");
    }
}

#[test]
fn a_rank_killed_by_a_signal_is_reported() {
    let out = run(
        &[
            "-n",
            "2",
            "--",
            "sh",
            "-c",
            "if [ $RANK = 1 ]; then kill -9 $$; fi; exec sleep 300",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(128 + 9));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "hetccl run: rank 1 was killed by signal 9 (SIGKILL); stopping the others"
    );
}

#[test]
fn sigint_to_the_launcher_ends_every_rank() {
    let mut child = Command::new(HETCCL)
        .args([
            "run",
            "-n",
            "2",
            "--",
            "sh",
            "-c",
            "echo pid $$; exec sleep 300",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until both ranks are up, so the signal finds them running.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    while pids(&seen).len() < 2 {
        let mut l = String::new();
        assert!(
            out.read_line(&mut l).unwrap() > 0,
            "launcher output ended early: {seen}"
        );
        seen.push_str(&l);
    }
    // SAFETY: sends SIGINT to the launcher this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let st = wait_bounded(&mut child, Duration::from_secs(10), "SIGINT");
    assert_eq!(st.code(), Some(128 + libc::SIGINT));
    for p in pids(&seen) {
        assert!(!is_alive(p), "rank process {p} survived SIGINT");
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(
        err.trim_end(),
        "hetccl run: got SIGINT; forwarding it to every rank"
    );
}

/// The CPUs this process may use, from `Cpus_allowed_list` ("0-3,8").
fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

#[test]
fn bind_cores_pins_rank_k_to_the_kth_allowed_cpu() {
    let cpus = allowed_cpus();
    let out = run(
        &[
            "-n",
            "3",
            "--bind-cores",
            "--",
            "sh",
            "-c",
            "grep Cpus_allowed_list /proc/self/status",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    let want: Vec<String> = (0..3)
        .map(|k| format!("[rank {k}] Cpus_allowed_list:\t{}", cpus[k % cpus.len()]))
        .collect();
    assert_eq!(lines(&out.stdout), want);
}

#[test]
fn usage_errors_exit_2() {
    let out = run(&["--", "true"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("hetccl run: missing -n N (how many ranks to start)\n\nusage: hetccl run"),
        "{err}"
    );
    let out = Command::new(HETCCL).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
