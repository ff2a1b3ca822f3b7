//! `hetccl run`: starts N ranks of a program on this host, torchrun-style.
//!
//! Each rank gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR=127.0.0.1`, `MASTER_PORT` (a free port), `HETCCL_JOB_ID` /
//! `HETCCL_JOB_KEY` unique to this run, and `HETCCL_LAUNCHER_FD` (below); everything else
//! of the environment is inherited (so `HETCCL_*` settings such as `HETCCL_NODE_ID` pass
//! through untouched).
//!
//! Lifecycle:
//!
//! ```text
//! spawn rank 0..N, each in its own process group, stdin from /dev/null,
//!   parent-death signal SIGTERM, the ranks' end of the watch socket inherited
//! 2 threads per rank copy stdout/stderr line by line, prefixed "[rank K] "
//! sleep in poll() on one pidfd per rank + a self-pipe the SIGINT/SIGTERM handlers write to
//!   (no pidfd_open, kernels before 5.3: look at every rank each 10 ms instead)
//! each wake-up:
//!   SIGINT/SIGTERM to the launcher -> forwarded to every rank's group; SIGKILL after the grace
//!   reap every rank that has exited; a rank killed by a signal (not SIGPIPE) counts before
//!     ranks that exited with a status in the same wake-up (they most likely exited
//!     because of it)
//!   the first rank killed by a signal -> named, SIGTERM the others' groups, SIGKILL after
//!     the grace; the first that exits non-zero -> the same, unless a rank killed by a
//!     signal turns up within 250 ms (SETTLE), which is named instead
//!   at the first failure, before the others are stopped: one hang report from the
//!     ranks' flight dumps (`crate::hang`); a rank whose own collective failed (its dump
//!     says so) gets SIGTERM only 1 s later (OWN_EXIT), time to print its own error,
//!     which names the job's culprit, and to exit by itself
//!   SIGUSR1 to the launcher -> the same report of the live job, which goes on
//! all ranks reaped -> /dev/shm files tagged with a rank's pid removed (a rank killed
//!   while a named segment was linked), the first failure and the others' fates in one
//!   line; exit 0 if all exited 0, else the first failure's status (128+signal if killed)
//! ```
//!
//! Own process groups keep a terminal's Ctrl-C from reaching the ranks twice (once from the
//! terminal, once forwarded) and let the launcher stop a rank's child processes too. A
//! pidfd wakes the launcher at the first exit, so the rank that failed first is named, not
//! one that exited a few milliseconds later because it lost its peer.
//!
//! When the launcher dies without stopping the ranks (kill -9, a crash, a closed
//! terminal), two things reach them:
//!
//! - The parent-death signal, SIGTERM (set before exec, so it ends any program at once,
//!   computing or communicating; a program may handle it to exit cleanly). Only the
//!   process the launcher started gets it, not the processes a wrapper (`sh -c`) starts.
//!   After setting it the child checks that the launcher is still its parent: a launcher
//!   that died before would never send the signal, and the rank is not started.
//! - The watch socket: the launcher keeps one end of a Unix socket pair (close-on-exec,
//!   so no rank holds it open) and every rank inherits the other as `HETCCL_LAUNCHER_FD`.
//!   The library's communicators watch it (`src/communicator/launcher_watch.rs`): when
//!   the launcher's end closes, whatever a rank's collective is waiting for, it returns
//!   "the launcher (hetccl run, pid N) exited; this rank stops", and so does every later
//!   call. This reaches programs started through a wrapper and programs that handle
//!   SIGTERM; one that is computing then finds out at its next call.
//!
//! The launcher writes its messages and the ranks' lines with writers that drop what a
//! closed stdout or stderr does not take (`| head`), so it keeps draining the ranks and
//! still ends with their status.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rand::RngCore;

use hetccl::transport::shm::segment;
use hetccl::{Error, Result};

use crate::hang;

