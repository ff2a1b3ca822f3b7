//! Whether a peer on this host is still there, for the waits on shared memory, where a
//! dead peer is silent (a socket would be closed by the kernel): the state each side
//! writes into a shared page, and whether its process still runs.
//!
//! Every shared page that two or more processes wait on (a link's segment, a control
//! page) holds, per side, a state word ([`ATTACHED`], [`CLOSED`], [`ABORTED`]; 0 before
//! the side attached), written by its owner only, and beside it an abort cause
//! ([`crate::error::AbortCause::to_word`]). A side that aborts writes its cause first,
//! then the state (release or stronger); a peer reads the state (acquire), then the cause.
//! A side that closes has let go in order: what it published before still counts.
//!
//! A side whose process ended without a word (killed, crashed) is noticed through its
//! process, whose pid and pid namespace it wrote into the page when it attached:
//!
//! `kill(pid, 0)` is not enough: it succeeds on a zombie, a process that has exited but
//! that its parent has not reaped yet (a launcher or a test harness that is slow to call
//! `wait`, or one that never does), so survivors would wait out `HETCCL_TIMEOUT`. Two
//! ways that zombies do not fool, in this order:
//!
//! - a pidfd (`pidfd_open`, Linux 5.3): it refers to the one process it was opened on
//!   (a reused pid cannot be mistaken for it), and `poll` says readable once that
//!   process has exited, reaped or not;
//! - where pidfds are refused (older kernels, seccomp filters): `/proc/<pid>/stat`,
//!   whose state is `Z` or `X` once the process has exited and whose start time tells a
//!   reused pid from the process first seen.
//!
//! A pid means something only inside its pid namespace: a peer whose namespace differs
//! from this process's is never judged by pid (it is then noticed by its state in the
//! shared page, or by the timeout).
//!
//! Asking costs a system call or a small file read: waits ask only after they have
//! spun and slept a while (every 50 ms), never on the fast path.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The side has attached: its pid and pid namespace are in the page.
pub(crate) const ATTACHED: u32 = 1;
/// The side let go in order (a link dropped, a communicator closed).
pub(crate) const CLOSED: u32 = 2;
/// The side gave up after an error; its cause word says why.
pub(crate) const ABORTED: u32 = 3;

const _: () = assert!(ATTACHED < CLOSED && CLOSED < ABORTED);

/// Whether a side in `state` has let go of the page, in order or not.
#[inline]
pub(crate) fn has_left(state: u32) -> bool {
    state >= CLOSED
}

/// Inode of this process's pid namespace, 0 when /proc does not say.
pub(crate) fn own_pidns() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid")
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// A peer process watched for its end.
#[derive(Debug)]
pub(crate) struct PeerProcess {
    pid: i32,
    how: Watch,
}

#[derive(Debug)]
enum Watch {
    /// Another pid namespace, or no pid: this side cannot tell.
    Unknown,
    /// The process had already gone when the watch started.
    Gone,
    Pidfd(OwnedFd),
    /// `/proc/<pid>/stat`, with the process's start time when first seen.
    Proc {
        start: Option<u64>,
    },
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// The state letter (`R`, `S`, `D`, `T`, `t`, `Z`, `X`, ...).
    pub(crate) state: u8,
    /// Start time after boot, in clock ticks (field 22).
    pub(crate) start: u64,
}

/// Parses the contents of `/proc/<pid>/stat`. The command name (field 2) is in
/// parentheses and may itself hold spaces and parentheses, so fields are counted from
/// the last `)`.
pub(crate) fn parse_stat(text: &[u8]) -> Option<ProcStat> {
    let close = text.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&text[close + 1..]).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.bytes().next()?;
    // Fields 4 to 21 lie between the state (3) and the start time (22).
    let start = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { state, start })
}

/// `/proc/<pid>/stat` of a process of this pid namespace; `Ok(None)` when there is no
/// such process.
pub(crate) fn read_stat(pid: i32) -> std::io::Result<Option<ProcStat>> {
    match std::fs::read(format!("/proc/{pid}/stat")) {
        Ok(b) => Ok(parse_stat(&b)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH)) => Ok(None),
        Err(e) => Err(e),
    }
}

impl PeerProcess {
    /// Starts watching process `pid`, which lives in the pid namespace with inode
    /// `pidns` (as the peer wrote it into shared memory). Call it while the peer is known
    /// to be alive (after it attached), so the watch is on that very process.
    pub(crate) fn watch(pid: i32, pidns: u64) -> PeerProcess {
        let how = if pid <= 0 || pidns == 0 || pidns != own_pidns() {
            Watch::Unknown
        } else {
            match pidfd_open(pid) {
                Ok(fd) => Watch::Pidfd(fd),
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Watch::Gone,
                Err(e) => {
                    tracing::debug!(pid, "no pidfd ({e}); watching /proc/{pid}/stat instead");
                    Self::proc_watch(pid)
                }
            }
        };
        PeerProcess { pid, how }
    }

    /// Like [`PeerProcess::watch`] without a pidfd: the `/proc` fallback alone.
    #[cfg(test)]
    pub(crate) fn watch_proc(pid: i32, pidns: u64) -> PeerProcess {
        let how = if pid <= 0 || pidns == 0 || pidns != own_pidns() {
            Watch::Unknown
        } else {
            Self::proc_watch(pid)
        };
        PeerProcess { pid, how }
    }

