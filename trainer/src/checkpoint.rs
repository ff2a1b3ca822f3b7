//! Checkpoints: written atomically, checked before use.
//!
//! File layout (little-endian):
//!
//! ```text
//! offset  bytes  field
//!      0      8  magic "HCBERTCK"
//!      8      4  format version (1)
//!     12      4  reserved, 0
//!     16      8  metadata length (JSON, bytes)
//!     24      8  payload length (bytes)
//!     32     32  sha256 of metadata ‖ payload
//!     64      …  metadata: step, data position, world size, config, corpus digest
//!      …      …  payload: params, AdamW m, AdamW v (f32 each, n_params of each)
//! ```
//!
//! The state is world-size independent: parameters and moments are the same on every rank
//! and the data position is global, so a checkpoint of N ranks resumes on M ranks. There is
//! no generator state to save: every random number is a pure function of the seed (in the
//! config) and the sample index (see `rng`).
//!
//! Saving writes a temporary file `.NAME.tmp.PID` in the same directory, fsyncs it,
//! renames it over the target and fsyncs the directory: a crash leaves the old file or the
//! new one, never a torn one. The file replaced is kept as `NAME.prev` when it is intact,
//! so a checkpoint found damaged later still has a good one before it. Temporaries left by
//! a writer that died are removed at the start of a run and at every save; a live
//! writer's are not (see [`remove_stale_temps`]).
//!
//! Reading checks the header's lengths against stated limits and the file's size before
//! allocating, so a damaged or hostile length field costs nothing.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::balance::SplitChange;
use super::config::TrainConfig;
use super::files::{human_bytes, shown};
use crate::error::{Error, Result};

/// First bytes of every checkpoint.
pub const MAGIC: &[u8; 8] = b"HCBERTCK";
/// Format version this build writes and reads.
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 64;

/// Largest metadata block read (bytes): it is a few hundred bytes of JSON.
pub const META_MAX_BYTES: u64 = 1 << 20;
/// Largest payload read (bytes): 12 bytes per parameter, so 5.7 G parameters, 50 times
/// BERT-base. A header claiming more is refused before anything is allocated; below it,
/// memory grows only with the bytes actually read.
pub const PAYLOAD_MAX_BYTES: u64 = 64 << 30;
/// Largest rank state payload read (bytes): error-feedback residuals, 4 bytes per
/// parameter at most.
pub const RANK_STATE_MAX_BYTES: u64 = PAYLOAD_MAX_BYTES / 3;

/// Bytes read or hashed at a time.
const CHUNK: usize = 1 << 20;

/// Everything in a checkpoint besides the tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// The next optimizer step to run.
    pub step: u64,
    /// Global training samples consumed (the data position).
    pub samples_seen: u64,
    /// AdamW's update count.
    pub adam_t: u64,
    /// World size of the run that wrote it (informational: any world size can resume).
    pub world_size: usize,
    /// The numeric configuration (model, optimizer, data, seed).
    pub config: TrainConfig,
    /// sha256 of the corpus token ids.
    pub corpus_digest: String,
    /// Parameters per tensor block of the payload.
    pub num_params: usize,
    /// The batch splits of the run up to `step` (the step each took effect), so a resume
    /// continues with the split in force. Absent in checkpoints of runs that kept none.
    #[serde(default)]
    pub splits: Vec<SplitChange>,
}

/// A loaded checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Metadata.
    pub meta: CheckpointMeta,
    /// Parameters.
    pub params: Vec<f32>,
    /// AdamW first moments.
    pub m: Vec<f32>,
    /// AdamW second moments.
    pub v: Vec<f32>,
}

fn fail(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: shown(path).display().to_string(),
        reason: reason.into(),
    }
}

/// Where [`save`] keeps the checkpoint it replaces: `path` with `.prev` appended.
pub fn previous_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".prev");
    PathBuf::from(name)
}

