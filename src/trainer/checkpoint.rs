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
//! config) and the sample index (see `rng`). Saving
//! writes a temporary file in the same directory, fsyncs it, renames it over the target and
//! fsyncs the directory: a crash leaves the old file or the new one, never a torn one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::config::TrainConfig;
use crate::error::{Error, Result};

/// First bytes of every checkpoint.
pub const MAGIC: &[u8; 8] = b"HCBERTCK";
/// Format version this build writes and reads.
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 64;

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
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Writes a checkpoint atomically.
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
    let mut payload = Vec::with_capacity(3 * 4 * n);
    for t in [params, m, v] {
        payload.extend_from_slice(bytemuck::cast_slice::<f32, u8>(t));
    }
    if cfg!(target_endian = "big") {
        for w in payload.chunks_exact_mut(4) {
            w.reverse();
        }
    }
    let mut h = Sha256::new();
    h.update(&meta_bytes);
    h.update(&payload);
    let digest = h.finalize();

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&(meta_bytes.len() as u64).to_le_bytes());
    header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    header.extend_from_slice(&digest);

    write_atomic(path, &[&header, &meta_bytes, &payload])?;
    tracing::info!(target: "hetccl::trainer::checkpoint", path = %path.display(), step = meta.step,
        bytes = HEADER_LEN + meta_bytes.len() + payload.len(), "checkpoint written");
    Ok(())
}

/// Writes `parts` to `path` through a temporary file in the same directory, fsynced
/// and renamed over the target, then fsyncs the directory.
fn write_atomic(path: &Path, parts: &[&[u8]]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        for p in parts {
            f.write_all(p)?;
        }
        f.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(format!("writing {}", tmp.display()), e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(
            format!("renaming {} to {}", tmp.display(), path.display()),
            e,
        )
    })?;
    // The rename is durable once the directory entry is.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
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
    write_atomic(path, &[&header, payload])
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
    let bytes = std::fs::read(path)
        .map_err(|e| Error::io(format!("reading rank state {}", path.display()), e))?;
    let fail = |reason: String| Error::Checkpoint {
        path: path.display().to_string(),
        reason,
    };
    if bytes.len() < RANK_STATE_HEADER || &bytes[..8] != RANK_STATE_MAGIC {
        return Err(fail(
            "not a hetccl rank state file (bad magic or too short)".into(),
        ));
    }
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != 1 {
        return Err(fail(format!("version {version}, this build reads 1")));
    }
    let (s, w, r, len) = (u64_at(16), u64_at(24), u64_at(32), u64_at(40));
    let payload = &bytes[RANK_STATE_HEADER..];
    if payload.len() as u64 != len {
        return Err(fail(format!(
            "payload is {} bytes, header says {len} (truncated?)",
            payload.len()
        )));
    }
    if Sha256::digest(payload).as_slice() != &bytes[48..80] {
        return Err(fail("checksum mismatch (corrupt file)".into()));
    }
    if (s, w, r) != (step, world as u64, rank as u64) {
        return Ok(Err(format!(
            "{} was written for step {s} by rank {r} of {w}, this is step {step}, rank {rank} \
             of {world}",
            path.display()
        )));
    }
    Ok(Ok(payload.to_vec()))
}

/// Reads and checks a checkpoint: magic, version, length, checksum, metadata, sizes.
/// Each failed check is an [`Error::Checkpoint`] whose reason names it.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::io(format!("reading checkpoint {}", path.display()), e))?;
    decode(path, &bytes)
}

fn decode(path: &Path, bytes: &[u8]) -> Result<Checkpoint> {
    if bytes.len() < HEADER_LEN {
        if bytes.len() >= MAGIC.len() && &bytes[..MAGIC.len()] != MAGIC {
            return Err(fail(path, "bad magic: not a hetccl-bert checkpoint"));
        }
        return Err(fail(
            path,
            format!(
                "truncated: {} bytes, the header alone needs {HEADER_LEN}",
                bytes.len()
            ),
        ));
    }
    if &bytes[..8] != MAGIC {
        return Err(fail(path, "bad magic: not a hetccl-bert checkpoint"));
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let version = u32_at(8);
    if version != VERSION {
        return Err(fail(
            path,
            format!("unsupported version {version} (this build reads {VERSION})"),
        ));
    }
    let (meta_len, payload_len) = (u64_at(16), u64_at(24));
    let want = (HEADER_LEN as u64)
        .checked_add(meta_len)
        .and_then(|x| x.checked_add(payload_len));
    match want {
        Some(w) if w == bytes.len() as u64 => {}
        Some(w) if w > bytes.len() as u64 => {
            return Err(fail(
                path,
                format!(
                    "truncated: header promises {w} bytes, file has {}",
                    bytes.len()
                ),
            ))
        }
        _ => {
            return Err(fail(
                path,
                format!(
                "size mismatch: header promises {} + {meta_len} + {payload_len} bytes, file has {}",
                HEADER_LEN,
                bytes.len()
            ),
            ))
        }
    }
    let meta_bytes = &bytes[HEADER_LEN..HEADER_LEN + meta_len as usize];
    let payload = &bytes[HEADER_LEN + meta_len as usize..];
    let mut h = Sha256::new();
    h.update(meta_bytes);
    h.update(payload);
    if h.finalize().as_slice() != &bytes[32..64] {
        return Err(fail(path, "checksum mismatch: the file is corrupt"));
    }
    let meta: CheckpointMeta = serde_json::from_slice(meta_bytes)
        .map_err(|e| fail(path, format!("metadata unreadable: {e}")))?;
    let n = meta.num_params;
    if payload.len() as u64 != 12 * n as u64 {
        return Err(fail(
            path,
            format!(
                "payload holds {} bytes, {n} parameters need {}",
                payload.len(),
                12 * n as u64
            ),
        ));
    }
    let floats = |k: usize| -> Vec<f32> {
        payload[4 * n * k..4 * n * (k + 1)]
            .chunks_exact(4)
            .map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect()
    };
    Ok(Checkpoint {
        params: floats(0),
        m: floats(1),
        v: floats(2),
        meta,
    })
}
