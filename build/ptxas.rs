//! The kernels' architectures and ptxas' register/spill report, shared by build.rs
//! (which fails the build on a spill) and tests/kernel_archs.rs (which checks the Volta
//! build's report the same way).

/// Machine code in the CUDA 13 fatbin: Turing (T4), Ampere (A100; RTX 3090, A10, A40),
/// Ada (RTX 4090, L4, L40), Hopper. CUDA 13 no longer targets Volta (sm_70): that is the
/// `cuda12` build's.
pub const FATBIN_SM: [u32; 5] = [75, 80, 86, 89, 90];

/// PTX in the fatbin, for the driver to JIT on architectures newer than the last
/// machine code (Blackwell and on).
pub const FATBIN_PTX: u32 = 90;

/// The Volta build's PTX target (NVRTC of CUDA 12); ptxas checks it for these too.
pub const VOLTA_PTX: u32 = 70;
pub const VOLTA_SM: [u32; 6] = [70, 75, 80, 86, 89, 90];

/// nvcc's `-gencode` arguments for [`FATBIN_SM`] and [`FATBIN_PTX`].
#[allow(dead_code)]
pub fn gencode() -> Vec<String> {
    let mut args = Vec::new();
    for sm in FATBIN_SM {
        args.push("-gencode".to_string());
        args.push(format!("arch=compute_{sm},code=sm_{sm}"));
    }
    args.push("-gencode".to_string());
    args.push(format!(
        "arch=compute_{FATBIN_PTX},code=compute_{FATBIN_PTX}"
    ));
    args
}

/// One kernel compiled for one architecture, as ptxas reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub arch: String,
    pub name: String,
    pub registers: u32,
    pub stack: u64,
    pub spill_stores: u64,
    pub spill_loads: u64,
}

impl Entry {
    /// `ptxas sm_90 fp16_compress: 32 registers, spill 0 B stores / 0 B loads, stack 0 B`
    #[allow(dead_code)]
    pub fn line(&self) -> String {
        format!(
            "ptxas {} {}: {} registers, spill {} B stores / {} B loads, stack {} B",
            self.arch, self.name, self.registers, self.spill_stores, self.spill_loads, self.stack
        )
    }
}

/// The entries of a `ptxas -v` report (nvcc's, or scripts/nvrtc-compile.py's):
///
/// ```text
/// ptxas info    : Compiling entry function 'fp16_compress' for 'sm_90'
/// ptxas info    : Function properties for fp16_compress
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 32 registers, used 0 barriers, 400 bytes cmem[0]
/// ```
pub fn parse(report: &str) -> Vec<Entry> {
    let mut entries = Vec::new();
    let mut current: Option<Entry> = None;
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let name = parts.next().unwrap_or("?").to_string();
            let arch = parts.nth(1).unwrap_or("?").to_string();
            current = Some(Entry {
                arch,
                name,
                registers: 0,
                stack: 0,
                spill_stores: 0,
                spill_loads: 0,
            });
        } else if line.contains("spill stores") {
            let nums: Vec<u64> = line
                .split_whitespace()
                .filter_map(|w| w.parse::<u64>().ok())
                .collect();
            if let (Some(e), [stack, stores, loads, ..]) = (current.as_mut(), nums.as_slice()) {
                e.stack = *stack;
                e.spill_stores = *stores;
                e.spill_loads = *loads;
            }
        } else if let Some(rest) = line.split("Used ").nth(1) {
            if let Some(mut e) = current.take() {
                e.registers = rest
                    .split_whitespace()
                    .next()
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0);
                entries.push(e);
            }
        }
    }
    entries
}

/// Checks that every architecture in `sms` compiled the same, non-empty set of kernels
/// and that none spills registers to local memory (a spill turns a bandwidth-bound
/// kernel into one bound by local-memory traffic). The error lists every problem.
pub fn check(entries: &[Entry], sms: &[u32]) -> Result<(), String> {
    let mut problems = Vec::new();
    let names_for = |sm: u32| {
        let arch = format!("sm_{sm}");
        let mut names: Vec<&str> = entries
            .iter()
            .filter(|e| e.arch == arch)
            .map(|e| e.name.as_str())
            .collect();
        names.sort_unstable();
        names
    };
    let first = sms.first().map(|&sm| (sm, names_for(sm)));
    for &sm in sms {
        let names = names_for(sm);
        if names.is_empty() {
            problems.push(format!("no kernel was compiled for sm_{sm}"));
        } else if let Some((sm0, names0)) = &first {
            if names != *names0 {
                problems.push(format!(
                    "sm_{sm} compiled {} kernels, sm_{sm0} {}",
                    names.len(),
                    names0.len()
                ));
            }
        }
    }
    for e in entries {
        if e.spill_stores > 0 || e.spill_loads > 0 {
            problems.push(format!(
                "{} spills on {}: {} B stores / {} B loads",
                e.name, e.arch, e.spill_stores, e.spill_loads
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