/// Calls `f` with the little-endian bytes of `t`, [`CHUNK`] bytes at a time.
fn le_chunks(t: &[f32], mut f: impl FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for c in t.chunks(CHUNK / 4) {
        if cfg!(target_endian = "little") {
            f(bytemuck::cast_slice::<f32, u8>(c))?;
        } else {
            buf.clear();
            for x in c {
                buf.extend_from_slice(&x.to_le_bytes());
            }
            f(&buf)?;
        }
    }
    Ok(())
}

/// Writes a checkpoint atomically. An intact checkpoint already at `path` is kept as
/// [`previous_path`] (a damaged one is not, so it never replaces a good previous one).
pub fn save(
    path: &Path,
    meta: &CheckpointMeta,
    params: &[f32],
    m: &[f32],
    v: &[f32],
) -> Result<()> {
    let n = meta.num_params;
    if params.len() != n || m.len() != n || v.len() != n {
        return Err(Error::invalid(
            "checkpoint::save",
            format!(
                "{n} parameters in metadata, tensors hold {}/{}/{}",
                params.len(),
                m.len(),
                v.len()
            ),
        ));
    }
    let meta_bytes = serde_json::to_vec(meta)
        .map_err(|e| Error::invalid("checkpoint::save", format!("metadata: {e}")))?;
    let tensors = [params, m, v];
    let payload_len = 12 * n as u64;
    // The digest goes in the header, before the payload: one pass to hash, one to write.
    let mut h = Sha256::new();
    h.update(&meta_bytes);
    for t in tensors {
        le_chunks(t, |b| {
            h.update(b);
            Ok(())
        })
        .map_err(|e| Error::io("hashing checkpoint", e))?;
    }
    let digest = h.finalize();

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&(meta_bytes.len() as u64).to_le_bytes());
    header.extend_from_slice(&payload_len.to_le_bytes());
    header.extend_from_slice(&digest);

    let prev = previous_path(path);
    let keep = match std::fs::symlink_metadata(path) {
        Ok(md) if md.is_file() => match verify(path) {
            Ok(()) => Some(prev.as_path()),
            Err(e) => {
                tracing::warn!(target: "hetccl::trainer::checkpoint", "replacing a damaged \
                    checkpoint without keeping it as {}: {e}", prev.display());
                None
            }
        },
        _ => None,
    };
    write_atomic(path, keep, |w| {
        w.write_all(&header)?;
        w.write_all(&meta_bytes)?;
        for t in tensors {
            le_chunks(t, |b| w.write_all(b))?;
        }
        Ok(())
    })?;
    tracing::info!(target: "hetccl::trainer::checkpoint", path = %path.display(), step = meta.step,
        bytes = HEADER_LEN as u64 + meta_bytes.len() as u64 + payload_len, "checkpoint written");
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into())
}

/// The temporary file process `pid` writes `target` through: `.NAME.tmp.PID` beside it.
pub fn temp_path(target: &Path, pid: u32) -> PathBuf {
    parent_dir(target).join(format!(".{}.tmp.{pid}", file_name(target)))
}

/// Writes `target` through a temporary file in the same directory, fsynced and renamed
/// over it, then fsyncs the directory. With `keep`, the file `target` held first becomes
/// `keep` (a hard link renamed into place), so at every moment `target` and `keep` are
/// whole files. Stale temporaries of both are removed first.
fn write_atomic(
    target: &Path,
    keep: Option<&Path>,
    write: impl FnOnce(&mut BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = parent_dir(target);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    remove_stale_temps(target);
    if let Some(k) = keep {
        remove_stale_temps(k);
    }
    let tmp = temp_path(target, std::process::id());
    let written = (|| -> std::io::Result<()> {
        let mut w = BufWriter::with_capacity(CHUNK, std::fs::File::create(&tmp)?);
        write(&mut w)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(format!("writing {}", tmp.display()), e));
    }
    if let Some(k) = keep {
        let link = temp_path(k, std::process::id());
        let _ = std::fs::remove_file(&link);
        if let Err(e) = std::fs::hard_link(target, &link).and_then(|_| std::fs::rename(&link, k)) {
            let _ = std::fs::remove_file(&link);
            tracing::warn!(target: "hetccl::trainer::checkpoint",
                "could not keep {} as {}: {e}", target.display(), k.display());
        }
    }
    std::fs::rename(&tmp, target).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(
            format!("renaming {} to {}", tmp.display(), target.display()),
            e,
        )
    })?;
    // The rename is durable once the directory entry is.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Checks, before a run spends any time, that `target` can be written the way
