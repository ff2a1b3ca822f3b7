//! The job key of a one-host job, handed from rank 0 to the other ranks through a file
//! only the job's user can read.
//!
//! Where: a private directory, `/dev/shm/hetccl-<uid>` (else `$XDG_RUNTIME_DIR/hetccl`,
//! else `/tmp/hetccl-<uid>`), created with mode 0700. An existing one is used only if it
//! is a real directory (not a link) owned by this user and closed to everyone else:
//! another user could have made it first to read or plant keys, so anything else is
//! refused with the reason, never repaired.
//!
//! Name: `<launcher>-<16 hex digits of SHA-256 of the launcher's job identity>.key`, the
//! identity being what the launcher gives every rank of the job and no other job at the
//! same time (OpenMPI's job id and launcher address, PMIx's namespace, Slurm's job and
//! step, torchrun's run id and store address).
//!
//! Content (mode 0600; at most [`MAX_KEY_FILE_BYTES`]):
//!
//! ```text
//! hetccl-key 1
//! port <rank 0's store port>
//! key <64 hex digits>
//! ```
//!
//! The key line holds the job key, or, when every rank was given `HETCCL_JOB_KEY` (and
//! the file only carries the port), a digest of it that tells this job's file from an
//! earlier job's without revealing the key.
//!
//! Rank 0 writes it to a temporary name and renames it, so readers see all of it or
//! nothing, and removes it once every rank has joined (or when its store stops). A file
//! left by a crashed earlier job with the same identity names a dead store or proves
//! another key; readers then read it again until rank 0 replaces it or their timeout ends.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::error::{Error, Result};

/// Largest key file a reader accepts.
pub const MAX_KEY_FILE_BYTES: usize = 1024;

const HEADER: &str = "hetccl-key 1";

/// The key file of one job.
#[derive(Clone, Debug)]
pub struct KeyFile {
    path: PathBuf,
}

/// What a key file says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFileContent {
    /// Rank 0's store port.
    pub port: u16,
    /// The job key (64 hex digits).
    pub key: String,
}

impl KeyFileContent {
    fn encode(&self) -> String {
        format!("{HEADER}\nport {}\nkey {}\n", self.port, self.key)
    }

    /// Parses a key file's bytes; the error says what is wrong.
    pub fn parse(bytes: &[u8]) -> std::result::Result<KeyFileContent, String> {
        if bytes.len() > MAX_KEY_FILE_BYTES {
            return Err(format!(
                "{} bytes, more than a key file's {MAX_KEY_FILE_BYTES}",
                bytes.len()
            ));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(format!("the first line is not {HEADER:?}"));
        }
        let mut field = |name: &str| -> std::result::Result<&str, String> {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|v| v.strip_prefix(' '))
                .ok_or_else(|| format!("no `{name}` line where expected"))
        };
        let port = field("port")?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("port {port:?} is not a TCP port from 1 to 65535"))?;
        let key = field("key")?;
        if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("the key is not 64 hex digits".into());
        }
        if lines.next().is_some() {
            return Err("text after the key".into());
        }
        Ok(KeyFileContent {
            port,
            key: key.to_string(),
        })
    }
}

/// The directory one-host jobs of this user keep their key files in (see the module
/// documentation); not created or checked here.
pub fn key_dir(cfg: &Config) -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        return shm.join(format!("hetccl-{uid}"));
    }
    match &cfg.runtime_dir {
        Some(d) if d.is_dir() => d.join("hetccl"),
        _ => PathBuf::from(format!("/tmp/hetccl-{uid}")),
    }
}

/// Makes `dir` (mode 0700, with any missing parents) unless it exists, and refuses it
/// unless it is a directory of this user that nobody else may enter. `what` names it for
/// the error (`the key directory`, `HETCCL_INIT=file://...`); `fix` says what the user
/// can do instead.
pub fn ensure_private_dir(dir: &Path, what: &str, fix: &str) -> Result<()> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("creating {what} {}", dir.display()), e)),
    }
    let md = fs::symlink_metadata(dir)
        .map_err(|e| Error::io(format!("checking {what} {}", dir.display()), e))?;
    check_private(dir, &md, what, fix)
}

