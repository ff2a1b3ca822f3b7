//! `file://` bootstrap: a rendezvous directory on a filesystem every rank sees (NFS, Lustre,
//! or a local disk for ranks of one host).
//!
//! Layout, for job id `J` under `HETCCL_INIT=file:///D`:
//!
//! ```text
//! D/<J, made filename-safe>/ag-<round>-<rank>     one blob per rank and round
//! D/<J, made filename-safe>/exit-<rank>           written when the rank's bootstrap is dropped
//! ```
//!
//! Files are written to a hidden temporary name and renamed, so a reader sees a whole
//! file or none. Each file starts with a header (magic, job id, world size, round, rank);
//! a file whose header does not match is refused with an error naming it, never used.
//!
//! Cleanup: after round `r` a rank deletes its own round `r-1` file (every rank has written
//! round `r`, so all have finished reading `r-1`). When dropped, a rank writes `exit-<rank>`
//! and the rank that then sees all `n` exit files removes the directory.
//!
//! Stale directories: a crashed run leaves, for every rank that took part, its last `ag-`
//! file or its `exit-` file. A new rank that finds a file of its own rank before it wrote
//! one refuses to start and names the directory, rather than mixing in old data. Set
//! `HETCCL_JOB_ID` to a value unique to each run (the `hetccl run` launcher, Slurm job ids)
//! and stale directories never collide with new runs.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{fmt_secs, Bootstrap};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"HCCLRDV1";

/// Largest rendezvous file a rank reads: a blob as large as the TCP store carries, plus
/// its header and job id.
pub const MAX_FILE_BYTES: usize = super::store::MAX_FRAME_BYTES + (64 << 10);

/// Reads a rendezvous file, refusing one past [`MAX_FILE_BYTES`] before reading it whole.
fn read_bounded(p: &Path) -> io::Result<Vec<u8>> {
    let f = fs::File::open(p)?;
    let mut body = Vec::new();
    f.take(MAX_FILE_BYTES as u64 + 1).read_to_end(&mut body)?;
    if body.len() > MAX_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than the {MAX_FILE_BYTES}-byte limit of a rendezvous file"),
        ));
    }
    Ok(body)
}

/// Bootstrap through files in a shared directory.
pub struct FileBootstrap {
    rank: usize,
    world_size: usize,
    round: u64,
    dir: PathBuf,
    job_id: String,
    timeout: Duration,
}

