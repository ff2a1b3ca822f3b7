//! The hang report of `hetccl run`: one rank of four misbehaves after one good
//! all-reduce (`hetccl-check --fault F --fault-rank 2`), the others' next all-reduce
//! (#1) cannot finish, and the launcher must print one report that names rank 2 and the
//! collective, within `HETCCL_TIMEOUT` + 2 s of the fault, over shared memory and TCP:
//!
//! - `stop`: rank 2 stops itself with SIGSTOP; the others time out;
//! - `kill`: rank 2 dies by SIGKILL; the others lose it;
//! - `skip`: rank 2 never calls the collective (it sleeps); the others time out, and
//!   rank 2, asked by SIGUSR1, says it is in compute, not in any collective;
//! - `op`: rank 2 calls broadcast #1 where the others call all_reduce #1.

mod common;

use common::*;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT_S: u64 = 3;

struct Run {
    /// The launcher's stderr, line by line, each with when the test read it.
    lines: Vec<(Instant, String)>,
    code: Option<i32>,
}

impl Run {
    fn text(&self) -> String {
        self.lines.iter().map(|l| format!("{}\n", l.1)).collect()
    }

    fn first(&self, pat: &str) -> Option<Instant> {
        self.lines.iter().find(|l| l.1.contains(pat)).map(|l| l.0)
    }
}

fn launch(fault: &str, shm_disable: &str, extra: &[(&str, &str)]) -> Run {
    let argv = [
        check_bin(),
        "--fault",
        fault,
        "--fault-rank",
        "2",
        "--counts",
        "1000",
    ];
    launch_argv(&argv, shm_disable, extra)
}

/// `hetccl run -n 4` of `argv`, as [`launch`].
fn launch_argv(argv: &[&str], shm_disable: &str, extra: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(launcher());
    cmd.args(["run", "-n", "4", "--grace-period", "0.5", "--"])
        .args(argv)
        .env("HETCCL_TIMEOUT", TIMEOUT_S.to_string())
        .env("HETCCL_SHM_DISABLE", shm_disable)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let err = std::io::BufReader::new(child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        err.lines()
            .map_while(|l| l.ok())
            .map(|l| (Instant::now(), l))
            .collect::<Vec<_>>()
    });
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            let st = child.wait().unwrap();
            let lines = reader.join().unwrap();
            panic!(
                "the job hung ({st}):\n{}",
                lines
                    .iter()
                    .map(|l| l.1.clone())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        lines: reader.join().unwrap(),
        code: status.code(),
    }
}

/// One report, naming rank 2 with `culprit` (the words after "culprit: "), in time.
fn assert_report(run: &Run, culprit: &str, fault_line: &str) {
    let text = run.text();
    assert_eq!(
        text.matches("hetccl hang report").count(),
        1,
        "not one report:\n{text}"
    );
    assert_eq!(
        text.matches("culprit:").count(),
        1,
        "not one culprit:\n{text}"
    );
    assert!(
        text.contains(&format!("  culprit: {culprit}")),
        "expected culprit {culprit:?}:\n{text}"
    );
    let fault = run
        .first(fault_line)
        .unwrap_or_else(|| panic!("no {fault_line:?}:\n{text}"));
    let report = run.first("culprit:").unwrap();
    let took = report.saturating_duration_since(fault);
    assert!(
        took < Duration::from_secs(TIMEOUT_S + 2),
        "the report came {took:?} after the fault:\n{text}"
    );
    assert_ne!(run.code, Some(0), "{text}");
}

fn stopped(shm_disable: &str) {
    let run = launch("stop", shm_disable, &[]);
    assert_report(
        &run,
        "rank 2 in all_reduce #1: rank 2 is stopped (SIGSTOP or a debugger) and cannot answer",
        "rank 2: stopping on purpose",
    );
    let text = run.text();
    assert!(
        text.contains("  rank 2: no state: its process is stopped"),
        "{text}"
    );
    // Every other rank waited on rank 2, directly or through a rank that did.
    assert!(text.contains("  waits for: "), "{text}");
    assert!(text.contains("-> 2 (all_reduce #1"), "{text}");
    // And each one's own error names rank 2 too, whichever peer it waited on itself.
    let named = errors_name(
        &run,
        "rank 2 in all_reduce #1: rank 2 is stopped (SIGSTOP or a debugger) and cannot answer",
    );
    assert_eq!(named, 3, "{text}");
}

