//! `hetccl run`: environment, output prefixes, failure propagation, signals; the rank
//! that failed first is the one named; ranks stop when the launcher is killed; closed
//! output streams panic nobody.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::{become_subreaper, kill_launcher, rank_pids, start_wrapped, wait_for_communicators};
use hetccl_testkit::Scratch;

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

use common::is_alive;

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

/// Every rank holds the ranks' end of one watch socket, above stdio, and no other socket
/// (the launcher's end stays with the launcher, so its exit is seen).
#[test]
fn ranks_inherit_one_end_of_the_watch_socket() {
    let script = "echo fd $HETCCL_LAUNCHER_FD $(readlink /proc/$$/fd/$HETCCL_LAUNCHER_FD) \
                  $(ls -l /proc/$$/fd | grep -c socket:)";
    let out = run(&["-n", "3", "--", "sh", "-c", script], &[]);
    assert_eq!(out.status.code(), Some(0));
    let got = lines(&out.stdout);
    assert_eq!(got.len(), 3, "{got:?}");
    let first: Vec<&str> = got[0].split(' ').collect();
    // "[rank 0] fd 5 socket:[1234] 1"
    assert_eq!(first.len(), 6, "{got:?}");
    assert!(first[3].parse::<i32>().unwrap() >= 3, "{got:?}");
    assert!(first[4].starts_with("socket:["), "{got:?}");
    for (k, l) in got.iter().enumerate() {
        assert_eq!(
            *l,
            format!("[rank {k}] fd {} {} 1", first[3], first[4]),
            "{got:?}"
        );
    }
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
        "hetccl run: rank 2 exited with status 3; stopping the others\n\
         hetccl run: rank 2 exited with status 3; ranks 0, 1 were killed by signal 15 (SIGTERM) after it"
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
        "hetccl run: rank 1 was killed by signal 9 (SIGKILL); stopping the others\n\
         hetccl run: rank 1 was killed by signal 9 (SIGKILL); rank 0 was killed by signal 15 (SIGTERM) after it"
    );
}

