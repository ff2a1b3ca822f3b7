"""DDP training of a Hugging Face BertForMaskedLM shaped as bert-mini, through a backend.

    python scripts/torch-ddp-bench.py --backend hetccl [--ranks 2] [--steps 12]
                                      [--no-sync | --paired]

bert-mini: 4 layers, hidden 256, 4 heads, FFN 1024, the BERT vocabulary (30,522); sequence
128, per-rank batch 8, DDP's default 25 MB buckets, one thread per rank, AdamW. With
--no-sync every step runs under `no_sync()` (no gradient communication at all): the step
time of the same ranks with communication skipped, so `step - step(no-sync)` is the
communication that backward does not hide.

--paired measures that within one launch, because launches minutes apart differ here by
more than the communication: its steps alternate between communicating and not, both
through one DDP comm hook that either runs PyTorch's `allreduce_hook` (what DDP's default
does: divide by the world size, all-reduce the bucket) or its `noop_hook` (DDP fills and
empties its buckets all the same, nothing is communicated). `no_sync()` is not that
baseline: under it DDP leaves the buckets alone, and here its steps ran ~110 ms slower
than steps with the noop hook. --steps of each kind after two warm-up steps of each.

In --paired mode every step of both kinds ends with a barrier inside its timing, so that
both kinds end when the slower rank is done: an all-reduced step cannot end before the
slower rank's last bucket, while a noop step, timed on rank 0 alone, would end with rank
0's own compute, and the difference would count the ranks' compute skew (tens of ms a step
here, moving from step to step) as communication. "exposed" is the median, over the
pairs of an all-reduced step and the noop step right after it, of their difference:
pairing neighbours cancels the drift of the machine's speed within a launch.

Prints rank 0's median step time over the steps
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
    hook = {"sync": True}
    if a.paired:
        from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def switch(state, bucket):
            return allreduce_hook(None, bucket) if state["sync"] else noop_hook(None, bucket)

        ddp.register_comm_hook(hook, switch)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1000 + rank)
    times, bare, loss = [], [], float("nan")
    per = 2 if a.paired else 1
    for i in range(per * (WARMUP + a.steps)):
        if i == per * WARMUP:
            cpu0 = thread_cpu()
        hook["sync"] = i % per == 0
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
        if a.paired:
            dist.barrier()
        (times if hook["sync"] else bare).append(time.perf_counter() - t0)
        if hook["sync"]:
            loss = out.loss.item()
    cpu1 = thread_cpu()
    dist.barrier()
    if rank == 0:
        main = os.getpid()
        spent = {t: c - cpu0.get(t, (n, 0.0))[1] for t, (n, c) in cpu1.items()}
        others = sorted(((c, cpu1[t][0]) for t, c in spent.items() if t != main and c > 0),
                        reverse=True)
        step = statistics.median(times[WARMUP:])
        mode = "no-sync" if a.no_sync else "paired" if a.paired else "sync"
        tcp = " tcp" if os.environ.get("HETCCL_SHM_DISABLE") == "1" else ""
        print(f"{a.backend}{tcp} {mode} ranks={a.ranks}: step median {step * 1e3:.0f} ms "
              f"(min {min(times[WARMUP:]) * 1e3:.0f}, max {max(times[WARMUP:]) * 1e3:.0f}, "
              f"{a.steps} steps), {a.ranks * BATCH / step:.2f} samples/s, last loss {loss:.4f}",
              flush=True)
        if a.paired:
            b = statistics.median(bare[WARMUP:])
            exposed = statistics.median(t - u for t, u in zip(times[WARMUP:], bare[WARMUP:]))
            print(f"  noop-hook steps: median {b * 1e3:.0f} ms; exposed "
                  f"{exposed * 1e3:.1f} ms", flush=True)
        n = per * a.steps
        print(f"  cpu per step: main thread {spent[main] / n * 1e3:.0f} ms, other "
              f"threads {sum(c for c, _ in others) / n * 1e3:.0f} ms ("
              + ", ".join(f"{name} {c / n * 1e3:.0f}" for c, name in others[:4]) + ")",
              flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="hetccl")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--no-sync", action="store_true")
    p.add_argument("--paired", action="store_true")
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(a, port), nprocs=a.ranks)


if __name__ == "__main__":
    main()
