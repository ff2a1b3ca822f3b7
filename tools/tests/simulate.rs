//! `hetccl simulate` as a user runs it: the table of every strategy for the example
//! clusters, the PNG, and bad input.

mod common;

use std::process::Command;

fn simulate(args: &[&str]) -> std::process::Output {
    Command::new(common::launcher())
        .arg("simulate")
        .args(args)
        .current_dir(common::repo())
        .output()
        .expect("start hetccl")
}

/// HetSeq's job on its assumed cluster: 1, 2, 4, 8 nodes, five strategies each, and a
/// PNG; the flat ring's 8-node step is the one docs/MODEL.md compares with 3.126 s.
#[test]
fn hetseq_job_prints_every_strategy_and_draws_the_png() {
    let png = std::env::temp_dir().join(format!("hetccl-sim-{}.png", std::process::id()));
    let out = simulate(&[
        "examples/clusters/hetseq-8x4.json",
        "--job",
        "examples/clusters/hetseq-job.json",
        "--png",
        png.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() == 11 && w[0].parse::<usize>().is_ok())
        .collect();
    assert_eq!(rows.len(), 4 * 5, "{text}");
    let nodes: Vec<&str> = rows.iter().step_by(5).map(|w| w[0]).collect();
    assert_eq!(nodes, ["1", "2", "4", "8"]);
    let ring8 = rows
        .iter()
        .find(|w| w[0] == "8" && w[2] == "ring+equal")
        .unwrap();
    let step: f64 = ring8[7].parse().unwrap();
    assert!((step - 3.126).abs() < 0.15, "flat ring, 8 nodes: {step} s");
    let bytes = std::fs::read(&png).expect("the PNG");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let _ = std::fs::remove_file(&png);
}

#[test]
fn a_missing_model_and_an_unknown_option_are_refused() {
    let out = simulate(&["examples/clusters/hetseq-8x4.json"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "hetccl simulate: give the model: --model NAME or --params P"
    );
    let out = simulate(&["examples/clusters/hetseq-8x4.json", "--nodes", "3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("hetccl simulate: unknown option --nodes")
    );
    let out = simulate(&["no-such.json", "--model", "bert-base"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .starts_with("hetccl simulate: reading cluster file no-such.json: "));
}