/// Checks that every rank's own error (`hetccl-check: rank R: FAILED: ...`) ends with
/// the job's first failure, `finding`; returns how many ranks printed one.
/// 2 nodes x 2 ranks (`HETCCL_NODE_ID` n0 for ranks 0 and 1, n1 for 2 and 3), the
/// hierarchical all-reduce forced, rank 2 stopped before #1: its node-mate 3 waits on it
/// in the intra-node reduce-scatter, and the report places the culprit there and names
/// the phase each waiting rank is in.
#[test]
fn a_stopped_rank_of_a_hierarchical_all_reduce_is_placed_in_its_phase() {
    let check = check_bin();
    let script = format!(
        "HETCCL_NODE_ID=n$((RANK / 2)) exec {check} --fault stop --fault-rank 2 --counts 1000"
    );
    let run = launch_argv(
        &["sh", "-c", &script],
        "0",
        &[("HETCCL_ALGO", "hier"), ("HETCCL_TOPO_PROBE", "0")],
    );
    assert_report(
        &run,
        "rank 2 in all_reduce #1: rank 2 is stopped (SIGSTOP or a debugger) and cannot answer",
        "rank 2: stopping on purpose",
    );
    let text = run.text();
    assert!(
        text.contains("  culprit's phase: intra-node reduce-scatter (where rank 3 waits on it)\n"),
        "{text}"
    );
    assert!(
        text.contains("3 -> 2 (all_reduce #1, intra-node reduce-scatter, to send data)"),
        "{text}"
    );
    // Rank 3 in the intra-node step; ranks 0 and 1 got past theirs (their node is
    // whole) and wait across nodes on their ring partners 2 and 3 (not on each other
    // in the all-gather that follows, whose receives are ready from the start too).
    let rank_line = |r: usize| {
        text.lines()
            .find(|l| l.starts_with(&format!("  rank {r}: ")))
            .unwrap_or_else(|| panic!("no line for rank {r}:\n{text}"))
            .to_string()
    };
    assert!(
        rank_line(3).ends_with("in the intra-node reduce-scatter")
            || rank_line(3).contains("in the intra-node reduce-scatter: "),
        "{text}"
    );
    for r in [0, 1] {
        assert!(
            rank_line(r).contains(&format!("waiting for rank {} to send data for ", r + 2))
                && rank_line(r).contains("s, in the inter-node all-reduce"),
            "rank {r}:\n{text}"
        );
        assert!(
            text.contains(&format!(
                "{r} -> {} (all_reduce #1, inter-node all-reduce, to send data)",
                r + 2
            )),
            "{text}"
        );
    }
}

fn errors_name(run: &Run, finding: &str) -> usize {
    let text = run.text();
    let failed: Vec<&str> = text.lines().filter(|l| l.contains(": FAILED: ")).collect();
    for l in &failed {
        assert!(
            l.ends_with(&format!("; the job's first failure: {finding}")),
            "{l}\n{text}"
        );
    }
    failed.len()
}

#[test]
fn a_stopped_rank_is_named_once_shm() {
    stopped("0");
}

#[test]
fn a_stopped_rank_is_named_once_tcp() {
    stopped("1");
}

fn killed(shm_disable: &str) {
    let run = launch("kill", shm_disable, &[]);
    assert_report(
        &run,
        "rank 2 in all_reduce #1: rank 2 was killed by signal 9 (SIGKILL)",
        "rank 2: killing itself on purpose",
    );
    let text = run.text();
    assert!(
        text.contains("  rank 2: no state: killed by signal 9 (SIGKILL)"),
        "{text}"
    );
    // The survivors answered with their own state: in (or failed in) all_reduce #1, or
    // still finishing #0, which rank 2 can leave before a slower rank does (its share is
    // already in shared memory when it moves on; with 4 ranks on 2 CPUs a rank may not
    // have run again yet).
    for r in [0, 1, 3] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("  rank {r}: ")))
            .unwrap_or_else(|| panic!("no line for rank {r}:\n{text}"));
        assert!(
            line.contains(" all_reduce #1") || line.contains(" in all_reduce #0 for "),
            "{line}\n{text}"
        );
    }
    // The ranks that saw the loss before the launcher stopped them name rank 2. Over
    // TCP the reset comes at once, so every survivor fails by itself, and the launcher
    // gives such a rank time to print its error before it stops it; over shared memory
    // the launcher is usually first.
    let named = errors_name(
        &run,
        "rank 2 in all_reduce #1: rank 2 is gone: its process ended (killed?) without a word",
    );
    if shm_disable == "1" {
        assert_eq!(named, 3, "{text}");
    }
}

#[test]
fn a_killed_rank_is_named_once_shm() {
    killed("0");
}

