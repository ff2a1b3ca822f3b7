//! Ranks as processes: start them with torchrun-style variables and collect what they
//! print, killing anything still running at a deadline so no test can hang; run this
//! test executable as a rank; find the binaries of the workspace's other packages; follow
//! processes a test does not start itself (a launcher's ranks, orphans).

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What one process left behind.
#[derive(Debug)]
pub struct Outcome {
    /// Exit code (None: killed by a signal or by the deadline).
    pub code: Option<i32>,
    /// stdout and stderr, concatenated.
    pub output: String,
    /// True when the deadline killed it.
    pub hung: bool,
    /// How long it ran.
    pub elapsed: Duration,
}

/// A port nobody listens on right now, below the ephemeral range, so that no outgoing
/// connection of a test running beside this one takes it before rank 0 binds it.
pub fn free_port() -> u16 {
    hetccl::bootstrap::port::free_store_port().expect("choosing a store port")
}

/// Starts `n` ranks of `program args` on this host with torchrun's variables (`RANK`,
/// `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR=127.0.0.1`, `MASTER_PORT` a free port), the
/// job id `test-<port>`, a job key and `HETCCL_CONNECT_TIMEOUT=20`; rank r with `env`
/// plus `per_rank(r)` on top.
pub fn spawn_ranks(
    n: usize,
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
    per_rank: impl Fn(usize) -> Vec<(String, String)>,
) -> Vec<Child> {
    let port = free_port().to_string();
    let job = format!("test-{port}");
    (0..n)
        .map(|r| {
            let mut c = Command::new(program);
            c.args(args)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("HETCCL_JOB_ID", &job)
                .env("HETCCL_JOB_KEY", "test-key")
                .env("HETCCL_CONNECT_TIMEOUT", "20")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            for (k, v) in env {
                c.env(k, v);
            }
            for (k, v) in per_rank(r) {
                c.env(k, v);
            }
            c.spawn().expect("spawn rank")
        })
        .collect()
}

