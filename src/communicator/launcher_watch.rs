//! Noticing that the launcher (`hetccl run`) exited, and turning it into an error.
//!
//! Protocol: `hetccl run` makes one Unix socket pair per job, keeps one end (close-on-exec,
//! so no rank holds it) and hands the other to every rank as the file descriptor named by
//! `HETCCL_LAUNCHER_FD`. Nothing is ever sent. The launcher's end closes when the launcher
//! exits, however it dies (kill -9 included), and the ranks' end then reports hang-up.
//! `SO_PEERCRED` on the ranks' end names the launcher's pid for the message.
//!
//! ```text
//! first communicator of the process: check the fd (a connected Unix stream socket),
//!   start one watcher thread: poll(fd, POLLRDHUP) with no timeout
//! every communicator: registers its abort flag (weak, so a dropped one is forgotten)
//! hang-up: set every registered abort flag; the collective each one is blocked in
//!   returns within ~50 ms, and its error (and every later one) names the launcher
//! communicator created after the hang-up: refused with the same error
//! ```
//!
//! This sits in the communicator layer because its action is aborting communicators;
//! bootstrap, below it, cannot know them.
//!
//! A rank started by `hetccl run` directly also gets SIGTERM as its parent-death signal
//! (see `tools/src/launcher.rs`), which ends it at once whatever it is doing. The watch
//! covers what that signal does not reach: a program started through a wrapper (`sh -c`,
//! a Python script starting a subprocess), one that handles SIGTERM, and a parent-death
//! race. Such a program, when it is computing rather than communicating, learns of the
//! launcher's exit at its next call, which fails at once.
//!
//! A variable that names no such socket (a closed descriptor, one reused for something
//! else, e.g. in a subprocess started with descriptors closed but the environment kept)
//! is logged at `warn` and not watched: it must not stop a program that works without it.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::algorithm::executor::ExecCtx;
use crate::config::Config;
use crate::error::{Error, Result};

/// The process-wide watch: one launcher per process.
static WATCH: Watch = Watch::new();

/// Registers a communicator's abort flag with the process's launcher watch, starting the
/// watch on first use; fails when the launcher has already exited.
pub(super) fn register(cfg: &Config, rank: usize, abort: &Arc<AtomicBool>) -> Result<()> {
    match cfg.launch.launcher_fd {
        Some(fd) => WATCH.register(fd, rank, abort),
        None => Ok(()),
    }
}

/// Why the communicator owning `abort` must stop, when the launcher's exit is the reason.
pub(super) fn reason(abort: &Arc<AtomicBool>) -> Option<String> {
    WATCH.reason(abort)
}

/// `e`, or the launcher's exit in the context of `ctx` when that is why the collective
/// failed. Peers abort their links when the launcher goes, so this rank's error may name
/// a peer that is only a symptom.
pub(super) fn blame(abort: &Arc<AtomicBool>, e: Error, ctx: &ExecCtx) -> Error {
    match reason(abort) {
        Some(why) => Error::Broken(in_context(&why, ctx)),
        None => e,
    }
}

/// Why a collective found its communicator's abort flag set before it started.
pub(super) fn abort_reason(abort: &Arc<AtomicBool>, ctx: &ExecCtx) -> String {
    match reason(abort) {
        Some(why) => in_context(&why, ctx),
        None => "aborted by the application".into(),
    }
}

fn in_context(why: &str, ctx: &ExecCtx) -> String {
    format!("rank {}: {} #{}: {why}", ctx.rank, ctx.op, ctx.seq)
}

/// A launcher watch: the state shared by the watcher thread and the communicators.
pub(crate) struct Watch {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The descriptor the first registration asked for.
    fd: Option<RawFd>,
    /// The launcher's pid, once the descriptor was found to be its socket.
    launcher: Option<i32>,
    /// The error text, once the launcher has exited.
    gone: Option<String>,
    /// Abort flags of the communicators to stop.
    targets: Vec<Weak<AtomicBool>>,
}

impl State {
    fn launcher_gone(&mut self, pid: i32) {
        if self.gone.is_some() {
            return;
        }
        let why = format!("the launcher (hetccl run, pid {pid}) exited; this rank stops");
        tracing::error!("{why}");
        for t in &self.targets {
            if let Some(flag) = t.upgrade() {
                flag.store(true, Ordering::Relaxed);
            }
        }
        self.gone = Some(why);
    }

    fn watches(&self, abort: &Arc<AtomicBool>) -> bool {
        self.targets
            .iter()
            .any(|t| std::ptr::eq(t.as_ptr(), Arc::as_ptr(abort)))
    }
}

