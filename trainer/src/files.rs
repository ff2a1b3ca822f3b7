//! The files the trainer reads: bounded reads, and where a data file's name came from.
//!
//! Every read stops one byte past a stated limit (a constant next to each reader), so a
//! file that is too large, `/dev/zero` or an endless FIFO is refused with its name, its
//! size (or "larger than") and the limit, instead of filling memory. A regular file's size
//! is checked before reading; other files are counted as they are read.
//!
//! The default corpus and vocabulary are the repository's `data/` files, compiled into the
//! program, so a run finds them wherever it is started from. A file named in a TOML
//! settings file is looked for relative to that file; one named by a flag, relative to the
//! working directory.

use std::borrow::Cow;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The default corpus: `data/tinyshakespeare.txt` (1.1 MB), built in.
pub const BUILTIN_CORPUS: &str = include_str!("../../data/tinyshakespeare.txt");
/// The default vocabulary: `data/bert-base-uncased-vocab.txt` (230 kB), built in.
pub const BUILTIN_VOCAB: &str = include_str!("../../data/bert-base-uncased-vocab.txt");

/// Who named a data file: the messages about it say so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag (`--data`); relative paths are relative to the working directory.
    Flag(&'static str),
    /// A key of this TOML file; relative paths were made relative to the file.
    ConfigFile {
        /// The key (`data`, `vocab`).
        key: &'static str,
        /// The settings file.
        file: PathBuf,
    },
    /// The program that built the options (a library user, a test).
    Caller,
}

/// A corpus or vocabulary: a file, or the copy built into the program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataFile {
    /// A file on disk.
    Path {
        /// As given (or as made relative to the settings file).
        path: PathBuf,
        /// Who named it.
        origin: Origin,
    },
    /// Built in: the repository file of this name (see [`BUILTIN_CORPUS`],
    /// [`BUILTIN_VOCAB`]).
    Builtin {
        /// Repository path, e.g. `data/tinyshakespeare.txt`.
        name: &'static str,
        /// Its text.
        text: &'static str,
    },
}

impl DataFile {
    /// The built-in corpus.
    pub fn builtin_corpus() -> DataFile {
        DataFile::Builtin {
            name: "data/tinyshakespeare.txt",
            text: BUILTIN_CORPUS,
        }
    }

    /// The built-in vocabulary.
    pub fn builtin_vocab() -> DataFile {
        DataFile::Builtin {
            name: "data/bert-base-uncased-vocab.txt",
            text: BUILTIN_VOCAB,
        }
    }

    /// The same file, now said to come from `origin` (a built-in stays built-in).
    pub fn with_origin(self, origin: Origin) -> DataFile {
        match self {
            DataFile::Path { path, .. } => DataFile::Path { path, origin },
            b => b,
        }
    }

    /// The text of the file, at most `limit` bytes of it (`what` names it in errors).
    pub fn read_text(&self, what: &str, limit: u64) -> Result<Cow<'static, str>> {
        match self {
            DataFile::Builtin { text, .. } => Ok(Cow::Borrowed(text)),
            DataFile::Path { path, .. } => {
                let bytes = read_limited(path, what, limit).map_err(|e| self.context(e))?;
                String::from_utf8(bytes).map(Cow::Owned).map_err(|e| {
                    Error::invalid(
                        "DataFile::read_text",
                        format!(
                            "{what} {self} is not UTF-8 text (invalid byte at offset {})",
                            e.utf8_error().valid_up_to()
                        ),
                    )
                })
            }
        }
    }

    /// Adds where the name came from to an I/O error about this file.
    pub fn context(&self, e: Error) -> Error {
        match (e, self) {
            (Error::Io { context, source }, DataFile::Path { origin, .. })
                if *origin != Origin::Caller =>
            {
                Error::Io {
                    context: format!("{context} ({})", OriginText(origin)),
                    source,
                }
            }
            (e, _) => e,
        }
    }
}

impl From<PathBuf> for DataFile {
    fn from(path: PathBuf) -> Self {
        DataFile::Path {
            path,
            origin: Origin::Caller,
        }
    }
}

impl From<&Path> for DataFile {
    fn from(path: &Path) -> Self {
        path.to_path_buf().into()
    }
}

struct OriginText<'a>(&'a Origin);

impl fmt::Display for OriginText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Origin::Flag(flag) => write!(f, "from {flag}, relative to the working directory"),
            Origin::ConfigFile { key, file } => {
                write!(f, "from {key} in {}, relative to that file", file.display())
            }
            Origin::Caller => Ok(()),
        }
    }
}

impl fmt::Display for DataFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataFile::Path { path, .. } => write!(f, "{}", shown(path).display()),
            DataFile::Builtin { name, .. } => write!(f, "{name} (built in)"),
        }
    }
}

