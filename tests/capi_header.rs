//! `bindings/hetccl.h` is written by hand; these tests keep it in step with the Rust
//! side: it compiles cleanly, it declares exactly the functions the library exports,
//! with the C types that correspond to the Rust signatures, and its enum values and
//! sizes are the Rust ones (checked by the C compiler, as the `cc` crate configures
//! it, through `_Static_assert`s generated from the Rust tables).

mod capi_support;
mod common;

use std::collections::BTreeSet;
use std::ffi::{c_char, c_int, c_void};
use std::fmt::Write;
use std::process::Command;

use capi_support::{c_build, compile_c, compiler, lib_path, root, run, scratch, text};
use hetccl::capi::{self, ops, status, unique_id, *};

fn header() -> String {
    std::fs::read_to_string(root().join("bindings/hetccl.h")).expect("read bindings/hetccl.h")
}

/// `NAME(types...) -> ret` for every function prototype in the header, parameter
/// names dropped and whitespace normalised.
fn header_prototypes() -> Vec<(String, String)> {
    // Drop comments and preprocessor lines, then split into declarations.
    let mut code = String::new();
    let h = header();
    let mut rest = h.as_str();
    while let Some(i) = rest.find("/*") {
        code.push_str(&rest[..i]);
        let end = rest[i..].find("*/").expect("closed comment") + i + 2;
        rest = &rest[end..];
    }
    code.push_str(rest);
    let code: String = code
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join(" ");
    let mut out = Vec::new();
    for decl in code.split(';') {
        let decl = decl.split_whitespace().collect::<Vec<_>>().join(" ");
        let decl = decl
            .trim_start_matches("extern \"C\" {")
            .trim()
            .trim_start_matches('}')
            .trim();
        let Some(open) = decl.find('(') else { continue };
        if decl.starts_with("typedef") || !decl.ends_with(')') {
            continue;
        }
        let head = &decl[..open];
        let name_at = head
            .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
            .map_or(0, |i| i + 1);
        let (ret, name) = (head[..name_at].trim().replace(" *", "*"), &head[name_at..]);
        if !name.starts_with("hetccl") {
            continue;
        }
        let params: Vec<String> = decl[open + 1..decl.len() - 1]
            .split(',')
            .map(|p| {
                let p = p.trim().replace(" *", "*");
                if p == "void" {
                    return p;
                }
                // Drop the parameter name: the last identifier after the type.
                let cut = p.rfind([' ', '*']).expect("typed parameter");
                p[..=cut].trim().to_string()
            })
            .collect();
        out.push((
            name.to_string(),
            format!("({}) -> {ret}", params.join(", ")),
        ));
    }
    out
}

/// The C signature each Rust entry point must have. The `let _: unsafe extern "C"
/// fn(..)` line makes the compiler check the Rust side against the Rust types written
/// next to the C ones, so a change on either side without the other fails a test.
macro_rules! sigs {
    ($($f:ident: fn($($rt:ty),*) -> $rr:ty = $c:literal;)*) => {{
        let mut v: Vec<(&'static str, &'static str)> = Vec::new();
        $(
            let _: unsafe extern "C" fn($($rt),*) -> $rr = capi::$f;
            v.push((stringify!($f), $c));
        )*
        v
    }};
}