/// Whether the socket `fd` has seen its peer close, waiting up to `timeout_ms` (-1: for
/// ever). `Err` when the descriptor itself is unusable.
fn hung_up(fd: RawFd, timeout_ms: i32) -> std::io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if p.revents & libc::POLLNVAL != 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EBADF));
        }
        if p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0 {
            return Ok(true);
        }
        if n == 0 || timeout_ms == 0 {
            return Ok(false);
        }
        // Readable without a hang-up: the launcher never writes, so someone else did;
        // drop it rather than spin on it.
        let mut b = [0u8; 64];
        // SAFETY: `b` is writable for its length; MSG_DONTWAIT keeps the call from blocking.
        let r = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), b.len(), libc::MSG_DONTWAIT) };
        if r == 0 {
            return Ok(true);
        }
    }
}

/// The launcher's pid if `fd` is a connected Unix stream socket, else why not.
fn launcher_pid(fd: RawFd) -> std::result::Result<i32, String> {
    // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes at most one `stat` into `st`.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err("not a socket".into());
    }
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `ty` and `len` describe a writable c_int.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || ty != libc::SOCK_STREAM {
        return Err("not a stream socket".into());
    }
    // SAFETY: an all-zero ucred is valid for getsockopt to overwrite.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` describe a writable ucred.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 || cred.pid <= 0 {
        return Err("not a connected Unix socket".into());
    }
    Ok(cred.pid)
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Watch {
    pub(crate) const fn new() -> Self {
        Watch {
            state: Mutex::new(State {
                fd: None,
                launcher: None,
                gone: None,
                targets: Vec::new(),
            }),
        }
    }

    /// See [`register`]. The watcher thread keeps `self`, hence `'static`.
    pub(crate) fn register(
        &'static self,
        fd: RawFd,
        rank: usize,
        abort: &Arc<AtomicBool>,
    ) -> Result<()> {
        let mut st = lock(&self.state);
        if st.fd.is_none() {
            st.fd = Some(fd);
            match launcher_pid(fd) {
                Ok(pid) => {
                    st.launcher = Some(pid);
                    std::thread::Builder::new()
                        .name("hetccl-launcher-watch".into())
                        .spawn(move || self.watch(fd, pid))
                        .map_err(|e| Error::io("starting the launcher watch", e))?;
                    tracing::debug!(rank, "watching launcher pid {pid} through fd {fd}");
                }
                Err(why) => tracing::warn!(
                    rank,
                    "HETCCL_LAUNCHER_FD={fd} is not the launcher's socket ({why}); \
                     this rank will not notice if its launcher exits"
                ),
            }
        } else if st.fd != Some(fd) {
            tracing::warn!(
                rank,
                "HETCCL_LAUNCHER_FD={fd} differs from {:?} of this process's first \
                 communicator; only that one is watched",
                st.fd
            );
        }
        let Some(pid) = st.launcher else {
            return Ok(());
        };
        // The watcher thread may not have run yet: look now, so a communicator made
        // after the launcher's exit is refused rather than left to find out later.
        if st.gone.is_none() && hung_up(fd, 0).unwrap_or(false) {
            st.launcher_gone(pid);
        }
        if let Some(why) = &st.gone {
            return Err(Error::Broken(format!("rank {rank}: {why}")));
        }
        st.targets.retain(|t| t.strong_count() > 0);
        st.targets.push(Arc::downgrade(abort));
        Ok(())
    }

    fn reason(&self, abort: &Arc<AtomicBool>) -> Option<String> {
        let mut st = lock(&self.state);
        // A communicator that never registered (a test's, an embedder's) keeps its own
        // errors, even in a process whose launcher is gone.
        if !st.watches(abort) {
            return None;
        }
        if st.gone.is_none() {
            // Asked on an error path: the watcher thread may be a moment behind.
            if let (Some(fd), Some(pid)) = (st.fd, st.launcher) {
                if hung_up(fd, 0).unwrap_or(false) {
                    st.launcher_gone(pid);
                }
            }
        }
        st.gone.clone()
    }

    fn watch(&self, fd: RawFd, pid: i32) {
        match hung_up(fd, -1) {
            Ok(true) => lock(&self.state).launcher_gone(pid),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                "watching the launcher (pid {pid}) through fd {fd} failed: {e}; \
                 this rank will not notice if its launcher exits"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    fn leak() -> &'static Watch {
        Box::leak(Box::new(Watch::new()))
    }

    fn wait_for(flag: &AtomicBool) -> Duration {
        let t = Instant::now();
        while !flag.load(Ordering::Relaxed) {
            assert!(t.elapsed() < Duration::from_secs(5), "abort flag never set");
            std::thread::sleep(Duration::from_millis(5));
        }
        t.elapsed()
    }

    #[test]
    fn the_launchers_exit_sets_every_registered_flag_and_names_it() {
        let w = leak();
        let (launcher, rank_end) = UnixStream::pair().unwrap();
        let fd = rank_end.as_raw_fd();
        let (a, b, stranger) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        w.register(fd, 0, &a).unwrap();
        w.register(fd, 0, &b).unwrap();
        assert_eq!(w.reason(&a), None);
        drop(launcher);
        wait_for(&a);
        wait_for(&b);
        let want = format!(
            "the launcher (hetccl run, pid {}) exited; this rank stops",
            std::process::id()
        );
        assert_eq!(w.reason(&a), Some(want.clone()));
        assert_eq!(w.reason(&b), Some(want.clone()));
        // A communicator that was never registered keeps its own errors.
        assert_eq!(w.reason(&stranger), None);
        assert!(!stranger.load(Ordering::Relaxed));
        // One made afterwards is refused with the same words.
        let e = w.register(fd, 3, &stranger).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("communicator is unusable after an earlier error: rank 3: {want}")
        );
    }

    #[test]
    fn an_error_path_sees_the_exit_before_the_watcher_thread_does() {
        let w = leak();
        let (launcher, rank_end) = UnixStream::pair().unwrap();
        let a = Arc::new(AtomicBool::new(false));
        w.register(rank_end.as_raw_fd(), 1, &a).unwrap();
        drop(launcher);
        // Asked at once: answered by looking at the socket, not by the thread's flag.
        assert!(w
            .reason(&a)
            .unwrap()
            .starts_with("the launcher (hetccl run, pid "));
        assert!(a.load(Ordering::Relaxed));
    }

    #[test]
    fn a_descriptor_that_is_no_launcher_socket_is_not_watched() {
        for (what, fd) in [
            ("closed", 1 << 20),
            ("a pipe", {
                let mut p = [0; 2];
                // SAFETY: `p` has room for the two descriptors pipe() writes.
                assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
                // SAFETY: the write end is ours and not used again.
                unsafe { libc::close(p[1]) };
                p[0]
            }),
        ] {
            let w = leak();
            let a = Arc::new(AtomicBool::new(false));
            w.register(fd, 0, &a)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(w.reason(&a), None, "{what}");
            std::thread::sleep(Duration::from_millis(50));
            assert!(!a.load(Ordering::Relaxed), "{what}");
        }
    }

    /// The only test that uses the process-wide watch (the launcher of a test process
    /// can exit once): a collective blocked on a peer returns the launcher's error.
    #[test]
    fn a_blocked_collective_returns_the_launchers_exit() {
        use crate::communicator::testing::world;
        use crate::config::AlgoChoice;
        use crate::ReduceOp;
        let (launcher, rank_end) = UnixStream::pair().unwrap();
        let mut cfg = Config {
            algo: AlgoChoice::Ring,
            ..Config::default()
        };
        cfg.launch.launcher_fd = Some(rank_end.as_raw_fd());
        let comms = world(2, 2, cfg);
        let t0 = Instant::now();
        let e = std::thread::scope(|s| {
            // Rank 1 never joins: rank 0's all-reduce blocks until the launcher goes.
            let h = s.spawn(|| comms[0].all_reduce(&mut [1.0f32; 100], ReduceOp::Sum));
            std::thread::sleep(Duration::from_millis(100));
            drop(launcher);
            h.join().unwrap().unwrap_err()
        });
        let why = format!(
            "the launcher (hetccl run, pid {}) exited; this rank stops",
            std::process::id()
        );
        assert_eq!(
            e.to_string(),
            format!(
                "communicator is unusable after an earlier error: rank 0: all_reduce #0: {why}"
            )
        );
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        // Every later call, on either rank, says the same.
        for c in &comms {
            let again = c.barrier().unwrap_err().to_string();
            assert!(again.ends_with(&why), "rank {}: {again}", c.rank());
        }
    }

    #[test]
    fn the_variable_is_a_descriptor_number() {
        let cfg = |v: &str| {
            let m = [("HETCCL_LAUNCHER_FD".to_string(), v.to_string())].into();
            Config::from_vars(&m)
        };
        assert_eq!(cfg("7").unwrap().launch.launcher_fd, Some(7));
        assert_eq!(
            cfg("-1").unwrap_err().to_string(),
            "invalid value \"-1\" for HETCCL_LAUNCHER_FD: accepted values are an integer from 0 to 2147483647"
        );
        assert_eq!(Config::default().launch.launcher_fd, None);
    }

    #[test]
    fn launcher_pid_is_the_socket_pairs_maker() {
        let (_l, r) = UnixStream::pair().unwrap();
        assert_eq!(launcher_pid(r.as_raw_fd()), Ok(std::process::id() as i32));
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(launcher_pid(f.as_raw_fd()), Err("not a socket".into()));
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            launcher_pid(u.as_raw_fd()),
            Err("not a stream socket".into())
        );
    }
}
