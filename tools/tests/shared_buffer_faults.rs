//! Failure paths of collectives on buffers from `Communicator::alloc_shared`, across real
//! processes: `hetccl-check --shared --fault ...` on three ranks, rank 1 misbehaving after
//! one good all-reduce (it exits, stops, or calls a different collective); every rank must
//! end in a specific error, never a hang. (The checks themselves are the library's tests,
//! `tests/shared_buffers.rs`.)

mod common;

use common::*;
use std::time::Duration;

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
    // Rank 0 or rank 2 reads rank 1's header first and names the mismatch; the other
    // may hear of rank 1 giving up before it reads that header, which of the two is the
    // scheduler's doing.
    let all: String = outs.iter().map(|o| o.output.clone()).collect();
    assert!(
        [0, 2].iter().any(|r| all.contains(&format!(
            "rank {r}: all_reduce #3 does not match what peer 1 sent: rank {r} runs it on \
             shared buffers, peer 1 runs all_reduce #3 of 100000 x f32 (sum op) over links"
        ))),
        "{all}"
    );
}

#[test]
fn a_different_count_is_a_mismatch() {
    let outs = faulty("count", "10", 30);
    for (r, o) in outs.iter().enumerate() {
        assert!(!o.hung, "rank {r} hung:\n{}", o.output);
        assert_eq!(o.code, Some(1), "rank {r}:\n{}", o.output);
    }
    // Named by whichever of ranks 0 and 2 reads rank 1's header first (above).
    let all: String = outs.iter().map(|o| o.output.clone()).collect();
    assert!(
        all.contains(
            "expected all_reduce #3 of 100000 x f32 (sum op), peer runs all_reduce #3 of 99999 x f32"
        ),
        "{all}"
    );
}
