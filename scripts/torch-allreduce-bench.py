"""torch.distributed.all_reduce of one size through a backend, median of repeats.

    python scripts/torch-allreduce-bench.py --backend hetccl --ranks 2 --mib 64 --iters 10
"""

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))


def worker(rank, a, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if a.backend == "hetccl":
        import hetccl_torch  # noqa: F401
    dist.init_process_group(a.backend, rank=rank, world_size=a.ranks)
    t = torch.ones(a.mib * (1 << 20) // 4)
    times = []
    for i in range(a.iters + 2):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        m = statistics.median(times)
        print(f"{a.backend} ranks={a.ranks} {a.mib} MiB: median {m * 1e3:.1f} ms, "
              f"algbw {a.mib / 1024 / m:.2f} GiB/s, "
              f"busbw {a.mib / 1024 / m * 2 * (a.ranks - 1) / a.ranks:.2f} GiB/s "
              f"(min {min(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms, {len(times)} runs)")
    dist.destroy_process_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="hetccl")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    if a.backend == "hetccl":
        import hetccl_torch  # noqa: F401  builds the extension once, before the ranks
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(a, port), nprocs=a.ranks)
