"""DDP training of a Hugging Face BertForMaskedLM shaped as bert-mini, through a backend.

    python scripts/torch-ddp-bench.py --backend hetccl [--ranks 2] [--steps 12] [--no-sync]

bert-mini: 4 layers, hidden 256, 4 heads, FFN 1024, the BERT vocabulary (30,522); sequence
128, per-rank batch 8, DDP's default 25 MB buckets, one thread per rank, AdamW. With
--no-sync every step runs under `no_sync()` (no gradient communication at all): the step
time of the same ranks with communication skipped, so `step - step(no-sync)` is the
communication that backward does not hide. Prints rank 0's median step time over the steps
after two warm-up steps, samples/s for the whole job, and the last loss, then the CPU
time per timed step of rank 0's threads: the main thread (forward, backward, optimizer)
and the others (the backend's: hetccl's call thread, Gloo's workers, autograd's), which
is what communication takes from the compute of ranks sharing cores. Set
HETCCL_SHM_DISABLE=1 to run hetccl over TCP.
"""

import argparse
import contextlib
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

MINI = dict(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=1024, max_position_embeddings=512, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, hidden_act="gelu_pytorch_tanh")
SEQ, BATCH, WARMUP = 128, 8, 2


def thread_cpu():
    """{tid: (name, user + system seconds)} of this process's threads."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def worker(rank, a, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if a.backend == "hetccl":
        import hetccl_torch  # noqa: F401  registers "hetccl"
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import BertConfig, BertForMaskedLM

    dist.init_process_group(a.backend, rank=rank, world_size=a.ranks)
    torch.manual_seed(0)
    ddp = DDP(BertForMaskedLM(BertConfig(**MINI)))
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1000 + rank)
    times, loss = [], float("nan")
    for i in range(WARMUP + a.steps):
        if i == WARMUP:
            cpu0 = thread_cpu()
        ids = torch.randint(1000, MINI["vocab_size"], (BATCH, SEQ), generator=gen)
        labels = ids.clone()
        mask = torch.rand(ids.shape, generator=gen) < 0.15
        labels[~mask] = -100
        ids[mask] = 103
        dist.barrier()
        t0 = time.perf_counter()
        with ddp.no_sync() if a.no_sync else contextlib.nullcontext():
            out = ddp(input_ids=ids, labels=labels)
            opt.zero_grad()
            out.loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        loss = out.loss.item()
    cpu1 = thread_cpu()
    dist.barrier()
    if rank == 0:
        main = os.getpid()
        spent = {t: c - cpu0.get(t, (n, 0.0))[1] for t, (n, c) in cpu1.items()}
        others = sorted(((c, cpu1[t][0]) for t, c in spent.items() if t != main and c > 0),
                        reverse=True)
        step = statistics.median(times[WARMUP:])
        mode = "no-sync" if a.no_sync else "sync"
        tcp = " tcp" if os.environ.get("HETCCL_SHM_DISABLE") == "1" else ""
        print(f"{a.backend}{tcp} {mode} ranks={a.ranks}: step median {step * 1e3:.0f} ms "
              f"(min {min(times[WARMUP:]) * 1e3:.0f}, max {max(times[WARMUP:]) * 1e3:.0f}, "
              f"{a.steps} steps), {a.ranks * BATCH / step:.2f} samples/s, last loss {loss:.4f}",
              flush=True)
        print(f"  cpu per step: main thread {spent[main] / a.steps * 1e3:.0f} ms, other "
              f"threads {sum(c for c, _ in others) / a.steps * 1e3:.0f} ms ("
              + ", ".join(f"{n} {c / a.steps * 1e3:.0f}" for c, n in others[:4]) + ")",
              flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="hetccl")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--no-sync", action="store_true")
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(a, port), nprocs=a.ranks)


if __name__ == "__main__":
    main()
