//! Shared by the C API tests: where the built library is, compiling C against it,
//! running programs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The crate root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>/deps/`, where the test binary runs from.
pub fn deps_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent().expect("test binary directory").to_path_buf()
}

/// `target/<profile>/`.
pub fn target_dir() -> PathBuf {
    deps_dir()
        .parent()
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// `libhetccl.so` as built for this test run. `cargo test` builds the library with
/// every crate type of `[lib]`, but copies the cdylib and staticlib up to
/// `target/<profile>/` only when the library itself was asked for (`cargo build`), so
/// the fresh copy is the one in `deps/`, next to the test binary; the one above may be
/// stale or absent.
pub fn lib_path() -> PathBuf {
    let p = deps_dir().join("libhetccl.so");
    assert!(
        p.exists(),
        "{} is missing; the [lib] crate-type must include cdylib",
        p.display()
    );
    p
}

/// A scratch folder for this test binary.
pub fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

/// Runs a command, panicking with its output when it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// stdout + stderr as text, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Compiles C sources against `bindings/hetccl.h` and `libhetccl.so` with warnings as
/// errors; returns the executable.
pub fn compile_c(srcs: &[&Path], exe_name: &str) -> PathBuf {
    let lib_dir = lib_path().parent().expect("lib dir").to_path_buf();
    let out = scratch("c").join(exe_name);
    let o = run(Command::new("cc")
        .args([
            "-std=c11",
            "-O1",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
        ])
        .arg("-I")
        .arg(root().join("bindings"))
        .args(srcs)
        .arg("-L")
        .arg(&lib_dir)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .args(["-lhetccl", "-lpthread", "-lm", "-o"])
        .arg(&out));
    assert!(
        o.status.success(),
        "compiling {srcs:?} failed:\n{}",
        text(&o)
    );
    out
}

/// True when `prog` can be found on PATH.
pub fn have(prog: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {prog} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
