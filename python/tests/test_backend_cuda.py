"""The hetccl torch.distributed backend on CUDA tensors (hetccl's device calls).

Every collective on float32, float16 and bfloat16 CUDA tensors against the same call on
CPU tensors through the same process group, and send/recv and all_to_all_single (which
go through host copies); the order with the caller's stream (a
collective issued behind queued GPU work must see that work's result); a dtype the GPU
reductions do not take, refused with hetccl's message; and DDP of a small BERT on CUDA
against Gloo. Ranks share GPUs when there are fewer GPUs than ranks.

Needs a GPU, PyTorch with CUDA, and libhetccl built with the cuda feature
(scripts/build-gpu-bin.sh leaves one in gpu-bin/; HETCCL_LIB_DIR names its folder).
Run: python -m unittest -v test_backend_cuda (in python/tests); scripts/gpu-check.sh
runs it. Without a GPU every case is skipped, saying why.
"""

import os
import sys
import unittest

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_backend as tb  # noqa: E402  (run_ranks, values, OPS, BERT)

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NO_GPU = None if torch.cuda.is_available() else "PyTorch sees no CUDA device"


def device_of(rank):
    return torch.device("cuda", rank % torch.cuda.device_count())


def cuda_collectives(rank, n):
    dev = device_of(rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("hetccl", rank=rank, world_size=n)
    checked = []

    def same(got, want, what):
        if got.device != dev or got.dtype != want.dtype:
            raise AssertionError(f"{what}: result on {got.device} as {got.dtype}")
        if not torch.equal(got.cpu(), want):
            raise AssertionError(f"{what}: cuda {got.cpu().tolist()} != cpu {want.tolist()}")
        checked.append(what)

    for dtype in GPU_DTYPES:
        for name, op in tb.OPS.items():
            c = tb.values(rank, n, dtype)
            g = c.to(dev)
            dist.all_reduce(c, op=op)
            dist.all_reduce(g, op=op)
            same(g, c, f"all_reduce {name} {dtype}")
            root = n - 1
            c = tb.values(rank, n, dtype)
            g = c.to(dev)
            dist.reduce(c, root, op=op)
            dist.reduce(g, root, op=op)
            if rank == root:
                same(g, c, f"reduce {name} {dtype}")
            big = tb.values(rank, n, dtype, 6 * n)
            rc, rg = torch.zeros(6, dtype=dtype), torch.zeros(6, dtype=dtype, device=dev)
            dist.reduce_scatter_tensor(rc, big, op=op)
            dist.reduce_scatter_tensor(rg, big.to(dev), op=op)
            same(rg, rc, f"reduce_scatter_tensor {name} {dtype}")
        c = tb.values(rank, n, dtype, plus=rank)
        g = c.to(dev)
        dist.broadcast(c, 1)
        dist.broadcast(g, 1)
        same(g, c, f"broadcast {dtype}")
        x = tb.values(rank, n, dtype, 5, plus=rank)
        lc = [torch.zeros(5, dtype=dtype) for _ in range(n)]
        lg = [torch.zeros(5, dtype=dtype, device=dev) for _ in range(n)]
        dist.all_gather(lc, x)
        dist.all_gather(lg, x.to(dev))
        same(torch.cat(lg), torch.cat(lc), f"all_gather {dtype}")
        oc = torch.zeros(5 * n, dtype=dtype)
        og = torch.zeros(5 * n, dtype=dtype, device=dev)
        dist.all_gather_into_tensor(oc, x)
        dist.all_gather_into_tensor(og, x.to(dev))
        same(og, oc, f"all_gather_into_tensor {dtype}")

    # Point to point and all_to_all_single (through host copies).
    if rank < 2:
        s = (tb.values(0, n, torch.float32, 9) if rank == 0 else torch.zeros(9)).to(dev)
        if rank == 0:
            dist.send(s, 1)
        else:
            dist.recv(s, 0)
            same(s, tb.values(0, n, torch.float32, 9), "send/recv")
    x = torch.arange(2 * n, dtype=torch.float32) + 100 * rank
    oc, og = torch.zeros(2 * n), torch.zeros(2 * n, device=dev)
    dist.all_to_all_single(oc, x)
    dist.all_to_all_single(og, x.to(dev))
    same(og, oc, "all_to_all_single")

    # Issued behind GPU work on the current stream: the collective must wait for it (an
    # unordered one would sum the zeros the tensor held before the fill).
    t = torch.zeros(1 << 20, device=dev)
    torch.cuda._sleep(200_000_000)
    t.fill_(rank + 1.0)
    dist.all_reduce(t, async_op=True).wait()
    same(t[:4], torch.full((4,), float(sum(r + 1 for r in range(n)))), "after queued work")

    # A dtype the GPU reductions do not take: hetccl's message, on every rank.
    try:
        dist.all_reduce(torch.ones(4, dtype=torch.int64, device=dev))
    except Exception as e:  # noqa: BLE001  the message is what is checked
        if "device reductions take f32, f16 and bf16, not i64" not in str(e):
            raise
        checked.append("int64 refused")
    else:
        raise AssertionError("an int64 all_reduce on the GPU was not refused")
    dist.destroy_process_group()
    return checked


def ddp_bert_cuda_hetccl(rank, n):
    return tb.ddp_bert(rank, n, "hetccl", steps=12, device=device_of(rank))


def ddp_bert_cuda_gloo(rank, n):
    return tb.ddp_bert(rank, n, "gloo", steps=12, device=device_of(rank))


@unittest.skipIf(NO_GPU, NO_GPU)
class CudaBackend(unittest.TestCase):
    def check(self, n):
        res = tb.run_ranks(cuda_collectives, n)
        for r, x in enumerate(res):
            self.assertIn("ok", x, f"rank {r}: {x}")
        # Per dtype: all_reduce and reduce_scatter_tensor x 5 ops, broadcast, two
        # gathers; the root adds reduce x 5; then all_to_all_single (and on rank 1 the
        # receive), the ordered call and the refusal.
        per = 2 * 5 + 3
        self.assertEqual(len(res[0]["ok"]), len(GPU_DTYPES) * per + 3)
        self.assertEqual(len(res[n - 1]["ok"]),
                         len(GPU_DTYPES) * (per + 5) + 3 + (n - 1 == 1))
        self.assertIn("send/recv", res[1]["ok"])

    def test_collectives_match_the_cpu_on_2_ranks(self):
        self.check(2)

    def test_collectives_match_the_cpu_on_3_ranks(self):
        self.check(3)

    def test_ddp_bert_on_cuda_losses_equal_gloo(self):
        het = tb.run_ranks(ddp_bert_cuda_hetccl, 2)
        glo = tb.run_ranks(ddp_bert_cuda_gloo, 2)
        for r in range(2):
            self.assertIn("ok", het[r], het[r])
            self.assertIn("ok", glo[r], glo[r])
            self.assertEqual(len(het[r]["ok"]), 12)
            for i, (a, b) in enumerate(zip(het[r]["ok"], glo[r]["ok"])):
                self.assertAlmostEqual(a, b, delta=1e-3 * abs(b), msg=f"rank {r} step {i}")


if __name__ == "__main__":
    unittest.main()
