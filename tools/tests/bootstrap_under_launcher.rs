//! Bootstrap across real processes started by `hetccl run`: the env:// TCP store with the
//! launcher's job id, and the file:// rendezvous. The parent tests start this same test
//! binary as every rank, running only the ignored `rank_main`. (Bootstrap across
//! processes started without the launcher is tested with the library, in
//! `tests/bootstrap_processes.rs`.)

use std::process::Command;

use hetccl::bootstrap::from_config;
use hetccl::Config;

const HETCCL: &str = env!("CARGO_BIN_EXE_hetccl");

/// One rank: gathers `rank<k>x<k+1 bytes>` from everyone, twice, and prints what it got.
#[test]
#[ignore = "a rank of the launcher tests below; needs the variables hetccl run sets"]
fn rank_main() {
    let cfg = Config::from_env().unwrap();
    let (mut b, auth) = from_config(&cfg).unwrap();
    let (rank, n) = (b.rank(), b.world_size());
    for round in 0..2 {
        let mine = format!("r{round}k{rank}").into_bytes();
        let got = b.all_gather(&mine).unwrap();
        let want: Vec<Vec<u8>> = (0..n)
            .map(|k| format!("r{round}k{k}").into_bytes())
            .collect();
        assert_eq!(got, want);
    }
    b.barrier().unwrap();
    println!("all_gather ok: rank {rank} of {n}, job {}", auth.job_id());
}

fn run_ranks(n: usize, env: &[(&str, &str)]) -> Vec<String> {
    let me = std::env::current_exe().unwrap();
    let mut cmd = Command::new(HETCCL);
    cmd.args(["run", "-n", &n.to_string(), "--"])
        .arg(me)
        .args([
            "--ignored",
            "--exact",
            "rank_main",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env("HETCCL_CONNECT_TIMEOUT", "60");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "hetccl run failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ok: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.split_once("all_gather ok: ").map(|(_, r)| r.to_string()))
        .collect();
    ok.sort();
    ok
}

#[test]
fn env_store_across_four_processes() {
    let got = run_ranks(4, &[]);
    assert_eq!(got.len(), 4, "{got:?}");
    // The launcher's job id reached every rank.
    let job = got[0].rsplit(' ').next().unwrap().to_string();
    assert!(job.starts_with("run-"), "{job}");
    let want: Vec<String> = (0..4)
        .map(|k| format!("rank {k} of 4, job {job}"))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn file_rendezvous_across_three_processes() {
    let dir = std::env::temp_dir().join(format!("hetccl-it-file-{}", std::process::id()));
    let init = format!("file://{}", dir.display());
    let got = run_ranks(3, &[("HETCCL_INIT", &init)]);
    assert_eq!(got.len(), 3, "{got:?}");
    let job = got[0].rsplit(' ').next().unwrap().to_string();
    let want: Vec<String> = (0..3)
        .map(|k| format!("rank {k} of 3, job {job}"))
        .collect();
    assert_eq!(got, want);
    // The last rank out removed the job's directory; only the root is left.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
