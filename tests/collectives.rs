//! Every collective, reduction and element type across real processes, checked
//! against closed forms by the test kit's checks (`hetccl_testkit::check`, those of
//! `hetccl-check`), run by this test executable as every rank.
//!
//! A short soak runs here too: random collectives, types, reductions, sizes and
//! algorithms on 4 ranks, bitwise checked, with resident memory and open descriptors
//! flat (see `hetccl-check --soak`). The long form, for a release or after changing
//! anything that allocates or opens descriptors (a few minutes on two cores):
//!
//! ```text
//! target/release/hetccl run -n 4 -- target/release/hetccl-check --soak 200000 --seed 7
//! ```

mod common;

use common::*;
use hetccl_testkit::check;
use std::time::Duration;

/// One rank of the tests below (they start it with the checks' arguments).
#[test]
#[ignore = "a rank of the tests below; they start it"]
fn check_rank() {
    check::rank_main();
}

/// `n` ranks of the checks `args` with `env`; asserts success.
fn launch(n: usize, args: &[&str], env: &[(&str, &str)], what: &str) -> String {
    check::launch(n, args, env, Duration::from_secs(300), what)
}

#[test]
fn world_sizes_1_to_8_over_shared_memory() {
    for n in 1..=8 {
        launch(
            n,
            &["--counts", "0,1,7,1000", "--mixed", "20"],
            &[],
            &format!("shm n={n}"),
        );
    }
}

#[test]
fn world_sizes_2_to_4_over_tcp() {
    for n in 2..=4 {
        launch(
            n,
            &["--counts", "0,1,7,1000", "--mixed", "20"],
            &[("HETCCL_SHM_DISABLE", "1")],
            &format!("tcp n={n}"),
        );
    }
}

#[test]
fn split_communicators_over_shared_memory_and_tcp() {
    // Two ranks: a child of one rank each, and rank 0 out of the second split.
    for n in [2, 5] {
        let out = launch(n, &["--split"], &[], &format!("split shm n={n}"));
        // Per rank: 3 checks in each of three new communicators (rank 0 is in two, and
        // counts 1 for the split it is left out of), the parent twice.
        let per_rank = |r: usize| if r == 0 { 3 + 1 + 3 + 2 } else { 3 + 3 + 3 + 2 };
        for r in 0..n {
            assert!(
                out.contains(&format!("rank {r}/{n}: {} checks passed", per_rank(r))),
                "rank {r}:\n{out}"
            );
        }
    }
    launch(
        3,
        &["--split"],
        &[("HETCCL_SHM_DISABLE", "1")],
        "split tcp n=3",
    );
}

#[test]
fn large_count_every_op_and_dtype() {
    let big = ((1 << 20) + 3).to_string();
    launch(2, &["--counts", &big], &[], "shm n=2 2^20+3");
    // Three sockets per peer: large chunks striped across them.
    launch(
        3,
        &["--counts", &big],
        &[("HETCCL_SHM_DISABLE", "1"), ("HETCCL_NSOCKS_PERPEER", "3")],
        "tcp n=3 2^20+3, 3 sockets per peer",
    );
}

#[test]
fn each_algorithm_forced() {
    for algo in ["ring", "tree", "doubling", "halving"] {
        for n in [3, 5] {
            launch(
                n,
                &["--counts", "0,1,7,1000", "--big-f32", "300007"],
                &[("HETCCL_ALGO", algo)],
                &format!("{algo} n={n}"),
            );
        }
    }
}

#[test]
fn long_mixed_sequence_with_overlapping_async_handles() {
    launch(
        4,
        &["--counts", "1", "--mixed", "300", "--seed", "7"],
        &[],
        "mixed n=4",
    );
}

#[test]
fn hierarchical_on_simulated_nodes() {
    // Ranks grouped into pretend nodes by HETCCL_NODE_ID: shm inside, TCP across.
    for sizes in [&[2usize, 2][..], &[3, 2, 1], &[1, 3]] {
        let n: usize = sizes.iter().sum();
        let node_of: Vec<usize> = sizes
            .iter()
            .enumerate()
            .flat_map(|(k, &g)| std::iter::repeat_n(k, g))
            .collect();
        let children = check::spawn(
            n,
            &["--counts", "0,1,7,1000", "--big-f32", "100003"],
            &[("HETCCL_ALGO", "hier"), ("HETCCL_TIMEOUT", "60")],
            |r| vec![("HETCCL_NODE_ID".into(), format!("node{}", node_of[r]))],
        );
        let outs = collect(children, Duration::from_secs(300));
        assert_all_ok(&outs, &format!("hier {sizes:?}"));
    }
}

