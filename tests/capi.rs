//! The C API from C (and Python): the examples are compiled with the C compiler the
//! `cc` crate configures, against this build's `libhetccl.so`, and run as real
//! multi-process jobs, one process per rank with torchrun's variables (shm and TCP), under
//! `mpirun` (when installed), and on their own with `hetcclGetUniqueId` +
//! `hetcclCommInitRank`. Each example checks closed forms itself and exits non-zero on the
//! first wrong element.

mod capi_support;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use capi_support::{compile_c, have, lib_path, root, scratch, Link};
use common::{assert_all_ok, collect, free_port, spawn_ranks};

/// Bounds every run: a hang becomes an error inside the ranks, then a kill here.
const RANK_ENV: &[(&str, &str)] = &[
    ("HETCCL_TIMEOUT", "60"),
    ("HETCCL_CONNECT_TIMEOUT", "30"),
    ("MASTER_ADDR", "127.0.0.1"),
];
const DEADLINE: Duration = Duration::from_secs(180);

fn example(name: &str) -> PathBuf {
    root().join("examples/c").join(name)
}

fn allreduce_check() -> &'static PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| compile_c(&[&example("allreduce_check.c")], "allreduce_check"))
}

fn in_place_memory() -> &'static PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let src = root().join("tests/capi_support/in_place_memory.c");
        compile_c(&[&src], "in_place_memory")
    })
}

fn comm_split() -> &'static PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let src = root().join("tests/capi_support/comm_split.c");
        compile_c(&[&src], "comm_split")
    })
}

fn uniqueid_init() -> &'static PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| compile_c(&[&example("uniqueid_init.c")], "uniqueid_init"))
}