/// Help text of `hetccl run`.
pub const USAGE: &str = "\
usage: hetccl run -n N [OPTIONS] [--] PROGRAM [ARGS...]

Starts N ranks of PROGRAM on this host with RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT, HETCCL_JOB_ID, a random
HETCCL_JOB_KEY and HETCCL_LAUNCHER_FD set; the rest of the environment is inherited. Every line a rank
prints is prefixed with \"[rank K] \". Ranks read stdin from /dev/null.

If a rank exits non-zero or is killed, the others get SIGTERM (SIGKILL after the
grace period) and hetccl run exits with that rank's status (128+signal if killed),
naming the rank that failed first and then what became of the others. SIGINT and
SIGTERM are forwarded to every rank. If hetccl run itself dies, its ranks get
SIGTERM, and hetccl's collectives in any process they started fail naming it.

At the first failure of ranks that use hetccl, one hang report is printed before the
others are stopped: the rank that stopped first and the collective it holds the others
up in, who waits for whom, and what every rank was last doing. SIGUSR1 to hetccl run
prints the same report of a running job, which goes on.

options:
  -n, --nproc N          number of ranks (also --nproc-per-node)
  --master-port P        port for rank 0's bootstrap store (default: a free one, below
                         the kernel's ephemeral range)
  --bind-cores           pin rank k to CPU (k mod C), C being the CPUs this launcher
                         may run on (sched_setaffinity before exec)
  --grace-period SECS    time between SIGTERM and SIGKILL when stopping ranks (default 5)
  --exit-polling         look for exited ranks every 10 ms instead of waiting on pidfds
                         (what happens anyway on kernels without pidfd_open, before 5.3)
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
    /// Find exited ranks by looking every 10 ms, as where pidfds are missing.
    pub exit_polling: bool,
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
        let mut exit_polling = false;
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
                "--exit-polling" => exit_polling = true,
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
            exit_polling,
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
    /// Per rank: its exit was seen before the first failure's (in an earlier wake-up).
    pub before_failure: Vec<bool>,
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

    /// The closing line after a failure: the first failure, then what became of the
    /// others, e.g. "rank 2 was killed by signal 9 (SIGKILL); ranks 0, 1, 3 exited with
    /// status 1 after it". `None` without a failure, or without other ranks.
    pub fn summary(&self) -> Option<String> {
        let (first, st) = self.first_failure?;
        // (what, before or after, ranks), in the order of each group's lowest rank.
        let mut groups: Vec<(String, &str, Vec<usize>)> = Vec::new();
        for (rank, s) in self.statuses.iter().enumerate() {
            if rank == first {
                continue;
            }
            let what = describe_status(*s);
            let when = if self.before_failure.get(rank) == Some(&true) {
                "before"
            } else {
                "after"
            };
            match groups.iter_mut().find(|g| g.0 == what && g.1 == when) {
                Some(g) => g.2.push(rank),
                None => groups.push((what, when, vec![rank])),
            }
        }
        if groups.is_empty() {
            return None;
        }
        let others: Vec<String> = groups
            .iter()
            .map(|(what, when, ranks)| match ranks.as_slice() {
                [r] => format!("rank {r} {what} {when} it"),
                _ => {
                    let list: Vec<String> = ranks.iter().map(usize::to_string).collect();
                    let what = match what.strip_prefix("was ") {
                        Some(rest) => format!("were {rest}"),
                        None => what.clone(),
                    };
                    format!("ranks {} {what} {when} it", list.join(", "))
                }
            })
            .collect();
        Some(format!(
            "rank {first} {}; {}",
            describe_status(st),
            others.join("; ")
        ))
    }
}

/// One line from the launcher on its stderr; dropped if stderr is closed.
fn say(msg: impl std::fmt::Display) {
    let _ = writeln!(hetccl::log::stderr(), "hetccl run: {msg}");
}

