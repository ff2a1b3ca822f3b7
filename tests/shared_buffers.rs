//! Collectives on buffers from `Communicator::alloc_shared` across real processes: the
//! direct shared-memory algorithms for every collective, reduction and element type
//! (checked by `hetccl-check --shared` against closed forms), their failure paths, and
//! that no run leaves anything in /dev/shm.

mod common;

use common::*;
use std::time::Duration;

/// Entries of /dev/shm whose name mentions `job`.
fn dev_shm_entries(job: &str) -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(job))
                .collect()
        })
        .unwrap_or_default()
}

/// The job id `hetccl-check --shared` prints.
fn job_of(out: &str) -> String {
    let line = out
        .lines()
        .find_map(|l| l.split("shared buffers, job ").nth(1))
        .unwrap_or_else(|| panic!("no job id in:\n{out}"));
    line.trim().to_string()
}

/// `hetccl run -n n -- hetccl-check --shared ARGS`; asserts every rank passed and
/// that nothing of the job is left in /dev/shm.
fn launch_shared(n: usize, args: &[&str], what: &str) -> String {
    launch_shared_env(n, args, &[], what)
}

fn launch_shared_env(n: usize, args: &[&str], env: &[(&str, &str)], what: &str) -> String {
    let args: Vec<&str> = std::iter::once("--shared")
        .chain(args.iter().copied())
        .collect();
    let out = launch_check(n, &args, env, Duration::from_secs(400), what);
    let job = job_of(&out);
    assert!(job.starts_with("run-"), "{job}");
    assert_eq!(dev_shm_entries(&job), Vec::<String>::new(), "{what}");
    out
}

#[test]
fn world_sizes_1_to_4_every_op_and_dtype() {
    for n in 1..=4 {
        launch_shared(
            n,
            &["--counts", "0,1,7,1000", "--mixed", "30"],
            &format!("shared n={n}"),
        );
    }
}

#[test]
fn large_count_every_op_and_dtype() {
    let big = ((1 << 20) + 3).to_string();
    for n in [2, 4] {
        launch_shared(n, &["--counts", &big], &format!("shared n={n} 2^20+3"));
    }
    // Streaming stores for every size.
    launch_shared_env(
        3,
        &["--counts", "1,1000", "--big-f32", &big],
        &[("HETCCL_STREAM_MIN_BYTES", "0")],
        "shared n=3 streaming",
    );
}

#[test]
fn shared_buffers_over_tcp_when_shm_is_disabled() {
    // Nothing is mapped across processes then; the buffers are plain memory and every
    // collective takes the links.
    launch_shared_env(
        3,
        &["--counts", "0,7,1000", "--mixed", "10"],
        &[("HETCCL_SHM_DISABLE", "1")],
        "shared n=3 tcp",
    );
}

#[test]
fn eight_ranks_oversubscribed() {
    launch_shared(
        8,
        &[
            "--counts",
            "0,1,7,1000",
            "--big-f32",
            "300007",
            "--mixed",
            "20",
        ],
        "shared n=8",
    );
}

#[test]
fn results_are_bitwise_equal_across_ranks_and_runs() {
    let hashes = |out: &str| -> Vec<String> {
        out.lines()
            .filter_map(|l| l.split("determinism hash ").nth(1))
            .map(|h| h.trim().to_string())
            .collect()
    };
    let a = hashes(&launch_shared(
        3,
        &["--determinism", "1000003"],
        "determinism 1",
    ));
    let b = hashes(&launch_shared(
        3,
        &["--determinism", "1000003"],
        "determinism 2",
    ));
    assert_eq!(a.len(), 3);
    assert!(a.iter().all(|h| *h == a[0]), "{a:?}");
    assert_eq!(a, b);
}

/// Three ranks with `--shared` and a fault on rank 1.
fn faulty(fault: &str, timeout: &str, deadline: u64) -> Vec<Outcome> {
    collect(spawn_faulty(fault, timeout), Duration::from_secs(deadline))
}