/// `path` as messages show it: absolute, so a relative name says where it was looked for.
pub fn shown(path: &Path) -> Cow<'_, Path> {
    match std::path::absolute(path) {
        Ok(p) if p != path => Cow::Owned(p),
        _ => Cow::Borrowed(path),
    }
}

/// A byte count for people: `64 MiB`, `1.5 GiB`, `512 bytes`.
pub fn human_bytes(n: u128) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The error for a file past its limit: `size` when known (a regular file), else
/// "larger than".
pub fn too_large(what: &str, path: &Path, size: Option<u64>, limit: u64) -> Error {
    let detail = match size {
        Some(s) => format!(
            "{s} bytes ({}), more than the {} limit for a {what}",
            human_bytes(s.into()),
            human_bytes(limit.into())
        ),
        None => format!(
            "larger than the {} limit for a {what}",
            human_bytes(limit.into())
        ),
    };
    Error::io(
        format!("reading {what} {}", shown(path).display()),
        std::io::Error::new(std::io::ErrorKind::FileTooLarge, detail),
    )
}

/// Opens `path` for a read of at most `limit` bytes: the reader stops one byte past it,
/// so a caller that gets more than `limit` bytes knows the file is too large. Refuses a
/// regular file already larger.
pub fn open_limited(path: &Path, what: &str, limit: u64) -> Result<std::io::Take<std::fs::File>> {
    let ctx = || format!("reading {what} {}", shown(path).display());
    let file = std::fs::File::open(path).map_err(|e| Error::io(ctx(), e))?;
    let meta = file.metadata().map_err(|e| Error::io(ctx(), e))?;
    if meta.is_dir() {
        return Err(Error::io(
            ctx(),
            std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
        ));
    }
    if meta.is_file() && meta.len() > limit {
        return Err(too_large(what, path, Some(meta.len()), limit));
    }
    Ok(file.take(limit.saturating_add(1)))
}

/// Reads all of `path`, refusing more than `limit` bytes (`what` names the file's role in
/// messages: "vocabulary", "corpus", ...).
pub fn read_limited(path: &Path, what: &str, limit: u64) -> Result<Vec<u8>> {
    let mut r = open_limited(path, what, limit)?;
    let mut buf = Vec::new();
    r.read_to_end(&mut buf)
        .map_err(|e| Error::io(format!("reading {what} {}", shown(path).display()), e))?;
    if buf.len() as u64 > limit {
        return Err(too_large(what, path, None, limit));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_rounds_to_the_unit() {
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(64 << 20), "64 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes(u64::MAX as u128 + 1), "16 EiB");
    }

    #[test]
    fn reads_stop_at_the_limit_for_devices_and_regular_files() {
        let err = read_limited(Path::new("/dev/zero"), "test file", 4096).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reading test file /dev/zero: larger than the 4 KiB limit for a test file"
        );
        assert!(matches!(err, Error::Io { ref source, .. }
            if source.kind() == std::io::ErrorKind::FileTooLarge));
        let dir = std::env::temp_dir().join(format!("hetccl-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, vec![b'x'; 4097]).unwrap();
        assert_eq!(
            read_limited(&p, "test file", 4096).unwrap_err().to_string(),
            format!(
                "reading test file {}: 4097 bytes (4.0 KiB), more than the 4 KiB limit for a test file",
                p.display()
            )
        );
        std::fs::write(&p, vec![b'x'; 4096]).unwrap();
        assert_eq!(read_limited(&p, "test file", 4096).unwrap().len(), 4096);
        let err = read_limited(&dir, "test file", 4096).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("reading test file {}: is a directory", dir.display())
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn errors_say_where_a_name_came_from() {
        let f = DataFile::Path {
            path: PathBuf::from("/nonexistent/c.txt"),
            origin: Origin::ConfigFile {
                key: "data",
                file: PathBuf::from("/etc/x.toml"),
            },
        };
        assert_eq!(
            f.read_text("corpus", 100).unwrap_err().to_string(),
            "reading corpus /nonexistent/c.txt (from data in /etc/x.toml, relative to that \
             file): No such file or directory (os error 2)"
        );
        let f = DataFile::from(PathBuf::from("/nonexistent/v.txt"))
            .with_origin(Origin::Flag("--vocab"));
        assert_eq!(
            f.read_text("vocabulary", 100).unwrap_err().to_string(),
            "reading vocabulary /nonexistent/v.txt (from --vocab, relative to the working \
             directory): No such file or directory (os error 2)"
        );
        assert_eq!(
            DataFile::builtin_vocab().to_string(),
            "data/bert-base-uncased-vocab.txt (built in)"
        );
    }
}
