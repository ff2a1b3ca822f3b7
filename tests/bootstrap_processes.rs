//! Bootstrap across real processes: ranks killed during bootstrap; the key file of
//! one-host jobs; a store and a link listener flooded by strangers. The parent tests start
//! this same test binary as every rank, running only the ignored `fault_rank_main`,
//! `link_flood_main` or the test kit's checks (`check_rank`). (The env:// store and the
//! file:// rendezvous under `hetccl run` are tested with the launcher, in
//! `tools/tests/bootstrap_under_launcher.rs`.)

use std::process::Command;

use hetccl::bootstrap::from_config;
use hetccl::Config;

// ---------------------------------------------------------------------------------------
// Ranks started one process each with torchrun's variables, not through the launcher (which
// would stop every rank as soon as one dies and hide what the survivors do on their own).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Outcome;
use hetccl::bootstrap::{Bootstrap, Liveness};
use hetccl_testkit::check;

/// One rank of the tests below that run collectives (the test kit's checks).
#[test]
#[ignore = "a rank of the process tests below; they start it"]
fn check_rank() {
    check::rank_main();
}

/// Exit status of a rank whose bootstrap failed as it should.
const FAILED: i32 = 3;

fn die_now() {
    // SAFETY: kill on our own pid with SIGKILL: the process ends here, as `kill -9` would.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
}

/// Delegates to a real bootstrap and dies (SIGKILL) after its `die_after`-th round.
struct DieAfter {
    inner: Box<dyn Bootstrap>,
    die_after: Option<usize>,
}

impl Bootstrap for DieAfter {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_gather(&mut self, data: &[u8]) -> hetccl::Result<Vec<Vec<u8>>> {
        let got = self.inner.all_gather(data)?;
        if let Some(n) = self.die_after.as_mut() {
            *n -= 1;
            if *n == 0 {
                die_now();
            }
        }
        Ok(got)
    }
    fn liveness(&self) -> Option<Arc<dyn Liveness>> {
        self.inner.liveness()
    }
}

/// One rank of the tests below; what it does comes from `BOOT_TEST_MODE`:
///
/// - `die-between-rounds`: two rounds; rank `BOOT_TEST_VICTIM` dies after the first;
/// - `die-in-link-setup`: TCP links between every pair; the victim dies after the second
///   exchange of link setup, when the others are about to connect to it;
/// - `key-file`: one round, rank 1 reporting its key file's mode and directory's first.
///
/// A rank whose bootstrap fails prints why and how long it ran, and exits with `FAILED`.
#[test]
#[ignore = "a rank of the process tests below; needs the variables they set"]
fn fault_rank_main() {
    let start = Instant::now();
    let mode = std::env::var("BOOT_TEST_MODE").unwrap();
    let victim: Option<usize> = std::env::var("BOOT_TEST_VICTIM")
        .ok()
        .map(|v| v.parse().unwrap());
    let cfg = Config::from_env().unwrap();
    let (b, auth) = match from_config(&cfg) {
        Ok(x) => x,
        Err(e) => failed(start, e),
    };
    let rank = b.rank();
    let me = victim == Some(rank);
    // Like a program that returns its error: the bootstrap is dropped before the exit.
    let res = (|| -> hetccl::Result<()> {
        match mode.as_str() {
            "die-between-rounds" => {
                let mut b = DieAfter {
                    inner: b,
                    die_after: me.then_some(1),
                };
                for round in 0..2 {
                    b.all_gather(format!("r{round}").as_bytes())?;
                }
            }
            "die-in-link-setup" => {
                let mut b = DieAfter {
                    inner: b,
                    die_after: me.then_some(2),
                };
                let same_host = vec![true; b.world_size()];
                hetccl::transport::connect_all(&cfg, &mut b, &auth, &same_host, false)?;
            }
            "key-file" => {
                let mut b = b;
                if rank == 1 {
                    use std::os::unix::fs::MetadataExt;
                    let kf = hetccl::bootstrap::key_file(&cfg)?.unwrap();
                    let path = kf.path();
                    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o777;
                    println!(
                        "key file {} mode {:o} in a directory of mode {:o}",
                        path.display(),
                        mode(path),
                        mode(path.parent().unwrap())
                    );
                }
                b.all_gather(b"x")?;
            }
            other => panic!("unknown BOOT_TEST_MODE {other}"),
        }
        Ok(())
    })();
    if let Err(e) = res {
        failed(start, e);
    }
    println!("rank {rank} done");
}

