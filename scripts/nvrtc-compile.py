#!/usr/bin/env python3
"""Compiles the kernels to PTX with NVRTC from the CUDA 12 wheels (the Volta build).

CUDA 13 no longer targets Volta (sm_70), and the CUDA 12 compiler wheels on PyPI carry
no `nvcc` driver: `nvidia-cuda-nvcc-cu12` holds only ptxas and libnvvm,
`nvidia-cuda-nvrtc-cu12` the runtime compiler, `nvidia-cuda-runtime-cu12` the headers.
This script is the missing front end: NVRTC turns the translation unit into PTX for
`--arch` (compute_70 for Volta), and `ptxas -v` of the same wheels compiles that PTX for
each `--sm` so that its register/spill report (printed on stderr, in nvcc's format) can
be checked as build.rs checks nvcc's. The PTX goes to `--out`; the driver JIT-compiles it
for whichever GPU loads it, so one image serves sm_70 and every later architecture.

    python3 scripts/nvrtc-compile.py --prefix target/cuda12 --arch compute_70 \
        --sm sm_70 -I kernels --out kernels.ptx unit.cu

`--prefix` is the directory the three wheels were installed into with
`pip install --target` (scripts/install-nvcc12.sh). Exit status 2: the wheels are not
there (the message says which file is missing); 1: compilation failed.
"""
import argparse
import ctypes
import os
import subprocess
import sys


def fail(code, msg):
    print(f"nvrtc-compile: {msg}", file=sys.stderr)
    sys.exit(code)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--arch", default="compute_70")
    ap.add_argument("--sm", action="append", default=[])
    ap.add_argument("-I", dest="includes", action="append", default=[])
    ap.add_argument("--out", required=True)
    ap.add_argument("source")
    a = ap.parse_args()

    nv = os.path.join(a.prefix, "nvidia")
    lib = os.path.join(nv, "cuda_nvrtc", "lib", "libnvrtc.so.12")
    ptxas = os.path.join(nv, "cuda_nvcc", "bin", "ptxas")
    headers = os.path.join(nv, "cuda_runtime", "include")
    for need, wheel in [(lib, "nvidia-cuda-nvrtc-cu12"), (ptxas, "nvidia-cuda-nvcc-cu12"),
                        (os.path.join(headers, "cuda_fp16.h"), "nvidia-cuda-runtime-cu12")]:
        if not os.path.isfile(need):
            fail(2, f"{need} is missing (wheel {wheel}; scripts/install-nvcc12.sh installs it)")

    nvrtc = ctypes.CDLL(lib)
    nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
    prog = ctypes.c_void_p()
    with open(a.source, "rb") as f:
        src = f.read()
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, a.source.encode(), 0, None, None)
    if rc:
        fail(1, f"nvrtcCreateProgram: {nvrtc.nvrtcGetErrorString(rc).decode()}")
    # The options nvcc gets in build.rs; no -use_fast_math, no -ftz (the kernels keep
    # subnormals and round as their CPU twins do).
    opts = [f"--gpu-architecture={a.arch}", "-std=c++17", f"-I{headers}"]
    opts += [f"-I{d}" for d in a.includes]
    copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), copts)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    # NVRTC 12 warns that sm_70 is deprecated; that is known, and noise in the report.
    text = "\n".join(l for l in log.value.decode(errors="replace").splitlines()
                     if "are deprecated" not in l)
    if text.strip():
        print(text, file=sys.stderr)
    if rc:
        fail(1, f"nvrtcCompileProgram: {nvrtc.nvrtcGetErrorString(rc).decode()}")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetPTX(prog, ptx)
    # cuModuleLoadData reads PTX as a NUL-terminated string: keep the terminator.
    with open(a.out, "wb") as f:
        f.write(ptx.raw)

    for sm in a.sm:
        r = subprocess.run([ptxas, "-v", f"-arch={sm}", "-O3", "-o", os.devnull, a.out],
                           capture_output=True, text=True)
        # ptxas' report names the entry but not the target when given one arch on the
        # command line; say it as nvcc's report does, so one parser reads both.
        for line in r.stderr.splitlines():
            if "Compiling entry function" in line and "for '" not in line:
                line = f"{line} for '{sm}'"
            print(line, file=sys.stderr)
        if r.returncode:
            fail(1, f"ptxas -arch={sm} failed with exit status {r.returncode}")


if __name__ == "__main__":
    main()
