//! The kernels' architectures without a GPU: ptxas' report is checked as build.rs checks
//! it (build/ptxas.rs), and the Volta build's compile (NVRTC and ptxas of the CUDA 12
//! wheels, scripts/nvrtc-compile.py) runs for sm_70 when those wheels are installed
//! (scripts/install-nvcc12.sh), else skips naming the missing file.

mod common;

#[path = "../build/ptxas.rs"]
mod ptxas;

use std::path::{Path, PathBuf};
use std::process::Command;

const REPORT: &str = "\
ptxas info    : Compiling entry function 'fp16_compress' for 'sm_75'
ptxas info    : Function properties for fp16_compress
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'fp16_compress' for 'sm_80'
ptxas info    : Function properties for fp16_compress
    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 400 bytes cmem[0]
";

#[test]
fn the_report_gives_registers_and_spills_per_kernel_and_architecture() {
    let entries = ptxas::parse(REPORT);
    assert_eq!(entries.len(), 2);
    assert_eq!(
        entries[1].line(),
        "ptxas sm_80 fp16_compress: 255 registers, spill 12 B stores / 4 B loads, stack 8 B"
    );
    assert_eq!(ptxas::check(&entries[..1], &[75]), Ok(()));
}

#[test]
fn a_spill_or_a_missing_architecture_fails_the_check() {
    let entries = ptxas::parse(REPORT);
    assert_eq!(
        ptxas::check(&entries, &[75, 80, 86]),
        Err(
            "no kernel was compiled for sm_86; fp16_compress spills on sm_80: 12 B stores / 4 B \
             loads"
                .to_string()
        )
    );
}

#[test]
fn the_fatbin_covers_turing_to_hopper_with_hopper_ptx() {
    assert_eq!(
        ptxas::gencode().join(" "),
        "-gencode arch=compute_75,code=sm_75 -gencode arch=compute_80,code=sm_80 \
         -gencode arch=compute_86,code=sm_86 -gencode arch=compute_89,code=sm_89 \
         -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90"
    );
}

/// Where scripts/install-nvcc12.sh puts the CUDA 12 wheels (as build.rs looks them up).
fn cuda12_prefix(root: &Path) -> PathBuf {
    std::env::var_os("HETCCL_CUDA12_PREFIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target").join("cuda12"))
}

#[test]
fn the_kernels_compile_for_volta_with_cuda_12_without_spills() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("hetccl-sm70-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The one translation unit build.rs compiles.
    let mut unit = String::new();
    for k in ["compress.cu", "reduce.cu"] {
        unit += &format!("#include \"{}\"\n", root.join("kernels").join(k).display());
    }
    let unit_path = dir.join("kernels_all.cu");
    std::fs::write(&unit_path, unit).unwrap();
    let out = dir.join("kernels.ptx");
    let run = Command::new("python3")
        .arg(root.join("scripts/nvrtc-compile.py"))
        .arg("--prefix")
        .arg(cuda12_prefix(root))
        .arg(format!("--arch=compute_{}", ptxas::VOLTA_PTX))
        .arg(format!("--sm=sm_{}", ptxas::VOLTA_SM[0]))
        .arg("-I")
        .arg(root.join("kernels"))
        .arg("--out")
        .arg(&out)
        .arg(&unit_path)
        .output();
    let run = match run {
        Ok(r) => r,
        Err(e) => return common::skip(&format!("python3 is not runnable: {e}")),
    };
    let report = String::from_utf8_lossy(&run.stderr).into_owned();
    if run.status.code() == Some(2) {
        let _ = std::fs::remove_dir_all(&dir);
        return common::skip(&format!("no CUDA 12 compiler: {}", report.trim()));
    }
    assert!(run.status.success(), "{report}");
    let ptx = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        String::from_utf8_lossy(&ptx).contains(".target sm_70"),
        "the PTX is not compute_70's"
    );
    assert_eq!(
        ptx.last(),
        Some(&0),
        "cuModuleLoadData needs the PTX NUL-terminated"
    );
    let entries = ptxas::parse(&report);
    assert_eq!(ptxas::check(&entries, &[70]), Ok(()), "{report}");
    assert_eq!((ptxas::VOLTA_PTX, ptxas::VOLTA_SM[0]), (70, 70));
    // The launchers' kernels (src/device/kernels.rs): 4 wire kernels for each of fp16
    // and bf16, and for f32, f16, bf16 each: reduce_inplace and reduce_from for five
    // ops, and reduce_finalize_avg.
    assert_eq!(entries.len(), 8 + 3 * 11, "{report}");
    for name in [
        "fp16_decompress_add_compress",
        "bf16_compress",
        "reduce_finalize_avg_bf16",
    ] {
        assert!(
            entries.iter().any(|e| e.name == name),
            "{name} missing: {report}"
        );
    }
}
