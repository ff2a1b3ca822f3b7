//! `bindings/hetccl.h` is written by hand; these tests keep it in step with the Rust
//! side. bindgen reads the header through libclang into Rust declarations, and those
//! are compared with the `extern "C"` functions of `src/capi/` as syn reads them and
//! with what `libhetccl.so` exports: the same functions with the same argument and
//! return types, the same types, the same enumerators and constants with the same
//! values. The C compiler (as the `cc` crate configures it) checks the enum values and
//! sizes once more through `_Static_assert`s generated from the Rust tables and links a
//! call to every function; a C++ compiler checks that the header compiles as C++.

mod capi_support;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use capi_support::{c_build, compile_c, compiler, lib_path, root, run, scratch, text};
use hetccl::capi::{self, ops, status, unique_id, *};
use syn::{ForeignItem, Item, ReturnType, Type};

/// The functions the header declares (and the library exports).
const FUNCTIONS: usize = 32;

fn header_path() -> PathBuf {
    root().join("bindings/hetccl.h")
}

/// bindgen's Rust for the header, or why it cannot be made here.
fn bindgen_output() -> &'static Result<String, String> {
    static OUT: OnceLock<Result<String, String>> = OnceLock::new();
    OUT.get_or_init(|| {
        // bindgen panics when it cannot load libclang: the one failure that means "this
        // machine cannot check" rather than "the header is wrong".
        if let Err(p) = std::panic::catch_unwind(bindgen::clang_version) {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            return Err(format!(
                "libclang cannot be loaded, so bindgen cannot read bindings/hetccl.h \
                 (apt install libclang-dev): {why}"
            ));
        }
        let header = header_path();
        let bindings = bindgen::Builder::default()
            .header(header.display().to_string())
            // A warning is a defect of the header as much as an error.
            .clang_args(["-std=c11", "-Wall", "-Wextra", "-pedantic", "-Werror"])
            .allowlist_file(".*/bindings/hetccl\\.h")
            // Enumerators as plain constants of the enum's type, named as in C, so every
            // alias (hetcclInt8 and hetcclChar are both 0) is kept.
            .default_enum_style(bindgen::EnumVariation::Consts)
            .prepend_enum_name(false)
            .layout_tests(false)
            .generate_comments(false)
            .formatter(bindgen::Formatter::None)
            .generate()
            .unwrap_or_else(|e| panic!("bindgen cannot read {}: {e}", header.display()));
        Ok(bindings.to_string())
    })
}

/// The header as bindgen declares it; None, with the skip recorded, where libclang is
/// missing.
fn header_bindings() -> Option<syn::File> {
    match bindgen_output() {
        Ok(src) => Some(
            syn::parse_file(src)
                .unwrap_or_else(|e| panic!("bindgen's output does not parse: {e}\n{src}")),
        ),
        Err(why) => {
            common::skip(why);
            None
        }
    }
}

/// A type as C spells it, from its Rust spelling on either side: bindgen writes
/// `*mut ::std::os::raw::c_int`, src/capi `*mut c_int`; both are `int*`.
fn c_spelling(ty: &Type) -> String {
    match ty {
        Type::Ptr(p) => {
            let to = c_spelling(&p.elem);
            if p.const_token.is_some() {
                format!("const {to}*")
            } else {
                format!("{to}*")
            }
        }
        Type::Path(p) if p.qself.is_none() => {
            let last = p.path.segments.last().expect("a type path has a segment");
            assert!(
                last.arguments.is_empty(),
                "generic type {} in the C API",
                last.ident
            );
            match last.ident.to_string().as_str() {
                "c_int" => "int".to_string(),
                "c_char" => "char".to_string(),
                "c_void" => "void".to_string(),
                "usize" => "size_t".to_string(),
                other => other.to_string(),
            }
        }
        Type::Tuple(t) if t.elems.is_empty() => "void".to_string(),
        _ => panic!("a C API type that is neither a pointer nor a named type"),
    }
}

/// Parameter and return types of a function, C-spelled.
#[derive(Debug, PartialEq, Eq)]
struct Prototype {
    params: Vec<String>,
    ret: String,
}