/// Runs `cmd` to completion (or the deadline) and returns its single outcome.
fn finish(mut cmd: Command, env: &[(&str, &str)]) -> common::Outcome {
    for (k, v) in RANK_ENV.iter().chain(env) {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    collect(vec![child], DEADLINE).remove(0)
}

/// `n` ranks of `program args`, one process each (the test kit's torchrun-style
/// variables), with `env`; what each left behind, in rank order.
fn launch(n: usize, env: &[(&str, &str)], program: &Path, args: &[&str]) -> Vec<common::Outcome> {
    let env: Vec<(&str, &str)> = RANK_ENV.iter().chain(env).copied().collect();
    let program = program.to_str().expect("a UTF-8 path");
    collect(spawn_ranks(n, program, args, &env, |_| vec![]), DEADLINE)
}

/// Every rank's output, in rank order.
fn all_output(outs: &[common::Outcome]) -> String {
    outs.iter().map(|o| o.output.as_str()).collect()
}

/// The number of checks each rank of allreduce_check reports.
fn passed_lines(out: &str, n: usize) -> usize {
    (0..n)
        .filter(|r| out.contains(&format!("rank {r} of {n}: ")) && out.contains("checks passed"))
        .count()
}

fn check_on_ranks(n: usize, env: &[(&str, &str)]) {
    let outs = launch(n, env, allreduce_check(), &[]);
    assert_all_ok(&outs, &format!("allreduce_check on {n} ranks {env:?}"));
    let out = all_output(&outs);
    assert_eq!(passed_lines(&out, n), n, "every rank reports:\n{out}");
}

#[test]
fn c_example_every_collective_1_rank() {
    check_on_ranks(1, &[]);
}

#[test]
fn c_example_every_collective_2_ranks_shm() {
    check_on_ranks(2, &[]);
}

#[test]
fn c_example_every_collective_4_ranks_shm() {
    check_on_ranks(4, &[]);
}

/// In-place reduce-scatter, all-gather and reduce through the C API on 64 MiB per rank
/// (the program checks every element): the peak RSS grows by the bounded scratch at
/// most, never by a copy of the buffer (the API once staged one for these layouts).
#[test]
fn c_in_place_collectives_copy_no_message() {
    for env in [&[][..], &[("HETCCL_SHM_DISABLE", "1")][..]] {
        let outs = launch(2, env, in_place_memory(), &[]);
        assert_all_ok(&outs, &format!("in_place_memory {env:?}"));
        let out = all_output(&outs);
        let growth: Vec<i64> = out
            .lines()
            .filter_map(|l| {
                let (_, rest) = l.split_once("peak RSS before ")?;
                let (before, rest) = rest.split_once(" KiB, after ")?;
                let after = rest.strip_suffix(" KiB")?;
                Some(after.parse::<i64>().ok()? - before.parse::<i64>().ok()?)
            })
            .collect();
        assert_eq!(growth.len(), 2, "{out}");
        for g in growth {
            assert!(g < 16 << 10, "peak RSS grew by {g} KiB {env:?}:\n{out}");
        }
    }
}

/// `hetcclCommSplit` by parity, without rank 0 (no colour), around a bad colour on the
/// last rank and a NULL result on rank 0, which alone fail; children outlive their
/// parent.
#[test]
fn c_comm_split_on_3_and_4_ranks() {
    for (n, env) in [(3, vec![]), (4, vec![("HETCCL_SHM_DISABLE", "1")])] {
        let outs = launch(n, &env, comm_split(), &[]);
        assert_all_ok(&outs, &format!("comm_split on {n} ranks {env:?}"));
        let out = all_output(&outs);
        // Checks per rank: 7 in each communicator it is in (parity twice), 1 for rank 0
        // left out, 3 for the last rank's refusal of its colour, 2 for rank 0's of NULL.
        for r in 0..n {
            let want = match r {
                0 => 7 + 1 + 7 + 2 + 7,
                r if r == n - 1 => 7 + 7 + 3 + 7 + 7,
                _ => 7 * 5,
            };
            assert!(
                out.contains(&format!("rank {r} of {n}: {want} split checks passed")),
                "rank {r} of {n}:\n{out}"
            );
        }
    }
}

#[test]
fn c_example_every_collective_2_ranks_tcp() {
    check_on_ranks(2, &[("HETCCL_SHM_DISABLE", "1")]);
}

#[test]
fn c_example_every_collective_4_ranks_tcp() {
    check_on_ranks(4, &[("HETCCL_SHM_DISABLE", "1")]);
}

#[test]
fn c_example_under_mpirun() {
    if !have("mpirun") {
        common::skip("mpirun is not installed (apt install openmpi-bin)");
        return;
    }
    let port = free_port().to_string();
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe"])
        .args([
            "--mca",
            "btl_tcp_if_include",
            "lo",
            "--mca",
            "oob_tcp_if_include",
            "lo",
        ])
        .args([
            "-n",
            "2",
            "-x",
            "MASTER_ADDR=127.0.0.1",
            "-x",
            &format!("MASTER_PORT={port}"),
        ])
        .args(["-x", "HETCCL_TIMEOUT=60", "-x", "HETCCL_CONNECT_TIMEOUT=30"])
        .arg(allreduce_check());
    let o = finish(c, &[]);
    assert_all_ok(
        std::slice::from_ref(&o),
        "allreduce_check under mpirun -n 2",
    );
    assert_eq!(passed_lines(&o.output, 2), 2, "{}", o.output);
}

#[test]
fn c_example_init_failure_reports_the_bad_variable() {
    let o = launch(1, &[("HETCCL_ALGO", "fast")], allreduce_check(), &[]).remove(0);
    assert_eq!(o.code, Some(1), "{}", o.output);
    assert!(
        o.output.contains(
            "hetcclCommInitFromEnv(&comm) failed: invalid usage (ranks disagree, or the call is \
             out of place) (invalid value \"fast\" for HETCCL_ALGO: accepted values are auto, \
             ring, tree, hier, doubling, halving)"
        ),
        "{}",
        o.output
    );
}

/// The CUDA runtime's headers and library from the `nvidia-cuda-runtime` wheel
/// (`scripts/install-nvcc.sh` installs it), or why they are not there.
fn cuda_runtime() -> Result<PathBuf, String> {
    let o = Command::new("python3")
        .args([
            "-c",
            "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))",
        ])
        .output()
        .map_err(|e| format!("python3 does not run: {e}"))?;
    let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    let (h, so) = (
        dir.join("include/cuda_runtime.h"),
        dir.join("lib/libcudart.so.13"),
    );
    if o.status.success() && h.is_file() && so.is_file() {
        Ok(dir)
    } else {
        Err(format!(
            "no CUDA runtime headers and library ({} and {}; the nvidia-cuda-runtime wheel, \
             which scripts/install-nvcc.sh installs)",
            h.display(),
            so.display()
        ))
    }
}

/// `examples/c/device_allreduce.c` compiles with CUDA's runtime headers (every warning an
/// error) and links against this build's libhetccl. Run as one rank, it either checks
/// its all-reduce on a GPU or stops at the first call that has none, saying which.
#[test]
fn c_device_example_builds_and_says_why_it_cannot_run() {
    let cuda = match cuda_runtime() {
        Ok(d) => d,
        Err(why) => {
            common::skip(&why);
            return;
        }
    };
    let mut build = capi_support::c_build("c11");
    build
        .include(root().join("bindings"))
        .include(cuda.join("include"));
    let mut cmd = capi_support::compiler(&build);
    let lib_dir = lib_path().parent().expect("lib dir").to_path_buf();
    let exe = scratch("c").join("device_allreduce");
    cmd.arg(example("device_allreduce.c"))
        .arg("-L")
        .arg(&lib_dir)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-lhetccl")
        .arg("-L")
        .arg(cuda.join("lib"))
        .arg(format!("-Wl,-rpath,{}", cuda.join("lib").display()))
        .args(["-l:libcudart.so.13", "-o"])
        .arg(&exe);
    let o = capi_support::run(&mut cmd);
    assert!(
        o.status.success(),
        "{}\n{}",
        capi_support::command_line(&cmd),
        capi_support::text(&o)
    );
    let o = launch(1, &[], &exe, &["1000"]).remove(0);
    let gpu = hetccl::device::available();
    if o.output
        .contains("rank 0: cudaGetDeviceCount(&gpus) failed: ")
    {
        // No GPU the runtime can use: the program says so and stops.
        assert_eq!(o.code, Some(1), "{}", o.output);
        assert!(
            gpu.is_err(),
            "hetccl sees a GPU the CUDA runtime does not: {}",
            o.output
        );
    } else if cfg!(feature = "cuda") && gpu.is_ok() {
        assert_eq!(o.code, Some(0), "{}", o.output);
        assert!(
            o.output
                .contains("rank 0/1: device all-reduce of 1000 floats on GPU 0: ok"),
            "{}",
            o.output
        );
    } else {
        // A GPU, but this libhetccl has no device calls: the first one says why.
        assert_eq!(o.code, Some(1), "{}", o.output);
        assert!(
            o.output.contains(
                "hetcclDeviceCommInit(&dcomm, comm, device) failed: unhandled cuda error"
            ),
            "{}",
            o.output
        );
    }
}

#[test]
fn c_unique_id_one_process_per_rank_through_a_pipe() {
    for (n, env) in [
        (1, vec![]),
        (3, vec![]),
        (4, vec![("HETCCL_SHM_DISABLE", "1")]),
    ] {
        let mut c = Command::new(uniqueid_init());
        c.args(["fork", &n.to_string()]);
        let o = finish(c, &env);
        assert_all_ok(
            std::slice::from_ref(&o),
            &format!("uniqueid_init fork {n} {env:?}"),
        );
        for r in 0..n {
            assert!(
                o.output.contains(&format!("rank {r} of {n}: ok")),
                "{}",
                o.output
            );
        }
    }
}

#[test]
fn c_unique_id_every_rank_in_one_thread_with_groups() {
    for (n, env) in [
        (1, vec![]),
        (2, vec![]),
        (4, vec![("HETCCL_SHM_DISABLE", "1")]),
    ] {
        let mut c = Command::new(uniqueid_init());
        c.args(["group", &n.to_string()]);
        let o = finish(c, &env);
        assert_all_ok(
            std::slice::from_ref(&o),
            &format!("uniqueid_init group {n} {env:?}"),
        );
        assert!(
            o.output.contains(&format!("{n} ranks in one thread: ok")),
            "{}",
            o.output
        );
    }
}

fn python_with_numpy() -> Option<&'static str> {
    let ok = Command::new("python3")
        .args(["-c", "import numpy, ctypes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some("python3")
}

#[test]
fn python_ctypes_example_on_2_ranks() {
    let Some(py) = python_with_numpy() else {
        common::skip("python3 with numpy is not available (pip install numpy)");
        return;
    };
    let script = root().join("examples/python/allreduce_ctypes.py");
    let lib = lib_path().display().to_string();
    let env: Vec<(&str, &str)> = RANK_ENV
        .iter()
        .copied()
        .chain([("HETCCL_LIB", lib.as_str())])
        .collect();
    let script = script.to_str().expect("a UTF-8 path");
    let outs = collect(spawn_ranks(2, py, &[script], &env, |_| vec![]), DEADLINE);
    assert_all_ok(&outs, "allreduce_ctypes.py on 2 ranks");
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.output
                .contains(&format!("rank {r} of 2: all-reduce of 1000000 float32 ok")),
            "{}",
            o.output
        );
    }
}

