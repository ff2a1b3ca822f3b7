//! Two processes linked by hetccl's communicator (started by `hetccl run`) make the same
//! updates as one process with the whole batch; traced (`HETCCL_TRACE`), every rank's
//! timeline has the trainer's spans (data, forward, backward per gradient bucket,
//! optimizer) and each bucket's all-reduce, recorded by the communicator on the thread
//! that runs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use hetccl_testkit::Scratch;

/// The `hetccl run` launcher, a binary of the tools' package.
fn launcher() -> PathBuf {
    hetccl_testkit::ranks::workspace_bin("hetccl")
}

/// The repository, where `configs/` and `data/` are (this package is `trainer/` in it).
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("trainer/ sits in the repository")
}

fn scratch(name: &str) -> Scratch {
    Scratch::new(&format!("trainer-dist-{name}"))
}

/// Train losses per step from a metrics file.
fn losses(path: &Path) -> Vec<f64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

fn args(dir: &Path, tag: &str) -> Vec<String> {
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
        "6",
        "--steps",
        "3",
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
        dir.join(format!("{tag}.jsonl")).display().to_string(),
        "--plot-out".into(),
        dir.join(format!("{tag}.png")).display().to_string(),
    ])
    .collect()
}

#[test]
fn two_processes_match_one() {
    let dir = scratch("match");
    let bert = env!("CARGO_BIN_EXE_hetccl-bert");
    let one = Command::new(bert).args(args(&dir, "one")).output().unwrap();
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    let two = Command::new(launcher())
        .args(["run", "-n", "2", "--", bert])
        .args(args(&dir, "two"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&two.stdout);
    assert!(
        two.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&two.stderr)
    );
    assert!(
        out.contains("2 ranks, global batch 6 x 24 tokens, micro-batches [3, 3]"),
        "{out}"
    );
    let (a, b) = (
        losses(&dir.join("one.jsonl")),
        losses(&dir.join("two.jsonl")),
    );
    assert_eq!((a.len(), b.len()), (3, 3));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5 * x, "{a:?} vs {b:?}");
    }
}

/// `args` with a checkpoint instead of none, and fp16 compression on every link.
fn compressed_args(dir: &Path, tag: &str, steps: &str, ckpt: &str) -> Vec<String> {
    let mut a: Vec<String> = args(dir, tag)
        .into_iter()
        .filter(|s| s != "--no-checkpoint")
        .collect();
    let at = a.iter().position(|s| s == "--steps").unwrap();
    a[at + 1] = steps.into();
    a.extend(
        [
            "--compress",
            "all",
            "--checkpoint",
            &dir.join(ckpt).display().to_string(),
        ]
        .map(String::from),
    );
    a
}

fn run_two(extra: &[String]) -> String {
    let out = Command::new(launcher())
        .args(["run", "-n", "2", "--", env!("CARGO_BIN_EXE_hetccl-bert")])
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

#[test]
fn compressed_run_resumes_bit_for_bit_with_its_residuals() {
    use hetccl_trainer::checkpoint;
    let dir = scratch("compressed-resume");
    // Six steps straight through, and three + three with a restart in between.
    run_two(&compressed_args(&dir, "full", "6", "full.ckpt"));
    let mut part = compressed_args(&dir, "part", "6", "part.ckpt");
    part.extend(["--stop-after".into(), "3".into()]);
    run_two(&part);
    for r in 0..2 {
        assert!(checkpoint::rank_state_path(&dir.join("part.ckpt"), r).exists());
    }
    let mut resumed = compressed_args(&dir, "resumed", "6", "resumed.ckpt");
    resumed.extend([
        "--resume".into(),
        dir.join("part.ckpt").display().to_string(),
    ]);
    run_two(&resumed);
    let full = checkpoint::load(&dir.join("full.ckpt")).unwrap();
    let again = checkpoint::load(&dir.join("resumed.ckpt")).unwrap();
    assert_eq!(full.meta.step, 6);
    assert!(
        full.params
            .iter()
            .zip(&again.params)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "resumed parameters differ from the uninterrupted run"
    );
    // Without the residuals the continuation is a different one, and says why.
    for r in 0..2 {
        std::fs::remove_file(checkpoint::rank_state_path(&dir.join("part.ckpt"), r)).unwrap();
    }
    let mut lost = compressed_args(&dir, "lost", "6", "lost.ckpt");
    lost.extend([
        "--resume".into(),
        dir.join("part.ckpt").display().to_string(),
    ]);
    let text = run_two(&lost);
    assert!(
        text.contains("error-feedback residuals start from zero"),
        "{text}"
    );
    let other = checkpoint::load(&dir.join("lost.ckpt")).unwrap();
    assert_ne!(full.params, other.params);
}

#[test]
fn a_traced_run_shows_the_spans_of_each_step_and_the_bucket_all_reduces() {
    let dir = scratch("trace");
    let bert = env!("CARGO_BIN_EXE_hetccl-bert");
    let pattern = format!("{}/bert-%r.json", dir.display());
    let two = Command::new(launcher())
        .args(["run", "-n", "2", "--", bert])
        .args(args(&dir, "two"))
        .env("HETCCL_TRACE", &pattern)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&two.stdout);
    assert!(
        two.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&two.stderr)
    );
    for r in 0..2 {
        let path = dir.join(format!("bert-{r}.json"));
        let events: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let named = |n: &str| -> Vec<&serde_json::Value> {
            events
                .iter()
                .filter(|e| e["ph"] == "X" && e["name"] == n)
                .collect()
        };
        // 3 steps of one micro-batch each.
        for n in ["data", "forward", "optimizer"] {
            assert_eq!(named(n).len(), 3, "rank {r}: {n}");
        }
        let backward = named("backward");
        let buckets = backward.iter().filter(|e| e["args"]["step"] == 0).count();
        assert!(buckets >= 2, "rank {r}: {buckets} backward spans in step 0");
        assert_eq!(backward.len(), 3 * buckets, "rank {r}");
        for (i, b) in backward.iter().take(buckets).enumerate() {
            assert_eq!(b["args"]["bucket"], i, "rank {r}");
        }
        // Each bucket's all-reduce (and one of the loss counters per step), on the
        // progress thread, not the one running backward.
        let reduces: Vec<&serde_json::Value> = named("all_reduce")
            .into_iter()
            .filter(|e| e["args"]["dtype"] == "f32")
            .collect();
        assert!(
            reduces.len() >= 3 * (buckets - 1),
            "rank {r}: {} all-reduces",
            reduces.len()
        );
        assert!(
            reduces.iter().any(|e| e["tid"] != backward[0]["tid"]),
            "rank {r}: no all-reduce off the backward thread"
        );
    }
}

