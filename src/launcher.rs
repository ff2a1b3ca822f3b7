//! `hetccl run`: starts N ranks of a program on this host, torchrun-style.
//!
//! Each rank gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR=127.0.0.1`, `MASTER_PORT` (a free port), and `HETCCL_JOB_ID` /
//! `HETCCL_JOB_KEY` unique to this run; everything else of the environment is inherited
//! (so `HETCCL_*` settings such as `HETCCL_NODE_ID` pass through untouched).
//!
//! Lifecycle:
//!
//! ```text
//! spawn rank 0..N, each in its own process group, stdin from /dev/null
//! 2 threads per rank copy stdout/stderr line by line, prefixed "[rank K] "
//! loop every 10 ms:
//!   SIGINT/SIGTERM to the launcher -> forwarded to every rank's group; SIGKILL after the grace
//!   a rank exits non-zero / by a signal -> report it, SIGTERM the others' groups, SIGKILL after the grace
//!   all ranks reaped -> exit: 0 if all exited 0, else the first failure's status (128+signal if killed)
//! ```
//!
//! Own process groups keep a terminal's Ctrl-C from reaching the ranks twice (once from the
//! terminal, once forwarded) and let the launcher stop a rank's child processes too.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rand::RngCore;

use crate::error::{Error, Result};

/// Help text of `hetccl run`.
pub const USAGE: &str = "\
usage: hetccl run -n N [OPTIONS] [--] PROGRAM [ARGS...]

Starts N ranks of PROGRAM on this host with RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT, HETCCL_JOB_ID and a random
HETCCL_JOB_KEY set; the rest of the environment is inherited. Every line a rank
prints is prefixed with \"[rank K] \". Ranks read stdin from /dev/null.

If a rank exits non-zero or is killed, the others get SIGTERM (SIGKILL after the
grace period) and hetccl run exits with that rank's status. SIGINT and SIGTERM
are forwarded to every rank.

options:
  -n, --nproc N          number of ranks (also --nproc-per-node)
  --master-port P        port for rank 0's bootstrap store (default: a free one)
  --bind-cores           pin rank k to CPU (k mod C), C being the CPUs this launcher
                         may run on (sched_setaffinity before exec)
  --grace-period SECS    time between SIGTERM and SIGKILL when stopping ranks (default 5)
  -h, --help             this text";

/// Parsed `hetccl run` command line.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOptions {
    /// Number of ranks.
    pub nproc: usize,
    /// Port for rank 0's store; `None` picks a free one.
    pub master_port: Option<u16>,
    /// Pin rank k to the k-th allowed CPU (modulo their count).
    pub bind_cores: bool,
    /// Time between SIGTERM and SIGKILL when stopping ranks.
    pub grace: Duration,
    /// The program each rank runs.
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
}

/// What the command line asked for.
#[derive(Clone, Debug, PartialEq)]
pub enum Parsed {
    /// Start ranks.
    Run(RunOptions),
    /// Print [`USAGE`].
    Help,
}

/// Most ranks one host is asked to run; beyond this it is a typo.
const MAX_RANKS: usize = 4096;

impl RunOptions {
    /// Parses the arguments after `run`. The error is a one-line reason.
    pub fn parse(args: &[OsString]) -> std::result::Result<Parsed, String> {
        let mut nproc = None;
        let mut master_port = None;
        let mut bind_cores = false;
        let mut grace = Duration::from_secs(5);
        let mut it = args.iter();
        let mut program = None;
        while let Some(a) = it.next() {
            let Some(s) = a.to_str() else {
                program = Some(a.clone());
                break;
            };
            // `--flag=value` and `--flag value` alike.
            let (flag, inline) = match s.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
                _ => (s, None),
            };
            let mut value = |name: &str| -> std::result::Result<String, String> {
                match inline.clone() {
                    Some(v) => Ok(v),
                    None => it
                        .next()
                        .and_then(|v| v.to_str())
                        .map(str::to_string)
                        .ok_or_else(|| format!("{name} needs a value")),
                }
            };
            match flag {
                "-h" | "--help" => return Ok(Parsed::Help),
                "-n" | "--nproc" | "--nproc-per-node" | "--nproc_per_node" => {
                    let v = value(flag)?;
                    let n = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_RANKS).contains(n))
                        .ok_or_else(|| {
                            format!("{flag} {v}: expected a number of ranks from 1 to {MAX_RANKS}")
                        })?;
                    nproc = Some(n);
                }
                "--master-port" | "--master_port" => {
                    let v = value(flag)?;
                    let p = v.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                        format!("{flag} {v}: expected a TCP port from 1 to 65535")
                    })?;
                    master_port = Some(p);
                }
                "--bind-cores" => bind_cores = true,
                "--grace-period" => {
                    let v = value(flag)?;
                    let secs = v
                        .parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 3600.0)
                        .ok_or_else(|| format!("{flag} {v}: expected seconds from 0 to 3600"))?;
                    grace = Duration::from_secs_f64(secs);
                }
                "--" => {
                    program = it.next().cloned();
                    break;
                }
                _ if s.starts_with('-') && s.len() > 1 => {
                    // `-n4` like mpirun and torchrun accept.
                    if let Some(n) = s.strip_prefix("-n").filter(|n| n.parse::<usize>().is_ok()) {
                        let n: usize = n.parse().unwrap_or(0);
                        if !(1..=MAX_RANKS).contains(&n) {
                            return Err(format!(
                                "-n {n}: expected a number of ranks from 1 to {MAX_RANKS}"
                            ));
                        }
                        nproc = Some(n);
                        continue;
                    }
                    return Err(format!("unknown option {s}"));
                }
                _ => {
                    program = Some(a.clone());
                    break;
                }
            }
        }
        let nproc = nproc.ok_or("missing -n N (how many ranks to start)")?;
        let program = program.ok_or("missing the program to run (after --)")?;
        Ok(Parsed::Run(RunOptions {
            nproc,
            master_port,
            bind_cores,
            grace,
            program,
            args: it.cloned().collect(),
        }))
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Each rank's exit status, in rank order.
    pub statuses: Vec<ExitStatus>,
    /// The first rank that exited non-zero or by a signal (not counting ranks the launcher stopped).
    pub first_failure: Option<(usize, ExitStatus)>,
    /// The signal (SIGINT, SIGTERM) that made the launcher stop the ranks.
    pub interrupted: Option<i32>,
}