fn rust_signatures() -> Vec<(&'static str, &'static str)> {
    type Comm = hetcclComm_t;
    type Res = hetcclResult_t;
    type Dt = hetcclDataType_t;
    type Op = hetcclRedOp_t;
    type St = hetcclStream_t;
    sigs! {
        hetcclGetVersion: fn(*mut c_int) -> Res = "(int*) -> hetcclResult_t";
        hetcclGetUniqueId: fn(*mut hetcclUniqueId) -> Res = "(hetcclUniqueId*) -> hetcclResult_t";
        hetcclCommInitRank: fn(*mut Comm, c_int, hetcclUniqueId, c_int) -> Res =
            "(hetcclComm_t*, int, hetcclUniqueId, int) -> hetcclResult_t";
        hetcclCommInitFromEnv: fn(*mut Comm) -> Res = "(hetcclComm_t*) -> hetcclResult_t";
        hetcclCommDestroy: fn(Comm) -> Res = "(hetcclComm_t) -> hetcclResult_t";
        hetcclCommAbort: fn(Comm) -> Res = "(hetcclComm_t) -> hetcclResult_t";
        hetcclCommCount: fn(Comm, *mut c_int) -> Res = "(const hetcclComm_t, int*) -> hetcclResult_t";
        hetcclCommUserRank: fn(Comm, *mut c_int) -> Res = "(const hetcclComm_t, int*) -> hetcclResult_t";
        hetcclCommGetAsyncError: fn(Comm, *mut Res) -> Res =
            "(hetcclComm_t, hetcclResult_t*) -> hetcclResult_t";
        hetcclGetErrorString: fn(c_int) -> *const c_char = "(hetcclResult_t) -> const char*";
        hetcclGetLastError: fn(Comm) -> *const c_char = "(hetcclComm_t) -> const char*";
        hetcclAllReduce: fn(*const c_void, *mut c_void, usize, Dt, Op, Comm, St) -> Res =
            "(const void*, void*, size_t, hetcclDataType_t, hetcclRedOp_t, hetcclComm_t, hetcclStream_t) -> hetcclResult_t";
        hetcclReduceScatter: fn(*const c_void, *mut c_void, usize, Dt, Op, Comm, St) -> Res =
            "(const void*, void*, size_t, hetcclDataType_t, hetcclRedOp_t, hetcclComm_t, hetcclStream_t) -> hetcclResult_t";
        hetcclAllGather: fn(*const c_void, *mut c_void, usize, Dt, Comm, St) -> Res =
            "(const void*, void*, size_t, hetcclDataType_t, hetcclComm_t, hetcclStream_t) -> hetcclResult_t";
        hetcclBroadcast: fn(*const c_void, *mut c_void, usize, Dt, c_int, Comm, St) -> Res =
            "(const void*, void*, size_t, hetcclDataType_t, int, hetcclComm_t, hetcclStream_t) -> hetcclResult_t";
        hetcclReduce: fn(*const c_void, *mut c_void, usize, Dt, Op, c_int, Comm, St) -> Res =
            "(const void*, void*, size_t, hetcclDataType_t, hetcclRedOp_t, int, hetcclComm_t, hetcclStream_t) -> hetcclResult_t";
        hetcclSend: fn(*const c_void, usize, Dt, c_int, Comm, St) -> Res =
            "(const void*, size_t, hetcclDataType_t, int, hetcclComm_t, hetcclStream_t) -> hetcclResult_t";
        hetcclRecv: fn(*mut c_void, usize, Dt, c_int, Comm, St) -> Res =
            "(void*, size_t, hetcclDataType_t, int, hetcclComm_t, hetcclStream_t) -> hetcclResult_t";
        hetcclGroupStart: fn() -> Res = "(void) -> hetcclResult_t";
        hetcclGroupEnd: fn() -> Res = "(void) -> hetcclResult_t";
    }
}

#[test]
fn header_prototypes_match_the_rust_signatures() {
    let header: Vec<(String, String)> = header_prototypes();
    let rust = rust_signatures();
    let h_names: BTreeSet<&str> = header.iter().map(|(n, _)| n.as_str()).collect();
    let r_names: BTreeSet<&str> = rust.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        h_names, r_names,
        "functions declared in hetccl.h vs entry points in src/capi"
    );
    for (name, sig) in &header {
        let want = rust.iter().find(|(n, _)| n == name).map(|(_, s)| *s);
        assert_eq!(Some(sig.as_str()), want, "prototype of {name}");
    }
}

#[test]
fn header_declares_exactly_what_the_library_exports() {
    let lib = lib_path();
    let o = run(Command::new("nm").args(["-D", "--defined-only"]).arg(&lib));
    assert!(o.status.success(), "nm failed:\n{}", text(&o));
    let exported: BTreeSet<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[1] == "T" && f[2].starts_with("hetccl")).then(|| f[2].to_string())
        })
        .collect();
    let declared: BTreeSet<String> = header_prototypes().into_iter().map(|(n, _)| n).collect();
    assert_eq!(declared.len(), 20, "{declared:?}");
    assert_eq!(
        declared,
        exported,
        "hetccl.h declarations vs `nm -D` of {}",
        lib.display()
    );
}

/// Enumerators declared in the header's `typedef enum { ... } NAME;` blocks.
fn header_enumerators(type_name: &str) -> BTreeSet<String> {
    let h = header();
    let end = h
        .find(&format!("}} {type_name};"))
        .unwrap_or_else(|| panic!("enum {type_name}"));
    let start = h[..end].rfind("typedef enum {").expect("typedef enum");
    h[start..end]
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            l.starts_with("hetccl")
                .then(|| l.split([' ', '=']).next().unwrap_or("").to_string())
        })
        .collect()
}