/// The bucket all-reduces of a step overlap its backward: on every rank, some step has
/// an f32 all-reduce (a gradient bucket's; the loss counters are f64), on another thread
/// than backward, that starts after that step's first backward span begins and before
/// its backward hands over its last bucket. The step's last backward span is left out:
/// it opens after the last bucket's handover and holds no gradient work, so an
/// all-reduce inside it would be the last bucket's, which overlaps nothing.
#[test]
fn a_traced_run_shows_bucket_all_reduces_overlapping_backward() {
    let dir = scratch("overlap");
    let bert = env!("CARGO_BIN_EXE_hetccl-bert");
    let pattern = format!("{}/bert-%r.json", dir.display());
    let two = Command::new(launcher())
        .args(["run", "-n", "2", "--", bert])
        .args(args(&dir, "two"))
        .env("HETCCL_TRACE", &pattern)
        .output()
        .unwrap();
    assert!(
        two.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&two.stdout),
        String::from_utf8_lossy(&two.stderr)
    );
    for r in 0..2 {
        let path = dir.join(format!("bert-{r}.json"));
        let events: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let spans = |n: &str| -> Vec<&serde_json::Value> {
            events
                .iter()
                .filter(|e| e["ph"] == "X" && e["name"] == n)
                .collect()
        };
        let ts = |e: &serde_json::Value| e["ts"].as_f64().unwrap();
        let end = |e: &serde_json::Value| ts(e) + e["dur"].as_f64().unwrap();
        let backward = spans("backward");
        let buckets: Vec<&serde_json::Value> = spans("all_reduce")
            .into_iter()
            .filter(|e| e["args"]["dtype"] == "f32")
            .collect();
        let mut overlapping = Vec::new();
        for step in 0..3u64 {
            let of_step: Vec<&&serde_json::Value> = backward
                .iter()
                .filter(|e| e["args"]["step"] == step)
                .collect();
            assert!(of_step.len() >= 2, "rank {r} step {step}: {of_step:?}");
            let trailing = of_step
                .iter()
                .map(|e| e["args"]["bucket"].as_u64().unwrap())
                .max()
                .unwrap();
            let first = of_step.iter().map(|e| ts(e)).fold(f64::INFINITY, f64::min);
            let last = of_step
                .iter()
                .filter(|e| e["args"]["bucket"] != trailing)
                .map(|e| end(e))
                .fold(0.0, f64::max);
            overlapping.extend(
                buckets
                    .iter()
                    .filter(|a| ts(a) >= first && ts(a) < last && a["tid"] != of_step[0]["tid"])
                    .map(|a| (step, a["args"]["seq"].clone(), ts(a), last)),
            );
        }
        assert!(
            !overlapping.is_empty(),
            "rank {r}: no bucket all-reduce starts before its step's backward ends; \
             backward {backward:?}, all-reduces {buckets:?}"
        );
    }
}
