//! A traced training run (`HETCCL_TRACE`): every rank's timeline has the trainer's
//! spans (data, forward, backward per gradient bucket, optimizer) and each bucket's
//! all-reduce, recorded by the communicator on the thread that runs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

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

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "hetccl-trainer-trace-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
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
        let events: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let named = |n: &str| -> Vec<&Value> {
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
        let reduces: Vec<&Value> = named("all_reduce")
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
    let _ = std::fs::remove_dir_all(&dir);
}
