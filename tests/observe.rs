//! Counters and the timeline on real processes: four ranks pretending two nodes of two
//! (`HETCCL_NODE_ID`), so the node-mates talk over shared memory and the nodes over
//! TCP, run a hierarchical all-reduce with `HETCCL_TRACE` set.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hetccl::observe::{LinkClass, Phase};
use hetccl::{Communicator, ReduceOp};
use serde_json::Value;

/// Elements of the all-reduce: 1 MiB of f32.
const COUNT: usize = 1 << 18;

/// One rank: two all-reduces of [`COUNT`] f32, then its counters on one line.
#[test]
#[ignore = "a rank of the tests below; they start it"]
fn observe_rank() {
    let comm = Communicator::init_from_env().unwrap();
    let mut v = vec![1.0f32; COUNT];
    for _ in 0..2 {
        let _s = comm.span("step");
        comm.all_reduce(&mut v, ReduceOp::Sum).unwrap();
    }
    assert_eq!(v[7], 16.0);
    let m = comm.metrics();
    println!(
        "COUNTERS calls={} shm_sent={} shm_received={} tcp_sent={} tcp_received={} inter_ns={}",
        m.calls,
        m.sent(LinkClass::Shm),
        m.received(LinkClass::Shm),
        m.sent(LinkClass::Tcp),
        m.received(LinkClass::Tcp),
        m.time_in(Phase::InterAllReduce).as_nanos()
    );
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hetccl-observe-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs 4 ranks as 2 nodes x 2 with the hierarchy forced and `env` on top.
fn run_2x2(env: &[(&str, &str)]) -> Vec<common::Outcome> {
    let argv = common::this_test_argv("observe_rank");
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    let mut all = vec![("HETCCL_ALGO", "hier"), ("HETCCL_TOPO_PROBE", "0")];
    all.extend_from_slice(env);
    let children = common::spawn_ranks(4, &argv[0], &args, &all, |r| {
        vec![("HETCCL_NODE_ID".to_string(), format!("n{}", r / 2))]
    });
    let outs = common::collect(children, Duration::from_secs(120));
    common::assert_all_ok(&outs, "2x2 hierarchical all-reduce");
    outs
}

fn counter(out: &str, name: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.starts_with("COUNTERS "))
        .unwrap_or_else(|| panic!("no counters in:\n{out}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        .parse()
        .unwrap()
}

fn read_trace(p: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", p.display()))
}

#[test]
fn a_hierarchical_all_reduce_counts_bytes_by_link_and_traces_its_phases_in_order() {
    let dir = scratch("hier");
    let pattern = format!("{}/trace-%r.json", dir.display());
    let outs = run_2x2(&[("HETCCL_TRACE", &pattern), ("HETCCL_DEBUG", "info")]);
    let s = (COUNT * 4) as u64;
    for (r, o) in outs.iter().enumerate() {
        let out = &o.output;
        assert_eq!(counter(out, "calls"), 2, "rank {r}");
        // Per call: the shard this rank does not own to its mate and the finished
        // one back (S/2 each way, shared memory); the 2-owner ring over its own
        // shard (S/2 each way, TCP).
        assert_eq!(counter(out, "shm_sent"), 2 * s, "rank {r}");
        assert_eq!(counter(out, "shm_received"), 2 * s, "rank {r}");
        assert_eq!(counter(out, "tcp_sent"), s, "rank {r}");
        assert_eq!(counter(out, "tcp_received"), s, "rank {r}");
        assert!(counter(out, "inter_ns") > 0, "rank {r}");
        // HETCCL_DEBUG=info: the counters are logged when the communicator goes.
        assert!(
            out.contains(&format!(
                "metrics: 2 calls (0 failed, 0 on shared memory: 0 bytes); shm sent {} \
                 received {} bytes; tcp sent {s} received {s} bytes",
                2 * s,
                2 * s
            )),
            "rank {r}:\n{out}"
        );

        let events = read_trace(&dir.join(format!("trace-{r}.json")));
        let clock = events
            .iter()
            .find(|e| e["name"] == "hetccl_clock")
            .unwrap_or_else(|| panic!("rank {r}: no clock"));
        assert_eq!(clock["args"]["rank"], r);
        // Loopback round trips on a loaded machine: well under 50 ms.
        let err = clock["args"]["error_us"].as_f64().unwrap();
        assert!((0.0..50_000.0).contains(&err), "rank {r}: {clock}");
        for seq in 0..2u64 {
            let call = events
                .iter()
                .find(|e| e["cat"] == "collective" && e["args"]["seq"] == seq)
                .unwrap_or_else(|| panic!("rank {r}: no collective #{seq}"));
            assert_eq!(call["name"], "all_reduce");
            assert_eq!(call["pid"], r);
            assert_eq!(call["args"]["bytes"], s);
            assert_eq!(call["args"]["algorithm"], "hier");
            assert_eq!(call["args"]["path"], "links");
            assert_eq!(call["args"]["compression"], "off");
            let (t0, dur) = (call["ts"].as_f64().unwrap(), call["dur"].as_f64().unwrap());
            let phases: Vec<&Value> = events
                .iter()
                .filter(|e| e["cat"] == "phase" && e["args"]["seq"] == seq)
                .collect();
            let names: Vec<&str> = phases.iter().map(|e| e["name"].as_str().unwrap()).collect();
            assert_eq!(
                names,
                [
                    "intra-node reduce-scatter",
                    "inter-node all-reduce",
                    "intra-node all-gather"
                ],
                "rank {r} #{seq}"
            );
            // Each phase inside the call, each after the one before (1 ns of rounding).
            let mut at = t0;
            for p in &phases {
                let (a, d) = (p["ts"].as_f64().unwrap(), p["dur"].as_f64().unwrap());
                assert_eq!(p["tid"], call["tid"], "rank {r}");
                assert!(
                    a >= at - 0.001 && a + d <= t0 + dur + 0.001,
                    "rank {r}: {p} in {call}"
                );
                at = a + d;
            }
        }
        let steps = events.iter().filter(|e| e["name"] == "step").count();
        assert_eq!(steps, 2, "rank {r}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One rank of the start-up probe test: init, one all-reduce of [`COUNT`] f32.
#[test]
#[ignore = "a rank of the test below; it starts it"]
fn probe_rank() {
    let comm = Communicator::init_from_env().unwrap();
    let mut v = vec![1.0f32; COUNT];
    comm.all_reduce(&mut v, ReduceOp::Sum).unwrap();
    assert_eq!(v[COUNT - 1], comm.world_size() as f32);
}

/// Every shared-memory link is probed once at start-up (the probe's outcome is logged
/// at debug: an estimate, or why there is none on a busy machine), unless the host runs
/// more ranks than it has CPUs: there its first rank probes the CPUs once and every
/// link starts from that; TCP links are not probed.
#[test]
fn the_shared_memory_links_probe_the_cores_once_at_start_up_or_the_host_cpus_where_ranks_share_them(
) {
    let argv = common::this_test_argv("probe_rank");
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    let cpus = hetccl::topology::host_cpus();
    // The node of each rank: two ranks on one node; four on one node; 2 x 2 nodes.
    let layouts: [&[usize]; 3] = [&[0, 0], &[0, 0, 0, 0], &[0, 0, 1, 1]];
    for node in layouts {
        let n = node.len();
        let env = [("HETCCL_DEBUG", "debug"), ("HETCCL_TOPO_PROBE", "0")];
        let children = common::spawn_ranks(n, &argv[0], &args, &env, |r| {
            vec![("HETCCL_NODE_ID".to_string(), format!("n{}", node[r]))]
        });
        let outs = common::collect(children, Duration::from_secs(120));
        common::assert_all_ok(&outs, "start-up probe");
        for (r, o) in outs.iter().enumerate() {
            let node_ranks = node.iter().filter(|&&k| k == node[r]).count();
            let want = if node_ranks <= cpus {
                node_ranks - 1
            } else {
                0
            };
            let probes = o
                .output
                .lines()
                .filter(|l| {
                    l.contains("shared-memory link: latency probe rank=")
                        || l.contains("shared-memory link: the latency probe")
                })
                .count();
            assert_eq!(
                probes, want,
                "{n} ranks, rank {r}, {node_ranks} on its node, {cpus} CPUs:\n{}",
                o.output
            );
            // Where the ranks outnumber the CPUs, the node's first rank measures the CPUs
            // instead, and every link of the node starts from its verdict (unless no
            // pair answered: `readings=[]`).
            let shared = node_ranks > cpus;
            let first = node.iter().position(|&k| k == node[r]).unwrap();
            let cpu_probes = o.output.matches("CPU probe: round trips").count();
            assert_eq!(
                cpu_probes,
                usize::from(shared && first == r),
                "rank {r}:\n{}",
                o.output
            );
            let measured = shared && !outs[first].output.contains("readings=[]");
            let started = o.output.matches("from=\"host CPU probe\"").count();
            assert_eq!(
                started,
                if measured { node_ranks - 1 } else { 0 },
                "rank {r}:\n{}",
                o.output
            );
        }
    }
}