impl Prototype {
    fn of(sig: &syn::Signature) -> Prototype {
        let params = sig
            .inputs
            .iter()
            .map(|a| match a {
                syn::FnArg::Typed(t) => c_spelling(&t.ty),
                syn::FnArg::Receiver(_) => panic!("{}: a method in the C API", sig.ident),
            })
            .collect();
        let ret = match &sig.output {
            ReturnType::Default => "void".to_string(),
            ReturnType::Type(_, t) => c_spelling(t),
        };
        Prototype { params, ret }
    }
}

impl std::fmt::Display for Prototype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let params = if self.params.is_empty() {
            "void".to_string()
        } else {
            self.params.join(", ")
        };
        write!(f, "({params}) -> {}", self.ret)
    }
}

/// Parameters the Rust side takes as a different, ABI-identical type, and why.
const PARAM_TAKEN_AS: &[(&str, &str, &str)] = &[(
    "hetcclResult_t",
    "int",
    "hetcclGetErrorString must answer any int: a Rust enum holding a value outside \
     its variants would be undefined behaviour",
)];

fn params_agree(c: &str, rust: &str) -> bool {
    c == rust || PARAM_TAKEN_AS.iter().any(|(h, r, _)| *h == c && *r == rust)
}

/// Every function the header declares, with its prototype.
fn header_functions(bindings: &syn::File) -> BTreeMap<String, Prototype> {
    let mut out = BTreeMap::new();
    for item in &bindings.items {
        let Item::ForeignMod(m) = item else { continue };
        for f in &m.items {
            if let ForeignItem::Fn(f) = f {
                out.insert(f.sig.ident.to_string(), Prototype::of(&f.sig));
            }
        }
    }
    out
}

/// `src/capi/*.rs` as syn reads it, file by file.
fn capi_sources() -> Vec<(PathBuf, syn::File)> {
    let dir = root().join("src/capi");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("src/capi entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let src = std::fs::read_to_string(&p).expect("read a src/capi file");
            let file = syn::parse_file(&src)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", p.display()));
            (p, file)
        })
        .collect()
}

/// Items of a file and of the modules written inside it.
fn all_items(items: &[Item]) -> Vec<&Item> {
    let mut out = Vec::new();
    for item in items {
        out.push(item);
        if let Item::Mod(syn::ItemMod {
            content: Some((_, inner)),
            ..
        }) = item
        {
            out.extend(all_items(inner));
        }
    }
    out
}

/// `#[no_mangle]` or `#[unsafe(no_mangle)]`.
fn is_no_mangle(attr: &syn::Attribute) -> bool {
    if attr.path().is_ident("no_mangle") {
        return true;
    }
    let mut inner = false;
    if attr.path().is_ident("unsafe") {
        let _ = attr.parse_nested_meta(|m| {
            inner |= m.path.is_ident("no_mangle");
            Ok(())
        });
    }
    inner
}

/// Every unmangled `extern "C"` function of src/capi, with its prototype and file.
fn rust_functions() -> BTreeMap<String, (Prototype, PathBuf)> {
    let mut out = BTreeMap::new();
    for (path, file) in capi_sources() {
        for item in all_items(&file.items) {
            let Item::Fn(f) = item else { continue };
            let extern_c = f
                .sig
                .abi
                .as_ref()
                .is_some_and(|abi| abi.name.as_ref().is_some_and(|n| n.value() == "C"));
            if extern_c && f.attrs.iter().any(is_no_mangle) {
                let name = f.sig.ident.to_string();
                let previous = out.insert(name.clone(), (Prototype::of(&f.sig), path.clone()));
                assert!(previous.is_none(), "{name} is defined twice in src/capi");
            }
        }
    }
    out
}

