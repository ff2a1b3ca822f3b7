//! Collectives on buffers from `Communicator::alloc_shared` across real processes: the
//! direct shared-memory algorithms for every collective, reduction and element type
//! (checked against closed forms by the test kit's checks with `--shared`, run by this
//! test executable as every rank), and that no run leaves anything in /dev/shm. Their
//! failure paths, driven by `hetccl-check --fault`, are tested with the tools
//! (`tools/tests/shared_buffer_faults.rs`).

use hetccl_testkit::check;
use std::time::Duration;

/// One rank of the tests below (they start it with the checks' arguments).
#[test]
#[ignore = "a rank of the tests below; they start it"]
fn check_rank() {
    check::rank_main();
}

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

/// The job id the checks print with `--shared`.
fn job_of(out: &str) -> String {
    let line = out
        .lines()
        .find_map(|l| l.split("shared buffers, job ").nth(1))
        .unwrap_or_else(|| panic!("no job id in:\n{out}"));
    line.trim().to_string()
}

/// `n` ranks of the checks `--shared ARGS`; asserts every rank passed and that nothing of
/// the job is left in /dev/shm.
fn launch_shared(n: usize, args: &[&str], what: &str) -> String {
    launch_shared_env(n, args, &[], what)
}

fn launch_shared_env(n: usize, args: &[&str], env: &[(&str, &str)], what: &str) -> String {
    let args: Vec<&str> = std::iter::once("--shared")
        .chain(args.iter().copied())
        .collect();
    let out = check::launch(n, &args, env, Duration::from_secs(400), what);
    let job = job_of(&out);
    // The job id the test kit gives its ranks.
    assert!(job.starts_with("test-"), "{job}");
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
