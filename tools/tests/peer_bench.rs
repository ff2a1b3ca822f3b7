//! The MPI side of the comparison scripts: `scripts/mpi_allreduce_bench.c`, built and
//! launched through `scripts/peers.sh` for each peer that is installed (OpenMPI from the
//! system, MPICH and Intel MPI from `scripts/install-peers.sh`), runs every collective on
//! 3 ranks over shared memory and TCP and checks its results, and the benchmark refuses
//! a collective it does not know.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

const COLLECTIVES: [&str; 5] = [
    "all_reduce",
    "reduce_scatter",
    "all_gather",
    "broadcast",
    "reduce",
];

/// `bash -c SCRIPT` in the repository with `scripts/peers.sh` sourced first.
fn with_peers(script: &str) -> std::process::Output {
    let repo = common::repo();
    Command::new("bash")
        .current_dir(&repo)
        .arg("-c")
        .arg(format!(". scripts/peers.sh\n{script}"))
        .output()
        .expect("run bash")
}

/// Builds the benchmark against `peer`'s MPI into a directory of the test `test`'s own
/// (tests run in parallel and each removes its directory), or says why it cannot (not
/// installed).
fn build(peer: &str, test: &str) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!(
        "hetccl-peer-bench-{}-{test}-{peer}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("make the build directory");
    let bin = dir.join("bench");
    let out = with_peers(&format!(
        "peer_check {peer} && peer_build {peer} scripts/mpi_allreduce_bench.c {}",
        bin.display()
    ));
    if out.status.success() {
        Ok(bin)
    } else {
        // Nothing was built: the directory goes with the skip.
        let _ = std::fs::remove_dir_all(&dir);
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The benchmark's `mpi_allreduce` lines for `coll` on 3 ranks over `link`, each as its
/// key=value pairs.
fn run(peer: &str, bin: &Path, link: &str, coll: &str) -> Vec<Vec<(String, String)>> {
    let out = with_peers(&format!(
        "peer_launch {peer} 3 {link} 0 && timeout 300 \"${{peer_cmd[@]}}\" {} -b 4 -e 256K -f 16 -n 2 -w 1 -g {coll}",
        bin.display()
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{peer} {link} {coll}: exit {:?}\n{stdout}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter(|l| l.starts_with("mpi_allreduce "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect()
        })
        .collect()
}

fn get<'a>(line: &'a [(String, String)], key: &str) -> &'a str {
    line.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

fn every_collective_is_right(peer: &str) {
    let bin = match build(peer, "collectives") {
        Ok(b) => b,
        Err(why) => {
            common::skip(&format!(
                "peer {peer} is not installed here: {}",
                why.trim()
            ));
            return;
        }
    };
    for link in ["shm", "tcp"] {
        for coll in COLLECTIVES {
            let lines = run(peer, &bin, link, coll);
            // Sizes 4 B to 256 KiB by 16x; a reduce-scatter or all-gather takes the
            // largest multiple of 3 elements (none at 4 B, so no line).
            let want: &[usize] = if coll == "reduce_scatter" || coll == "all_gather" {
                &[60, 1020, 16380, 262140]
            } else {
                &[4, 64, 1024, 16384, 262144]
            };
            let sizes: Vec<usize> = lines
                .iter()
                .map(|l| get(l, "size").parse().unwrap())
                .collect();
            assert_eq!(sizes, want, "{peer} {link} {coll}: sizes");
            for l in &lines {
                assert_eq!(get(l, "coll"), coll, "{peer} {link}");
                assert_eq!(get(l, "ranks"), "3", "{peer} {link} {coll}");
                assert_eq!(
                    get(l, "wrong"),
                    "0",
                    "{peer} {link} {coll}: wrong elements in {l:?}"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(bin.parent().unwrap());
}

#[test]
fn openmpi_runs_every_collective_right() {
    every_collective_is_right("openmpi");
}

#[test]
fn mpich_runs_every_collective_right() {
    every_collective_is_right("mpich");
}

#[test]
fn intelmpi_runs_every_collective_right() {
    every_collective_is_right("intelmpi");
}

#[test]
fn unknown_collective_and_peer_are_refused_by_name() {
    // The benchmark checks its flags before MPI_Init, so it runs without a launcher.
    let bin = match build("openmpi", "refusals") {
        Ok(b) => b,
        Err(why) => {
            common::skip(&format!(
                "peer openmpi is not installed here: {}",
                why.trim()
            ));
            return;
        }
    };
    let out = Command::new(&bin)
        .args(["-g", "allreduce"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "-g allreduce: need all_reduce, reduce_scatter, all_gather, broadcast or reduce\n"
    );
    let out = with_peers("peer_list openmpi,lam");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "unknown peer 'lam': need openmpi, mpich or intelmpi\n"
    );
    let out = with_peers("peer_list all");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "openmpi mpich intelmpi\n"
    );
    let _ = std::fs::remove_dir_all(bin.parent().unwrap());
}