#[test]
fn header_declares_the_functions_of_src_capi_with_their_types() {
    let Some(bindings) = header_bindings() else {
        return;
    };
    let header = header_functions(&bindings);
    let rust = rust_functions();
    assert_eq!(header.len(), FUNCTIONS, "{:?}", header.keys());
    assert_eq!(
        header.keys().collect::<Vec<_>>(),
        rust.keys().collect::<Vec<_>>(),
        "functions declared in hetccl.h vs #[no_mangle] extern \"C\" functions in src/capi"
    );
    for (name, h) in &header {
        let (r, file) = &rust[name];
        let agree = h.ret == r.ret
            && h.params.len() == r.params.len()
            && h.params
                .iter()
                .zip(&r.params)
                .all(|(c, r)| params_agree(c, r));
        assert!(
            agree,
            "{name}: hetccl.h declares {h}, {} defines {r}",
            file.display()
        );
    }
    // The one difference allowed is in use; were it not, the table should go.
    let r = &rust["hetcclGetErrorString"].0;
    assert_eq!(
        (header["hetcclGetErrorString"].to_string(), r.to_string()),
        (
            "(hetcclResult_t) -> const char*".to_string(),
            "(int) -> const char*".to_string()
        )
    );
    // A few prototypes spelled out, so the comparison above is known to see types.
    assert_eq!(
        header["hetcclAllReduce"].to_string(),
        "(const void*, void*, size_t, hetcclDataType_t, hetcclRedOp_t, hetcclComm_t, \
         hetcclStream_t) -> hetcclResult_t"
    );
    assert_eq!(
        header["hetcclCommInitRank"].to_string(),
        "(hetcclComm_t*, int, hetcclUniqueId, int) -> hetcclResult_t"
    );
    assert_eq!(
        header["hetcclGroupEnd"].to_string(),
        "(void) -> hetcclResult_t"
    );
    assert_eq!(
        header["hetcclDeviceAllReduce"].to_string(),
        "(const void*, void*, size_t, hetcclDataType_t, hetcclRedOp_t, hetcclDeviceComm_t, \
         hetcclStream_t) -> hetcclResult_t"
    );
}

#[test]
fn header_declares_exactly_what_the_library_exports() {
    let Some(bindings) = header_bindings() else {
        return;
    };
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
    let declared: BTreeSet<String> = header_functions(&bindings).into_keys().collect();
    assert_eq!(declared.len(), FUNCTIONS, "{declared:?}");
    assert_eq!(
        declared,
        exported,
        "hetccl.h declarations vs `nm -D` of {}",
        lib.display()
    );
}

/// An integer constant's value as bindgen writes it (`0`, `128`, `-1`).
fn const_value(expr: &syn::Expr) -> i64 {
    match expr {
        syn::Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Int(i),
            ..
        }) => i.base10_parse().expect("an integer constant"),
        syn::Expr::Unary(syn::ExprUnary {
            op: syn::UnOp::Neg(_),
            expr,
            ..
        }) => -const_value(expr),
        _ => panic!("a constant that is not an integer literal"),
    }
}

/// The header's integer constants by the C type they have: each enum's enumerators
/// under the enum's name, `#define`d numbers under `#define`.
fn header_constants(bindings: &syn::File) -> BTreeMap<String, BTreeMap<String, i64>> {
    let enums: BTreeSet<String> = rust_enum_names();
    let mut out: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for item in &bindings.items {
        let Item::Const(c) = item else { continue };
        let ty = c_spelling(&c.ty);
        let group = if enums.contains(&ty) {
            ty
        } else {
            "#define".to_string()
        };
        out.entry(group)
            .or_default()
            .insert(c.ident.to_string(), const_value(&c.expr));
    }
    out
}

/// The C enums of the API.
fn rust_enum_names() -> BTreeSet<String> {
    ["hetcclResult_t", "hetcclDataType_t", "hetcclRedOp_t"]
        .map(String::from)
        .into()
}

