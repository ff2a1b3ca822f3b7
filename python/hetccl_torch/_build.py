"""Finds libhetccl and its header, and builds the c10d extension against this torch.

Where the library is looked for, in order: ``HETCCL_LIB_DIR``; the repository's
``target/release`` (``cargo build --release``); the ``hetccl`` pkg-config package that
``scripts/install-lib.sh PREFIX`` installs (``PKG_CONFIG_PATH=PREFIX/lib/pkgconfig``);
``/usr/local/lib``. The header is the repository's ``bindings/hetccl.h``, else
``<libdir>/../include/hetccl.h``. The extension is built once per torch and library
directory (``torch.utils.cpp_extension.load``, cached under ``TORCH_EXTENSIONS_DIR``).
"""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent.parent


def _pkg_config_libdir():
    try:
        out = subprocess.run(
            ["pkg-config", "--variable=libdir", "hetccl"],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def find_library():
    """(libdir, includedir) holding libhetccl.so and hetccl.h; raises naming every place tried."""
    tried = []
    candidates = []
    if os.environ.get("HETCCL_LIB_DIR"):
        candidates.append(("HETCCL_LIB_DIR", Path(os.environ["HETCCL_LIB_DIR"])))
    candidates.append(("the repository's cargo build", _REPO / "target" / "release"))
    pc = _pkg_config_libdir()
    if pc is not None:
        candidates.append(("pkg-config hetccl", pc))
    candidates.append(("/usr/local/lib", Path("/usr/local/lib")))
    for what, libdir in candidates:
        lib = libdir / "libhetccl.so"
        tried.append(f"{lib} ({what})")
        if not lib.is_file():
            continue
        for inc in (_REPO / "bindings", libdir.parent / "include"):
            if (inc / "hetccl.h").is_file():
                return libdir.resolve(), inc.resolve()
        tried[-1] += " [no hetccl.h beside it]"
    raise ImportError(
        "hetccl_torch: libhetccl.so not found; tried " + ", ".join(tried) +
        ". Build it (cargo build --release) or install it (scripts/install-lib.sh PREFIX) "
        "and set HETCCL_LIB_DIR=PREFIX/lib"
    )


def load_extension(verbose=False):
    import torch
    from torch.utils import cpp_extension

    libdir, incdir = find_library()
    if shutil.which("ninja") is None:
        # pip's ninja package, installed in a venv that is not activated.
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    src = _HERE / "csrc" / "backend.cpp"
    # One build per torch version and library place: a cached build never links another.
    tag = hashlib.sha256(f"{torch.__version__}|{libdir}".encode()).hexdigest()[:12]
    return cpp_extension.load(
        name=f"hetccl_torch_{tag}",
        sources=[str(src)],
        extra_include_paths=[str(incdir)],
        extra_cflags=["-O2"],
        extra_ldflags=[f"-L{libdir}", "-lhetccl", f"-Wl,-rpath,{libdir}"],
        verbose=verbose,
    )
