//! `hetccl trace merge`: every event of every rank kept, each rank moved onto rank 0's
//! clock by the offset its file records; on a real traced job, the ranks' spans of one
//! all-reduce overlap once merged.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

const PERF: &str = env!("CARGO_BIN_EXE_hetccl-perf");

fn scratch(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hetccl-merge-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn merge(out: &std::path::Path, files: &[std::path::PathBuf]) -> String {
    let o = Command::new(common::launcher())
        .args(["trace", "merge"])
        .arg(out)
        .args(files)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    text
}

#[test]
fn merge_moves_each_rank_by_its_offset_and_keeps_every_event() {
    let dir = scratch("synthetic");
    let r0 = dir.join("t-0.json");
    let r1 = dir.join("t-1.json");
    std::fs::write(
        &r0,
        r#"[
{"ph":"M","name":"process_name","pid":0,"args":{"name":"rank 0"}}
,{"ph":"M","name":"hetccl_clock","pid":0,"args":{"rank":0,"world_size":2,"offset_us":0.0,"error_us":0.0}}
,{"ph":"X","name":"all_reduce","cat":"collective","ts":100.0,"dur":50.0,"pid":0,"tid":1}
]
"#,
    )
    .unwrap();
    // Rank 1's clock reads 40 us less than rank 0's; its file was cut mid-event.
    std::fs::write(
        &r1,
        r#"[
{"ph":"M","name":"process_name","pid":1,"args":{"name":"rank 1"}}
,{"ph":"M","name":"hetccl_clock","pid":1,"args":{"rank":1,"world_size":2,"offset_us":40.0,"error_us":3.5}}
,{"ph":"X","name":"all_reduce","cat":"collective","ts":70.0,"dur":60.0,"pid":1,"tid":1}
,{"ph":"X","name":"forw"#,
    )
    .unwrap();
    let out = dir.join("merged.json");
    let said = merge(&out, &[r0.clone(), r1.clone()]);
    assert!(
        said.contains(
            "t-1.json: 3 events, moved by 40.0 us (clock offset to rank 0 within 3.5 us)"
        ),
        "{said}"
    );
    assert!(
        said.ends_with(&format!("6 events written to {}\n", out.display())),
        "{said}"
    );
    let merged: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(merged.len(), 6);
    let ts: Vec<(u64, f64)> = merged
        .iter()
        .filter(|e| e["ph"] == "X")
        .map(|e| (e["pid"].as_u64().unwrap(), e["ts"].as_f64().unwrap()))
        .collect();
    assert_eq!(ts, [(0, 100.0), (1, 110.0)]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_traced_job_merges_with_the_ranks_of_each_all_reduce_overlapping() {
    let dir = scratch("job");
    let pattern = format!("{}/perf-%r.json", dir.display());
    let mut cmd = Command::new(common::launcher());
    cmd.args(["run", "-n", "2", "--", PERF])
        .args(["-b", "1M", "-e", "1M", "-n", "5", "-w", "1"])
        .env("HETCCL_CONNECT_TIMEOUT", "20")
        .env("HETCCL_TIMEOUT", "30")
        .env("HETCCL_TRACE", &pattern)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let outs = common::collect(vec![cmd.spawn().unwrap()], Duration::from_secs(120));
    common::assert_all_ok(&outs, "traced hetccl-perf");
    let files: Vec<_> = (0..2).map(|r| dir.join(format!("perf-{r}.json"))).collect();
    let out = dir.join("merged.json");
    merge(&out, &files);
    let merged: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let counts: usize = files
        .iter()
        .map(|f| {
            serde_json::from_str::<Vec<Value>>(&std::fs::read_to_string(f).unwrap())
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(merged.len(), counts);
    let err: f64 = merged
        .iter()
        .filter(|e| e["name"] == "hetccl_clock")
        .map(|e| e["args"]["error_us"].as_f64().unwrap())
        .sum();
    // Both ranks' spans of a 1 MiB all-reduce: neither can end before the other began
    // (each needs the other's data), once the clocks agree within `err`.
    let spans = |seq: u64, pid: u64| -> (f64, f64) {
        let e = merged
            .iter()
            .find(|e| {
                e["name"] == "all_reduce"
                    && e["pid"] == pid
                    && e["args"]["seq"] == seq
                    && e["args"]["bytes"] == 1 << 20
            })
            .unwrap_or_else(|| panic!("no all_reduce #{seq} of 1 MiB on rank {pid}"));
        let t = e["ts"].as_f64().unwrap();
        (t, t + e["dur"].as_f64().unwrap())
    };
    let mut checked = 0;
    for seq in 0..20 {
        if !merged
            .iter()
            .any(|e| e["args"]["seq"] == seq && e["args"]["bytes"] == 1 << 20)
        {
            continue;
        }
        let (a0, a1) = spans(seq, 0);
        let (b0, b1) = spans(seq, 1);
        assert!(
            a0 <= b1 + err && b0 <= a1 + err,
            "#{seq}: {a0}..{a1} vs {b0}..{b1} (±{err})"
        );
        checked += 1;
    }
    assert!(checked >= 5, "{checked} all-reduces of 1 MiB");
    std::fs::remove_dir_all(&dir).unwrap();
}