impl Outcome {
    /// The launcher's exit code: 0 only when every rank exited 0; the first failing rank's
    /// status (128 + signal if killed); 128 + signal when the launcher was interrupted.
    pub fn exit_code(&self) -> i32 {
        if let Some(sig) = self.interrupted {
            return 128 + sig;
        }
        match self.first_failure {
            None => 0,
            Some((_, st)) => match (st.code(), st.signal()) {
                (Some(c), _) if c != 0 => c,
                (_, Some(s)) => 128 + s,
                _ => 1,
            },
        }
    }
}

/// `hetccl run ARGS...`: parses, runs, reports; returns the process exit code.
pub fn cli(args: &[OsString]) -> i32 {
    match RunOptions::parse(args) {
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            0
        }
        Err(msg) => {
            eprintln!("hetccl run: {msg}\n\n{USAGE}");
            2
        }
        Ok(Parsed::Run(opts)) => match run(&opts) {
            Ok(outcome) => outcome.exit_code(),
            Err(e) => {
                eprintln!("hetccl run: {e}");
                1
            }
        },
    }
}

/// Name of the common signals, for messages.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// "exited with status 3", "was killed by signal 9 (SIGKILL)".
pub fn describe_status(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (_, Some(s)) => format!("was killed by signal {s} ({})", signal_name(s)),
        _ => format!("ended ({st})"),
    }
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn free_port() -> Result<u16> {
    // The listener closes before rank 0 binds the port; another process could take it in
    // between, and rank 0 would then fail with "address in use" naming the port.
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::io("finding a free port", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("finding a free port", e))
}

/// The CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; sched_getaffinity writes at most
    // the size passed, which is the set's own size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: see above; `set` lives across the call.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        return (0..n).collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| {
            // SAFETY: `c` is below CPU_SETSIZE, inside the set.
            unsafe { libc::CPU_ISSET(c, &set) }
        })
        .collect()
}

