//! Collectives across a simulated cluster: `scripts/netcluster.sh` puts each node in a
//! network namespace (shared memory inside, TCP over veth pairs between), and the test
//! kit's checks (this test executable as every rank) compare every collective, reduction
//! and element type with closed forms, on node shapes 1x4, 2x2, 2x3, 3+2+1 and 4x1, with the algorithm the cost
//! model picks and with the hierarchy and the flat ring forced.
//!
//! Needs root for `ip netns`; elsewhere every such test records itself as skipped, with
//! the reason (`common::skip`). The topology
//! dump and reload test runs anywhere (nodes pretended with `HETCCL_NODE_ID`).

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hetccl_testkit::check;

/// What `netcluster.sh` exits with where namespaces cannot be made.
const SKIP: i32 = 77;

/// One cluster at a time: two cores do not run several well, and each test's ranks
/// should not time out waiting for another test's.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn script() -> PathBuf {
    [env!("CARGO_MANIFEST_DIR"), "scripts", "netcluster.sh"]
        .iter()
        .collect()
}

/// One rank of the tests below that run collectives (the test kit's checks).
#[test]
#[ignore = "a rank of the tests below; they start it"]
fn check_rank() {
    check::rank_main();
}

/// Namespace prefix unique to this process and test.
fn prefix(tag: &str) -> String {
    format!("hct{}-{tag}", std::process::id())
}

struct Run {
    code: Option<i32>,
    output: String,
}

/// `netcluster.sh run --ranks <ranks> -- <program...>` with `env`, stopped with SIGTERM
/// (so its trap removes the namespaces and the ranks) if it outlives `deadline`.
fn netcluster(
    tag: &str,
    ranks: &str,
    env: &[(&str, &str)],
    program: &[&str],
    deadline: Duration,
) -> Option<Run> {
    let pfx = prefix(tag);
    let mut c = Command::new("bash");
    c.arg(script())
        .args(["run", "--ranks", ranks, "--"])
        .args(program)
        .env("NETCLUSTER_PREFIX", &pfx)
        .env("HETCCL_CONNECT_TIMEOUT", "30")
        .env("HETCCL_TIMEOUT", "60")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().expect("start netcluster.sh");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > deadline {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Whatever happened, leave no namespace behind.
    let _ = Command::new("bash")
        .arg(script())
        .arg("down")
        .env("NETCLUSTER_PREFIX", &pfx)
        .status();
    let output = reader.join().unwrap() + &err_reader.join().unwrap();
    let code = status.and_then(|s| s.code());
    if code == Some(SKIP) {
        common::skip(&format!("no simulated cluster: {}", output.trim()));
        return None;
    }
    Some(Run { code, output })
}

fn leftover_namespaces(tag: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let pfx = prefix(tag);
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(&pfx))
        .map(str::to_string)
        .collect()
}

/// Runs the checks on node shape `ranks` with `HETCCL_ALGO=algo` and checks that
/// every rank passed the same number of checks.
fn check_shape(ranks: &str, algo: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tag = format!("{}-{algo}", ranks.replace(',', ""));
    let (argv, (var, val)) = check::argv(&["--counts", "0,1,7,1000,65537", "--big-f32", "1000003"]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let Some(run) = netcluster(
        &tag,
        ranks,
        &[("HETCCL_ALGO", algo), ("HETCCL_DEBUG", "info"), (var, &val)],
        &argv,
        Duration::from_secs(90),
    ) else {
        return;
    };
    let world: usize = ranks.split(',').map(|n| n.parse::<usize>().unwrap()).sum();
    assert_eq!(
        run.code,
        Some(0),
        "{ranks} {algo}: netcluster run failed:\n{}",
        run.output
    );
    let mut counts = Vec::new();
    for r in 0..world {
        let head = format!("[rank {r}] rank {r}/{world}: ");
        let line = run
            .output
            .lines()
            .find(|l| l.starts_with(&head) && l.contains("checks passed"))
            .unwrap_or_else(|| panic!("{ranks} {algo}: no result from rank {r}:\n{}", run.output));
        counts.push(line[head.len()..].split(' ').next().unwrap().to_string());
    }
    assert!(
        counts.iter().all(|c| *c == counts[0]),
        "{ranks} {algo}: {counts:?}"
    );
    // Nodes are wired as intended: shared memory inside a node, TCP between nodes.
    let sizes: Vec<usize> = ranks.split(',').map(|n| n.parse().unwrap()).collect();
    let first_node = sizes[0];
    for peer in 1..world {
        let kind = if peer < first_node { "shm" } else { "tcp" };
        let found = run.output.lines().any(|l| {
            l.starts_with("[rank 0] ")
                && l.contains(&format!("{kind} link"))
                && l.contains(&format!("peer={peer}"))
        });
        assert!(
            found,
            "{ranks}: no {kind} link from rank 0 to {peer}:\n{}",
            run.output
        );
    }
    assert_eq!(leftover_namespaces(&tag), Vec::<String>::new());
}

#[test]
fn two_nodes_of_two() {
    check_shape("2,2", "auto");
    check_shape("2,2", "hier");
}

#[test]
fn one_node_of_four() {
    check_shape("4", "auto");
}

#[test]
fn two_nodes_of_three() {
    check_shape("3,3", "hier");
    check_shape("3,3", "ring");
}

#[test]
fn three_two_and_one() {
    check_shape("3,2,1", "auto");
    check_shape("3,2,1", "hier");
    check_shape("3,2,1", "ring");
}

#[test]
fn four_nodes_of_one() {
    check_shape("1,1,1,1", "auto");
    check_shape("1,1,1,1", "hier");
}

/// Splits whose new communicators span nodes (by parity, the first member on the last
/// node; every rank but 0; a split of a split): their stores listen on the first
/// member's network address, their keys derive from the job's.
#[test]
fn splits_across_nodes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (argv, (var, val)) = check::argv(&["--split"]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let Some(run) = netcluster(
        "split",
        "2,1,2",
        &[(var, &val)],
        &argv,
        Duration::from_secs(90),
    ) else {
        return;
    };
    assert_eq!(run.code, Some(0), "netcluster run failed:\n{}", run.output);
    for r in 0..5 {
        let want = if r == 0 { 9 } else { 11 };
        let line = format!("[rank {r}] rank {r}/5: {want} checks passed");
        assert!(run.output.contains(&line), "no {line:?}:\n{}", run.output);
    }
    assert_eq!(leftover_namespaces("split"), Vec::<String>::new());
}

#[test]
fn ranks_get_their_node_and_launcher_variables() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(run) = netcluster(
        "env",
        "3,2,1",
        &[],
        &[
            "sh",
            "-c",
            "echo \"$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR \
             $HETCCL_NODE_ID $HETCCL_SOCKET_IFNAME\"",
        ],
        Duration::from_secs(30),
    ) else {
        return;
    };
    assert_eq!(run.code, Some(0), "{}", run.output);
    let mut lines: Vec<&str> = run
        .output
        .lines()
        .filter(|l| l.starts_with("[rank"))
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            "[rank 0] 0 6 0 3 10.231.0.1 node0 hccl0",
            "[rank 1] 1 6 1 3 10.231.0.1 node0 hccl0",
            "[rank 2] 2 6 2 3 10.231.0.1 node0 hccl0",
            "[rank 3] 3 6 0 2 10.231.0.1 node1 hccl1",
            "[rank 4] 4 6 1 2 10.231.0.1 node1 hccl1",
            "[rank 5] 5 6 0 1 10.231.0.1 node2 hccl2",
        ]
    );
    assert_eq!(leftover_namespaces("env"), Vec::<String>::new());
}