fn spawn_faulty(fault: &str, timeout: &str) -> Vec<std::process::Child> {
    spawn_ranks(
        3,
        check_bin(),
        &[
            "--shared",
            "--fault",
            fault,
            "--fault-rank",
            "1",
            "--counts",
            "100000",
        ],
        &[("HETCCL_TIMEOUT", timeout)],
        |_| vec![],
    )
}

#[test]
fn a_killed_rank_is_peer_lost_everywhere() {
    let outs = faulty("exit", "30", 25);
    assert_eq!(outs[1].code, Some(17));
    for r in [0, 2] {
        let o = &outs[r];
        assert!(!o.hung, "rank {r} hung:\n{}", o.output);
        assert_eq!(o.code, Some(1), "rank {r}:\n{}", o.output);
        assert!(
            o.output
                .contains(&format!("rank {r}: peer 1 is gone during all_reduce #3")),
            "rank {r}:\n{}",
            o.output
        );
        // Noticed by the liveness check, well before the 30 s timeout.
        assert!(
            o.elapsed < Duration::from_secs(20),
            "rank {r}: {:?}",
            o.elapsed
        );
    }
    assert!(
        outs.iter()
            .any(|o| o.output.contains("peer 1 (pid") && o.output.contains("process has exited")),
        "{:?}",
        outs.iter().map(|o| &o.output).collect::<Vec<_>>()
    );
}

/// Kills and reaps the child when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_stopped_rank_times_out_naming_the_peer() {
    let mut children = spawn_faulty("stop", "3");
    // Waited for apart: it stays stopped until the others are done, then is killed.
    let stopped = KillOnDrop(children.remove(1));
    let outs = collect(children, Duration::from_secs(20));
    let state =
        std::fs::read_to_string(format!("/proc/{}/stat", stopped.0.id())).unwrap_or_default();
    assert!(
        state
            .rsplit_once(')')
            .is_some_and(|(_, s)| s.starts_with(" T")),
        "rank 1 stopped all along: {state}"
    );
    drop(stopped);
    for (o, r) in outs.iter().zip([0, 2]) {
        assert!(!o.hung, "rank {r} hung:\n{}", o.output);
        assert_eq!(o.code, Some(1), "rank {r}:\n{}", o.output);
        assert!(
            o.elapsed < Duration::from_secs(15),
            "rank {r}: {:?}",
            o.elapsed
        );
    }
    // Every rank waits on every other here: a survivor that times out waits on the
    // stopped rank itself and sees that its process is stopped.
    let all: String = outs.iter().map(|o| o.output.clone()).collect();
    assert!(
        all.contains("all_reduce #3 timed out after")
            && all.contains("waiting for peer 1 to start the collective; its process (pid ")
            && all.contains(") is stopped (SIGSTOP or job control)"),
        "{all}"
    );
}

#[test]
fn a_private_buffer_among_shared_ones_is_a_mismatch() {
    let outs = faulty("private", "10", 30);
    for (r, o) in outs.iter().enumerate() {
        assert!(!o.hung, "rank {r} hung:\n{}", o.output);
        assert_eq!(o.code, Some(1), "rank {r}:\n{}", o.output);
    }
    assert!(
        outs[0].output.contains(
            "rank 0: all_reduce #3 does not match what peer 1 sent: rank 0 runs it on shared \
             buffers, peer 1 over links"
        ),
        "{}",
        outs[0].output
    );
}

#[test]
fn a_different_count_is_a_mismatch() {
    let outs = faulty("count", "10", 30);
    for (r, o) in outs.iter().enumerate() {
        assert!(!o.hung, "rank {r} hung:\n{}", o.output);
        assert_eq!(o.code, Some(1), "rank {r}:\n{}", o.output);
    }
    assert!(
        outs[0].output.contains(
            "expected all_reduce #3 of 100000 x f32 (sum op), peer runs all_reduce #3 of 99999 x f32"
        ),
        "{}",
        outs[0].output
    );
}
