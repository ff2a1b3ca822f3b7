//! `mpirun` starting hetccl programs of the default build (no `mpi` feature) on one host,
//! with nothing but mpirun's own environment: rank 0 serves the store on a loopback port
//! of its own and hands the port and a random key to the others through its private key
//! file, named from OpenMPI's job id.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{collect, Outcome};

fn mpirun_present() -> bool {
    Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `mpirun -n n PROGRAM ARGS` with an environment holding only what finds programs
/// (`PATH`, `HOME`): whatever reaches the ranks comes from mpirun.
fn mpirun(n: usize, extra: &[&str], program: &str, args: &[String]) -> Command {
    let mut c = Command::new("mpirun");
    c.env_clear();
    for k in ["PATH", "HOME"] {
        if let Some(v) = std::env::var_os(k) {
            c.env(k, v);
        }
    }
    c.args(["--allow-run-as-root", "-n", &n.to_string()])
        .args(["--mca", "btl_tcp_if_include", "lo"])
        .args(["--mca", "oob_tcp_if_include", "lo"])
        .args(extra)
        .arg(program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn oversubscribe(n: usize) -> &'static [&'static str] {
    if n > 2 {
        &["--oversubscribe"]
    } else {
        &[]
    }
}

fn run(c: &mut Command, what: &str) -> Outcome {
    let out = collect(
        vec![c.spawn().expect("spawn mpirun")],
        Duration::from_secs(120),
    )
    .into_iter()
    .next()
    .unwrap();
    assert!(
        out.code == Some(0) && !out.hung,
        "{what}: mpirun exited {:?} (hung {}):\n{}",
        out.code,
        out.hung,
        out.output
    );
    out
}

fn check_args() -> Vec<String> {
    ["--counts", "0,1,7,1000"].map(String::from).to_vec()
}

#[test]
fn hetccl_check_runs_under_mpirun_with_only_its_environment() {
    if !mpirun_present() {
        common::skip("no working `mpirun` on PATH (apt install openmpi-bin)");
        return;
    }
    for n in [2usize, 4] {
        let what = format!("mpirun -n {n} hetccl-check");
        let out = run(
            &mut mpirun(n, oversubscribe(n), common::check_bin(), &check_args()),
            &what,
        );
        assert_eq!(
            out.output.matches("checks passed").count(),
            n,
            "{what}:\n{}",
            out.output
        );
        for r in 0..n {
            assert!(
                out.output.contains(&format!("rank {r}/{n}: ")),
                "{what}:\n{}",
                out.output
            );
        }
    }
}

fn repo() -> PathBuf {
    common::repo()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hetccl-mpirun-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A very short trainer run: one small layer, two steps, a slice of the corpus.
fn bert_args(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("data/tinyshakespeare.txt")).unwrap();
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, &text[..40_000]).unwrap();
    [
        "--layers",
        "1",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--max-position",
        "32",
        "--seq-len",
        "24",
        "--batch-size",
        "8",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--eval-every",
        "0",
        "--val-samples",
        "8",
        "--threads",
        "1",
        "--no-progress",
        "--no-checkpoint",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--data".into(),
        corpus.display().to_string(),
        "--vocab".into(),
        repo()
            .join("data/bert-base-uncased-vocab.txt")
            .display()
            .to_string(),
        "--metrics-out".into(),
        dir.join("metrics.jsonl").display().to_string(),
        "--plot-out".into(),
        dir.join("loss.png").display().to_string(),
    ])
    .collect()
}

#[test]
fn the_trainer_runs_under_mpirun_with_only_its_environment() {
    if !mpirun_present() {
        common::skip("no working `mpirun` on PATH (apt install openmpi-bin)");
        return;
    }
    for n in [2usize, 4] {
        let dir = scratch(&format!("bert{n}"));
        let what = format!("mpirun -n {n} hetccl-bert");
        let bert = common::workspace_bin("hetccl-bert");
        let out = run(
            &mut mpirun(
                n,
                oversubscribe(n),
                bert.to_str().unwrap(),
                &bert_args(&dir),
            ),
            &what,
        );
        let micro = vec![(8 / n).to_string(); n].join(", ");
        assert!(
            out.output.contains(&format!(
                "{n} ranks, global batch 8 x 24 tokens, micro-batches [{micro}]"
            )),
            "{what}:\n{}",
            out.output
        );
        let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        let steps = metrics
            .lines()
            .filter(|l| l.contains("\"kind\":\"train\""))
            .count();
        assert_eq!(steps, 2, "{what}:\n{metrics}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The store ports the ranks of one job report at `HETCCL_DEBUG=info`.
fn store_ports(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| l.split_once("store serving on 127.0.0.1:"))
        .map(|(_, rest)| rest.split(' ').next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn two_mpirun_jobs_at_once_do_not_collide() {
    if !mpirun_present() {
        common::skip("no working `mpirun` on PATH (apt install openmpi-bin)");
        return;
    }
    let jobs: Vec<_> = (0..2)
        .map(|_| {
            mpirun(
                2,
                &["-x", "HETCCL_DEBUG=info"],
                common::check_bin(),
                &check_args(),
            )
            .spawn()
            .expect("spawn mpirun")
        })
        .collect();
    let outs = collect(jobs, Duration::from_secs(120));
    let mut ports = Vec::new();
    for (j, o) in outs.iter().enumerate() {
        assert!(
            o.code == Some(0) && !o.hung,
            "job {j}: mpirun exited {:?} (hung {}):\n{}",
            o.code,
            o.hung,
            o.output
        );
        assert_eq!(o.output.matches("checks passed").count(), 2, "{}", o.output);
        let p = store_ports(&o.output);
        assert_eq!(p.len(), 1, "job {j}: one store, on loopback:\n{}", o.output);
        ports.push(p[0].clone());
    }
    assert_ne!(
        ports[0], ports[1],
        "both jobs served their store on one port"
    );
}
