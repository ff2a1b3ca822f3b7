//! The launcher's side of the hang report: one private directory per job for the ranks'
//! flight dumps (`HETCCL_FLIGHT_DIR`), and one report from them.
//!
//! ```text
//! start       mkdir $TMPDIR/hetccl-<job id> (0700); every rank gets HETCCL_FLIGHT_DIR
//! a rank      writes rank-K.pid at its first communicator (whether it handles SIGUSR1),
//!             rank-K.json when a collective fails (src/flight/)
//! report      at the first failure, or when the launcher gets SIGUSR1:
//!   every 20 ms, for each rank: its dump if it wrote one (for SIGUSR1: a fresh one),
//!     else what its process is (exited, killed, stopped: /proc/PID/stat);
//!     a running rank without a dump gets SIGUSR1 once, if its rank-K.pid says it
//!     handles it
//!   until every rank has a dump or cannot write one, or GATHER passed
//!   hetccl::flight::report::build -> one text on stderr
//! end         the directory is removed
//! ```
//!
//! A rank's dump reaches the launcher even when its links to the other ranks are gone,
//! so the report holds every rank that can still write a file; a rank that cannot
//! (killed, stopped) is described by what the launcher sees of its process.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use hetccl::flight::report::{build, Fate, RankState, Report};
use hetccl::flight::{dump_path, now_ms, pid_path, proc_state, read_marker, Marker};
use hetccl::{Error, Result};

/// Longest wait for the ranks' dumps.
const GATHER: Duration = Duration::from_millis(1500);

/// The job's dump directory, removed when dropped.
pub struct FlightDir {
    path: PathBuf,
}

impl FlightDir {
    /// Makes `$TMPDIR/hetccl-<job_id>`, readable by this user only, with the launcher's
    /// own marker in it (`launcher.pid`), and removes what launchers of this host that
    /// were killed left there: directories of `hetccl-<prefix>` (the job id up to its
    /// last `-`) whose every marker names a dead process (see [`hetccl::flight::sweep`]).
    pub fn create(job_id: &str) -> Result<FlightDir> {
        let path = std::env::temp_dir().join(format!("hetccl-{job_id}"));
        if let Some((prefix, _)) = job_id.rsplit_once('-') {
            hetccl::flight::sweep(&format!("hetccl-{prefix}-"), &path);
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| {
                Error::io(
                    format!(
                        "creating the ranks' flight dump directory {}",
                        path.display()
                    ),
                    e,
                )
            })?;
        let dir = FlightDir { path };
        let marker = Marker {
            pid: std::process::id(),
            host: hetccl::topology::hostname(),
            asks: false,
        };
        let launcher = dir.path.join("launcher.pid");
        std::fs::write(&launcher, marker.to_string())
            .map_err(|e| Error::io(format!("writing {}", launcher.display()), e))?;
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gathers the ranks' dumps and builds the report. `pids`: each rank's process;
    /// `statuses`: the ranks reaped so far; `fresh`: ask every running rank for its state
    /// now (SIGUSR1), instead of taking the dumps its failure left. `None` when no rank
    /// ever had a communicator (no marker, no dump): a program that does not use hetccl
    /// has nothing to report.
    pub fn report(
        &self,
        title: &str,
        pids: &[u32],
        statuses: &[Option<ExitStatus>],
        fresh: bool,
    ) -> Option<Report> {
        let n = pids.len();
        let start = now_ms();
        let deadline = Instant::now() + GATHER;
        let mut asked = vec![false; n];
        loop {
            let mut states: Vec<Option<RankState>> = vec![None; n];
            let mut fates = vec![Fate::Unknown; n];
            let mut waiting = false;
            let mut hetccl_job = false;
            for k in 0..n {
                let marker = read_marker(&pid_path(&self.path, k));
                let asks = marker.as_ref().is_some_and(|m| m.asks);
                let marker = marker.map(|m| m.pid);
                hetccl_job |= marker.is_some() || dump_path(&self.path, k).exists();
                fates[k] = match statuses.get(k).copied().flatten() {
                    Some(st) => fate_of(st),
                    None => {
                        let procs = [Some(pids[k]), marker];
                        let states: Vec<char> = procs
                            .iter()
                            .flatten()
                            .filter_map(|&p| proc_state(p))
                            .collect();
                        if states.iter().any(|c| matches!(c, 'T' | 't')) {
                            Fate::Stopped
                        } else if states.iter().any(|c| !matches!(c, 'Z' | 'X')) {
                            Fate::Running
                        } else {
                            Fate::Unknown
                        }
                    }
                };
                // A dump counts when a failure wrote it, or when it was taken for this
                // report (SIGUSR1 dumps of an earlier request are stale).
                states[k] = read_dump(&dump_path(&self.path, k))
                    .filter(|s| (!fresh && s.why == "error") || s.taken_ms + 10 >= start);
                if states[k].is_none() && fates[k] == Fate::Running && asks {
                    if let Some(pid) = marker {
                        if !asked[k] {
                            asked[k] = true;
                            signal(pid, libc::SIGUSR1);
                        }
                        waiting = true;
                    }
                }
            }
            if !hetccl_job {
                return None;
            }
            if !waiting || Instant::now() >= deadline {
                return Some(build(title, &states, &fates, now_ms()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl FlightDir {
    /// Whether rank `k`'s own collective failed: its dump was taken on an error.
    pub fn failed_itself(&self, k: usize) -> bool {
        read_dump(&dump_path(&self.path, k)).is_some_and(|s| s.why == "error")
    }
}

impl Drop for FlightDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Prints `r` on stderr in one write (dropped if stderr is closed).
pub fn print(r: Option<Report>) {
    if let Some(r) = r {
        let _ = hetccl::log::stderr().write_all(r.text.as_bytes());
    }
}

fn fate_of(st: ExitStatus) -> Fate {
    match (st.code(), st.signal()) {
        (Some(c), _) => Fate::Exited(c),
        // SIGPIPE comes from writing to a peer that went first: a consequence.
        (_, Some(s)) if s != libc::SIGPIPE => Fate::Killed(s),
        _ => Fate::Unknown,
    }
}

fn read_dump(path: &Path) -> Option<RankState> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

fn signal(pid: u32, sig: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) has no memory effects.
    unsafe {
        libc::kill(pid, sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_state_reads_the_letter_after_the_command() {
        assert!(matches!(
            proc_state(std::process::id()),
            Some('R' | 'S' | 'D')
        ));
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // SAFETY: stopping a child this test started.
        unsafe { libc::kill(c.id() as i32, libc::SIGSTOP) };
        let t = Instant::now();
        while proc_state(c.id()) != Some('T') {
            assert!(t.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(10));
        }
        c.kill().unwrap();
        c.wait().unwrap();
        assert_eq!(proc_state(c.id()), None);
    }
}