/// [`save`] writes it: its directory exists or can be made, a file can be created in it,
/// and `target` is not a directory. Stale temporaries of `target` (and of its
/// [`previous_path`]) are removed on the way.
pub fn check_writable(target: &Path) -> Result<()> {
    let dir = parent_dir(target);
    let ctx = |what: &str| {
        format!(
            "checkpoint {}: {what} {}",
            shown(target).display(),
            shown(&dir).display()
        )
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        // "File exists" alone would not say which part of the path is in the way.
        if let Some(f) = dir.ancestors().find(|a| a.is_file()) {
            return Err(fail(
                target,
                format!(
                    "cannot create its directory: {} is a file",
                    shown(f).display()
                ),
            ));
        }
        return Err(Error::io(ctx("cannot create its directory"), e));
    }
    if std::fs::metadata(target).is_ok_and(|m| m.is_dir()) {
        return Err(fail(target, "is a directory"));
    }
    remove_stale_temps(target);
    remove_stale_temps(&previous_path(target));
    let probe = temp_path(target, std::process::id());
    std::fs::File::create(&probe)
        .map_err(|e| Error::io(ctx("cannot create a file in its directory"), e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Removes the temporaries `.NAME.tmp.PID` of `target` whose writer is gone: no process
/// `PID`, a zombie, or a process that started after the file was last written (the pid
/// was reused). A live writer's file stays. Returns the files removed.
pub fn remove_stale_temps(target: &Path) -> Vec<PathBuf> {
    let dir = parent_dir(target);
    let prefix = format!(".{}.tmp.", file_name(target));
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(md) = e.metadata() else { continue };
        let Ok(written) = md.modified() else { continue };
        if !md.is_file() || writer_alive(pid, written) {
            continue;
        }
        let path = e.path();
        if std::fs::remove_file(&path).is_ok() {
            tracing::info!(target: "hetccl::trainer::checkpoint", path = %path.display(), pid,
                "removed the temporary file of a writer that is gone");
            removed.push(path);
        }
    }
    removed
}

/// Clock skew allowed between a file's time stamp and a process's start time (the
/// boot time in `/proc/stat` is whole seconds; the wall clock may have been stepped).
const START_SLACK: Duration = Duration::from_secs(2);

/// Whether process `pid` may still be the one that last wrote a file at `written`.
/// In doubt (no `/proc`, unreadable fields), yes.
fn writer_alive(pid: u32, written: SystemTime) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match parse_stat(&stat) {
            Some((state, _)) if state == 'Z' || state == 'X' => false,
            Some((_, ticks)) => match (boot_time(), clock_ticks()) {
                (Some(boot), Some(hz)) => {
                    let started = boot + Duration::from_secs_f64(ticks as f64 / hz as f64);
                    started <= written + START_SLACK
                }
                _ => true,
            },
            None => true,
        },
        Err(_) if Path::new("/proc/self/stat").exists() => false,
        // No procfs: signal 0 says whether the pid exists (EPERM: it does, not ours).
        Err(_) => {
            // SAFETY: kill with signal 0 sends nothing; it only checks the pid.
            let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
            r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
        }
    }
}

