//! A test's own directory under `$TMPDIR`, gone when the test passes.

use std::ffi::OsStr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// `$TMPDIR/hetccl-<name>-<pid>-<n>`, made empty on creation. Dropped after a pass it is
/// removed with everything in it; dropped while the test panics it is kept, and its path
/// printed, so the files of a failure can be read.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    /// Creates the directory; `name` tells the tests apart, `n` the calls of one test.
    pub fn new(name: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("hetccl-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        if let Err(e) = std::fs::create_dir_all(&path) {
            panic!("creating the test directory {}: {e}", path.display());
        }
        Scratch(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<OsStr> for Scratch {
    fn as_ref(&self) -> &OsStr {
        self.0.as_os_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passing_test_leaves_nothing() {
        let d = Scratch::new("scratch-pass");
        std::fs::write(d.join("f"), b"x").unwrap();
        let path = d.path().to_path_buf();
        assert!(path.join("f").exists());
        drop(d);
        assert!(!path.exists(), "{} is still there", path.display());
    }

    #[test]
    fn a_failing_test_keeps_its_files() {
        let path = std::thread::spawn(|| {
            let d = Scratch::new("scratch-fail");
            std::fs::write(d.join("f"), b"x").unwrap();
            let path = d.path().to_path_buf();
            std::panic::panic_any(path);
        })
        .join()
        .unwrap_err()
        .downcast::<PathBuf>()
        .unwrap();
        assert!(path.join("f").exists(), "{} was removed", path.display());
        std::fs::remove_dir_all(&*path).unwrap();
    }

    #[test]
    fn two_of_one_name_are_two_directories() {
        let (a, b) = (Scratch::new("scratch-two"), Scratch::new("scratch-two"));
        assert_ne!(a.path(), b.path());
        assert!(a.is_dir() && b.is_dir());
    }
}
