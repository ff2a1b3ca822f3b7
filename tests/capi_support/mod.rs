//! Shared by the C API tests: where the built library is, compiling C against it
//! with the compiler the `cc` crate configures, running programs.
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

/// The target this test binary was built for, which is the machine it runs on: the C
/// programs are built for it too.
fn target() -> String {
    let env = if cfg!(target_env = "musl") {
        "musl"
    } else {
        "gnu"
    };
    format!("{}-unknown-linux-{env}", std::env::consts::ARCH)
}

/// The C (or C++) compiler as the `cc` crate finds and configures it: the one `CC` /
/// `CXX` name, else the platform's, with cc's default flags for the target and ours:
/// the language standard, `-O1`, every warning as an error, `-pedantic`. A test is no
/// build script, so what cc would read from Cargo's build-script variables (target,
/// host, optimisation, output folder) is given here.
pub fn c_build(std: &str) -> cc::Build {
    let mut b = cc::Build::new();
    b.target(&target())
        .host(&target())
        .opt_level(1)
        .debug(false)
        .out_dir(scratch("cc"))
        .cargo_metadata(false)
        .cargo_warnings(false)
        .cpp(std.starts_with("c++"))
        .std(std)
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .flag("-pedantic");
    b
}

/// The configured compiler of `build` as a command, ready for sources and link flags.
pub fn compiler(build: &cc::Build) -> Command {
    build
        .try_get_compiler()
        .unwrap_or_else(|e| panic!("cc cannot configure a compiler: {e}"))
        .to_command()
}

/// How a C program gets libhetccl.
pub enum Link<'a> {
    /// This build's `libhetccl.so`, found at run time through an rpath.
    Shared,
    /// This build's `libhetccl.a`; the program adds what Rust's std needs from libc.
    Static,
    /// An installed copy, through these flags (`pkg-config --cflags --libs hetccl`) only.
    Flags(&'a [&'a str]),
}

/// Compiles C11 sources with `cc`'s compiler into `exe`, linked to hetccl as `link`
/// says; panics with the compiler's output when that fails.
pub fn build_c(srcs: &[&Path], link: Link, exe: &Path) {
    let mut build = c_build("c11");
    if !matches!(link, Link::Flags(_)) {
        build.include(root().join("bindings"));
    }
    let mut cmd = compiler(&build);
    cmd.args(srcs);
    match link {
        Link::Shared => {
            let lib_dir = lib_path().parent().expect("lib dir").to_path_buf();
            cmd.arg("-L")
                .arg(&lib_dir)
                .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
                .args(["-lhetccl", "-lpthread", "-lm"]);
        }
        Link::Static => {
            let a = lib_path().with_file_name("libhetccl.a");
            assert!(
                a.exists(),
                "{} missing: crate-type must include staticlib",
                a.display()
            );
            cmd.arg(&a).args(["-lpthread", "-ldl", "-lm"]);
        }
        Link::Flags(flags) => {
            cmd.args(flags);
        }
    }
    let o = run(cmd.arg("-o").arg(exe));
    assert!(
        o.status.success(),
        "compiling {srcs:?} failed:\n{}\n{}",
        command_line(&cmd),
        text(&o)
    );
}

/// A command as a shell would show it, without the environment cc passes along.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Compiles C sources against `bindings/hetccl.h` and `libhetccl.so`; returns the
/// executable.
pub fn compile_c(srcs: &[&Path], exe_name: &str) -> PathBuf {
    let out = scratch("c").join(exe_name);
    build_c(srcs, Link::Shared, &out);
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