/// (state, start time in clock ticks after boot) from `/proc/PID/stat`; the command name
/// in parentheses may hold spaces and parentheses, so fields are counted after the last
/// `)`: state is field 3, start time field 22.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let ticks = fields.get(19)?.parse().ok()?;
    Some((state, ticks))
}

fn boot_time() -> Option<SystemTime> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let secs: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

fn clock_ticks() -> Option<u64> {
    // SAFETY: sysconf has no preconditions; it returns -1 for unknown names.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then_some(hz as u64)
}

/// First bytes of a rank's state file.
pub const RANK_STATE_MAGIC: &[u8; 8] = b"HCRANKST";
const RANK_STATE_HEADER: usize = 8 + 4 + 4 + 8 * 4 + 32;

/// Where rank `rank` keeps its own state (error-feedback residuals) beside `checkpoint`.
pub fn rank_state_path(checkpoint: &Path, rank: usize) -> PathBuf {
    let mut name = checkpoint.as_os_str().to_owned();
    name.push(format!(".rank{rank}"));
    PathBuf::from(name)
}

/// Writes one rank's state for the checkpoint of `step`, atomically.
///
/// Layout (little-endian): magic `HCRANKST`, u32 version 1, u32 reserved, u64 step,
/// u64 world size, u64 rank, u64 payload length, sha256 of the payload, payload.
pub fn save_rank_state(
    path: &Path,
    step: u64,
    world: usize,
    rank: usize,
    payload: &[u8],
) -> Result<()> {
    let mut header = Vec::with_capacity(RANK_STATE_HEADER);
    header.extend_from_slice(RANK_STATE_MAGIC);
    header.extend_from_slice(&1u32.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    for v in [step, world as u64, rank as u64, payload.len() as u64] {
        header.extend_from_slice(&v.to_le_bytes());
    }
    header.extend_from_slice(&Sha256::digest(payload));
    write_atomic(path, None, |w| {
        w.write_all(&header)?;
        w.write_all(payload)
    })
}

/// Reads into `buf` until it is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Opens a file to read: the file and its size when it is a regular file.
fn open(path: &Path, what: &str) -> Result<(std::fs::File, Option<u64>)> {
    let ctx = || format!("reading {what} {}", shown(path).display());
    let f = std::fs::File::open(path).map_err(|e| Error::io(ctx(), e))?;
    let md = f.metadata().map_err(|e| Error::io(ctx(), e))?;
    if md.is_dir() {
        return Err(fail(path, "is a directory"));
    }
    Ok((f, md.is_file().then_some(md.len())))
}

/// Reads one rank's state. A file that is not intact is an [`Error::Checkpoint`] naming
/// the failed check; an intact one written for another step, world size or rank is
/// `Ok(Err(why))`: usable by nobody here, but nothing is corrupt (e.g. a job stopped
/// between writing the rank files and the checkpoint, or resumed on another size).
pub fn load_rank_state(
    path: &Path,
    step: u64,
    world: usize,
    rank: usize,
) -> Result<std::result::Result<Vec<u8>, String>> {
    let (mut f, size) = open(path, "rank state")?;
    let io = |e| Error::io(format!("reading rank state {}", shown(path).display()), e);
    let mut header = [0u8; RANK_STATE_HEADER];
    let got = read_full(&mut f, &mut header).map_err(io)?;
    if got < RANK_STATE_HEADER || &header[..8] != RANK_STATE_MAGIC {
        return Err(fail(
            path,
            "not a hetccl rank state file (bad magic or too short)",
        ));
    }
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != 1 {
        return Err(fail(path, format!("version {version}, this build reads 1")));
    }
    let reserved = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    if reserved != 0 {
        return Err(fail(
            path,
            format!("reserved header field is {reserved:#x}, not 0 (corrupt header?)"),
        ));
    }
    let (s, w, r, len) = (u64_at(16), u64_at(24), u64_at(32), u64_at(40));
    if len > RANK_STATE_MAX_BYTES {
        return Err(fail(
            path,
            format!(
                "header says {len} bytes of payload, more than the {} limit (corrupt header?)",
                human_bytes(RANK_STATE_MAX_BYTES.into())
            ),
        ));
    }
    let short = |have: u64| {
        fail(
            path,
            format!("payload is {have} bytes, header says {len} (truncated?)"),
        )
    };
    if let Some(size) = size {
        let have = size.saturating_sub(RANK_STATE_HEADER as u64);
        if have != len {
            return Err(short(have));
        }
    }
    // Grows with the bytes read, whatever the header claims.
    let mut payload = Vec::new();
    (&mut f)
        .take(len + 1)
        .read_to_end(&mut payload)
        .map_err(io)?;
    if payload.len() as u64 != len {
        return Err(short(payload.len() as u64));
    }
    if Sha256::digest(&payload).as_slice() != &header[48..80] {
        return Err(fail(path, "checksum mismatch (corrupt file)"));
    }
    if (s, w, r) != (step, world as u64, rank as u64) {
        return Ok(Err(format!(
            "{} was written for step {s} by rank {r} of {w}, this is step {step}, rank {rank} \
             of {world}",
            path.display()
        )));
    }
    Ok(Ok(payload))
}

/// Reads and checks a checkpoint: magic, version, lengths (against the limits and the
/// file's size, before anything is allocated), checksum, metadata, sizes. Each failed
/// check is an [`Error::Checkpoint`] whose reason names it, and says where the previous
/// checkpoint is when [`save`] kept one.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let (f, size) = open(path, "checkpoint")?;
    read(path, f, size, true).map_err(|e| match e {
        Error::Checkpoint { path: p, reason } if previous_path(path).is_file() => {
            Error::Checkpoint {
                path: p,
                reason: format!(
                    "{reason} (the checkpoint before it is {}, untouched)",
                    shown(&previous_path(path)).display()
                ),
            }
        }
        e => e,
    })
}