#[test]
fn a_failing_rank_fails_the_run_and_stops_the_others() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = std::env::temp_dir().join(format!("hetccl-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        "echo $$ > {}/pid.$RANK; if [ $RANK = 2 ]; then sleep 0.5; exit 3; fi; exec sleep 60",
        dir.display()
    );
    let Some(run) = netcluster(
        "fail",
        "2,2",
        &[],
        &["sh", "-c", &script],
        Duration::from_secs(30),
    ) else {
        return;
    };
    assert_eq!(run.code, Some(3), "{}", run.output);
    assert!(
        run.output
            .contains("netcluster: rank 2 exited with status 3; stopping the others"),
        "{}",
        run.output
    );
    for r in [0, 1, 3] {
        let pid: i32 = std::fs::read_to_string(dir.join(format!("pid.{r}")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: signal 0 only asks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "rank {r} (pid {pid}) still runs");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(leftover_namespaces("fail"), Vec::<String>::new());
}

/// A job writes its measured topology; a second job loads it instead of probing, and
/// a file that does not fit the running job is refused on every rank.
#[test]
fn topology_dump_feeds_a_later_job() {
    use hetccl::topology::{LinkClass, Topology};
    let dir = std::env::temp_dir().join(format!("hetccl-topo-dump-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("topo.json");
    let path_s = path.to_str().unwrap().to_string();
    let node = |r: usize| vec![("HETCCL_NODE_ID".to_string(), format!("n{}", r / 2))];
    let run = |env: &[(&str, &str)]| {
        let children = check::spawn(4, &["--counts", "7,1000"], env, node);
        common::collect(children, Duration::from_secs(60))
    };
    let outs = run(&[("HETCCL_TOPO_DUMP_FILE", &path_s), ("HETCCL_DEBUG", "info")]);
    common::assert_all_ok(&outs, "dumping run");
    assert!(
        outs[0].output.contains("probed 6 links"),
        "{}",
        outs[0].output
    );
    let t = Topology::load(&path).unwrap();
    assert_eq!(t.nodes, vec![vec![0, 1], vec![2, 3]]);
    for (a, b, class) in [
        (0, 1, LinkClass::Shm),
        (1, 2, LinkClass::Tcp),
        (0, 2, LinkClass::Tcp),
    ] {
        let l = t.link(a, b);
        assert_eq!(l.class, class, "{a}-{b}");
        assert!(
            l.measured.is_some_and(|m| m.bytes_per_s > 0),
            "{a}-{b}: {l:?}"
        );
    }

    let outs = run(&[("HETCCL_TOPO_FILE", &path_s), ("HETCCL_DEBUG", "info")]);
    common::assert_all_ok(&outs, "run from the file");
    assert!(!outs[0].output.contains("probed"), "{}", outs[0].output);
    assert!(outs[0].output.contains("measured"), "{}", outs[0].output);

    // The file puts ranks 0 and 1 on one node; here rank 1 runs on another.
    let split = |r: usize| vec![("HETCCL_NODE_ID".to_string(), format!("m{}", r % 2))];
    let children = check::spawn(
        4,
        &["--counts", "7"],
        &[
            ("HETCCL_TOPO_FILE", &path_s),
            ("HETCCL_CONNECT_TIMEOUT", "5"),
        ],
        split,
    );
    let outs = common::collect(children, Duration::from_secs(60));
    for (r, o) in outs.iter().enumerate() {
        assert_eq!(o.code, Some(1), "rank {r}:\n{}", o.output);
        assert!(
            o.output.contains(
                "topology: the topology file puts ranks 0 and 1 on one node, but they run on m0 and m1"
            ),
            "rank {r}:\n{}",
            o.output
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