#[test]
fn static_library_links_a_c_program() {
    // libhetccl.a carries Rust's std; the C side adds what std needs from libc.
    let src = scratch("static").join("version.c");
    std::fs::write(
        &src,
        "#include <hetccl.h>\n#include <stdio.h>\nint main(void) { int v = 0;\n\
         if (hetcclGetVersion(&v) != hetcclSuccess) return 1;\n\
         printf(\"%d\\n\", v); return v == HETCCL_VERSION_CODE ? 0 : 2; }\n",
    )
    .unwrap();
    let exe = scratch("static").join("version");
    capi_support::build_c(&[&src], Link::Static, &exe);
    let o = capi_support::run(&mut Command::new(&exe));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        hetccl::capi::VERSION_CODE.to_string()
    );
}

#[test]
fn install_script_and_pkg_config_build_a_program() {
    if !have("pkg-config") {
        common::skip("pkg-config is not installed (apt install pkg-config)");
        return;
    }
    let prefix = scratch("install").join("prefix");
    let _ = std::fs::remove_dir_all(&prefix);
    let o = capi_support::run(
        Command::new("bash")
            .arg(root().join("scripts/install-lib.sh"))
            .arg("--from")
            .arg(capi_support::deps_dir())
            .arg(&prefix),
    );
    assert!(o.status.success(), "{}", capi_support::text(&o));
    for f in [
        "lib/libhetccl.so",
        "lib/libhetccl.a",
        "include/hetccl.h",
        "lib/pkgconfig/hetccl.pc",
    ] {
        assert!(prefix.join(f).exists(), "{f} installed");
    }
    let pc = |args: &[&str]| {
        let o = capi_support::run(
            Command::new("pkg-config")
                .args(args)
                .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig")),
        );
        assert!(o.status.success(), "{}", capi_support::text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(pc(&["--modversion", "hetccl"]), env!("CARGO_PKG_VERSION"));
    let flags = pc(&["--cflags", "--libs", "hetccl"]);
    let p = prefix.display();
    assert_eq!(
        flags,
        format!("-I{p}/include -L{p}/lib -Wl,-rpath,{p}/lib -lhetccl")
    );
    // Build against the installed copy only, then run it.
    let exe = scratch("install").join("uniqueid_init");
    let flags: Vec<&str> = flags.split_whitespace().collect();
    capi_support::build_c(&[&example("uniqueid_init.c")], Link::Flags(&flags), &exe);
    let mut c = Command::new(&exe);
    c.args(["group", "2"]);
    let o = finish(c, &[]);
    assert_all_ok(std::slice::from_ref(&o), "installed uniqueid_init group 2");
    assert!(
        o.output.contains("2 ranks in one thread: ok"),
        "{}",
        o.output
    );
}