/// `hetccl run ARGS...`: parses, runs, reports; returns the process exit code.
pub fn cli(args: &[OsString]) -> i32 {
    match RunOptions::parse(args) {
        Ok(Parsed::Help) => {
            let _ = writeln!(hetccl::log::stdout(), "{USAGE}");
            0
        }
        Err(msg) => {
            say(format_args!("{msg}\n\n{USAGE}"));
            2
        }
        Ok(Parsed::Run(opts)) => match run(&opts) {
            Ok(outcome) => {
                if let Some(line) = outcome.summary() {
                    say(line);
                }
                outcome.exit_code()
            }
            Err(e) => {
                say(e);
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
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSTOP => "SIGSTOP",
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

/// The CPUs this process may run on, in order (all of them when the system will not say).
fn allowed_cpus() -> Vec<usize> {
    hetccl::topology::place::allowed_cpus().unwrap_or_else(|| {
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
    })
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
    /// SIGUSR1: print the ranks' state, the job goes on.
    usr1: Arc<AtomicBool>,
    ids: Vec<signal_hook::SigId>,
    /// Read end of the self-pipe the handlers write a byte to, so a waiting poll() wakes.
    wake: UnixStream,
}

impl Signals {
    fn install() -> Result<Signals> {
        let int = Arc::new(AtomicBool::new(false));
        let term = Arc::new(AtomicBool::new(false));
        let usr1 = Arc::new(AtomicBool::new(false));
        let pipe_err = |e| Error::io("creating the signal self-pipe", e);
        let (wake, wake_tx) = UnixStream::pair().map_err(pipe_err)?;
        wake.set_nonblocking(true).map_err(pipe_err)?;
        let mut ids = Vec::new();
        for (sig, flag) in [
            (libc::SIGINT, &int),
            (libc::SIGTERM, &term),
            (libc::SIGUSR1, &usr1),
        ] {
            let failed = |e| Error::io(format!("installing a {} handler", signal_name(sig)), e);
            // Actions run in the order registered: the flag is set before the wake-up.
            ids.push(signal_hook::flag::register(sig, flag.clone()).map_err(failed)?);
            let tx = wake_tx.try_clone().map_err(pipe_err)?;
            ids.push(signal_hook::low_level::pipe::register(sig, tx).map_err(failed)?);
        }
        Ok(Signals {
            int,
            term,
            usr1,
            ids,
            wake,
        })
    }

    /// Empties the self-pipe, so the next poll() sleeps until the next signal.
    fn drain(&self) {
        let mut b = [0u8; 64];
        while matches!((&self.wake).read(&mut b), Ok(n) if n > 0) {}
    }

    /// Whether SIGUSR1 arrived since the last call.
    fn take_usr1(&self) -> bool {
        self.usr1.swap(false, Ordering::SeqCst)
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

/// The watch socket pair: the launcher's end, and the ranks' end at a descriptor above
/// stdio (0-2 become each rank's stdio before exec, and a launcher started with one of
/// them closed could have been given it); both close-on-exec.
fn watch_socket() -> Result<(UnixStream, OwnedFd)> {
    let failed = |e| Error::io("creating the ranks' watch socket", e);
    let (mine, theirs) = UnixStream::pair().map_err(failed)?;
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor (or fails) and touches no memory.
    let fd = unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just made by fcntl and nothing else owns it.
    Ok((mine, unsafe { OwnedFd::from_raw_fd(fd) }))
}

#[allow(clippy::too_many_arguments)]
fn spawn_rank(
    opts: &RunOptions,
    rank: usize,
    port: u16,
    job_id: &str,
    key: &str,
    cpus: &[usize],
    watch_fd: RawFd,
    flight_dir: &std::path::Path,
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
        .env("HETCCL_LAUNCHER_FD", watch_fd.to_string())
        .env("HETCCL_FLIGHT_DIR", flight_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let launcher = std::process::id() as libc::pid_t;
    let pin = (opts.bind_cores && !cpus.is_empty())
        .then(|| hetccl::topology::place::cpu_set(&[cpus[rank % cpus.len()]]));
    // SAFETY: the closure runs between fork and exec; it only makes async-signal-safe
    // system calls (prctl, getppid, fcntl, sched_setaffinity) on values built before the
    // fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let os_err = std::io::Error::last_os_error;
            // Sent when the launcher thread that forks exits: `run`'s caller, which
            // returns only after every rank has been reaped.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(os_err());
            }
            // A launcher that died before the prctl will never send the signal: the
            // child has been handed to another parent by now. Do not start the rank.
            if libc::getppid() != launcher {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            // The ranks' end of the watch socket survives exec in the child only.
            let flags = libc::fcntl(watch_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(watch_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) != 0 {
                return Err(os_err());
            }
            if let Some(set) = &pin {
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) != 0 {
                    return Err(os_err());
                }
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// How long the fallback waits between looks at the ranks.
const EXIT_POLL: Duration = Duration::from_millis(10);

/// How the launcher learns that ranks have exited.
enum Exits {
    /// One pidfd per rank, in rank order: poll() wakes at the first exit.
    Pidfds(Vec<OwnedFd>),
    /// Every rank is looked at each [`EXIT_POLL`].
    Polling,
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just made by the kernel and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

impl Exits {
    fn open(children: &[Child], polling: bool) -> Exits {
        if polling {
            return Exits::Polling;
        }
        let mut fds = Vec::with_capacity(children.len());
        for c in children {
            match pidfd_open(c.id()) {
                Ok(fd) => fds.push(fd),
                Err(e) => {
                    if e.raw_os_error() == Some(libc::ENOSYS) {
                        tracing::debug!(
                            "no pidfd_open on this kernel; looking for exited ranks every 10 ms"
                        );
                    } else {
                        tracing::warn!(
                            "pidfd_open failed ({e}); looking for exited ranks every 10 ms"
                        );
                    }
                    return Exits::Polling;
                }
            }
        }
        Exits::Pidfds(fds)
    }

    /// Sleeps until one of the `running` ranks may have exited, a signal arrived on
    /// `wake`, or `timeout` passed.
    fn wait(&self, running: &[usize], wake: &UnixStream, timeout: Option<Duration>) {
        let Exits::Pidfds(fds) = self else {
            std::thread::sleep(timeout.map_or(EXIT_POLL, |t| t.min(EXIT_POLL)));
            return;
        };
        let mut pfds: Vec<libc::pollfd> = std::iter::once(wake.as_raw_fd())
            .chain(running.iter().map(|&k| fds[k].as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // Rounded up, so a deadline is not woken for a millisecond early, again and again.
        let ms = timeout.map_or(-1, |t| {
            i32::try_from(t.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
        });
        // SAFETY: `pfds` is an array of `pfds.len()` valid pollfds for the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            // EINTR is a signal, which the caller looks at next; anything else must not
            // turn the loop into a spin.
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::warn!("waiting for the ranks: poll failed: {e}");
                std::thread::sleep(EXIT_POLL);
            }
        }
    }
}

/// How long a rank's non-zero exit waits for a rank killed by a signal to turn up before
/// it is blamed. A rank killed with SIGKILL closes its sockets a moment before it counts
/// as exited (its last thread still has to finish), and on a busy host the peers that
/// saw the sockets close can exit 1 inside that moment; a signal does not come from a
/// peer's exit, so the killed rank is the cause. Costs a genuine failure this long
/// before the others are stopped.
const SETTLE: Duration = Duration::from_millis(250);

/// How long a rank whose collective failed may take to print its error and exit by
/// itself, once the first failure is known, before it gets SIGTERM: it is already on its
/// way out, and its error says what the job's culprit is from where it stood.
const OWN_EXIT: Duration = Duration::from_secs(1);

/// Whether an exit status looks like the cause of a failure rather than its consequence:
/// killed by a signal, except SIGPIPE, which a program that does not ignore it gets for
/// writing to a peer that has gone.
fn is_cause(st: ExitStatus) -> bool {
    st.signal().is_some_and(|s| s != libc::SIGPIPE)
}

/// Orders the exits seen in one wake-up: ranks killed by a signal first (the others most
/// likely exited because their peer vanished), then non-zero exits, then clean ones;
/// rank order within each.
fn blame_order(exited: &mut [(usize, ExitStatus)]) {
    exited.sort_by_key(|&(rank, st)| {
        let class = if is_cause(st) {
            0
        } else if !st.success() {
            1
        } else {
            2
        };
        (class, rank)
    });
}

/// Starts the ranks and supervises them until all have exited.
pub fn run(opts: &RunOptions) -> Result<Outcome> {
    let port = match opts.master_port {
        Some(p) => p,
        // Below the ephemeral range: no outgoing connection takes it before rank 0 binds it.
        None => hetccl::bootstrap::port::free_store_port()?,
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
    // Held until every rank has exited: its closing is how they learn the launcher died.
    let (_watch, ranks_end) = watch_socket()?;
    let flight = hang::FlightDir::create(&job_id)?;

    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut children: Vec<Child> = Vec::with_capacity(opts.nproc);
    let mut readers = 0usize;
    for rank in 0..opts.nproc {
        let spawned = spawn_rank(
            opts,
            rank,
            port,
            &job_id,
            &key,
            &cpus,
            ranks_end.as_raw_fd(),
            flight.path(),
        );
        let mut child = match spawned {
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
    drop(ranks_end);
    let exits = Exits::open(&children, opts.exit_polling);

    let n = children.len();
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; n];
    let mut before_failure = vec![false; n];
    let mut first_failure = None;
    // A rank that exited non-zero, not yet blamed: see SETTLE.
    let mut suspect: Option<(usize, ExitStatus, Instant)> = None;
    let mut interrupted = None;
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;
    // Ranks failing by themselves, told to stop only at this time (OWN_EXIT).
    let mut term_at: Vec<Option<Instant>> = vec![None; n];
    // The hang report is printed once, at the first failure.
    let mut reported = false;
    loop {
        if signals.take_usr1() {
            say("got SIGUSR1; asking every rank for its state");
            let pids: Vec<u32> = children.iter().map(Child::id).collect();
            let r = flight.report("asked with SIGUSR1", &pids, &statuses, true);
            hang::print(r);
        }
        if let Some(sig) = signals.take() {
            if interrupted.is_none() {
                say(format_args!(
                    "got {}; forwarding it to every rank",
                    signal_name(sig)
                ));
            }
            interrupted.get_or_insert(sig);
            for (c, st) in children.iter().zip(&statuses) {
                if st.is_none() {
                    signal_group(c.id(), sig);
                }
            }
            kill_at.get_or_insert(Instant::now() + opts.grace);
        }
        // Every rank that has exited by now, as one batch: which of them exited first
        // cannot be told apart any more.
        let mut exited = Vec::new();
        for (rank, child) in children.iter_mut().enumerate() {
            if statuses[rank].is_some() {
                continue;
            }
            match child.try_wait() {
                Ok(Some(st)) => exited.push((rank, st)),
                Ok(None) => {}
                Err(e) => tracing::warn!("rank {rank}: waiting for it failed: {e}"),
            }
        }
        blame_order(&mut exited);
        let mut blamed = None;
        for (rank, st) in exited {
            statuses[rank] = Some(st);
            before_failure[rank] = first_failure.is_none() && suspect.is_none() && blamed.is_none();
            tracing::debug!("rank {rank} {}", describe_status(st));
            let stopping = interrupted.is_some() || first_failure.is_some() || blamed.is_some();
            if st.success() || stopping {
                continue;
            }
            if is_cause(st) {
                blamed = Some((rank, st));
                if let Some((r, ..)) = suspect.take() {
                    before_failure[r] = false;
                }
            } else if suspect.is_none() {
                suspect = Some((rank, st, Instant::now() + SETTLE));
            }
        }
        let running: Vec<usize> = (0..n).filter(|&k| statuses[k].is_none()).collect();
        if blamed.is_none() && interrupted.is_none() {
            if let Some((rank, st, until)) = suspect {
                // Nobody is left who could turn out to be the cause.
                if Instant::now() >= until || running.is_empty() {
                    blamed = Some((rank, st));
                    suspect = None;
                }
            }
        }
        if let Some((rank, st)) = blamed {
            first_failure = Some((rank, st));
            if !reported {
                reported = true;
                let pids: Vec<u32> = children.iter().map(Child::id).collect();
                let title = format!("rank {rank} {}", describe_status(st));
                hang::print(flight.report(&title, &pids, &statuses, false));
            }
            say(format_args!(
                "rank {rank} {}; stopping the others",
                describe_status(st)
            ));
            let now = Instant::now();
            let mut last_term = now;
            for &k in &running {
                if flight.failed_itself(k) {
                    term_at[k] = Some(now + OWN_EXIT);
                    last_term = now + OWN_EXIT;
                } else {
                    signal_group(children[k].id(), libc::SIGTERM);
                }
            }
            kill_at = Some(last_term + opts.grace);
        }
        if running.is_empty() {
            break;
        }
        for &k in &running {
            if term_at[k].is_some_and(|t| Instant::now() >= t) {
                term_at[k] = None;
                signal_group(children[k].id(), libc::SIGTERM);
            }
        }
        if let Some(t) = kill_at {
            if !killed && Instant::now() >= t {
                say(format_args!(
                    "rank(s) {running:?} still running {:.1}s after being told to stop; killing them",
                    opts.grace.as_secs_f64()
                ));
                for &k in &running {
                    signal_group(children[k].id(), libc::SIGKILL);
                }
                killed = true;
            }
        }
        let wake_at = [
            kill_at.filter(|_| !killed),
            suspect.filter(|_| first_failure.is_none()).map(|s| s.2),
            running.iter().filter_map(|&k| term_at[k]).min(),
        ];
        let timeout = wake_at
            .into_iter()
            .flatten()
            .min()
            .map(|t| t.saturating_duration_since(Instant::now()));
        exits.wait(&running, &signals.wake, timeout);
        signals.drain();
    }
    drop(signals);

    // A rank killed between making a named /dev/shm segment and unlinking it (a
    // rendezvous window) leaves the file; every rank has been reaped, so nobody can
    // still be opening one.
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let removed = segment::remove_files_of(std::path::Path::new("/dev/shm"), &pids);
    if !removed.is_empty() {
        say(format_args!(
            "removed {} /dev/shm segment(s) that exited ranks left: {}",
            removed.len(),
            removed.join(", ")
        ));
    }

    // The pipes close when the ranks and their children have exited; a child process a
    // rank left running would hold them open, so do not wait for it forever.
    let deadline = Instant::now() + Duration::from_secs(2);
    for _ in 0..readers {
        if done_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_err()
        {
            say("a rank's output is still open (a process it started is still running); not waiting for it");
            break;
        }
    }
    Ok(Outcome {
        statuses: statuses.into_iter().flatten().collect(),
        first_failure,
        before_failure,
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
            (o.master_port, o.bind_cores, o.grace, o.exit_polling),
            (None, false, Duration::from_secs(5), false)
        );
        assert!(opts(&["-n", "2", "--exit-polling", "x"]).exit_polling);

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
            before_failure: vec![false; 2],
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
    fn the_summary_names_the_first_failure_then_the_others_fates() {
        let exited = |c: i32| ExitStatus::from_raw(c << 8);
        let killed = |s: i32| ExitStatus::from_raw(s);
        let out = Outcome {
            statuses: vec![exited(1), exited(1), killed(9), exited(1)],
            first_failure: Some((2, killed(9))),
            before_failure: vec![false; 4],
            interrupted: None,
        };
        assert_eq!(
            out.summary().unwrap(),
            "rank 2 was killed by signal 9 (SIGKILL); ranks 0, 1, 3 exited with status 1 after it"
        );
        let out = Outcome {
            statuses: vec![killed(15), exited(0), exited(3), exited(1)],
            first_failure: Some((2, exited(3))),
            before_failure: vec![false, true, false, false],
            interrupted: None,
        };
        assert_eq!(
            out.summary().unwrap(),
            "rank 2 exited with status 3; rank 0 was killed by signal 15 (SIGTERM) after it; \
             rank 1 exited with status 0 before it; rank 3 exited with status 1 after it"
        );
        let out = Outcome {
            statuses: vec![killed(15), killed(15), exited(3)],
            first_failure: Some((2, exited(3))),
            before_failure: vec![false; 3],
            interrupted: None,
        };
        assert_eq!(
            out.summary().unwrap(),
            "rank 2 exited with status 3; ranks 0, 1 were killed by signal 15 (SIGTERM) after it"
        );
        let alone = Outcome {
            statuses: vec![exited(3)],
            first_failure: Some((0, exited(3))),
            before_failure: vec![false],
            interrupted: None,
        };
        assert_eq!(alone.summary(), None);
        let fine = Outcome {
            first_failure: None,
            ..out
        };
        assert_eq!(fine.summary(), None);
    }

    #[test]
    fn in_one_wake_up_a_rank_killed_by_a_signal_is_blamed_first() {
        let exited = |c: i32| ExitStatus::from_raw(c << 8);
        let killed = |s: i32| ExitStatus::from_raw(s);
        let mut batch = vec![
            (0, exited(1)),
            (1, exited(0)),
            (2, exited(1)),
            (3, killed(9)),
            (4, killed(11)),
        ];
        blame_order(&mut batch);
        let order: Vec<usize> = batch.iter().map(|b| b.0).collect();
        assert_eq!(order, [3, 4, 0, 2, 1]);
        // SIGPIPE comes from writing to a peer that went first: a consequence.
        let mut batch = vec![(0, killed(libc::SIGPIPE)), (1, exited(1)), (2, killed(6))];
        blame_order(&mut batch);
        let order: Vec<usize> = batch.iter().map(|b| b.0).collect();
        assert_eq!(order, [2, 0, 1]);
    }

    #[test]
    fn pidfds_wake_the_wait_at_an_exit_and_at_a_signal() {
        let mut quick = Command::new("sleep").arg("0.2").spawn().unwrap();
        let mut slow = Command::new("sleep").arg("30").spawn().unwrap();
        let exits = match (pidfd_open(quick.id()), pidfd_open(slow.id())) {
            (Ok(a), Ok(b)) => Exits::Pidfds(vec![a, b]),
            (Err(e), _) | (_, Err(e)) => {
                slow.kill().unwrap();
                slow.wait().unwrap();
                quick.wait().unwrap();
                hetccl_testkit::skip(&format!("pidfd_open fails here: {e}"));
                return;
            }
        };
        let (wake, wake_tx) = UnixStream::pair().unwrap();
        let t = Instant::now();
        exits.wait(&[0, 1], &wake, Some(Duration::from_secs(20)));
        let woke = t.elapsed();
        assert!(
            woke >= Duration::from_millis(150) && woke < Duration::from_secs(10),
            "{woke:?}"
        );
        assert!(quick.try_wait().unwrap().is_some());
        // With only the slow one left, a byte on the self-pipe ends the wait.
        (&wake_tx).write_all(b"x").unwrap();
        let t = Instant::now();
        exits.wait(&[1], &wake, Some(Duration::from_secs(20)));
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        slow.kill().unwrap();
        slow.wait().unwrap();
    }

    #[test]
    fn allowed_cpus_are_listed_once_in_order() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]), "{cpus:?}");
    }
}