#[test]
fn a_killed_rank_is_named_once_tcp() {
    killed("1");
}

fn skipped(shm_disable: &str) {
    let run = launch("skip", shm_disable, &[]);
    assert_report(
        &run,
        "rank 2 in all_reduce #1: rank 2 in compute for ",
        "rank 2: not calling the collective on purpose",
    );
    let text = run.text();
    let line = text
        .lines()
        .find(|l| l.starts_with("  rank 2: "))
        .unwrap_or_else(|| panic!("no line for rank 2:\n{text}"));
    assert!(
        line.ends_with("not in any collective (last: all_reduce #0, finished)"),
        "{line}"
    );
    // "in compute for X s": about the timeout, since it left all_reduce #0.
    let secs: f64 = line
        .split("in compute for ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        secs >= (TIMEOUT_S as f64) - 0.5 && secs < (TIMEOUT_S + 10) as f64,
        "{line}"
    );
}

#[test]
fn a_rank_that_never_calls_is_named_once_shm() {
    skipped("0");
}

#[test]
fn a_rank_that_never_calls_is_named_once_tcp() {
    skipped("1");
}

fn other_collective(shm_disable: &str) {
    let run = launch("op", shm_disable, &[]);
    assert_report(
        &run,
        "rank 2 in broadcast #1: rank 2 called broadcast #1 where ranks 0, 1, 3 called all_reduce #1",
        "hetccl-check: rank 2: FAILED",
    );
}

#[test]
fn a_rank_that_calls_another_collective_is_named_once_shm() {
    other_collective("0");
}

#[test]
fn a_rank_that_calls_another_collective_is_named_once_tcp() {
    other_collective("1");
}

/// SIGUSR1 to the launcher of a live job: a report of every rank's state, and the job
/// goes on (here: until the test stops it).
#[test]
fn sigusr1_to_the_launcher_reports_a_live_job() {
    let mut cmd = Command::new(launcher());
    cmd.args(["run", "-n", "2", "--grace-period", "0.5", "--"])
        .arg(check_bin())
        .args(["--fault", "skip", "--fault-rank", "1", "--counts", "1000"])
        .env("HETCCL_TIMEOUT", "120")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while !seen.contains("not calling the collective on purpose") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "{seen}");
        seen.push_str(&line);
    }
    // Rank 0 is in all_reduce #1 by now or soon; its wait is recorded after 50 ms.
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling the launcher this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    let t = Instant::now();
    while !seen.contains("  rank 1: ") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "{seen}");
        seen.push_str(&line);
    }
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(
        seen.contains("hetccl hang report (asked with SIGUSR1), 2 ranks:"),
        "{seen}"
    );
    assert!(
        seen.contains("  culprit: rank 1 in all_reduce #1: rank 1 in compute for "),
        "{seen}"
    );
    assert!(
        seen.contains("  rank 0: in all_reduce #1 for ") && seen.contains("waiting for rank 1"),
        "{seen}"
    );
    // Still running: the report did not stop the job.
    assert!(child.try_wait().unwrap().is_none(), "{seen}");
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(128 + libc::SIGTERM), "{seen}");
}

/// Without the launcher (ranks started with torchrun's variables, as mpirun or srun
/// would): the lowest rank that failed prints the one report, and the time its faulty
/// collective took (the wait, then the report) stays within `HETCCL_TIMEOUT` + 2 s.
/// Waits for the ranks of a job whose rank 2 misbehaves (then kills rank 2): every other
/// rank must exit with status 1, and the job print one report naming `culprit`.
/// Returns their outcomes, rank 2's left out, and all their output.
fn outcomes(mut children: Vec<std::process::Child>, culprit: &str) -> (Vec<Outcome>, String) {
    let mut faulty = children.remove(2);
    let outs = collect(children, Duration::from_secs(40));
    let _ = faulty.kill();
    let _ = faulty.wait();
    let all: String = outs.iter().map(|o| o.output.clone()).collect();
    for o in &outs {
        assert!(!o.hung, "{all}");
        assert_eq!(o.code, Some(1), "{all}");
    }
    assert_eq!(all.matches("hetccl hang report").count(), 1, "{all}");
    assert!(all.contains(&format!("  culprit: {culprit}")), "{all}");
    (outs, all)
}

