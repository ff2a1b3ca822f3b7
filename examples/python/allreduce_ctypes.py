"""All-reduce a numpy array through libhetccl.so with ctypes (no compiled glue).

    hetccl run -n 2 -- python3 examples/python/allreduce_ctypes.py

The library is found through HETCCL_LIB (a path to libhetccl.so), else the
loader's search path (LD_LIBRARY_PATH, an installed prefix), else this
repository's target/release or target/debug. Every rank fills
x[i] = rank + i % 100, sums across ranks in place, and checks
x[i] = n(n-1)/2 + n * (i % 100). Exit status 1 on a wrong element or a failed call.
"""

import ctypes
import ctypes.util
import os
import sys

import numpy as np

# Values of the C enums in bindings/hetccl.h.
HETCCL_SUCCESS = 0
HETCCL_FLOAT32 = 7
HETCCL_SUM = 0
UNIQUE_ID_BYTES = 128


def load():
    candidates = [os.environ.get("HETCCL_LIB"), ctypes.util.find_library("hetccl")]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidates += [os.path.join(repo, "target", p, "libhetccl.so") for p in ("release", "debug")]
    for path in candidates:
        if path and (os.path.exists(path) or not os.path.dirname(path)):
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    sys.exit("libhetccl.so not found: set HETCCL_LIB=/path/to/libhetccl.so")


lib = load()
Comm = ctypes.c_void_p  # hetcclComm_t: an opaque handle
lib.hetcclCommInitFromEnv.argtypes = [ctypes.POINTER(Comm)]
lib.hetcclCommUserRank.argtypes = [Comm, ctypes.POINTER(ctypes.c_int)]
lib.hetcclCommCount.argtypes = [Comm, ctypes.POINTER(ctypes.c_int)]
lib.hetcclAllReduce.argtypes = [
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
    ctypes.c_int, ctypes.c_int, Comm, ctypes.c_void_p,
]
lib.hetcclCommDestroy.argtypes = [Comm]
lib.hetcclGetErrorString.restype = ctypes.c_char_p
lib.hetcclGetLastError.argtypes = [Comm]
lib.hetcclGetLastError.restype = ctypes.c_char_p
for f in ("hetcclCommInitFromEnv", "hetcclCommUserRank", "hetcclCommCount",
          "hetcclAllReduce", "hetcclCommDestroy"):
    getattr(lib, f).restype = ctypes.c_int


def check(name, code):
    if code != HETCCL_SUCCESS:
        sys.exit("%s failed: %s (%s)" % (
            name, lib.hetcclGetErrorString(code).decode(),
            lib.hetcclGetLastError(None).decode()))


def main():
    comm = Comm()
    check("hetcclCommInitFromEnv", lib.hetcclCommInitFromEnv(ctypes.byref(comm)))
    rank, n = ctypes.c_int(), ctypes.c_int()
    check("hetcclCommUserRank", lib.hetcclCommUserRank(comm, ctypes.byref(rank)))
    check("hetcclCommCount", lib.hetcclCommCount(comm, ctypes.byref(n)))
    rank, n = rank.value, n.value

    count = 1_000_000
    x = (rank + np.arange(count) % 100).astype(np.float32)
    ptr = x.ctypes.data_as(ctypes.c_void_p)
    # In place: sendbuff == recvbuff; the stream must be NULL (host memory).
    check("hetcclAllReduce",
          lib.hetcclAllReduce(ptr, ptr, count, HETCCL_FLOAT32, HETCCL_SUM, comm, None))
    want = (n * (n - 1) // 2 + n * (np.arange(count) % 100)).astype(np.float32)
    wrong = np.flatnonzero(x != want)
    if wrong.size:
        i = wrong[0]
        sys.exit("rank %d: %d wrong elements, first x[%d] = %g, expected %g"
                 % (rank, wrong.size, i, x[i], want[i]))
    check("hetcclCommDestroy", lib.hetcclCommDestroy(comm))
    print("rank %d of %d: all-reduce of %d float32 ok" % (rank, n, count), flush=True)


if __name__ == "__main__":
    main()