#[test]
fn results_are_bitwise_deterministic_across_ranks_and_runs() {
    let mut hashes = Vec::new();
    for algo in ["ring", "tree"] {
        for _run in 0..2 {
            let out = launch(
                4,
                &["--determinism", "100003", "--seed", "3"],
                &[("HETCCL_ALGO", algo)],
                "determinism",
            );
            let hs: Vec<&str> = out
                .lines()
                .filter_map(|l| l.split("determinism hash ").nth(1))
                .collect();
            assert_eq!(hs.len(), 4, "{out}");
            assert!(hs.iter().all(|h| *h == hs[0]), "ranks disagree: {hs:?}");
            hashes.push((algo, hs[0].to_string()));
        }
    }
    assert_eq!(hashes[0].1, hashes[1].1, "ring differs between runs");
    assert_eq!(hashes[2].1, hashes[3].1, "tree differs between runs");
}

fn hashes(out: &str, tag: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.split(tag).nth(1).map(str::to_string))
        .collect()
}

#[test]
fn compressed_all_reduce_over_shm_tcp_and_nodes_every_algorithm() {
    for (algo, shm_disable) in [("ring", "0"), ("tree", "0"), ("ring", "1"), ("tree", "1")] {
        let out = launch(
            3,
            &["--compressed", "20011"],
            &[("HETCCL_ALGO", algo), ("HETCCL_SHM_DISABLE", shm_disable)],
            &format!("compressed {algo} shm_disable={shm_disable}"),
        );
        let hs = hashes(&out, "compressed hash ");
        assert_eq!(hs.len(), 3, "{out}");
        assert!(hs.iter().all(|h| *h == hs[0]), "ranks disagree: {hs:?}");
    }
    // Two pretend nodes of two ranks: `inter` compresses only between them. Forced
    // doubling runs as the tree when compressed (see `Communicator::schedule`).
    for (algo, count) in [
        ("ring", "20011"),
        ("tree", "20011"),
        ("hier", "20011"),
        ("halving", "20011"),
        ("doubling", "1000"),
        ("auto", "1000"),
    ] {
        let children = check::spawn(
            4,
            &["--compressed", count],
            &[("HETCCL_ALGO", algo), ("HETCCL_TIMEOUT", "60")],
            |r| vec![("HETCCL_NODE_ID".into(), format!("node{}", r / 2))],
        );
        let outs = collect(children, Duration::from_secs(120));
        assert_all_ok(&outs, &format!("compressed nodes {algo}"));
        let hs: Vec<String> = outs
            .iter()
            .flat_map(|o| hashes(&o.output, "compressed hash "))
            .collect();
        assert_eq!(hs.len(), 4);
        assert!(
            hs.iter().all(|h| *h == hs[0]),
            "{algo}: ranks disagree: {hs:?}"
        );
    }
}

/// What soak rank `r` printed: resident KiB after the warm-up and at the end, and open
/// descriptors after the warm-up and at the end.
fn soak_figures(out: &str, r: usize) -> (u64, u64, u64, u64) {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("rank {r}/4: soak of ")))
        .unwrap_or_else(|| panic!("rank {r} printed no soak figures:\n{out}"));
    let pair = |tag: &str| -> (u64, u64) {
        let rest = &line[line.find(tag).unwrap() + tag.len()..];
        let mut nums = rest
            .split(|c: char| !c.is_ascii_digit())
            .filter(|w| !w.is_empty())
            .map(|w| w.parse::<u64>().unwrap());
        (nums.next().unwrap(), nums.next().unwrap())
    };
    let (rss0, rss1) = pair("resident memory ");
    let (fd0, fd1) = pair("open descriptors ");
    (rss0, rss1, fd0, fd1)
}

/// Four ranks, `steps` soak steps with `env`; asserts every rank passed its checks and
/// stayed flat: no more descriptors than after the warm-up, at most 8 MiB more memory.
fn short_soak(steps: usize, seed: u64, env: &[(&str, &str)], what: &str) {
    let steps_s = steps.to_string();
    let seed_s = seed.to_string();
    let mut all_env = vec![("HETCCL_TIMEOUT", "60")];
    all_env.extend_from_slice(env);
    let children = check::spawn(
        4,
        &["--soak", &steps_s, "--seed", &seed_s],
        &all_env,
        |_| vec![],
    );
    let outs = collect(children, Duration::from_secs(120));
    assert_all_ok(&outs, what);
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.output
                .contains(&format!("rank {r}/4: soak of {steps} steps in ")),
            "{what}: rank {r}:\n{}",
            o.output
        );
        let (rss0, rss1, fd0, fd1) = soak_figures(&o.output, r);
        assert!(fd1 <= fd0, "{what}: rank {r} descriptors {fd0} -> {fd1}");
        assert!(
            rss1 <= rss0 + 8192,
            "{what}: rank {r} resident memory {rss0} -> {rss1} KiB"
        );
    }
}

#[test]
fn a_short_soak_of_random_collectives_keeps_memory_and_descriptors_flat() {
    short_soak(3000, 7, &[], "soak over shm");
    short_soak(800, 8, &[("HETCCL_SHM_DISABLE", "1")], "soak over tcp");
}