/// Rank 0 exits 1 first; rank 1 is killed by SIGKILL only after the launcher has reaped
/// rank 0. The killed rank is still the one named: peers exit 1 *because* a rank was
/// killed, never the other way round, and a killed rank is seen to exit a moment after
/// its peers can already tell.
#[test]
fn a_rank_killed_just_after_a_peer_exited_is_named() {
    let dir = scratch("settle");
    let script = format!(
        "if [ $RANK = 0 ]; then echo $$ > {d}/p.tmp; mv {d}/p.tmp {d}/p; exit 1; fi; \
         while [ ! -e {d}/p ]; do :; done; p=$(cat {d}/p); \
         while kill -0 $p 2>/dev/null; do :; done; kill -9 $$",
        d = dir.display()
    );
    let out = run(&["-n", "2", "--", "sh", "-c", &script], &[]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "hetccl run: rank 1 was killed by signal 9 (SIGKILL); stopping the others\n\
         hetccl run: rank 1 was killed by signal 9 (SIGKILL); rank 0 exited with status 1 after it"
    );
    assert_eq!(out.status.code(), Some(128 + 9));
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

const CHECK: &str = env!("CARGO_BIN_EXE_hetccl-check");

/// A fresh directory for one test's files.
fn scratch(tag: &str) -> Scratch {
    Scratch::new(&format!("launcher-{tag}"))
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: signals a process this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill {pid}");
}

/// The launcher's words on a rank killed by SIGKILL.
fn sigkill(rank: usize) -> String {
    format!("rank {rank} was killed by signal 9 (SIGKILL)")
}

/// Kills rank `victim` of an `n`-rank hetccl-check in collectives with SIGKILL, and checks
/// that the launcher names it (and only it) and exits 137. `env` picks the transport.
fn killed_rank_is_blamed(n: usize, victim: usize, env: &[(&str, &str)], extra: &[&str]) {
    let mut cmd = Command::new(common::launcher());
    cmd.args(["run", "-n", &n.to_string(), "--grace-period", "5"])
        .args(extra)
        .args(["--", "sh", "-c", "echo pid $$; exec \"$0\" \"$@\"", CHECK])
        .args(["--iters", "1000000", "--counts", "1000"])
        .env("HETCCL_ALGO", "ring")
        .env("HETCCL_TIMEOUT", "10")
        .env("HETCCL_TOPO_PROBE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let pids = rank_pids(&mut out, n);
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = out.read_to_string(&mut rest);
    });
    let mut err = child.stderr.take().unwrap();
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    wait_for_communicators(&pids);
    kill(pids[victim], libc::SIGKILL);
    let st = wait_bounded(&mut child, Duration::from_secs(60), "a killed rank");
    let stderr = errs.join().unwrap();
    drain.join().unwrap();
    let what = format!("{n} ranks {env:?} {extra:?}, rank {victim} killed");
    assert!(!stderr.contains("panicked at"), "{what}:\n{stderr}");
    // Ranks stopped inside a rendezvous can leave named segments, which the launcher
    // removes and says so; whatever the timing, none of the ranks' files may be left.
    let said: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("hetccl run: "))
        .filter(|l| !l.starts_with("removed "))
        .collect();
    let tags: Vec<String> = pids.iter().map(|p| format!("-p{p}n")).collect();
    let left: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|f| f.starts_with("hetccl-") && tags.iter().any(|t| f.contains(t.as_str())))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(left, Vec::<String>::new(), "{what}:\n{stderr}");
    assert_eq!(
        said.first().copied().unwrap_or_default(),
        format!("{}; stopping the others", sigkill(victim)),
        "{what}:\n{stderr}"
    );
    assert_eq!(said.len(), 2, "{what}:\n{stderr}");
    let rest = said[1]
        .strip_prefix(&format!("{}; ", sigkill(victim)))
        .unwrap_or_else(|| panic!("{what}:\n{stderr}"));
    // Every other rank's fate, each rank once, all after the killed one: "rank 1 ... after
    // it", "ranks 0, 1, 3 ... after it".
    let mut named: Vec<usize> = rest
        .split("; ")
        .flat_map(|group| {
            assert!(group.ends_with(" after it"), "{what}:\n{stderr}");
            let list = group
                .strip_prefix("ranks ")
                .or_else(|| group.strip_prefix("rank "))
                .unwrap_or_else(|| panic!("{what}: {group:?}"));
            let end = list.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(0);
            list[..end]
                .split(", ")
                .map(|r| {
                    r.trim()
                        .parse::<usize>()
                        .unwrap_or_else(|e| panic!("{what}: {group:?}: {e}"))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    named.sort();
    let others: Vec<usize> = (0..n).filter(|&r| r != victim).collect();
    assert_eq!(named, others, "{what}:\n{stderr}");
    assert_eq!(st.code(), Some(128 + 9), "{what}:\n{stderr}");
}

const TCP: &[(&str, &str)] = &[("HETCCL_SHM_DISABLE", "1")];
const SHM: &[(&str, &str)] = &[];

/// Each configuration 5 times: the wrong rank was named in most runs before.
fn blame_five_times(n: usize, env: &[(&str, &str)], extra: &[&str]) {
    for _ in 0..5 {
        killed_rank_is_blamed(n, n / 2, env, extra);
        killed_rank_is_blamed(n, 0, env, extra);
    }
}

#[test]
fn a_killed_rank_is_blamed_two_ranks_shm() {
    blame_five_times(2, SHM, &[]);
}

#[test]
fn a_killed_rank_is_blamed_two_ranks_tcp() {
    blame_five_times(2, TCP, &[]);
}

#[test]
fn a_killed_rank_is_blamed_four_ranks_shm() {
    blame_five_times(4, SHM, &[]);
}

#[test]
fn a_killed_rank_is_blamed_four_ranks_tcp() {
    blame_five_times(4, TCP, &[]);
}

/// The fallback for kernels without pidfds looks at the ranks every 10 ms; within one
/// look a rank killed by a signal still counts first.
#[test]
fn a_killed_rank_is_blamed_when_polling_for_exits() {
    blame_five_times(4, TCP, &["--exit-polling"]);
}

#[test]
fn ranks_started_directly_get_sigterm_when_the_launcher_is_killed() {
    become_subreaper();
    let (mut launcher, pids) = start_wrapped(
        "echo pid $$; exec \"$0\" \"$@\"",
        CHECK,
        &["--iters", "1000000", "--counts", "1000"],
        &[],
    );
    for (r, (st, after)) in kill_launcher(&mut launcher, &pids).into_iter().enumerate() {
        assert_eq!(st.signal(), Some(libc::SIGTERM), "rank {r}: {st:?}");
        assert!(
            after < Duration::from_secs(10),
            "rank {r} ended {after:?} after the launcher"
        );
    }
}

/// Behind a wrapper the parent-death signal reaches only the wrapper: the rank's
/// communicator notices the launcher's exit itself. Rank 0 writes its stderr to a file;
/// rank 1's stays the pipe to the dead launcher, where its error and log lines must be
/// dropped, not panic.
#[test]
fn ranks_in_collectives_fail_naming_the_launcher_when_it_is_killed() {
    become_subreaper();
    let dir = scratch("collectives");
    let err0 = dir.join("rank0.err");
    let script = format!(
        "if [ $RANK = 0 ]; then exec 2>{}; fi; \"$0\" \"$@\" & echo pid $!; wait $!",
        err0.display()
    );
    let (mut launcher, pids) = start_wrapped(
        &script,
        CHECK,
        &["--iters", "1000000", "--counts", "1000"],
        &[("HETCCL_TOPO_PROBE", "0")],
    );
    let lpid = launcher.id();
    for (r, (st, after)) in kill_launcher(&mut launcher, &pids).into_iter().enumerate() {
        // 1 is hetccl-check's failure; a panic would be 101.
        assert_eq!(st.code(), Some(1), "rank {r}: {st:?}");
        assert!(
            after < Duration::from_secs(10),
            "rank {r} ended {after:?} after the launcher"
        );
        assert!(!is_alive(pids[r]));
    }
    let text = std::fs::read_to_string(&err0).unwrap();
    let why = format!("the launcher (hetccl run, pid {lpid}) exited; this rank stops");
    assert!(!text.contains("panicked at"), "{text}");
    let failed = text
        .lines()
        .find(|l| l.starts_with("hetccl-check: rank 0: FAILED: "))
        .unwrap_or_else(|| panic!("no failure reported:\n{text}"));
    assert!(failed.ends_with(&why), "{text}");
}

/// The trainer, between and inside its gradient all-reduces, behind a wrapper.
#[test]
fn the_trainer_fails_naming_the_launcher_when_it_is_killed() {
    become_subreaper();
    let dir = scratch("trainer");
    let bert = common::workspace_bin("hetccl-bert");
    let repo = common::repo();
    let script = format!(
        "\"$0\" \"$@\" >{d}/out$RANK 2>{d}/err$RANK & echo pid $!; wait $!",
        d = dir.display()
    );
    let metrics = dir.join("metrics.jsonl");
    let (mut launcher, pids) = start_wrapped(
        &script,
        bert.to_str().unwrap(),
        &[
            "--config",
            repo.join("configs/bert-tiny.toml").to_str().unwrap(),
            "--data",
            repo.join("data/tinyshakespeare.txt").to_str().unwrap(),
            "--vocab",
            repo.join("data/bert-base-uncased-vocab.txt")
                .to_str()
                .unwrap(),
            "--layers",
            "1",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--seq-len",
            "24",
            "--batch-size",
            "6",
            "--steps",
            "1000000",
            "--eval-every",
            "0",
            "--log-every",
            "1",
            "--threads",
            "1",
            "--no-progress",
            "--no-checkpoint",
            "--metrics-out",
            metrics.to_str().unwrap(),
            "--plot-out",
            dir.join("loss.png").to_str().unwrap(),
        ],
        &[("HETCCL_TOPO_PROBE", "0")],
    );
    // Kill it once it is training, not still loading.
    let start = Instant::now();
    while std::fs::metadata(&metrics).map_or(0, |m| m.len()) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the trainer never logged a step"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let lpid = launcher.id();
    let why = format!("the launcher (hetccl run, pid {lpid}) exited; this rank stops");
    for (r, (st, after)) in kill_launcher(&mut launcher, &pids).into_iter().enumerate() {
        let text = std::fs::read_to_string(dir.join(format!("err{r}"))).unwrap();
        assert_eq!(st.code(), Some(1), "rank {r}: {st:?}\n{text}");
        assert!(
            after < Duration::from_secs(10),
            "rank {r} ended {after:?} after the launcher"
        );
        assert!(!text.contains("panicked at"), "rank {r}:\n{text}");
        let last = text.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("hetccl-bert: error: ") && last.ends_with(&why),
            "rank {r}:\n{text}"
        );
    }
}

/// `hetccl run ... | head -1` and a closed stderr: the launcher drops what it cannot
/// write, keeps draining the ranks, and ends with their status, not a panic's 101.
#[test]
fn closed_output_streams_panic_nobody_and_the_status_is_the_ranks() {
    for (fault, want) in [("none", 0), ("exit", 17)] {
        let mut child = Command::new(common::launcher())
            .args([
                "run", "-n", "2", "--", CHECK, "--counts", "7", "--iters", "20",
            ])
            .args(["--fault", fault, "--fault-rank", "1"])
            .env("HETCCL_TIMEOUT", "20")
            .env("HETCCL_TOPO_PROBE", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // stderr closed from the start; stdout like `| head -1`: one line, then closed.
        drop(child.stderr.take());
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        drop(out);
        let st = wait_bounded(&mut child, Duration::from_secs(60), "closed streams");
        assert_eq!(
            st.code(),
            Some(want),
            "--fault {fault}: {st:?}, first line {first:?}"
        );
    }
}

/// A rank killed while one of its named /dev/shm segments is still linked leaves the
/// file behind; the launcher removes every file tagged with one of its ranks' pids once
/// all have exited, and nothing else.
#[test]
fn segments_a_killed_rank_left_in_dev_shm_are_removed() {
    let ns = std::fs::read_link("/proc/self/ns/pid").unwrap_or_default();
    if ns.as_os_str().is_empty() || !std::path::Path::new("/dev/shm").is_dir() {
        return common::skip("no readable /proc/self/ns/pid or no /dev/shm");
    }
    let tag = format!("{:x}", rand::random::<u32>());
    // Each rank names a file as the library does (`hetccl-…-p<pid>n<pid namespace, hex>`);
    // rank 1 then dies by SIGKILL. A file tagged with the test's own pid must stay.
    // Rank 1 dies only once rank 0 has said what it made (the launcher stops rank 0 at
    // once after that).
    let said = std::env::temp_dir().join(format!("hetccl-launchtest-{tag}.said"));
    let script = format!(
        "ns=$(stat -L -c %i /proc/self/ns/pid); \
         f=/dev/shm/hetccl-launchtest-{tag}-$RANK-p$$n$(printf %x $ns); \
         : > $f; echo made $f; \
         if [ $RANK = 0 ]; then : > {said}; fi; \
         if [ $RANK = 1 ]; then \
           i=0; while [ ! -e {said} ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); done; \
           kill -9 $$; \
         fi; exec sleep 300",
        said = said.display()
    );
    let ns_ino = std::fs::metadata("/proc/self/ns/pid").unwrap();
    let keep = format!(
        "/dev/shm/hetccl-launchtest-{tag}-keep-p{}n{:x}",
        std::process::id(),
        std::os::unix::fs::MetadataExt::ino(&ns_ino)
    );
    std::fs::write(&keep, b"").unwrap();
    let out = run(&["-n", "2", "--", "sh", "-c", &script], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let left: Vec<String> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&format!("launchtest-{tag}-")))
        .collect();
    std::fs::remove_file(&keep).unwrap();
    let _ = std::fs::remove_file(&said);
    assert_eq!(out.status.code(), Some(128 + 9), "{stderr}");
    let made: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once("] made /dev/shm/").map(|(_, f)| f))
        .collect();
    assert_eq!(made.len(), 2, "{stdout}");
    assert_eq!(
        left,
        vec![keep.trim_start_matches("/dev/shm/").to_string()],
        "{stderr}"
    );
    let line = stderr
        .lines()
        .find(|l| l.contains("/dev/shm segment(s)"))
        .unwrap_or_else(|| panic!("no removal line:\n{stderr}"));
    assert!(
        line.starts_with("hetccl run: removed 2 /dev/shm segment(s) that exited ranks left: ")
            && made.iter().all(|f| line.contains(f)),
        "{line}"
    );
}

/// A launcher killed by SIGKILL cannot remove its dump directory (`$TMPDIR/hetccl-run-*`);
/// the next `hetccl run` of the host removes it once every marker in it names a dead
/// process, or, with no marker, once it has not changed for a minute. A directory with a
/// live process's marker, and one that changed just now, stay.
#[test]
fn dump_directories_of_killed_launchers_are_removed_by_the_next_run() {
    let tmp = scratch("sweep");
    let host = hetccl::topology::hostname();
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let dir = |name: &str, files: &[(&str, String)]| {
        let d = tmp.join(format!("hetccl-run-{name}"));
        std::fs::create_dir(&d).unwrap();
        for (f, text) in files {
            std::fs::write(d.join(f), text).unwrap();
        }
        d
    };
    let killed = dir(
        "killed",
        &[
            ("launcher.pid", format!("{dead} {host} -")),
            ("rank-1.json", "{}".into()),
        ],
    );
    let live = dir(
        "live",
        &[("launcher.pid", format!("{} {host} -", std::process::id()))],
    );
    let old = dir("old", &[("rank-0.json", "{}".into())]);
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::open(&old)
        .unwrap()
        .set_modified(hour_ago)
        .unwrap();
    let new = dir("new", &[("rank-0.json", "{}".into())]);
    let other_host = dir(
        "elsewhere",
        &[("launcher.pid", format!("{dead} not-{host} -"))],
    );

    let tmpdir = tmp.display().to_string();
    let out = run(&["-n", "1", "--", "true"], &[("TMPDIR", &tmpdir)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut left: Vec<String> = std::fs::read_dir(&*tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["hetccl-run-elsewhere", "hetccl-run-live", "hetccl-run-new"],
        "killed: {}, old: {}",
        killed.exists(),
        old.exists()
    );
    assert!(live.join("launcher.pid").exists() && new.exists() && other_host.exists());
}