#[test]
fn header_enums_and_sizes_match_rust_checked_by_the_c_compiler() {
    let mut c = String::from("#include <hetccl.h>\n#include <stddef.h>\n\n");
    let mut expect = |names: &mut BTreeSet<String>, name: &str, v: i64| {
        writeln!(c, "_Static_assert({name} == {v}, \"{name} must be {v}\");").unwrap();
        names.insert(name.to_string());
    };
    let mut results = BTreeSet::new();
    for r in hetcclResult_t::ALL {
        expect(&mut results, r.c_name(), r as i64);
    }
    expect(&mut results, "hetcclNumResults", status::NUM_RESULTS as i64);
    let mut types = BTreeSet::new();
    for (name, dt) in ops::DATATYPE_NAMES {
        expect(&mut types, name, *dt as u8 as i64);
    }
    expect(&mut types, "hetcclNumTypes", ops::NUM_TYPES as i64);
    let mut redops = BTreeSet::new();
    for (name, op) in ops::REDOP_NAMES {
        expect(&mut redops, name, *op as u8 as i64);
    }
    expect(&mut redops, "hetcclNumOps", ops::NUM_OPS as i64);
    let mut other = BTreeSet::new();
    expect(
        &mut other,
        "HETCCL_UNIQUE_ID_BYTES",
        unique_id::UNIQUE_ID_BYTES as i64,
    );
    expect(
        &mut other,
        "sizeof(hetcclUniqueId)",
        std::mem::size_of::<hetcclUniqueId>() as i64,
    );
    expect(
        &mut other,
        "sizeof(hetcclResult_t)",
        std::mem::size_of::<hetcclResult_t>() as i64,
    );
    expect(
        &mut other,
        "sizeof(hetcclDataType_t)",
        std::mem::size_of::<hetcclDataType_t>() as i64,
    );
    expect(
        &mut other,
        "sizeof(hetcclRedOp_t)",
        std::mem::size_of::<hetcclRedOp_t>() as i64,
    );
    expect(
        &mut other,
        "sizeof(hetcclStream_t)",
        std::mem::size_of::<hetcclStream_t>() as i64,
    );
    expect(&mut other, "HETCCL_VERSION_CODE", capi::VERSION_CODE as i64);
    // Every enumerator of the header is in a Rust table (the other direction is the
    // compiler's: an unknown name fails to compile).
    assert_eq!(header_enumerators("hetcclResult_t"), results);
    assert_eq!(header_enumerators("hetcclDataType_t"), types);
    assert_eq!(header_enumerators("hetcclRedOp_t"), redops);
    // The program also calls every function once, so a wrong prototype that still
    // parses (or a missing export) fails at link time.
    c.push_str(
        r#"
int main(void) {
  int v = 0;
  hetcclComm_t comm = NULL;
  hetcclUniqueId id;
  if (hetcclGetVersion(&v) != hetcclSuccess || v != HETCCL_VERSION_CODE) return 1;
  if (hetcclCommDestroy(NULL) != hetcclInvalidArgument) return 2;
  if (hetcclGetLastError(NULL)[0] == '\0') return 3;
  (void)hetcclGetErrorString(hetcclTimeout);
  if (0) {
    (void)hetcclGetUniqueId(&id);
    (void)hetcclCommInitRank(&comm, 1, id, 0);
    (void)hetcclCommInitFromEnv(&comm);
    (void)hetcclCommAbort(comm);
    (void)hetcclCommCount(comm, &v);
    (void)hetcclCommUserRank(comm, &v);
    (void)hetcclCommGetAsyncError(comm, NULL);
    (void)hetcclAllReduce(NULL, NULL, 0, hetcclFloat, hetcclSum, comm, NULL);
    (void)hetcclReduceScatter(NULL, NULL, 0, hetcclFloat, hetcclSum, comm, NULL);
    (void)hetcclAllGather(NULL, NULL, 0, hetcclFloat, comm, NULL);
    (void)hetcclBroadcast(NULL, NULL, 0, hetcclFloat, 0, comm, NULL);
    (void)hetcclReduce(NULL, NULL, 0, hetcclFloat, hetcclSum, 0, comm, NULL);
    (void)hetcclSend(NULL, 0, hetcclFloat, 0, comm, NULL);
    (void)hetcclRecv(NULL, 0, hetcclFloat, 0, comm, NULL);
    (void)hetcclGroupStart();
    (void)hetcclGroupEnd();
  }
  return 0;
}
"#,
    );
    let src = scratch("header").join("header_check.c");
    std::fs::write(&src, &c).expect("write header_check.c");
    let exe = compile_c(&[&src], "header_check");
    let o = run(&mut Command::new(&exe));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn header_compiles_as_cxx_too() {
    let mut build = c_build("c++11");
    build.include(root().join("bindings")).flag("-fsyntax-only");
    match build.try_get_compiler() {
        Ok(tool) if capi_support::have(&tool.path().display().to_string()) => {}
        Ok(tool) => {
            common::skip(&format!(
                "no C++ compiler: {} is not on PATH (apt install g++)",
                tool.path().display()
            ));
            return;
        }
        Err(e) => {
            common::skip(&format!("cc finds no C++ compiler: {e}"));
            return;
        }
    }
    let src = scratch("header").join("header_cxx.cc");
    std::fs::write(
        &src,
        "#include <hetccl.h>\nint main() { return hetcclSuccess; }\n",
    )
    .unwrap();
    let mut cmd = compiler(&build);
    let o = run(cmd.arg(&src));
    assert!(
        o.status.success(),
        "{}\n{}",
        capi_support::command_line(&cmd),
        text(&o)
    );
}