/// Refuses `md` (of `path`) unless it is owned by this user and closed to group and others,
/// and (for a directory) is not a link.
fn check_private(path: &Path, md: &fs::Metadata, what: &str, fix: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let mode = md.mode() & 0o7777;
    let problem = if md.file_type().is_symlink() {
        "is a symbolic link".to_string()
    } else if md.uid() != uid {
        format!("belongs to uid {}, not to this user (uid {uid})", md.uid())
    } else if mode & 0o077 != 0 {
        format!("is open to other users (mode {mode:04o})")
    } else {
        return Ok(());
    };
    Err(Error::Bootstrap(format!(
        "{what} {} {problem}: another user could read or replace the job key there; {fix}",
        path.display()
    )))
}

const KEY_DIR_FIX: &str = "remove it (or make it yours with mode 0700), or set HETCCL_JOB_KEY \
                           to the same secret on every rank";

impl KeyFile {
    /// The key file of the job that `identity` names, in `dir` (made private if missing,
    /// refused if not private). `launcher` prefixes the name (`openmpi`, `slurm`, ...).
    pub fn new(dir: &Path, launcher: &str, identity: &str) -> Result<KeyFile> {
        ensure_private_dir(dir, "the key directory", KEY_DIR_FIX)?;
        Ok(KeyFile {
            path: dir.join(file_name(launcher, identity)),
        })
    }

    /// Where the file is (or will be).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rank 0: publishes `content` atomically; the returned guard removes the file.
    pub fn publish(&self, content: &KeyFileContent) -> Result<Published> {
        let text = content.encode();
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        let tmp = dir.join(format!(
            ".{}.{}.{}.tmp",
            self.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id(),
            super::auth::random_hex(4)
        ));
        let write = || -> io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(
                format!("rank 0: writing the key file {}", self.path.display()),
                e,
            )
        })?;
        tracing::debug!("rank 0: job key published in {}", self.path.display());
        Ok(Published {
            path: self.path.clone(),
            text,
        })
    }

    /// The other ranks: what the file says now; `None` while it does not exist. A file
    /// that is not private to this user, too long, or malformed is an error naming it.
    pub fn read(&self) -> Result<Option<KeyFileContent>> {
        let f = match fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::io(
                    format!("reading the key file {}", self.path.display()),
                    e,
                ))
            }
        };
        let md = f
            .metadata()
            .map_err(|e| Error::io(format!("checking the key file {}", self.path.display()), e))?;
        check_private(&self.path, &md, "the key file", KEY_DIR_FIX)?;
        let mut bytes = Vec::new();
        f.take(MAX_KEY_FILE_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(format!("reading the key file {}", self.path.display()), e))?;
        KeyFileContent::parse(&bytes).map(Some).map_err(|why| {
            Error::Bootstrap(format!(
                "the key file {} is not one hetccl wrote: {why}; remove it",
                self.path.display()
            ))
        })
    }
}

/// `<launcher>-<16 hex digits>.key`: the identity hashed, so any text makes a safe name.
fn file_name(launcher: &str, identity: &str) -> String {
    let h = Sha256::digest(identity.as_bytes());
    let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
    let launcher: String = launcher
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(16)
        .collect();
    format!("{launcher}-{hex}.key")
}

/// Rank 0's published key file; dropping it removes the file if it still holds this
/// job's content (a later job with the same identity may have replaced it).
#[derive(Debug)]
pub struct Published {
    path: PathBuf,
    text: String,
}

