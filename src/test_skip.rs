//! How a test that cannot run here says so, in a way `scripts/test.sh` counts.
//!
//! The test harness reports a test that returns early as passed, so a skip must leave a
//! trace of its own: one line `<binary>::<test>\t<reason>` appended to the file named by
//! `HETCCL_TEST_SKIP_LOG` (the test script sets it and prints the lines in its summary),
//! and the same on stderr for `--nocapture` runs. The harness names each test's thread
//! after the test, which gives the name.
//!
//! Compiled into the library's unit tests and, through `#[path]`, into the integration
//! tests' `common` module, so both write the same marker.
#![allow(dead_code)]

use std::io::Write;

/// The variable naming the file skips are appended to.
pub const SKIP_LOG_VAR: &str = "HETCCL_TEST_SKIP_LOG";

/// Records that the calling test skips, and why. Call it, then return from the test.
pub fn skip(reason: &str) {
    let name = test_name();
    let reason = reason.replace(['\n', '\t'], " ");
    eprintln!("SKIPPED {name}: {reason}");
    let Some(path) = std::env::var_os(SKIP_LOG_VAR) else {
        return;
    };
    // One write of one line with O_APPEND: lines of tests running at once stay whole.
    let line = format!("{name}\t{reason}\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("cannot record the skip in {}: {e}", path.to_string_lossy());
    }
}

/// `<binary>::<test path>`, e.g. `mpi::mpi_all_gather_under_mpirun`.
fn test_name() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|stem| match stem.rsplit_once('-') {
            // Cargo names test binaries `<target>-<16 hex digits>`.
            Some((target, hash))
                if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                target.to_string()
            }
            _ => stem,
        })
        .unwrap_or_else(|| "?".into());
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    format!("{binary}::{test}")
}
