//! The `hetccl-bert` binary as people run it: from any directory, with values it must
//! refuse, with outputs it cannot write, and with nobody reading its standard output.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hetccl_testkit::Scratch;

/// The repository, where `configs/` and `data/` are (this package is `trainer/` in it).
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("trainer/ sits in the repository")
}

fn scratch(name: &str) -> Scratch {
    Scratch::new(&format!("bert-cli-{name}"))
}

/// Two steps of a small batch: seconds, whatever the model.
const FAST: &[&str] = &[
    "--steps",
    "2",
    "--warmup-steps",
    "1",
    "--seq-len",
    "16",
    "--batch-size",
    "2",
    "--val-samples",
    "2",
    "--eval-every",
    "0",
    "--threads",
    "1",
    "--no-progress",
];

/// Runs `hetccl-bert args` in `dir`, outputs under `dir`.
fn bert(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hetccl-bert"))
        .current_dir(dir)
        .args(args)
        .args(["--metrics-out", "m.jsonl", "--plot-out", "loss.png"])
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn train_steps(metrics: &Path) -> Vec<u64> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn trains_from_any_directory_with_an_absolute_config_or_none() {
    let dir = scratch("anywhere");
    let config = repo().join("configs/bert-tiny.toml");
    let config = config.to_str().unwrap();
    let mut args = vec!["--config", config, "--checkpoint", "c.ckpt"];
    args.extend(FAST);
    let o = bert(&dir, &args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("step     2/2 | loss"), "{}", text(&o));
    assert_eq!(train_steps(&dir.join("m.jsonl")), [0, 1]);
    assert!(dir.join("c.ckpt").is_file());
    // No config at all: the built-in corpus and vocabulary.
    let mut args = vec!["--no-checkpoint"];
    args.extend(FAST);
    let o = bert(&dir, &args);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(train_steps(&dir.join("m.jsonl")), [0, 1]);
}

#[test]
fn paths_resolve_against_the_config_file_or_the_working_directory() {
    let dir = scratch("paths");
    let conf_dir = dir.join("conf");
    let run_dir = dir.join("elsewhere");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::create_dir_all(&run_dir).unwrap();
    let shakespeare = std::fs::read_to_string(repo().join("data/tinyshakespeare.txt")).unwrap();
    std::fs::write(conf_dir.join("corpus.txt"), &shakespeare[..20_000]).unwrap();
    let conf = conf_dir.join("c.toml");
    let conf_s = conf.to_str().unwrap();
    let mut args = vec!["--config", conf_s, "--no-checkpoint"];
    args.extend(FAST);

    std::fs::write(&conf, "data = \"missing.txt\"\n").unwrap();
    let o = bert(&run_dir, &args);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        format!(
            "hetccl-bert: error: reading corpus {} (from data in {conf_s}, relative to that \
             file): No such file or directory (os error 2)\n",
            conf_dir.join("missing.txt").display()
        )
    );
    std::fs::write(&conf, "data = \"corpus.txt\"\n").unwrap();
    let o = bert(&run_dir, &args);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(train_steps(&run_dir.join("m.jsonl")), [0, 1]);
    // A flag's path is the working directory's, and overrides the file's.
    args.extend(["--data", "corpus.txt"]);
    let o = bert(&run_dir, &args);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        format!(
            "hetccl-bert: error: reading corpus {} (from --data, relative to the working \
             directory): No such file or directory (os error 2)\n",
            run_dir.join("corpus.txt").display()
        )
    );
}

