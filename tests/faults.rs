//! Failure paths: every one must end in a specific error on every rank, never a hang
//! or wrong data.

mod common;

use common::*;
use std::io::Write;
use std::time::Duration;

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

#[test]
fn a_stopped_rank_times_out_naming_the_peer() {
    // Two ranks, so the survivor's wait is on the stopped rank itself.
    let children = spawn_ranks(
        2,
        check_bin(),
        &["--fault", "stop", "--fault-rank", "1"],
        &[("HETCCL_TIMEOUT", "3")],
        |_| vec![],
    );
    let outs = collect(children, Duration::from_secs(20));
    // Rank 1 is stopped: the deadline kills it. Rank 0 must have ended on its own.
    assert!(outs[1].hung);
    no_rank_hung(&outs, Some(1));
    let o = &outs[0];
    assert_eq!(o.code, Some(1), "{}", o.output);
    assert!(
        o.output.contains("rank 0: all_reduce #1 timed out after"),
        "{}",
        o.output
    );
    // The fault's all-reduce is small and both ranks share a host: the survivor
    // waits in the eager slots for the stopped rank to arrive.
    assert!(
        o.output
            .contains("waiting for peer 1 to start the collective"),
        "{}",
        o.output
    );
    assert!(o.elapsed < Duration::from_secs(10), "{:?}", o.elapsed);
}

#[test]
fn a_stopped_rank_in_a_ring_ends_every_other_rank() {
    let children = spawn_ranks(
        3,
        check_bin(),
        &["--fault", "stop", "--fault-rank", "1"],
        &[("HETCCL_TIMEOUT", "3")],
        |_| vec![],
    );
    let outs = collect(children, Duration::from_secs(20));
    assert!(outs[1].hung);
    no_rank_hung(&outs, Some(1));
    for r in [0, 2] {
        let o = &outs[r];
        assert_eq!(o.code, Some(1), "rank {r}:\n{}", o.output);
        assert!(
            o.output.contains("all_reduce #1"),
            "rank {r}:\n{}",
            o.output
        );
    }
    // The first survivor to give up names whom it waited for; the other learns of it
    // through the aborted link rather than waiting out its own timeout.
    let all: String = outs.iter().map(|o| o.output.clone()).collect();
    assert!(
        all.contains("timed out after") && all.contains("waiting for peer"),
        "{all}"
    );
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