/// Waits for every child until `deadline`, then kills the rest.
pub fn collect(children: Vec<Child>, deadline: Duration) -> Vec<Outcome> {
    let start = Instant::now();
    let mut children: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    let mut out: Vec<Option<Outcome>> = children.iter().map(|_| None).collect();
    // Drain pipes in threads so a chatty child never blocks on a full pipe.
    let readers: Vec<_> = children
        .iter_mut()
        .map(|c| {
            let c = c.as_mut().unwrap();
            let mut so = c.stdout.take().unwrap();
            let mut se = c.stderr.take().unwrap();
            std::thread::spawn(move || {
                let mut a = String::new();
                let mut b = String::new();
                let t = std::thread::spawn(move || {
                    let _ = se.read_to_string(&mut b);
                    b
                });
                let _ = so.read_to_string(&mut a);
                a + &t.join().unwrap_or_default()
            })
        })
        .collect();
    loop {
        let mut running = 0;
        for (i, c) in children.iter_mut().enumerate() {
            if let Some(ch) = c {
                match ch.try_wait().unwrap() {
                    Some(st) => {
                        out[i] = Some(Outcome {
                            code: st.code(),
                            output: String::new(),
                            hung: false,
                            elapsed: start.elapsed(),
                        });
                        *c = None;
                    }
                    None => running += 1,
                }
            }
        }
        if running == 0 {
            break;
        }
        if start.elapsed() > deadline {
            for (i, c) in children.iter_mut().enumerate() {
                if let Some(ch) = c {
                    let _ = ch.kill();
                    let _ = ch.wait();
                    out[i] = Some(Outcome {
                        code: None,
                        output: String::new(),
                        hung: true,
                        elapsed: start.elapsed(),
                    });
                    *c = None;
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    out.into_iter()
        .zip(readers)
        .map(|(o, r)| {
            let mut o = o.unwrap();
            o.output = r.join().unwrap_or_default();
            o
        })
        .collect()
}

/// Asserts every rank exited 0, printing all output otherwise.
pub fn assert_all_ok(outs: &[Outcome], what: &str) {
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.code == Some(0) && !o.hung,
            "{what}: rank {r} failed (code {:?}, hung {}):\n{}\n--- all ranks ---\n{}",
            o.code,
            o.hung,
            o.output,
            outs.iter()
                .enumerate()
                .map(|(i, o)| format!("[{i}] {}", o.output))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Makes this test process the parent of its orphans: a rank whose launcher was killed is
/// handed to us instead of to init, so a test can wait for it and read how it ended.
pub fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER only changes an attribute of this process.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);
}

/// Whether process `pid` exists (a zombie counts).
pub fn is_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Waits up to `limit` for `pid` to exit and reaps it. `pid` is this process's child or
/// one of its descendants: an orphan handed to it (see [`become_subreaper`]) is waited for
/// once it has been handed over. Past `limit` the process is killed and this is an error.
pub fn wait_pid(pid: i32, limit: Duration) -> Result<std::process::ExitStatus, String> {
    use std::os::unix::process::ExitStatusExt;
    let start = Instant::now();
    loop {
        let mut st = 0;
        // SAFETY: waitpid writes one status into `st`.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
        if r == pid {
            return Ok(std::process::ExitStatus::from_raw(st));
        }
        if r < 0 && !is_alive(pid) {
            return Err(format!("process {pid} ended but was reaped elsewhere"));
        }
        if start.elapsed() > limit {
            // SAFETY: `pid` is a process this test started (directly or not).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = wait_pid(pid, Duration::from_secs(5));
            return Err(format!("process {pid} still running after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether process `pid` runs a communicator already (its progress thread exists), i.e.
/// it is past bootstrap and into collectives.
pub fn has_communicator(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("comm"))
            .is_ok_and(|c| c.starts_with("hetccl-progress"))
    })
}

/// Waits until each of `pids` runs a communicator (past bootstrap, into collectives).
pub fn wait_for_communicators(pids: &[i32]) {
    let start = Instant::now();
    while !pids.iter().all(|&p| has_communicator(p)) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "ranks {pids:?} never got a communicator"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// This test executable, running only the ignored test `entry` with its output
/// uncaptured: the way a test starts itself as a rank (or any other process of its own).
pub fn this_test(entry: &str) -> Command {
    let argv = this_test_argv(entry);
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    c
}

/// The command line of [`this_test`], for ranks another program starts (`mpirun`, a
/// simulated cluster).
pub fn this_test_argv(entry: &str) -> Vec<String> {
    let exe = std::env::current_exe().expect("the path of this test executable");
    let mut argv = vec![exe.to_string_lossy().into_owned()];
    argv.extend(
        [
            "--ignored",
            "--exact",
            entry,
            "--nocapture",
            "--test-threads=1",
            "-q",
        ]
        .map(String::from),
    );
    argv
}

/// The executable `name` of another package of the workspace (`hetccl` of the tools,
/// `hetccl-bert` of the trainer), which cargo builds into `target/<profile>/`, one
/// directory above this test executable, or which `HETCCL_BIN_DIR` or this test
/// executable's own directory holds (the layout of `gpu-bin/`). Cargo builds only the
/// binaries of the package under test before its tests: the others come from building
/// the workspace first.
pub fn workspace_bin(name: &str) -> PathBuf {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("HETCCL_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(PathBuf::from))
    {
        dirs.push(dir.clone());
        if let Some(up) = dir.parent() {
            dirs.push(up.to_path_buf());
        }
    }
    let candidates: Vec<PathBuf> = dirs.iter().map(|d| d.join(name)).collect();
    candidates
        .iter()
        .find(|c| c.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "cannot find the {name} executable (tried {}): build the workspace first: \
                 cargo build --release (or set HETCCL_BIN_DIR)",
                candidates
                    .iter()
                    .map(|c| c.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}
