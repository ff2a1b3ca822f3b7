//! The PyTorch backend (`python/hetccl_torch`): runs `python/tests/test_backend.py`
//! (collectives of every shared dtype and op, grouped sends and receives and
//! all_to_all against Gloo on 2 and 4 ranks; plain isend/irecv rings posted receive
//! first, and a receive posted before a collective, on 2 and 4 ranks; sends and receives
//! matched by tag, a receive of the wrong size; mismatched shapes and a dead rank on 2
//! and 4 ranks, the process group's timeout and `set_timeout`; DDP BERT against Gloo) with
//! the Python that `HETCCL_TORCH_PYTHON` names, else `python3`. Without PyTorch there
//! (it is large: `scripts/install-torch.sh` installs it) the test is recorded as skipped.
//! A second test runs `python/tests/test_backend_cuda.py` where PyTorch and hetccl see a
//! GPU.

mod common;

use std::process::Command;

fn python() -> String {
    std::env::var("HETCCL_TORCH_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Why the backend's tests cannot run with `py`, if they cannot.
fn missing(py: &str) -> Option<String> {
    let probe = Command::new(py)
        .args([
            "-c",
            "import torch, torch.distributed as d, transformers; assert d.is_gloo_available()",
        ])
        .output();
    match probe {
        Err(e) => Some(format!("{py} does not run ({e})")),
        Ok(o) if !o.status.success() => Some(format!(
            "PyTorch with Gloo and transformers is not importable by {py} \
             (scripts/install-torch.sh installs them; HETCCL_TORCH_PYTHON selects the Python)"
        )),
        Ok(_) => None,
    }
}

/// Runs `python -m unittest -v MODULE` in python/tests against this build's
/// libhetccl; asserts it passed and returns unittest's report.
fn unittest(py: &str, module: &str) -> String {
    let repo = common::repo();
    let out = Command::new(py)
        .args(["-m", "unittest", "-v", module])
        .current_dir(repo.join("python/tests"))
        .env("HETCCL_LIB_DIR", repo.join("target/release"))
        .output()
        .expect("running the Python tests");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "python/tests/{module}.py failed:\n{text}"
    );
    text
}

#[test]
fn torch_backend_matches_gloo_and_trains_ddp_bert() {
    let py = python();
    if let Some(why) = missing(&py) {
        common::skip(&why);
        return;
    }
    let repo = common::repo();
    let lib = repo.join("target/release/libhetccl.so");
    assert!(
        lib.is_file(),
        "{} is missing: cargo build --release first",
        lib.display()
    );
    let text = unittest(&py, "test_backend");
    // unittest's summary: every case the file defines ran, none was skipped.
    let source = std::fs::read_to_string(repo.join("python/tests/test_backend.py"))
        .expect("reading python/tests/test_backend.py");
    let cases = source
        .lines()
        .filter(|l| l.trim_start().starts_with("def test_"))
        .count();
    assert!(
        cases >= 12,
        "only {cases} test cases found in test_backend.py"
    );
    assert!(text.contains(&format!("Ran {cases} tests")), "{text}");
    assert!(!text.contains("skipped"), "{text}");
    assert!(text.trim_end().ends_with("OK"), "{text}");
}

/// The backend on CUDA tensors: `python/tests/test_backend_cuda.py` (every collective on
/// float32, float16 and bfloat16 CUDA tensors against the same call on CPU tensors, on 2
/// and 3 ranks; the order with the caller's stream; a refused dtype; DDP BERT on CUDA
/// against Gloo). Needs a GPU that PyTorch sees and `target/release/libhetccl.so` built
/// with the cuda feature (`cargo build --release -p hetccl --features cuda`); skipped,
/// saying which is missing, otherwise.
#[test]
fn torch_backend_on_cuda_tensors() {
    let py = python();
    if let Some(why) = missing(&py) {
        common::skip(&why);
        return;
    }
    if let Err(why) = hetccl::device::available() {
        common::skip(&format!("no GPU for hetccl here: {why}"));
        return;
    }
    let sees = Command::new(&py)
        .args([
            "-c",
            "import torch, sys; sys.exit(not torch.cuda.is_available())",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !sees {
        common::skip(&format!("PyTorch at {py} sees no CUDA device"));
        return;
    }
    let text = unittest(&py, "test_backend_cuda");
    assert!(text.contains("Ran 3 tests"), "{text}");
    assert!(!text.contains("skipped"), "{text}");
}