/// The seconds of `hetccl-check`'s "faulty collective returned after Xs" in `output`.
fn returned_after(output: &str) -> f64 {
    output
        .split("faulty collective returned after ")
        .nth(1)
        .and_then(|s| s.split('s').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{output}"))
}

fn without_launcher(fault: &str, culprit: &str) {
    without_launcher_with(fault, culprit, &[]);
}

/// [`without_launcher`] with `env` on top of the ranks' variables.
fn without_launcher_with(fault: &str, culprit: &str, env: &[(&str, &str)]) {
    let timeout = TIMEOUT_S.to_string();
    let mut vars = vec![("HETCCL_TIMEOUT", timeout.as_str())];
    vars.extend_from_slice(env);
    let children = spawn_ranks(
        4,
        check_bin(),
        &["--fault", fault, "--fault-rank", "2", "--counts", "1000"],
        &vars,
        |_| vec![],
    );
    let (outs, all) = outcomes(children, culprit);
    // For a stopped or killed rank, each rank's own error names the same rank, whomever
    // it waited on itself (the others fail together, before the report is printed and
    // its dumps removed).
    for o in outs.iter().filter(|_| fault == "stop" || fault == "kill") {
        let line = o
            .output
            .lines()
            .find(|l| l.contains(": FAILED: "))
            .unwrap_or_else(|| panic!("no error:\n{all}"));
        assert!(
            line.contains(&format!("; the job's first failure: {culprit}")),
            "{line}\n{all}"
        );
    }
    // The rank that printed it: its faulty collective returned after the wait and the
    // report.
    let printer = outs
        .iter()
        .find(|o| o.output.contains("hetccl hang report"))
        .unwrap();
    let took = returned_after(&printer.output);
    assert!(took < (TIMEOUT_S + 2) as f64, "{took} s:\n{all}");
    // The rank that printed it says so (the lowest that had failed when it looked: rank 0
    // unless it failed more than 100 ms after a higher rank).
    let k = outs
        .iter()
        .position(|o| o.output.contains("hetccl hang report"))
        .map(|i| if i >= 2 { i + 1 } else { i })
        .unwrap();
    assert!(
        printer.output.contains(&format!(
            "hetccl hang report (printed by rank {k}, the lowest rank that failed)"
        )),
        "{all}"
    );
}

#[test]
fn without_the_launcher_a_stopped_rank_is_named_once() {
    without_launcher(
        "stop",
        "rank 2 in all_reduce #1: rank 2 is stopped (SIGSTOP or a debugger) and cannot answer",
    );
}

#[test]
fn without_the_launcher_a_killed_rank_is_named_once() {
    without_launcher(
        "kill",
        "rank 2 in all_reduce #1: rank 2 is gone: its process ended (killed?) without a word",
    );
}

#[test]
fn without_the_launcher_a_rank_that_never_calls_is_named_once() {
    without_launcher("skip", "rank 2 in all_reduce #1: rank 2 in compute for ");
}

#[test]
fn without_the_launcher_a_rank_that_calls_another_collective_is_named_once() {
    without_launcher(
        "op",
        "rank 2 in broadcast #1: rank 2 called broadcast #1 where ranks 0, 1, 3 called all_reduce #1",
    );
}

/// A job run again under the same identity (a fixed job id, as a fixed torchrun port
/// gives) after a run whose killed rank left its marker, and so the report's lock and
/// finding, in the dump directory: the new run prints its own one report, and the
/// earlier run's directory is removed.
#[test]
fn without_the_launcher_a_job_run_again_reports_its_own_failure() {
    let tmp = std::env::temp_dir().join(format!("hetccl-rerun-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let id = format!("rerun-{}", std::process::id());
    let env = [("TMPDIR", tmp.to_str().unwrap()), ("HETCCL_JOB_ID", &id)];
    let flight_dirs = || {
        let mut d: Vec<_> = std::fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("hetccl-flight-")
            })
            .collect();
        d.sort();
        d
    };
    let gone =
        "rank 2 in all_reduce #1: rank 2 is gone: its process ended (killed?) without a word";
    without_launcher_with("kill", gone, &env);
    let first = flight_dirs();
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(first[0].join("finding").exists() && first[0].join("report.lock").exists());
    assert!(first[0].join("rank-2.pid").exists());
    without_launcher_with("kill", gone, &env);
    let second = flight_dirs();
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second, first);
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// 2 hosts x 2 ranks without a launcher or a shared directory: each rank in a UTS
/// namespace of its own named `h0` (ranks 0, 1) or `h1` (ranks 2, 3), each host with its
/// own temporary directory, so the dumps of one host are out of the other's reach. Rank
/// 2 misbehaves; the one report (rank 0's, on h0) must hold the states of h1's ranks,
/// asked over the network, and name rank 2. Returns the ranks' outputs in rank order
/// (rank 2's left out) and the report.
fn across_hosts(fault: &str, culprit: &str) -> (Vec<Outcome>, String) {
    if !Command::new("unshare")
        .args(["--uts", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        skip("unshare --uts is not permitted here (needs root or user namespaces)");
        return (Vec::new(), String::new());
    }
    let base = std::env::temp_dir().join(format!("hetccl-hosts-{fault}-{}", std::process::id()));
    for h in ["h0", "h1"] {
        std::fs::create_dir_all(base.join(h)).unwrap();
    }
    let script = format!(
        "hostname h$((RANK / 2)) && exec {} --fault {fault} --fault-rank 2 --counts 1000",
        check_bin()
    );
    let timeout = TIMEOUT_S.to_string();
    let children = spawn_ranks(
        4,
        "unshare",
        &["--uts", "sh", "-c", &script],
        &[("HETCCL_TIMEOUT", &timeout)],
        |r| {
            let tmp = base.join(format!("h{}", r / 2));
            vec![("TMPDIR".to_string(), tmp.to_string_lossy().into_owned())]
        },
    );
    let (outs, all) = outcomes(children, culprit);
    // Rank 0 printed it: the lowest that failed, on h0.
    assert!(
        outs[0]
            .output
            .contains("hetccl hang report (printed by rank 0, the lowest rank that failed)"),
        "{all}"
    );
    let report = outs[0].output.clone();
    // Its faulty collective returned, the report printed, within the timeout + 2 s.
    let took = returned_after(&report);
    assert!(took < (TIMEOUT_S + 2) as f64, "{took} s:\n{all}");
    // Rank 3's state came from h1 over the network: a line of its own, not "no state".
    let line3 = report
        .lines()
        .find(|l| l.starts_with("  rank 3: "))
        .unwrap_or_else(|| panic!("no line for rank 3:\n{all}"));
    assert!(line3.contains(" all_reduce #1"), "{line3}\n{all}");
    std::fs::remove_dir_all(&base).unwrap();
    (outs, report)
}

#[test]
fn across_hosts_a_stopped_rank_is_named_once() {
    let silent = "rank 2 in all_reduce #1: rank 2 does not answer from its host: stopped \
                  (SIGSTOP or a debugger) or hung";
    let (outs, report) = across_hosts("stop", silent);
    if outs.is_empty() {
        return;
    }
    assert!(
        report.contains("  rank 2: no state: it does not answer from its host"),
        "{report}"
    );
    // Ranks 0 and 1 see rank 2 only over the network; rank 3, on its host, sees its
    // process stopped.
    let stopped = "rank 2 in all_reduce #1: rank 2 is stopped (SIGSTOP or a debugger) and \
                   cannot answer";
    for (o, finding) in outs.iter().zip([silent, silent, stopped]) {
        let line = o
            .output
            .lines()
            .find(|l| l.contains(": FAILED: "))
            .unwrap_or_else(|| panic!("no error:\n{}", o.output));
        assert!(
            line.ends_with(&format!("; the job's first failure: {finding}")),
            "{line}"
        );
    }
}

#[test]
fn across_hosts_a_killed_rank_is_named_once() {
    let gone =
        "rank 2 in all_reduce #1: rank 2 is gone: its process ended (killed?) without a word";
    let (outs, report) = across_hosts("kill", gone);
    if outs.is_empty() {
        return;
    }
    assert!(
        report.contains("  rank 2: no state: its process is gone"),
        "{report}"
    );
    for o in &outs {
        let line = o.output.lines().find(|l| l.contains(": FAILED: ")).unwrap();
        assert!(
            line.ends_with(&format!("; the job's first failure: {gone}")),
            "{line}"
        );
    }
}

#[test]
fn across_hosts_a_rank_that_never_calls_is_named_once() {
    let (outs, report) = across_hosts("skip", "rank 2 in all_reduce #1: rank 2 in compute for ");
    if outs.is_empty() {
        return;
    }
    // Rank 2's own state, asked over the network while it sleeps.
    let line = report
        .lines()
        .find(|l| l.starts_with("  rank 2: "))
        .unwrap_or_else(|| panic!("no line for rank 2:\n{report}"));
    assert!(
        line.ends_with("not in any collective (last: all_reduce #0, finished)"),
        "{line}\n{report}"
    );
}

#[test]
fn across_hosts_a_rank_that_calls_another_collective_is_named_once() {
    across_hosts(
        "op",
        "rank 2 in broadcast #1: rank 2 called broadcast #1 where ranks 0, 1, 3 called all_reduce #1",
    );
}