fn failed(start: Instant, e: hetccl::Error) -> ! {
    println!(
        "rank failed after {:.2}s: {e}",
        start.elapsed().as_secs_f64()
    );
    std::process::exit(FAILED)
}

/// Starts `n` ranks of `fault_rank_main` with torchrun's variables, `env` on top.
fn spawn_fault_ranks(n: usize, env: &[(&str, &str)]) -> Vec<Child> {
    let me = std::env::current_exe().unwrap();
    let port = common::free_port().to_string();
    (0..n)
        .map(|r| {
            let mut c = Command::new(&me);
            c.args([
                "--ignored",
                "--exact",
                "fault_rank_main",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env_remove("HETCCL_JOB_KEY")
            .env_remove("HETCCL_JOB_ID")
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            // The default: a death must be noticed long before it.
            .env("HETCCL_CONNECT_TIMEOUT", "60")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            for (k, v) in env {
                c.env(k, v);
            }
            c.spawn().unwrap()
        })
        .collect()
}

/// Every rank but `victim` failed within `bound`, naming the victim's death in `naming`.
fn survivors_fail_fast(outs: &[Outcome], victim: usize, naming: &str, bound: Duration) {
    let all = || {
        outs.iter()
            .enumerate()
            .map(|(i, o)| format!("[{i}] {:?}\n{}", o.code, o.output))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        outs[victim].code,
        None,
        "the victim was not killed:\n{}",
        all()
    );
    for (r, o) in outs.iter().enumerate() {
        if r == victim {
            continue;
        }
        assert!(!o.hung, "rank {r} hung:\n{}", all());
        assert_eq!(o.code, Some(FAILED), "rank {r}:\n{}", all());
        assert!(o.output.contains(naming), "rank {r}:\n{}", all());
        assert!(
            !o.output.contains("raise HETCCL_CONNECT_TIMEOUT"),
            "rank {r} blames the timeout:\n{}",
            all()
        );
        assert!(
            o.elapsed < bound,
            "rank {r} took {:?}:\n{}",
            o.elapsed,
            all()
        );
    }
}

const DIED: &str = "died (its connection to the store closed without a goodbye";

#[test]
fn a_rank_killed_between_bootstrap_rounds_fails_every_other_rank_at_once() {
    // Any rank but 0 (the store's) is seen dying by the store.
    let outs = common::collect(
        spawn_fault_ranks(
            4,
            &[
                ("BOOT_TEST_MODE", "die-between-rounds"),
                ("BOOT_TEST_VICTIM", "2"),
            ],
        ),
        Duration::from_secs(90),
    );
    survivors_fail_fast(
        &outs,
        2,
        &format!("all_gather #1 cannot complete: rank 2 {DIED}"),
        Duration::from_secs(10),
    );
}

#[test]
fn a_killed_rank_0_fails_every_other_rank_at_once() {
    let outs = common::collect(
        spawn_fault_ranks(
            4,
            &[
                ("BOOT_TEST_MODE", "die-between-rounds"),
                ("BOOT_TEST_VICTIM", "0"),
            ],
        ),
        Duration::from_secs(90),
    );
    survivors_fail_fast(
        &outs,
        0,
        "lost the connection to rank 0's store at 127.0.0.1:",
        Duration::from_secs(10),
    );
}

#[test]
fn a_rank_killed_during_link_setup_fails_every_other_rank_at_once() {
    let outs = common::collect(
        spawn_fault_ranks(
            4,
            &[
                ("BOOT_TEST_MODE", "die-in-link-setup"),
                ("BOOT_TEST_VICTIM", "2"),
                ("HETCCL_SHM_DISABLE", "1"),
            ],
        ),
        Duration::from_secs(90),
    );
    survivors_fail_fast(&outs, 2, &format!("rank 2 {DIED}"), Duration::from_secs(10));
    // Ranks 0, 1 waited for rank 2 to connect, rank 3 tried to connect to it: each saw
    // the death in link setup itself.
    for r in [0, 1, 3] {
        assert!(
            outs[r].output.contains("link setup stopped while"),
            "rank {r}:\n{}",
            outs[r].output
        );
    }
}

#[test]
fn one_host_ranks_without_a_key_share_one_through_a_private_file() {
    let outs = common::collect(
        spawn_fault_ranks(3, &[("BOOT_TEST_MODE", "key-file")]),
        Duration::from_secs(90),
    );
    common::assert_all_ok(&outs, "key-file ranks");
    let line = outs[1]
        .output
        .lines()
        .find_map(|l| l.strip_prefix("key file "))
        .unwrap_or_else(|| panic!("rank 1 did not report its key file:\n{}", outs[1].output));
    let (path, modes) = line.split_once(" mode ").unwrap();
    assert_eq!(modes, "600 in a directory of mode 700", "{line}");
    assert!(
        !std::path::Path::new(path).exists(),
        "{path} outlived the job"
    );
}

/// Connects until `port` accepts, for at most 30 s.
fn wait_listening(port: u16) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "nobody listens on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn idle_strangers_and_garbage_do_not_keep_ranks_out_and_logs_stay_short() {
    let port = common::free_port();
    let spawn = |r: usize| {
        check::command(&["--counts", "0,1,7"])
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", "4")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("HETCCL_JOB_KEY", "flood-test-key")
            .env("HETCCL_CONNECT_TIMEOUT", "60")
            .env("HETCCL_TIMEOUT", "60")
            .env_remove("HETCCL_DEBUG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let began = Instant::now();
    let rank0 = spawn(0);
    wait_listening(port);
    // Far more idle connections than the store would once hold, then a flood of garbage
    // while the other ranks join.
    let idle: Vec<TcpStream> = (0..200)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flood = {
        let stop = stop.clone();
        let sent = sent.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // The flood is in full swing before the other ranks start.
    let start = Instant::now();
    while sent.load(Ordering::Relaxed) < 500 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut children = vec![rank0];
    children.extend((1..4).map(spawn));
    let outs = common::collect(children, Duration::from_secs(120));
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    let garbage = sent.load(Ordering::Relaxed);
    drop(idle);
    common::assert_all_ok(&outs, "ranks behind a flood");
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.output.contains("checks passed"),
            "rank {r}:\n{}",
            o.output
        );
    }
    // Thousands of refusals, a handful of lines: five per 10 s, then one count.
    let warns = outs[0]
        .output
        .lines()
        .filter(|l| l.contains("WARN"))
        .count();
    let took = began.elapsed();
    let windows = took.as_secs() as usize / 10 + 1;
    println!(
        "{garbage} garbage and 200 idle connections: {warns} warning lines from rank 0 in {took:?}"
    );
    assert!(garbage > 200, "only {garbage} garbage connections");
    assert!(
        warns <= 6 * windows + 1,
        "{warns} warning lines for {garbage} garbage connections in {took:?}:\n{}",
        outs[0].output
    );
}

// ---------------------------------------------------------------------------------------
// A rank's TCP link listener flooded during link setup. The listener runs in a process of
// its own (`link_flood_main`), so the handshake threads counted there are its alone.

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// Rank 0 accepts 2 sockets from each of ranks 1..=3 while 300 idle connections and a
/// stream of garbage arrive at its listener; checks the links, and prints the most
/// handshake threads (`hetccl-accept`) that were alive at once and how many were left a
/// while after setup returned.
#[test]
#[ignore = "the process of the link listener flood test below"]
fn link_flood_main() {
    use hetccl::bootstrap::JobAuth;
    use hetccl::transport::{tcp, Link};
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::atomic::AtomicUsize;

    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .try_init();
    let began = Instant::now();
    let auth = JobAuth::new("link-flood", "link-flood-key");
    let listener = tcp::listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
    let addr = listener.local_addr().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, most) = (stop.clone(), most.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                most.fetch_max(threads_named("hetccl-accept"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let acceptor = {
        let auth = auth.clone();
        std::thread::spawn(move || {
            tcp::accept_links(&listener, &auth, 0, &[1, 2, 3], 2, 4096, deadline, None)
        })
    };
    let idle: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flood = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut s) = TcpStream::connect(addr) {
                    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let start = Instant::now();
    while sent.load(Ordering::Relaxed) < 500 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let peers: Vec<_> = (1..4)
        .map(|r| {
            let auth = auth.clone();
            std::thread::spawn(move || {
                tcp::connect_link(addr, &auth, r, 0, 2, 4096, deadline, None)
            })
        })
        .collect();
    let connected: Vec<usize> = peers
        .into_iter()
        .map(|p| p.join().unwrap().unwrap())
        .map(|l| {
            assert_eq!((l.peer(), l.nsocks()), (0, 2));
            l.peer()
        })
        .collect();
    let accepted: Vec<(usize, usize)> = acceptor
        .join()
        .unwrap()
        .unwrap()
        .iter()
        .map(|l| (l.peer(), l.nsocks()))
        .collect();
    let took = began.elapsed();
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    sampler.join().unwrap();
    assert_eq!(accepted, vec![(1, 2), (2, 2), (3, 2)]);
    assert_eq!(connected, vec![0, 0, 0]);
    // Setup is over: the idle connections still open are no reason to keep threads.
    let after = Instant::now();
    while threads_named("hetccl-accept") > 0 && after.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "link flood: {} idle and {} garbage connections; setup took {:.1}s; at most {} \
         handshake threads at once, {} left {:.2}s after setup",
        idle.len(),
        sent.load(Ordering::Relaxed),
        took.as_secs_f64(),
        most.load(Ordering::Relaxed),
        threads_named("hetccl-accept"),
        after.elapsed().as_secs_f64()
    );
}

#[test]
fn idle_strangers_and_garbage_at_a_link_listener_cost_bounded_threads_and_logs() {
    use hetccl::bootstrap::admission::PRE_AUTH_CONNECTIONS;

    let began = Instant::now();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "link_flood_main",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = common::collect(vec![child], Duration::from_secs(120)).remove(0);
    let took = began.elapsed();
    assert_eq!(out.code, Some(0), "link flood process:\n{}", out.output);
    let line = out
        .output
        .lines()
        .find_map(|l| l.strip_prefix("link flood: "))
        .unwrap_or_else(|| panic!("no summary:\n{}", out.output));
    println!("{line}");
    let number_after = |what: &str| -> usize {
        line.split_once(what)
            .and_then(|(_, r)| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"))
    };
    let idle: usize = line.split(' ').next().and_then(|n| n.parse().ok()).unwrap();
    let garbage = number_after(" idle and ");
    assert_eq!(idle, 300, "{line}");
    assert!(garbage > 200, "only {garbage} garbage connections: {line}");
    // 300 idle connections fill the budget, and never more than it: one thread each.
    assert_eq!(
        number_after("at most "),
        PRE_AUTH_CONNECTIONS,
        "{}",
        out.output
    );
    // Those still in their handshake when setup returned were shed, so no thread waited
    // out its deadline.
    assert_eq!(number_after("at once, "), 0, "{}", out.output);
    // Thousands of refusals, a handful of lines: five per 10 s, then one count; the first
    // is the listener shedding an idle connection.
    let warns: Vec<&str> = out.output.lines().filter(|l| l.contains("WARN")).collect();
    let windows = took.as_secs() as usize / 10 + 1;
    assert!(
        !warns.is_empty() && warns.len() <= 6 * windows + 1,
        "{} warning lines in {took:?}:\n{}",
        warns.len(),
        out.output
    );
    let first = warns[0];
    assert!(
        first.contains("rank 0: listener 127.0.0.1:")
            && first.contains(": shed 127.0.0.1:")
            && first.ends_with(&format!(
                ": {PRE_AUTH_CONNECTIONS} connections were already in their handshake"
            )),
        "{first}"
    );
}