/// The header's constants as the Rust tables give them.
fn rust_constants() -> BTreeMap<String, BTreeMap<String, i64>> {
    let named = |pairs: Vec<(&str, i64)>| -> BTreeMap<String, i64> {
        pairs.into_iter().map(|(n, v)| (n.to_string(), v)).collect()
    };
    let mut results: Vec<(&str, i64)> = hetcclResult_t::ALL
        .iter()
        .map(|r| (r.c_name(), *r as i64))
        .collect();
    results.push(("hetcclNumResults", status::NUM_RESULTS as i64));
    let mut types: Vec<(&str, i64)> = ops::DATATYPE_NAMES
        .iter()
        .map(|(n, dt)| (*n, *dt as u8 as i64))
        .collect();
    types.push(("hetcclNumTypes", ops::NUM_TYPES as i64));
    let mut redops: Vec<(&str, i64)> = ops::REDOP_NAMES
        .iter()
        .map(|(n, op)| (*n, *op as u8 as i64))
        .collect();
    redops.push(("hetcclNumOps", ops::NUM_OPS as i64));
    let defines = vec![
        ("HETCCL_MAJOR", capi::VERSION.0 as i64),
        ("HETCCL_MINOR", capi::VERSION.1 as i64),
        ("HETCCL_PATCH", capi::VERSION.2 as i64),
        ("HETCCL_VERSION_CODE", capi::VERSION_CODE as i64),
        ("HETCCL_UNIQUE_ID_BYTES", unique_id::UNIQUE_ID_BYTES as i64),
        ("HETCCL_SPLIT_NOCOLOR", capi::HETCCL_SPLIT_NOCOLOR as i64),
    ];
    [
        ("hetcclResult_t", named(results)),
        ("hetcclDataType_t", named(types)),
        ("hetcclRedOp_t", named(redops)),
        ("#define", named(defines)),
    ]
    .into_iter()
    .map(|(g, m)| (g.to_string(), m))
    .collect()
}

#[test]
fn header_enumerators_and_constants_are_the_rust_ones() {
    let Some(bindings) = header_bindings() else {
        return;
    };
    let header = header_constants(&bindings);
    let rust = rust_constants();
    for (group, want) in &rust {
        assert_eq!(
            header.get(group),
            Some(want),
            "{group}: hetccl.h (left) vs the Rust tables (right)"
        );
    }
    assert_eq!(
        header.keys().collect::<Vec<_>>(),
        rust.keys().collect::<Vec<_>>(),
        "kinds of constant in hetccl.h"
    );
    assert_eq!(header["hetcclDataType_t"]["hetcclChar"], 0);
    assert_eq!(header["hetcclDataType_t"]["hetcclBfloat16"], 9);
}

/// The names of the types the header declares, and of those src/capi defines for it.
#[test]
fn header_declares_the_types_of_src_capi() {
    let Some(bindings) = header_bindings() else {
        return;
    };
    let declared: BTreeSet<String> = bindings
        .items
        .iter()
        .filter_map(|item| match item {
            Item::Type(t) => Some(t.ident.to_string()),
            Item::Struct(s) => Some(s.ident.to_string()),
            _ => None,
        })
        .collect();
    let defined: BTreeSet<String> = capi_sources()
        .iter()
        .flat_map(|(_, f)| all_items(&f.items))
        .filter_map(|item| match item {
            Item::Type(t) => Some(t.ident.to_string()),
            Item::Struct(s) => Some(s.ident.to_string()),
            Item::Enum(e) => Some(e.ident.to_string()),
            _ => None,
        })
        .filter(|n| n.starts_with("hetccl"))
        .collect();
    assert_eq!(declared, defined, "types in hetccl.h vs src/capi");
    assert_eq!(
        declared.into_iter().collect::<Vec<_>>(),
        [
            "hetcclComm",
            "hetcclComm_t",
            "hetcclDataType_t",
            "hetcclDeviceComm",
            "hetcclDeviceComm_t",
            "hetcclMetrics_t",
            "hetcclRedOp_t",
            "hetcclResult_t",
            "hetcclStream_t",
            "hetcclUniqueId"
        ]
    );
}

/// Without libclang the bindgen tests do not pass quietly: they record a skip that says
/// libclang is missing. clang-sys looks only where `LIBCLANG_PATH` points when it is
/// set, so an empty folder there hides the installed libclang from a second run of
/// this test binary.
#[test]
fn without_libclang_the_bindgen_tests_record_a_skip() {
    let dir = scratch("no-libclang");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).expect("create an empty folder");
    let log = dir.join("skipped");
    let _ = std::fs::remove_file(&log);
    let test = "header_declares_exactly_what_the_library_exports";
    let exe = std::env::current_exe().expect("test binary path");
    let o = run(Command::new(exe)
        .args([test, "--exact"])
        .env("LIBCLANG_PATH", &empty)
        .env("HETCCL_TEST_SKIP_LOG", &log));
    assert!(o.status.success(), "{}", text(&o));
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = logged.lines().collect();
    assert_eq!(lines.len(), 1, "{logged:?}\n{}", text(&o));
    let (name, reason) = lines[0].split_once('\t').expect("name<TAB>reason");
    assert_eq!(name, format!("capi_header::{test}"));
    assert!(
        reason.starts_with(
            "libclang cannot be loaded, so bindgen cannot read bindings/hetccl.h \
             (apt install libclang-dev): Unable to find libclang"
        ),
        "{reason}"
    );
}