/// Keeps `[A-Za-z0-9._-]`; anything else (or an overlong id) gets replaced and a hash of
/// the full id appended, so two ids never share a directory by accident.
fn dir_name(job_id: &str) -> String {
    let safe: String = job_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if safe == job_id && !safe.starts_with('.') {
        return safe;
    }
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(job_id.as_bytes());
    let hex: String = h[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{hex}", safe.trim_start_matches('.'))
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::io(what, e)
}

impl FileBootstrap {
    /// Joins the rendezvous under `root` as `rank` of `world_size`. Waits for peers at most
    /// `timeout` in each all_gather.
    pub fn new(
        root: &Path,
        job_id: &str,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<Self> {
        if rank >= world_size {
            return Err(Error::invalid(
                "bootstrap",
                format!("rank {rank} is not below the world size {world_size}"),
            ));
        }
        let dir = root.join(dir_name(job_id));
        fs::create_dir_all(&dir).map_err(io_err(format!(
            "creating the rendezvous directory {}",
            dir.display()
        )))?;
        let b = FileBootstrap {
            rank,
            world_size,
            round: 0,
            dir,
            job_id: job_id.to_string(),
            timeout,
        };
        b.refuse_stale()?;
        tracing::info!(
            "rank {rank}/{world_size}: bootstrap through the directory {}",
            b.dir.display()
        );
        Ok(b)
    }

    /// The job's rendezvous directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn refuse_stale(&self) -> Result<()> {
        let entries =
            fs::read_dir(&self.dir).map_err(io_err(format!("listing {}", self.dir.display())))?;
        let own_ag = format!("-{}", self.rank);
        let own_exit = format!("exit-{}", self.rank);
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let mine = name == own_exit
                || name
                    .strip_prefix("ag-")
                    .and_then(|s| s.strip_suffix(own_ag.as_str()))
                    .is_some_and(|round| round.parse::<u64>().is_ok());
            if mine {
                return Err(Error::Bootstrap(format!(
                    "rank {}: the rendezvous directory {} already holds {name} for this rank: it is left \
                     over from an earlier run of job {:?} (or two processes claim rank {}); remove the \
                     directory, or set HETCCL_JOB_ID to a value unique to this run",
                    self.rank,
                    self.dir.display(),
                    self.job_id,
                    self.rank
                )));
            }
        }
        Ok(())
    }

    fn path(&self, round: u64, rank: usize) -> PathBuf {
        self.dir.join(format!("ag-{round}-{rank}"))
    }

    fn write_atomic(&self, name: &str, body: &[u8]) -> Result<()> {
        let tmp = self.dir.join(format!(".tmp-{name}-{}", std::process::id()));
        let dst = self.dir.join(name);
        let write = || -> io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(body)?;
            // The rename publishes the file; on a shared filesystem its data must be there first.
            f.sync_data()?;
            fs::rename(&tmp, &dst)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(format!("rank {}: writing {}", self.rank, dst.display()), e)
        })
    }

    fn encode(&self, round: u64, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + self.job_id.len() + data.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.job_id.len() as u64).to_le_bytes());
        out.extend_from_slice(self.job_id.as_bytes());
        for v in [
            self.world_size as u64,
            round,
            self.rank as u64,
            data.len() as u64,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    /// Checks a peer's file header against this job, round and rank; returns the payload.
    fn decode(&self, path: &Path, body: &[u8], round: u64, rank: usize) -> Result<Vec<u8>> {
        let bad = |why: String| {
            Error::Bootstrap(format!(
                "rank {}: refusing {}: {why}",
                self.rank,
                path.display()
            ))
        };
        let u64_at = |off: usize| -> Option<u64> {
            body.get(off..off + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        if body.get(..8) != Some(&MAGIC[..]) {
            return Err(bad("not a hetccl rendezvous file".into()));
        }
        let id_len = u64_at(8).ok_or_else(|| bad("truncated header".into()))? as usize;
        let id = body
            .get(16..16usize.saturating_add(id_len))
            .ok_or_else(|| bad("truncated header".into()))?;
        if id != self.job_id.as_bytes() {
            return Err(bad(format!(
                "it belongs to job {:?}, not {:?}",
                String::from_utf8_lossy(id),
                self.job_id
            )));
        }
        let off = 16 + id_len;
        let field = |i: usize| u64_at(off + 8 * i).ok_or_else(|| bad("truncated header".into()));
        let (world, r, k, len) = (field(0)?, field(1)?, field(2)?, field(3)? as usize);
        if world != self.world_size as u64 || r != round || k != rank as u64 {
            return Err(bad(format!(
                "header says world {world}, round {r}, rank {k}; expected world {}, round {round}, rank {rank}",
                self.world_size
            )));
        }
        let data = body.get(off + 32..).unwrap_or_default();
        if data.len() != len {
            return Err(bad(format!(
                "{} payload bytes, header says {len}",
                data.len()
            )));
        }
        Ok(data.to_vec())
    }
}

impl Bootstrap for FileBootstrap {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_gather(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let r = self.round;
        let n = self.world_size;
        self.write_atomic(&format!("ag-{r}-{}", self.rank), &self.encode(r, data))?;
        let mut got: Vec<Option<Vec<u8>>> = vec![None; n];
        let start = Instant::now();
        // Shared filesystems answer a stat in ~1 ms; back off to 50 ms between sweeps.
        let mut pause = Duration::from_millis(1);
        loop {
            for (k, slot) in got.iter_mut().enumerate() {
                if slot.is_some() {
                    continue;
                }
                let p = self.path(r, k);
                match read_bounded(&p) {
                    Ok(body) => *slot = Some(self.decode(&p, &body, r, k)?),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(Error::io(
                            format!("rank {}: reading {}", self.rank, p.display()),
                            e,
                        ))
                    }
                }
            }
            let missing: Vec<usize> = got
                .iter()
                .enumerate()
                .filter(|(_, g)| g.is_none())
                .map(|(k, _)| k)
                .collect();
            if missing.is_empty() {
                break;
            }
            if start.elapsed() >= self.timeout {
                return Err(Error::Bootstrap(format!(
                    "rank {}: file rendezvous in {} timed out after {} in all_gather #{r}: \
                     rank(s) {missing:?} never wrote ag-{r}-<rank>",
                    self.rank,
                    self.dir.display(),
                    fmt_secs(self.timeout)
                )));
            }
            std::thread::sleep(pause.min(self.timeout.saturating_sub(start.elapsed())));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        if r > 0 {
            let old = self.path(r - 1, self.rank);
            if let Err(e) = fs::remove_file(&old) {
                tracing::debug!("rank {}: cannot remove {}: {e}", self.rank, old.display());
            }
        }
        self.round += 1;
        tracing::debug!(
            "rank {}: file all_gather #{r} done, {} bytes in",
            self.rank,
            data.len()
        );
        Ok(got.into_iter().flatten().collect())
    }
}

impl Drop for FileBootstrap {
    fn drop(&mut self) {
        // Every rank announces its exit; the one that sees all announcements removes the
        // directory. Each rank writes before it looks, so the last writer sees them all.
        if let Err(e) = self.write_atomic(&format!("exit-{}", self.rank), b"") {
            tracing::warn!("{e}; leaving {} in place", self.dir.display());
            return;
        }
        let all_out = (0..self.world_size).all(|k| self.dir.join(format!("exit-{k}")).exists());
        if all_out {
            match fs::remove_dir_all(&self.dir) {
                Ok(()) => tracing::debug!("rank {}: removed {}", self.rank, self.dir.display()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(
                    "rank {}: cannot remove {}: {e}",
                    self.rank,
                    self.dir.display()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_root(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("hetccl-file-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn dir_names_are_safe_and_distinct() {
        assert_eq!(dir_name("run-1a2b"), "run-1a2b");
        let a = dir_name("file:/shared/rdv");
        let b = dir_name("file:_shared_rdv");
        assert!(
            a.starts_with("file__shared_rdv-") && a.len() == "file__shared_rdv-".len() + 12,
            "{a}"
        );
        assert_ne!(a, b);
        assert!(!dir_name("..").starts_with('.'));
    }

    #[test]
    fn all_gather_across_three_threads_then_cleanup() {
        let root = tmp_root("ag");
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let root = root.clone();
                std::thread::spawn(move || {
                    let mut b =
                        FileBootstrap::new(&root, "job/ag", rank, 3, Duration::from_secs(20))
                            .unwrap();
                    let r0 = b.all_gather(format!("rank{rank}").as_bytes()).unwrap();
                    let r1 = b.all_gather(&vec![rank as u8; rank * 100]).unwrap();
                    b.barrier().unwrap();
                    (r0, r1)
                })
            })
            .collect();
        for h in handles {
            let (r0, r1) = h.join().unwrap();
            assert_eq!(
                r0,
                vec![b"rank0".to_vec(), b"rank1".to_vec(), b"rank2".to_vec()]
            );
            assert_eq!(r1, vec![vec![], vec![1u8; 100], vec![2u8; 200]]);
        }
        // The last rank out removed the job directory.
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn missing_ranks_are_named_and_stale_files_refused() {
        let root = tmp_root("missing");
        let t = Duration::from_millis(200);
        let mut b = FileBootstrap::new(&root, "job-m", 1, 4, t).unwrap();
        let e = b.all_gather(b"x").err().unwrap().to_string();
        let dir = root.join("job-m");
        assert_eq!(
            e,
            format!(
                "bootstrap: rank 1: file rendezvous in {} timed out after 0.2s in all_gather #0: \
                 rank(s) [0, 2, 3] never wrote ag-0-<rank>",
                dir.display()
            )
        );
        // ag-0-1 is still there: a second rank 1 of the same job id is refused.
        let e = FileBootstrap::new(&root, "job-m", 1, 4, t)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("already holds ag-0-1 for this rank"), "{e}");
        drop(b);
        // Rank 1's exit file alone also marks the directory as used.
        fs::remove_file(dir.join("ag-0-1")).unwrap();
        let e = FileBootstrap::new(&root, "job-m", 1, 4, t)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("already holds exit-1"), "{e}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_file_of_another_job_is_refused() {
        let root = tmp_root("other");
        let t = Duration::from_secs(5);
        let mut b = FileBootstrap::new(&root, "job-x", 0, 2, t).unwrap();
        // A file claiming another job id where rank 1's file belongs.
        let impostor = FileBootstrap {
            rank: 1,
            world_size: 2,
            round: 0,
            dir: b.dir().to_path_buf(),
            job_id: "job-y".into(),
            timeout: t,
        };
        impostor
            .write_atomic("ag-0-1", &impostor.encode(0, b"evil"))
            .unwrap();
        std::mem::forget(impostor);
        let e = b.all_gather(b"x").err().unwrap().to_string();
        assert_eq!(
            e,
            format!(
                "bootstrap: rank 0: refusing {}: it belongs to job \"job-y\", not \"job-x\"",
                b.dir().join("ag-0-1").display()
            )
        );
        drop(b);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_oversized_file_is_refused_before_it_is_read_whole() {
        let root = tmp_root("big");
        let mut b = FileBootstrap::new(&root, "job-big", 0, 2, Duration::from_secs(5)).unwrap();
        let big = b.dir().join("ag-0-1");
        // A sparse file far past the limit: reading it whole would take gigabytes.
        fs::File::create(&big).unwrap().set_len(8 << 30).unwrap();
        let e = b.all_gather(b"x").err().unwrap().to_string();
        assert_eq!(
            e,
            format!(
                "rank 0: reading {}: larger than the {MAX_FILE_BYTES}-byte limit of a \
                 rendezvous file",
                big.display()
            )
        );
        drop(b);
        fs::remove_dir_all(&root).unwrap();
    }

    fn bootstrap_at(dir: &Path, rank: usize) -> FileBootstrap {
        FileBootstrap {
            rank,
            world_size: 3,
            round: 0,
            dir: dir.to_path_buf(),
            job_id: "job-prop".into(),
            timeout: Duration::from_secs(1),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(3000))]
        /// Any file contents are a payload of this job, round and rank, or refused with an
        /// error naming the file; never a panic.
        #[test]
        fn any_contents_decode_or_are_refused(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..160)) {
            let b = std::mem::ManuallyDrop::new(bootstrap_at(Path::new("/nonexistent"), 1));
            let p = Path::new("/nonexistent/ag-0-2");
            match b.decode(p, &body, 0, 2) {
                Ok(data) => proptest::prop_assert!(data.len() < body.len()),
                Err(e) => proptest::prop_assert!(
                    e.to_string().starts_with("bootstrap: rank 1: refusing /nonexistent/ag-0-2: "),
                    "{}", e
                ),
            }
        }

        /// A valid file with one byte changed or cut short is refused unless the change
        /// falls in the payload.
        #[test]
        fn mutated_files_are_refused_or_keep_their_header(
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24),
            at in 0usize..200,
            xor in 1u8..=255,
            cut in proptest::prelude::any::<bool>(),
        ) {
            let b = std::mem::ManuallyDrop::new(bootstrap_at(Path::new("/nonexistent"), 1));
            let writer = std::mem::ManuallyDrop::new(bootstrap_at(Path::new("/nonexistent"), 2));
            let mut body = writer.encode(0, &payload);
            let header = body.len() - payload.len();
            let at = at % body.len();
            if cut {
                body.truncate(at);
            } else {
                body[at] ^= xor;
            }
            let p = Path::new("/nonexistent/ag-0-2");
            match b.decode(p, &body, 0, 2) {
                Ok(data) => {
                    proptest::prop_assert!(!cut && at >= header, "a changed header at {} passed", at);
                    proptest::prop_assert_eq!(data.len(), payload.len());
                }
                Err(_) => proptest::prop_assert!(cut || at < header),
            }
        }
    }
}