/// [`load`] of a checkpoint held in memory (`name` stands for its path in errors).
pub fn from_bytes(name: &Path, bytes: &[u8]) -> Result<Checkpoint> {
    read(name, bytes, Some(bytes.len() as u64), true)
}

/// [`load`] from a stream whose length is unknown until it ends (a pipe): memory grows
/// only with the bytes that arrive, never with what the header claims.
pub fn from_reader(name: &Path, r: impl Read) -> Result<Checkpoint> {
    read(name, r, None, true)
}

/// Checks that the checkpoint at `path` is whole (header, size and checksum), without
/// keeping its contents.
pub fn verify(path: &Path) -> Result<()> {
    let (f, size) = open(path, "checkpoint")?;
    read(path, f, size, false).map(|_| ())
}

/// Reads a checkpoint from `r` (`size`: its length when known). With `keep` false the
/// tensors are only hashed, and come back empty.
fn read(path: &Path, mut r: impl Read, size: Option<u64>, keep: bool) -> Result<Checkpoint> {
    let io = |e| Error::io(format!("reading checkpoint {}", shown(path).display()), e);
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(&mut r, &mut header).map_err(io)?;
    if got < HEADER_LEN {
        if got >= MAGIC.len() && &header[..MAGIC.len()] != MAGIC {
            return Err(fail(path, "bad magic: not a hetccl-bert checkpoint"));
        }
        return Err(fail(
            path,
            format!("truncated: {got} bytes, the header alone needs {HEADER_LEN}"),
        ));
    }
    if &header[..8] != MAGIC {
        return Err(fail(path, "bad magic: not a hetccl-bert checkpoint"));
    }
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != VERSION {
        return Err(fail(
            path,
            format!("unsupported version {version} (this build reads {VERSION})"),
        ));
    }
    // Not covered by the checksum, like the rest of the header: every field is checked.
    let reserved = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    if reserved != 0 {
        return Err(fail(
            path,
            format!("reserved header field is {reserved:#x}, not 0 (corrupt header?)"),
        ));
    }
    let (meta_len, payload_len) = (u64_at(16), u64_at(24));
    if meta_len > META_MAX_BYTES {
        return Err(fail(
            path,
            format!(
                "header says {meta_len} bytes of metadata, more than the {} limit (corrupt \
                 header?)",
                human_bytes(META_MAX_BYTES.into())
            ),
        ));
    }
    if payload_len > PAYLOAD_MAX_BYTES {
        return Err(fail(
            path,
            format!(
                "header says {payload_len} bytes of tensors, more than the {} limit (corrupt \
                 header?)",
                human_bytes(PAYLOAD_MAX_BYTES.into())
            ),
        ));
    }
    let want = HEADER_LEN as u64 + meta_len + payload_len;
    let truncated = |have: u64| {
        fail(
            path,
            format!("truncated: header promises {want} bytes, file has {have}"),
        )
    };
    let longer = |have: String| {
        fail(
            path,
            format!(
                "size mismatch: header promises {HEADER_LEN} + {meta_len} + {payload_len} \
                 bytes, file has {have}"
            ),
        )
    };
    match size {
        Some(s) if s < want => return Err(truncated(s)),
        Some(s) if s > want => return Err(longer(s.to_string())),
        _ => {}
    }
    if payload_len % 12 != 0 {
        return Err(fail(
            path,
            format!("header says {payload_len} bytes of tensors, not three f32 tensors"),
        ));
    }
    let mut h = Sha256::new();
    // Both grow with the bytes actually read (reserved up front only when the file's
    // size already proved them there).
    let mut meta_bytes = Vec::new();
    (&mut r)
        .take(meta_len)
        .read_to_end(&mut meta_bytes)
        .map_err(io)?;
    if (meta_bytes.len() as u64) < meta_len {
        return Err(truncated(HEADER_LEN as u64 + meta_bytes.len() as u64));
    }
    h.update(&meta_bytes);
    let n = (payload_len / 12) as usize;
    let mut tensors: [Vec<f32>; 3] = Default::default();
    if keep && size.is_some() {
        for t in &mut tensors {
            t.reserve_exact(n);
        }
    }
    let mut buf = vec![0u8; CHUNK.min(payload_len as usize)];
    let mut done = 0u64;
    while done < payload_len {
        let want_now = (payload_len - done).min(CHUNK as u64) as usize;
        let k = read_full(&mut r, &mut buf[..want_now]).map_err(io)?;
        if k < want_now {
            return Err(truncated(HEADER_LEN as u64 + meta_len + done + k as u64));
        }
        h.update(&buf[..k]);
        if keep {
            // Float i of the payload belongs to tensor i / n (k and done are multiples
            // of 4 since CHUNK is).
            for (j, w) in buf[..k].chunks_exact(4).enumerate() {
                let i = (done / 4) as usize + j;
                tensors[i / n].push(f32::from_le_bytes([w[0], w[1], w[2], w[3]]));
            }
        }
        done += k as u64;
    }
    if size.is_none() && read_full(&mut r, &mut [0u8; 1]).map_err(io)? > 0 {
        return Err(longer("more".into()));
    }
    if h.finalize().as_slice() != &header[32..64] {
        return Err(fail(path, "checksum mismatch: the file is corrupt"));
    }
    let meta: CheckpointMeta = serde_json::from_slice(&meta_bytes)
        .map_err(|e| fail(path, format!("metadata unreadable: {e}")))?;
    if meta.num_params as u64 != n as u64 {
        return Err(fail(
            path,
            format!(
                "payload holds {payload_len} bytes, {} parameters need {}",
                meta.num_params,
                12 * meta.num_params as u128
            ),
        ));
    }
    let [params, m, v] = tensors;
    Ok(Checkpoint { meta, params, m, v })
}