#[test]
fn header_enums_and_sizes_match_rust_checked_by_the_c_compiler() {
    let mut c = String::from("#include <hetccl.h>\n#include <stddef.h>\n\n");
    let mut expect = |name: &str, v: i64| {
        writeln!(c, "_Static_assert({name} == {v}, \"{name} must be {v}\");").unwrap();
    };
    for group in rust_constants().values() {
        for (name, v) in group {
            expect(name, *v);
        }
    }
    expect(
        "sizeof(hetcclUniqueId)",
        std::mem::size_of::<hetcclUniqueId>() as i64,
    );
    expect(
        "sizeof(hetcclResult_t)",
        std::mem::size_of::<hetcclResult_t>() as i64,
    );
    expect(
        "sizeof(hetcclDataType_t)",
        std::mem::size_of::<hetcclDataType_t>() as i64,
    );
    expect(
        "sizeof(hetcclRedOp_t)",
        std::mem::size_of::<hetcclRedOp_t>() as i64,
    );
    expect(
        "sizeof(hetcclStream_t)",
        std::mem::size_of::<hetcclStream_t>() as i64,
    );
    expect(
        "sizeof(hetcclMetrics_t)",
        std::mem::size_of::<hetcclMetrics_t>() as i64,
    );
    // Fields in the same order: the first phase's and the last field's places agree.
    expect(
        "offsetof(hetcclMetrics_t, ns_total)",
        std::mem::offset_of!(hetcclMetrics_t, ns_total) as i64,
    );
    expect(
        "offsetof(hetcclMetrics_t, compress_nonfinite)",
        std::mem::offset_of!(hetcclMetrics_t, compress_nonfinite) as i64,
    );
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
  /* Device calls fail cleanly without a device communicator (and without a GPU). */
  hetcclDeviceComm_t dcomm = NULL;
  if (hetcclDeviceCommInit(NULL, comm, 0) != hetcclInvalidArgument) return 4;
  if (hetcclDeviceCommDestroy(dcomm) == hetcclSuccess) return 5;
  if (hetcclDeviceAllReduce(NULL, NULL, 0, hetcclFloat, hetcclSum, dcomm, NULL) == hetcclSuccess) return 6;
  hetcclComm_t split = NULL;
  if (hetcclCommSplit(comm, 0, 0, NULL) != hetcclInvalidArgument) return 7;
  if (hetcclCommSplit(comm, HETCCL_SPLIT_NOCOLOR, 0, &split) != hetcclInvalidArgument || split != NULL) return 8;
  if (0) {
    (void)hetcclDeviceCommInit(&dcomm, comm, 0);
    (void)hetcclDeviceBroadcast(NULL, NULL, 0, hetcclFloat, 0, dcomm, NULL);
    (void)hetcclDeviceReduce(NULL, NULL, 0, hetcclFloat, hetcclSum, 0, dcomm, NULL);
    (void)hetcclDeviceAllGather(NULL, NULL, 0, hetcclFloat, dcomm, NULL);
    (void)hetcclDeviceReduceScatter(NULL, NULL, 0, hetcclFloat, hetcclSum, dcomm, NULL);
    (void)hetcclGetUniqueId(&id);
    (void)hetcclCommInitRank(&comm, 1, id, 0);
    (void)hetcclGetUniqueIdAt(&id, NULL, 0, 0);
    (void)hetcclCommInitRankSettings(&comm, 1, id, 0, "HETCCL_COMPRESS=all");
    (void)hetcclCommInitFromEnv(&comm);
    (void)hetcclCommAbort(comm);
    (void)hetcclCommCount(comm, &v);
    (void)hetcclCommUserRank(comm, &v);
    (void)hetcclCommGetAsyncError(comm, NULL);
    (void)hetcclCommGetMetrics(comm, NULL);
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