#[test]
fn out_of_range_options_are_refused_before_any_work() {
    let dir = scratch("ranges");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--grad-clip", "-1"],
            "invalid value \"-1\" for grad_clip: accepted values are 0 (no clipping) or a \
             positive finite norm",
        ),
        (
            &["--weight-decay", "-0.5"],
            "invalid value \"-0.5\" for weight_decay: accepted values are 0 to 1 (0: no decay)",
        ),
        (
            &["--lr", "-1e-3"],
            "invalid value \"-0.001\" for lr: accepted values are a positive finite number",
        ),
        (
            &["--slowdown", "inf"],
            "invalid value \"inf\" for slowdown: accepted values are a factor from 1 to 1000",
        ),
        (
            &["--sim-ranks", "0"],
            "invalid value \"0\" for sim_ranks: accepted values are 1..=1024",
        ),
        (
            &["--threads", "0"],
            "invalid value \"0\" for threads: accepted values are 1..=4096",
        ),
        (
            &["--log-every", "0"],
            "invalid value \"0\" for log_every: accepted values are at least 1",
        ),
        (
            &["--slow-ranks", "3", "--slowdown", "2"],
            "invalid value \"3\" for slow_ranks: accepted values are ranks 0..=0",
        ),
    ];
    for (flags, want) in cases {
        let o = bert(&dir, flags);
        assert_eq!(o.status.code(), Some(1), "{flags:?}: {}", text(&o));
        assert_eq!(
            String::from_utf8_lossy(&o.stderr),
            format!("hetccl-bert: error: {want}\n"),
            "{flags:?}"
        );
    }
    // Nothing was started: no checkpoint directory, no metrics.
    assert!(!dir.join("runs").exists() && !dir.join("m.jsonl").exists());
}

#[test]
fn a_model_too_large_for_memory_is_refused_with_what_it_needs() {
    let dir = scratch("huge");
    let t0 = Instant::now();
    let o = bert(&dir, &["--hidden", "1000000", "--no-checkpoint"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        err.starts_with(
            "hetccl-bert: error: invalid argument to train: the model needs at least 364.7 TiB \
             of memory: 25031067030522 parameters × 16 bytes (weights, gradients, AdamW \
             moments) = 364.2 TiB, plus "
        ),
        "{err}"
    );
    assert!(
        err.contains("Lower hidden (1000000), ffn (4000000)"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
}

#[test]
fn an_unwritable_checkpoint_path_is_refused_before_training() {
    let dir = scratch("unwritable");
    std::fs::write(dir.join("plain-file"), "not a directory").unwrap();
    let mut args = vec!["--checkpoint", "plain-file/c.ckpt"];
    args.extend(FAST);
    let o = bert(&dir, &args);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        format!(
            "hetccl-bert: error: checkpoint {}: cannot create its directory: {} is a file\n",
            dir.join("plain-file/c.ckpt").display(),
            dir.join("plain-file").display()
        )
    );
    std::fs::create_dir(dir.join("a-directory")).unwrap();
    let mut args = vec!["--checkpoint", "a-directory"];
    args.extend(FAST);
    let o = bert(&dir, &args);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        format!(
            "hetccl-bert: error: checkpoint {}: is a directory\n",
            dir.join("a-directory").display()
        )
    );
    // Refused before the first step: no metrics were written.
    assert!(!dir.join("m.jsonl").exists());
    assert!(o.stdout.is_empty(), "{}", text(&o));
}

#[test]
fn a_closed_stdout_ends_the_run_with_an_error_not_a_panic() {
    let dir = scratch("closed-stdout");
    // Long enough (hundreds of logged steps) that it is still printing when the reader
    // goes away after the first line, as `hetccl-bert | head -1` does.
    let mut child = Command::new(env!("CARGO_BIN_EXE_hetccl-bert"))
        .current_dir(&dir)
        .args([
            "--layers",
            "1",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--steps",
            "2000",
            "--log-every",
            "1",
            "--threads",
            "1",
            "--no-progress",
            "--no-checkpoint",
            "--metrics-out",
            "m.jsonl",
        ])
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("bert: 1 layers, hidden 32"), "{first}");
    // The reader is dropped here: stdout is closed.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running 120 s after its stdout closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(
        err,
        "hetccl-bert: error: writing progress to standard output: Broken pipe (os error 32)\n"
    );
}