    fn proc_watch(pid: i32) -> Watch {
        match read_stat(pid) {
            Ok(None) => Watch::Gone,
            Ok(Some(s)) if matches!(s.state, b'Z' | b'X') => Watch::Gone,
            Ok(Some(s)) => Watch::Proc {
                start: Some(s.start),
            },
            Err(_) => Watch::Proc { start: None },
        }
    }

    /// The pid watched.
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the process is known to have exited (a zombie counts: it runs no more).
    /// False when this side cannot tell.
    pub(crate) fn exited(&self) -> bool {
        match &self.how {
            Watch::Unknown => false,
            Watch::Gone => true,
            Watch::Pidfd(fd) => {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; a zero timeout never blocks.
                let r = unsafe { libc::poll(&mut p, 1, 0) };
                r > 0 && p.revents & (libc::POLLIN | libc::POLLHUP) != 0
            }
            Watch::Proc { start } => match read_stat(self.pid) {
                Ok(None) => true,
                Ok(Some(s)) => {
                    matches!(s.state, b'Z' | b'X') || start.is_some_and(|t| t != s.start)
                }
                Err(_) => false,
            },
        }
    }

    /// A few words on the process's state when it is held still by a signal or a
    /// tracer (`T`, `t`): the likely end of a chain of waiting ranks. `None` otherwise,
    /// or when this side cannot tell.
    pub(crate) fn stopped(&self) -> Option<String> {
        if matches!(self.how, Watch::Unknown | Watch::Gone) || self.exited() {
            return None;
        }
        match read_stat(self.pid) {
            Ok(Some(s)) if s.state == b'T' => Some(format!(
                "its process (pid {}) is stopped (SIGSTOP or job control)",
                self.pid
            )),
            Ok(Some(s)) if s.state == b't' => Some(format!(
                "its process (pid {}) is stopped by a debugger or tracer",
                self.pid
            )),
            _ => None,
        }
    }
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us alone. pidfds are opened
    // with O_CLOEXEC by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A child that sleeps until killed; the test reaps it (or not) itself.
    fn sleeper() -> i32 {
        // SAFETY: the child only sleeps and never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            loop {
                // SAFETY: plain sleep until SIGKILL.
                unsafe { libc::pause() };
            }
        }
        pid
    }

    fn kill(pid: i32) {
        // SAFETY: our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }

    fn reap(pid: i32) {
        // SAFETY: our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }

    /// Waits (bounded) until `w` says the process exited.
    fn until_exited(w: &PeerProcess) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if w.exited() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn a_zombie_is_seen_as_exited_by_both_watches() {
        let pid = sleeper();
        let ns = own_pidns();
        let fd = PeerProcess::watch(pid, ns);
        let proc = PeerProcess::watch_proc(pid, ns);
        assert!(matches!(fd.how, Watch::Pidfd(_)), "{:?}", fd.how);
        assert!(matches!(proc.how, Watch::Proc { start: Some(_) }));
        assert!(!fd.exited() && !proc.exited());
        kill(pid);
        // Not reaped: the child is a zombie, which kill(pid, 0) still finds.
        assert!(until_exited(&fd));
        assert!(until_exited(&proc));
        // SAFETY: signal 0 only checks that the process exists.
        assert_eq!(
            unsafe { libc::kill(pid, 0) },
            0,
            "the zombie is still there"
        );
        assert_eq!(read_stat(pid).unwrap().map(|s| s.state), Some(b'Z'));
        reap(pid);
        assert!(fd.exited() && proc.exited());
        assert_eq!(read_stat(pid).unwrap(), None);
        // A watch started after the end knows at once.
        assert!(PeerProcess::watch(pid, ns).exited());
        assert!(PeerProcess::watch_proc(pid, ns).exited());
    }

    #[test]
    fn other_namespaces_and_no_pid_are_never_judged() {
        let pid = sleeper();
        kill(pid);
        reap(pid);
        for w in [
            PeerProcess::watch(pid, own_pidns() ^ 1),
            PeerProcess::watch(0, own_pidns()),
            PeerProcess::watch(pid, 0),
        ] {
            assert!(!w.exited());
            assert_eq!(w.stopped(), None);
        }
    }

    #[test]
    fn a_reused_pid_is_not_the_process_first_seen() {
        let pid = std::process::id() as i32;
        let mut w = PeerProcess::watch_proc(pid, own_pidns());
        assert!(!w.exited());
        // The same pid with another start time: the first process is gone.
        if let Watch::Proc { start } = &mut w.how {
            *start = start.map(|t| t + 1);
        }
        assert!(w.exited());
    }

    #[test]
    fn a_stopped_process_is_named_as_such() {
        let pid = sleeper();
        let w = PeerProcess::watch(pid, own_pidns());
        assert_eq!(w.stopped(), None);
        // SAFETY: our own child.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let t = Instant::now();
        let mut said = None;
        while said.is_none() && t.elapsed() < Duration::from_secs(5) {
            said = w.stopped();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            said,
            Some(format!(
                "its process (pid {pid}) is stopped (SIGSTOP or job control)"
            ))
        );
        kill(pid);
        reap(pid);
        assert_eq!(w.stopped(), None);
    }

    #[test]
    fn stat_lines_parse_whatever_the_command_name() {
        let line = b"4242 (a) b) (c) Z 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                     987654 1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                state: b'Z',
                start: 987654
            })
        );
        assert_eq!(parse_stat(b""), None);
        assert_eq!(parse_stat(b"1 (x) S 1 2"), None);
        assert_eq!(parse_stat(b"1 (x"), None);
        let own = read_stat(std::process::id() as i32).unwrap().unwrap();
        assert!(matches!(own.state, b'R' | b'S'), "{}", own.state as char);
    }
}