impl Drop for Published {
    fn drop(&mut self) {
        let ours = fs::read(&self.path).is_ok_and(|b| b == self.text.as_bytes());
        if ours {
            match fs::remove_file(&self.path) {
                Ok(()) => tracing::debug!("rank 0: removed the key file {}", self.path.display()),
                Err(e) => tracing::warn!(
                    "rank 0: cannot remove the key file {}: {e}",
                    self.path.display()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hetccl-keyfile-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn content() -> KeyFileContent {
        KeyFileContent {
            port: 4242,
            key: "ab".repeat(32),
        }
    }

    #[test]
    fn published_file_is_private_and_read_back_then_removed() {
        let dir = scratch("pub");
        let kf = KeyFile::new(&dir, "openmpi", "openmpi:1:tcp://x").unwrap();
        let md = fs::symlink_metadata(&dir).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o700);
        assert_eq!(kf.read().unwrap(), None);
        let guard = kf.publish(&content()).unwrap();
        let md = fs::metadata(kf.path()).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o600);
        assert_eq!(kf.read().unwrap(), Some(content()));
        assert!(kf
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("openmpi-"));
        // Only the file itself: no temporary left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        drop(guard);
        assert!(!kf.path().exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_replaced_file_is_left_to_its_writer() {
        let dir = scratch("replaced");
        let kf = KeyFile::new(&dir, "slurm", "slurm:1.0").unwrap();
        let guard = kf.publish(&content()).unwrap();
        let newer = KeyFileContent {
            port: 1,
            ..content()
        };
        let _newer = std::mem::ManuallyDrop::new(kf.publish(&newer).unwrap());
        drop(guard);
        assert_eq!(kf.read().unwrap(), Some(newer));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn open_or_foreign_directories_are_refused() {
        let dir = scratch("open");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let e = KeyFile::new(&dir, "openmpi", "x").unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "bootstrap: the key directory {} is open to other users (mode 0755): another \
                 user could read or replace the job key there; {KEY_DIR_FIX}",
                dir.display()
            )
        );
        fs::remove_dir_all(&dir).unwrap();
        // A link to a private directory is refused too.
        let real = scratch("real");
        fs::DirBuilder::new().mode(0o700).create(&real).unwrap();
        let link = scratch("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = KeyFile::new(&link, "openmpi", "x").unwrap_err().to_string();
        assert!(e.contains("is a symbolic link"), "{e}");
        fs::remove_file(&link).unwrap();
        fs::remove_dir_all(&real).unwrap();
        // Another user's directory (as root, make one that belongs to nobody).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = scratch("theirs");
            fs::DirBuilder::new().mode(0o700).create(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            let e = KeyFile::new(&theirs, "openmpi", "x")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("belongs to uid 65534, not to this user (uid 0)"),
                "{e}"
            );
            fs::remove_dir_all(&theirs).unwrap();
        }
    }

    #[test]
    fn a_readable_key_file_is_refused() {
        let dir = scratch("readable");
        let kf = KeyFile::new(&dir, "openmpi", "x").unwrap();
        let _g = kf.publish(&content()).unwrap();
        fs::set_permissions(kf.path(), fs::Permissions::from_mode(0o644)).unwrap();
        let e = kf.read().unwrap_err().to_string();
        assert!(
            e.contains("the key file") && e.contains("is open to other users (mode 0644)"),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_differ_by_identity() {
        assert_ne!(file_name("openmpi", "a"), file_name("openmpi", "b"));
        assert_eq!(
            file_name("open/../mpi", "a").len(),
            "openmpi-".len() + 16 + 4
        );
    }

    #[test]
    fn malformed_contents_are_named() {
        let good = content().encode();
        assert_eq!(KeyFileContent::parse(good.as_bytes()), Ok(content()));
        let cases: [(&[u8], &str); 7] = [
            (b"", "the first line is not \"hetccl-key 1\""),
            (
                b"hetccl-key 1\nport 0\nkey x\n",
                "port \"0\" is not a TCP port from 1 to 65535",
            ),
            (b"hetccl-key 1\nkey 1\n", "no `port` line where expected"),
            (
                b"hetccl-key 1\nport 1\nkey 12\n",
                "the key is not 64 hex digits",
            ),
            (b"hetccl-key 1\nport 1\n", "no `key` line where expected"),
            (&[0xff, 0xfe], "not UTF-8 text"),
            (&[b'x'; 2000], "2000 bytes, more than a key file's 1024"),
        ];
        for (bytes, want) in cases {
            assert_eq!(KeyFileContent::parse(bytes), Err(want.to_string()));
        }
        let mut extra = good.clone();
        extra.push_str("more\n");
        assert_eq!(
            KeyFileContent::parse(extra.as_bytes()),
            Err("text after the key".into())
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2000))]
        /// Any bytes parse to a content that writes back the same, or to an error; never a
        /// panic.
        #[test]
        fn any_bytes_parse_or_are_refused(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1100)) {
            if let Ok(c) = KeyFileContent::parse(&bytes) {
                proptest::prop_assert_eq!(KeyFileContent::parse(c.encode().as_bytes()), Ok(c));
            }
        }

        /// A valid file with one byte changed parses to the same content or an error.
        #[test]
        fn mutated_files_parse_or_are_refused(at in 0usize..120, x in 1u8..=255) {
            let mut b = content().encode().into_bytes();
            let n = b.len();
            b[at % n] ^= x;
            if let Ok(c) = KeyFileContent::parse(&b) {
                proptest::prop_assert!(c.key.len() == 64 && c.port > 0);
            }
        }
    }
}
