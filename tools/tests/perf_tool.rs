//! `hetccl-perf` under the launcher: the table has one row per size, 15 fields per
//! row (the nccl-tests columns, then the median times), and every checked result is
//! right (#wrong = 0); its ranks stop when the launcher is killed.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

const PERF: &str = env!("CARGO_BIN_EXE_hetccl-perf");

/// Runs `hetccl run -n N -- hetccl-perf ARGS` and returns rank 0's lines without the
/// launcher's "[rank 0] " prefix; fails the test on a non-zero exit or a hang.
fn perf(n: usize, args: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let mut cmd = Command::new(common::launcher());
    cmd.args(["run", "-n", &n.to_string(), "--", PERF])
        .args(args)
        .env("HETCCL_CONNECT_TIMEOUT", "20")
        .env("HETCCL_TIMEOUT", "30")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = common::collect(
        vec![cmd.spawn().expect("start hetccl run")],
        Duration::from_secs(120),
    )
    .pop()
    .expect("one outcome");
    assert!(!out.hung, "hetccl-perf hung:\n{}", out.output);
    assert_eq!(out.code, Some(0), "hetccl-perf failed:\n{}", out.output);
    out.output
        .lines()
        .filter_map(|l| l.strip_prefix("[rank 0] "))
        .map(str::to_string)
        .collect()
}

/// Table rows split on whitespace.
fn rows(lines: &[String]) -> Vec<Vec<String>> {
    lines
        .iter()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

#[test]
fn all_reduce_rows_are_all_right_over_shm() {
    let lines = perf(
        2,
        &[
            "-b", "8", "-e", "64K", "-f", "8", "-c", "1", "-n", "3", "-w", "1",
        ],
        &[],
    );
    let rows = rows(&lines);
    let sizes: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(sizes, ["8", "64", "512", "4096", "32768"], "{lines:#?}");
    for r in &rows {
        assert_eq!(r.len(), 15, "{r:?}");
        // Medians of the per-iteration times, one per mode, positive microseconds.
        for k in [13, 14] {
            let m: f64 = r[k].parse().unwrap_or_else(|_| panic!("median {k}: {r:?}"));
            assert!(m > 0.0, "{r:?}");
        }
        assert_eq!(
            (r[2].as_str(), r[3].as_str(), r[4].as_str()),
            ("f32", "sum", "-1")
        );
        assert_eq!(r[1], (r[0].parse::<usize>().unwrap() / 4).to_string());
        assert_eq!((r[8].as_str(), r[12].as_str()), ("0", "0"), "{r:?}");
    }
    assert!(
        lines.iter().any(|l| l == "# Out of bounds values : 0 OK"),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("links: 1 shm, 0 tcp")),
        "{lines:#?}"
    );
}

#[test]
fn reduce_scatter_bf16_max_over_tcp_on_three_ranks() {
    let lines = perf(
        3,
        &[
            "-g",
            "reduce_scatter",
            "-d",
            "bf16",
            "-o",
            "max",
            "-b",
            "1K",
            "-e",
            "64K",
            "-f",
            "4",
            "-n",
            "2",
            "-w",
            "1",
        ],
        &[("HETCCL_SHM_DISABLE", "1")],
    );
    let rows = rows(&lines);
    // 1 KiB of bf16 over 3 ranks: 512 elements -> 170 per rank, 510 in all
    let sizes: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(sizes, ["1020", "4092", "16380", "65532"], "{lines:#?}");
    for r in &rows {
        // Both forms checked: out of place, and in place in NCCL's layout.
        assert_eq!((r[8].as_str(), r[12].as_str()), ("0", "0"), "{r:?}");
    }
    assert!(
        lines.iter().any(|l| l.contains("links: 0 shm, 2 tcp")),
        "{lines:#?}"
    );
}

#[test]
fn broadcast_from_rank_one_writes_json() {
    let json = std::env::temp_dir().join(format!("hetccl-perf-test-{}.json", std::process::id()));
    let json_s = json.to_str().expect("utf-8 temp path");
    let lines = perf(
        2,
        &[
            "-g",
            "broadcast",
            "-d",
            "i32",
            "-r",
            "1",
            "-b",
            "4K",
            "-e",
            "16K",
            "-f",
            "2",
            "-n",
            "2",
            "-w",
            "1",
            "--json",
            json_s,
        ],
        &[],
    );
    let rows = rows(&lines);
    assert_eq!(rows.len(), 3, "{lines:#?}");
    for r in &rows {
        assert_eq!((r[3].as_str(), r[4].as_str()), ("none", "1"));
        assert_eq!(r[12], "0", "{r:?}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
            .expect("valid json");
    let _ = std::fs::remove_file(&json);
    assert_eq!(v["collective"], "broadcast");
    assert_eq!(v["world_size"], 2);
    let jrows = v["rows"].as_array().expect("rows");
    assert_eq!(jrows.len(), 3);
    assert_eq!(jrows[2]["size"], 16384);
    assert_eq!(jrows[2]["in_place"]["wrong"], 0);
    assert!(jrows[2]["out_of_place"].is_null());
    // The JSON median is the table's last field, unrounded; broadcast has no
    // out-of-place median.
    let m = jrows[2]["in_place"]["median_us"]
        .as_f64()
        .expect("median_us");
    assert_eq!(format!("{m:.2}"), rows[2][14], "{:?}", rows[2]);
    assert_eq!(rows[2][13], "n/a");
}

/// Behind a wrapper (so the launcher's parent-death signal reaches only the wrapper), both
/// ranks end within seconds of the launcher's kill -9, with the error naming it: rank 0
/// writes its stderr to a file, and its table rows to the dead launcher's pipe, which must
/// not panic it; rank 1's stderr is that pipe too.
#[test]
fn ranks_stop_when_the_launcher_is_killed() {
    common::become_subreaper();
    let err0 = std::env::temp_dir().join(format!("hetccl-perf-rank0-{}.err", std::process::id()));
    let script = format!(
        "if [ $RANK = 0 ]; then exec 2>{}; fi; \"$0\" \"$@\" & echo pid $!; wait $!",
        err0.display()
    );
    let (mut launcher, pids) = common::start_wrapped(
        &script,
        PERF,
        &["-b", "8", "-e", "1M", "-f", "2", "-n", "1000000", "-w", "1"],
        &[("HETCCL_TOPO_PROBE", "0")],
    );
    let why = format!(
        "the launcher (hetccl run, pid {}) exited; this rank stops",
        launcher.id()
    );
    for (r, (st, after)) in common::kill_launcher(&mut launcher, &pids)
        .into_iter()
        .enumerate()
    {
        // 1 is hetccl-perf's failure; a panic would be 101.
        assert_eq!(st.code(), Some(1), "rank {r}: {st:?}");
        assert!(
            after < Duration::from_secs(10),
            "rank {r} ended {after:?} after the launcher"
        );
    }
    let text = std::fs::read_to_string(&err0).unwrap();
    let _ = std::fs::remove_file(&err0);
    assert!(!text.contains("panicked at"), "{text}");
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("hetccl-perf: rank 0: ") && last.ends_with(&why),
        "{text}"
    );
}