fn cpu_set_of(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` comes from allowed_cpus(), so it is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

/// Sends `sig` to the process group led by `pid` (each rank leads its own).
fn signal_group(pid: u32, sig: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) has no memory effects; a negative pid addresses the process group,
    // which exists at least as long as its unreaped leader.
    unsafe {
        libc::kill(-pid, sig);
    }
}

/// Copies lines from a rank's pipe to ours, each prefixed; ends at EOF.
fn forward_lines(pipe: impl Read, prefix: String, to_stderr: bool) {
    let mut r = BufReader::with_capacity(64 << 10, pipe);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        line.extend_from_slice(prefix.as_bytes());
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        // One write per line under the lock keeps lines of different ranks whole. A closed
        // stdout (`| head`) must not stop the draining, or the rank would block on its pipe.
        let _ = if to_stderr {
            std::io::stderr().lock().write_all(&line)
        } else {
            std::io::stdout().lock().write_all(&line)
        };
    }
}

struct Signals {
    int: Arc<AtomicBool>,
    term: Arc<AtomicBool>,
    ids: Vec<signal_hook::SigId>,
}

impl Signals {
    fn install() -> Result<Signals> {
        let int = Arc::new(AtomicBool::new(false));
        let term = Arc::new(AtomicBool::new(false));
        let mut ids = Vec::new();
        for (sig, flag) in [(libc::SIGINT, &int), (libc::SIGTERM, &term)] {
            let id = signal_hook::flag::register(sig, flag.clone())
                .map_err(|e| Error::io(format!("installing a {} handler", signal_name(sig)), e))?;
            ids.push(id);
        }
        Ok(Signals { int, term, ids })
    }

    /// The signal received since the last call, if any.
    fn take(&self) -> Option<i32> {
        if self.int.swap(false, Ordering::SeqCst) {
            Some(libc::SIGINT)
        } else if self.term.swap(false, Ordering::SeqCst) {
            Some(libc::SIGTERM)
        } else {
            None
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

fn spawn_rank(
    opts: &RunOptions,
    rank: usize,
    port: u16,
    job_id: &str,
    key: &str,
    cpus: &[usize],
) -> std::io::Result<Child> {
    let n = opts.nproc.to_string();
    let r = rank.to_string();
    let mut cmd = Command::new(&opts.program);
    cmd.args(&opts.args)
        .env("RANK", &r)
        .env("WORLD_SIZE", &n)
        .env("LOCAL_RANK", &r)
        .env("LOCAL_WORLD_SIZE", &n)
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("HETCCL_JOB_ID", job_id)
        .env("HETCCL_JOB_KEY", key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if opts.bind_cores && !cpus.is_empty() {
        let set = cpu_set_of(cpus[rank % cpus.len()]);
        // SAFETY: the closure runs between fork and exec; it only makes the
        // sched_setaffinity system call (async-signal-safe) on a set built before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.spawn()
}

/// Starts the ranks and supervises them until all have exited.
pub fn run(opts: &RunOptions) -> Result<Outcome> {
    let port = match opts.master_port {
        Some(p) => p,
        None => free_port()?,
    };
    let job_id = format!("run-{}", random_hex(8));
    let key = random_hex(16);
    let cpus = if opts.bind_cores {
        allowed_cpus()
    } else {
        Vec::new()
    };
    let signals = Signals::install()?;
    let program = OsStr::new(&opts.program).to_string_lossy().into_owned();
    tracing::info!(
        "starting {} rank(s) of {program}, store on 127.0.0.1:{port}, job {job_id}",
        opts.nproc
    );

    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut children: Vec<Child> = Vec::with_capacity(opts.nproc);
    let mut readers = 0usize;
    for rank in 0..opts.nproc {
        let mut child = match spawn_rank(opts, rank, port, &job_id, &key, &cpus) {
            Ok(c) => c,
            Err(e) => {
                for c in &mut children {
                    signal_group(c.id(), libc::SIGKILL);
                    let _ = c.wait();
                }
                return Err(Error::io(
                    format!("cannot start {program} for rank {rank}"),
                    e,
                ));
            }
        };
        if opts.bind_cores && !cpus.is_empty() {
            tracing::info!("rank {rank} pinned to CPU {}", cpus[rank % cpus.len()]);
        }
        let prefix = format!("[rank {rank}] ");
        let streams: [(Option<Box<dyn Read + Send>>, bool); 2] = [
            (
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
                false,
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
                true,
            ),
        ];
        for (pipe, to_stderr) in streams {
            let Some(pipe) = pipe else { continue };
            let (prefix, tx) = (prefix.clone(), done_tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("rank{rank}-out"))
                .spawn(move || {
                    forward_lines(pipe, prefix, to_stderr);
                    let _ = tx.send(());
                });
            match spawned {
                Ok(_) => readers += 1,
                Err(e) => tracing::warn!("rank {rank}: cannot forward its output: {e}"),
            }
        }
        children.push(child);
    }
    drop(done_tx);

    let n = children.len();
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; n];
    let mut first_failure = None;
    let mut interrupted = None;
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;
    loop {
        if let Some(sig) = signals.take() {
            if interrupted.is_none() {
                eprintln!(
                    "hetccl run: got {}; forwarding it to every rank",
                    signal_name(sig)
                );
            }
            interrupted.get_or_insert(sig);
            for (c, st) in children.iter().zip(&statuses) {
                if st.is_none() {
                    signal_group(c.id(), sig);
                }
            }
            kill_at.get_or_insert(Instant::now() + opts.grace);
        }
        for rank in 0..n {
            if statuses[rank].is_some() {
                continue;
            }
            let st = match children[rank].try_wait() {
                Ok(Some(st)) => st,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!("rank {rank}: waiting for it failed: {e}");
                    continue;
                }
            };
            statuses[rank] = Some(st);
            tracing::debug!("rank {rank} {}", describe_status(st));
            let stopping = interrupted.is_some() || first_failure.is_some();
            if !st.success() && !stopping {
                first_failure = Some((rank, st));
                eprintln!(
                    "hetccl run: rank {rank} {}; stopping the others",
                    describe_status(st)
                );
                for (c, s) in children.iter().zip(&statuses) {
                    if s.is_none() {
                        signal_group(c.id(), libc::SIGTERM);
                    }
                }
                kill_at = Some(Instant::now() + opts.grace);
            }
        }
        let running: Vec<usize> = (0..n).filter(|&k| statuses[k].is_none()).collect();
        if running.is_empty() {
            break;
        }
        if let Some(t) = kill_at {
            if !killed && Instant::now() >= t {
                eprintln!(
                    "hetccl run: rank(s) {running:?} still running {:.1}s after being told to stop; killing them",
                    opts.grace.as_secs_f64()
                );
                for &k in &running {
                    signal_group(children[k].id(), libc::SIGKILL);
                }
                killed = true;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(signals);

    // The pipes close when the ranks and their children have exited; a child process a
    // rank left running would hold them open, so do not wait for it forever.
    let deadline = Instant::now() + Duration::from_secs(2);
    for _ in 0..readers {
        if done_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_err()
        {
            eprintln!("hetccl run: a rank's output is still open (a process it started is still running); not waiting for it");
            break;
        }
    }
    Ok(Outcome {
        statuses: statuses.into_iter().flatten().collect(),
        first_failure,
        interrupted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Parsed, String> {
        let v: Vec<OsString> = args.iter().map(OsString::from).collect();
        RunOptions::parse(&v)
    }

    fn opts(args: &[&str]) -> RunOptions {
        match parse(args).unwrap() {
            Parsed::Run(o) => o,
            Parsed::Help => panic!("help"),
        }
    }

    #[test]
    fn command_lines() {
        let o = opts(&["-n", "3", "--", "sh", "-c", "echo $RANK"]);
        assert_eq!(o.nproc, 3);
        assert_eq!(o.program, "sh");
        assert_eq!(
            o.args,
            vec![OsString::from("-c"), OsString::from("echo $RANK")]
        );
        assert_eq!(
            (o.master_port, o.bind_cores, o.grace),
            (None, false, Duration::from_secs(5))
        );

        let o = opts(&[
            "--nproc=2",
            "--master-port",
            "29500",
            "--bind-cores",
            "--grace-period=0.5",
            "prog",
            "-n",
            "7",
        ]);
        assert_eq!(
            (o.nproc, o.master_port, o.bind_cores),
            (2, Some(29500), true)
        );
        assert_eq!(o.grace, Duration::from_millis(500));
        // Options after the program belong to the program.
        assert_eq!(o.args, vec![OsString::from("-n"), OsString::from("7")]);
        assert_eq!(opts(&["-n4", "x"]).nproc, 4);
        assert_eq!(parse(&["--help"]), Ok(Parsed::Help));
    }

    #[test]
    fn bad_command_lines_say_why() {
        assert_eq!(
            parse(&["--", "x"]),
            Err("missing -n N (how many ranks to start)".into())
        );
        assert_eq!(
            parse(&["-n", "2"]),
            Err("missing the program to run (after --)".into())
        );
        assert_eq!(
            parse(&["-n", "0", "x"]),
            Err("-n 0: expected a number of ranks from 1 to 4096".into())
        );
        assert_eq!(parse(&["-n"]), Err("-n needs a value".into()));
        assert_eq!(
            parse(&["-n", "2", "--master-port", "70000", "x"]),
            Err("--master-port 70000: expected a TCP port from 1 to 65535".into())
        );
        assert_eq!(
            parse(&["-n", "2", "--frob", "x"]),
            Err("unknown option --frob".into())
        );
    }

    #[test]
    fn exit_codes_and_descriptions() {
        let exited = |c: i32| ExitStatus::from_raw(c << 8);
        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert_eq!(describe_status(exited(3)), "exited with status 3");
        assert_eq!(describe_status(killed), "was killed by signal 9 (SIGKILL)");
        let ok = Outcome {
            statuses: vec![exited(0); 2],
            first_failure: None,
            interrupted: None,
        };
        assert_eq!(ok.exit_code(), 0);
        let failed = Outcome {
            first_failure: Some((1, exited(3))),
            ..ok.clone()
        };
        assert_eq!(failed.exit_code(), 3);
        let crashed = Outcome {
            first_failure: Some((0, killed)),
            ..ok.clone()
        };
        assert_eq!(crashed.exit_code(), 137);
        let interrupted = Outcome {
            interrupted: Some(libc::SIGINT),
            ..ok
        };
        assert_eq!(interrupted.exit_code(), 130);
    }

    #[test]
    fn allowed_cpus_are_listed_once_in_order() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]), "{cpus:?}");
    }
}
