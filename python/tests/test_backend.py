"""The hetccl torch.distributed backend against Gloo's results, its errors, and DDP.

Run: HETCCL_TORCH_PYTHON=<python with torch> cargo test --release -p hetccl-tools --test
torch_backend, or directly: python -m unittest discover -s python/tests.
Each case starts its ranks as processes (spawn) that write their outcome to a file.
"""

import json
import os
import random
import shutil
import socket
import sys
import tempfile
import time
import traceback
import unittest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Every dtype torch and hetccl share. Gloo has no unsigned types wider than 8 bits: for
# those its side of the comparison runs on int64 copies of the same values.
DTYPES = [torch.int8, torch.uint8, torch.int32, torch.uint32, torch.int64, torch.uint64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64]
NOT_IN_GLOO = (torch.uint32, torch.uint64)
# Gloo has no AVG: its side is a sum divided by the world size (integer division for
# integer dtypes, as hetccl's AVG).
OPS = {"sum": dist.ReduceOp.SUM, "product": dist.ReduceOp.PRODUCT, "min": dist.ReduceOp.MIN,
       "max": dist.ReduceOp.MAX, "avg": dist.ReduceOp.AVG}


def free_port():
    """A free port below the ephemeral range (as hetccl's own choice), so that no
    outgoing connection of a test beside this one takes it before rank 0 binds it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        first = 32768
    lo = max(10000, first - 8192)
    for _ in range(64):
        port = random.randrange(lo, first) if first > lo else 0
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port for the store")


def _entry(fn, rank, n, port, out, env):
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        import hetccl_torch  # noqa: F401  registers "hetccl"
        result = {"ok": fn(rank, n)}
    except BaseException as e:  # noqa: BLE001  the outcome is the test's to judge
        result = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)


def run_ranks(fn, n, env=None, timeout=240):
    """Runs fn(rank, n) in n processes; returns each rank's {"ok": ...} or {"error": ...}."""
    ctx = mp.get_context("spawn")
    out = tempfile.mkdtemp(prefix="hetccl-torch-test-")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, n, port, out, env or {})) for r in range(n)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(1, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = []
    for r in range(n):
        path = os.path.join(out, f"{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
        else:
            results.append(None)
    shutil.rmtree(out, ignore_errors=True)
    if hung:
        raise AssertionError(f"ranks {hung} still ran after {timeout} s; results: {results}")
    return results


def values(rank, n, dtype, numel=37, plus=0):
    # Small integers: every sum, product, min and max is exact in every dtype compared.
    # Built in int64 (unsigned tensors of 32 and 64 bits have few arithmetic ops).
    base = torch.arange(numel, dtype=torch.int64) % 3 + 1 + (rank % 2)
    if dtype in (torch.int8, torch.uint8):
        base = base % 2 + 1
    return (base + plus).to(dtype)


def collectives(rank, n):
    dist.init_process_group("gloo", rank=rank, world_size=n)
    het = dist.new_group(backend="hetccl")
    glo = dist.new_group(backend="gloo")
    checked = []

    def same(a, b, what):
        if a.dtype != dtype:
            raise AssertionError(f"{what}: hetccl returned {a.dtype}")
        if not torch.equal(a.to(b.dtype), b):
            raise AssertionError(f"{what}: hetccl {a.tolist()} != gloo {b.tolist()}")
        checked.append(what)

    def gloo_reduced(b, name):
        # Gloo's result for op `name`, b already reduced with SUM where name is avg.
        if name != "avg":
            return b
        return b / n if b.dtype.is_floating_point else b // n

    for dtype in DTYPES:
        gdt = torch.int64 if dtype in NOT_IN_GLOO else dtype  # Gloo's side
        for name, op in OPS.items():
            gop = dist.ReduceOp.SUM if name == "avg" else op
            a, b = values(rank, n, dtype), values(rank, n, gdt)
            dist.all_reduce(a, op=op, group=het)
            dist.all_reduce(b, op=gop, group=glo)
            same(a, gloo_reduced(b, name), f"all_reduce {name} {dtype}")
            root = n - 1
            a, b = values(rank, n, dtype), values(rank, n, gdt)
            dist.reduce(a, root, op=op, group=het)
            dist.reduce(b, root, op=gop, group=glo)
            if rank == root:
                same(a, gloo_reduced(b, name), f"reduce {name} {dtype}")
            big_a, big_b = values(rank, n, dtype, 6 * n), values(rank, n, gdt, 6 * n)
            ra, rb = torch.zeros(6, dtype=dtype), torch.zeros(6, dtype=gdt)
            dist.reduce_scatter_tensor(ra, big_a, op=op, group=het)
            dist.reduce_scatter_tensor(rb, big_b, op=gop, group=glo)
            same(ra, gloo_reduced(rb, name), f"reduce_scatter_tensor {name} {dtype}")
        a, b = values(rank, n, dtype, plus=rank), values(rank, n, gdt, plus=rank)
        dist.broadcast(a, 1, group=het)
        dist.broadcast(b, 1, group=glo)
        same(a, b, f"broadcast {dtype}")
        x, y = values(rank, n, dtype, 5, plus=rank), values(rank, n, gdt, 5, plus=rank)
        la = [torch.zeros(5, dtype=dtype) for _ in range(n)]
        lb = [torch.zeros(5, dtype=gdt) for _ in range(n)]
        dist.all_gather(la, x, group=het)
        dist.all_gather(lb, y, group=glo)
        same(torch.cat(la), torch.cat(lb), f"all_gather {dtype}")
        oa = torch.zeros(5 * n, dtype=dtype)
        ob = torch.zeros(5 * n, dtype=gdt)
        dist.all_gather_into_tensor(oa, x, group=het)
        dist.all_gather_into_tensor(ob, y, group=glo)
        same(oa, ob, f"all_gather_into_tensor {dtype}")
        if rank < 2:
            s = values(rank, n, dtype, 9) if rank == 0 else torch.zeros(9, dtype=dtype)
            if rank == 0:
                dist.send(s, 1, group=het)
            else:
                dist.recv(s, 0, group=het)
                same(s, values(0, n, gdt, 9), f"send/recv {dtype}")
    # Asynchronous calls complete in issue order; wait() and is_completed() follow them.
    ts = [torch.full((1 << 16,), float(rank + i)) for i in range(4)]
    works = [dist.all_reduce(t, group=het, async_op=True) for t in ts]
    works[-1].wait()
    if not all(w.is_completed() for w in works):
        raise AssertionError("an earlier call is not complete after a later one's wait()")
    dtype = torch.float32
    for i, t in enumerate(ts):
        same(t[:3], torch.full((3,), float(sum(r + i for r in range(n)))), f"async {i}")
    dist.barrier(group=het)
    dist.destroy_process_group()
    return checked


def grouped_exchanges(rank, n):
    """batch_isend_irecv rings, all_to_all_single and all_to_all, through hetccl and Gloo."""
    dist.init_process_group("gloo", rank=rank, world_size=n)
    het = dist.new_group(backend="hetccl")
    glo = dist.new_group(backend="gloo")
    right, left = (rank + 1) % n, (rank - 1) % n
    checked = []

    def exchange(group):
        # Both directions of the ring at once; 4 MiB outgrows every link's buffering, so
        # run in call order (send before receive on every rank) these would deadlock.
        big = torch.arange(1 << 20, dtype=torch.float32) + 1000 * rank
        small = torch.arange(7, dtype=torch.int64) * (rank + 1)
        from_left = torch.zeros(1 << 20, dtype=torch.float32)
        from_right = torch.zeros(7, dtype=torch.int64)
        ops = [dist.P2POp(dist.isend, big, right, group),
               dist.P2POp(dist.irecv, from_left, left, group),
               dist.P2POp(dist.isend, small, left, group),
               dist.P2POp(dist.irecv, from_right, right, group)]
        works = dist.batch_isend_irecv(ops)
        for w in works:
            w.wait()
        # all_to_all_single with uneven splits: rank r sends r + p + 1 rows of 3 to p.
        ins = [r + rank + 1 for r in range(n)]
        outs = [rank + r + 1 for r in range(n)]
        x = torch.cat([torch.full((k, 3), 100.0 * rank + p) for p, k in enumerate(ins)])
        y = torch.zeros(sum(outs), 3)
        dist.all_to_all_single(y, x, outs, ins, group=group)
        # all_to_all_single in equal blocks, and all_to_all of lists.
        e = torch.arange(2 * n, dtype=torch.int32) + 10 * rank
        f = torch.zeros(2 * n, dtype=torch.int32)
        dist.all_to_all_single(f, e, group=group)
        li = [torch.full((3,), float(rank * n + p), dtype=torch.float64) for p in range(n)]
        lo = [torch.zeros(3, dtype=torch.float64) for _ in range(n)]
        dist.all_to_all(lo, li, group=group)
        # _coalescing_manager's fast path: one allreduce_coalesced of both tensors.
        c1, c2 = torch.full((5,), rank + 1.0), torch.full((3,), 2.0 * rank)
        with dist._coalescing_manager(group=group, async_ops=True) as cm:
            dist.all_reduce(c1, group=group)
            dist.all_reduce(c2, group=group)
        cm.wait()
        return [from_left, from_right, y, f, torch.cat(lo), torch.cat([c1, c2])]

    got, want = exchange(het), exchange(glo)
    names = ["ring right", "ring left", "all_to_all_single uneven", "all_to_all_single",
             "all_to_all", "coalesced all_reduce"]
    for a, b, name in zip(got, want, names):
        if not torch.equal(a, b):
            raise AssertionError(f"{name}: hetccl {a.tolist()[:8]} != gloo {b.tolist()[:8]}")
        checked.append(name)
    # The closed forms, so that agreeing with Gloo is not agreeing on nothing.
    if not torch.equal(got[0][:3], torch.tensor([0.0, 1.0, 2.0]) + 1000 * left):
        raise AssertionError(f"ring right: {got[0][:3].tolist()} from rank {left}")
    if not torch.equal(got[1], torch.arange(7, dtype=torch.int64) * (right + 1)):
        raise AssertionError(f"ring left: {got[1].tolist()} from rank {right}")
    if got[2][:, 0].tolist() != [100.0 * p + rank for p in range(n) for _ in range(rank + p + 1)]:
        raise AssertionError(f"all_to_all_single uneven: {got[2][:, 0].tolist()}")
    if got[5].tolist() != [n * (n + 1) / 2] * 5 + [float(n * (n - 1))] * 3:
        raise AssertionError(f"coalesced all_reduce: {got[5].tolist()}")
    dist.destroy_process_group()
    return checked


def mismatched_shapes(rank, n):
    dist.init_process_group("hetccl", rank=rank, world_size=n)
    t = torch.ones(4 + 4 * rank)
    try:
        dist.all_reduce(t)
    except dist.DistBackendError as e:
        return str(e)
    return "no error"


def wrong_output_size(rank, n):
    dist.init_process_group("hetccl", rank=rank, world_size=n)
    try:
        dist.all_gather_into_tensor(torch.zeros(3), torch.ones(2))
    except dist.DistBackendError as e:
        return str(e)
    return "no error"


def dead_rank(rank, n):
    """Rank 1 of 2, rank 2 of 4, ends without a word after the first all_reduce."""
    dist.init_process_group("hetccl", rank=rank, world_size=n)
    dist.all_reduce(torch.ones(8))
    if rank == n // 2:
        os._exit(3)
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1 << 20))
    except dist.DistBackendError as e:
        return {"error": str(e), "seconds": time.monotonic() - t0}
    return {"error": None}


def silent_peer(rank, n):
    """Rank 1 never makes the second call; rank 0's waits for it as long as the process
    group's timeout (4 s), not HETCCL_TIMEOUT's 300 s from the environment."""
    from datetime import timedelta

    dist.init_process_group("hetccl", rank=rank, world_size=n, timeout=timedelta(seconds=4))
    store = dist.distributed_c10d._get_default_store()
    dist.all_reduce(torch.ones(8))
    if rank == 1:
        # Alive and silent until rank 0 is done (the store is not hetccl's).
        store.wait(["silent_peer/done"], timedelta(seconds=120))
        store.set("silent_peer/seen", "1")
        return None
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(8))
        out = {"error": None}
    except dist.DistBackendError as e:
        out = {"error": str(e), "seconds": time.monotonic() - t0}
    store.set("silent_peer/done", "1")
    # Rank 0 serves the store: it stays until rank 1 has read it.
    store.wait(["silent_peer/seen"], timedelta(seconds=120))
    return out


def unordered_point_to_point(rank, n):
    """Plain isend/irecv (no batch_isend_irecv) posted in orders that only complete if
    each one progresses on its own, as with Gloo: every message is 4 MiB, more than any
    link buffers, so a send completes only while its receiver receives."""
    dist.init_process_group("hetccl", rank=rank, world_size=n)
    right, left = (rank + 1) % n, (rank - 1) % n
    big = 1 << 20
    checked = []

    def sent(by, k=0):
        return torch.arange(big, dtype=torch.float32) + 1000 * by + k

    def same(got, want, what):
        if not torch.equal(got, want):
            raise AssertionError(f"{what}: {got[:4].tolist()} != {want[:4].tolist()}")
        checked.append(what)

    # A ring, receive posted first on every rank: req_r = irecv(left); req_s = isend(right).
    got = torch.zeros(big)
    req_r = dist.irecv(got, left)
    req_s = dist.isend(sent(rank), right)
    req_r.wait()
    req_s.wait()
    same(got, sent(left), "ring, receive first")
    # Both directions of the ring at once, waited for in the opposite order; each
    # direction has a tag of its own (on 2 ranks left and right are the same peer).
    from_left, from_right = torch.zeros(big), torch.zeros(big)
    reqs = [dist.isend(sent(rank, 1), right, tag=1), dist.isend(sent(rank, 2), left, tag=2),
            dist.irecv(from_right, right, tag=2), dist.irecv(from_left, left, tag=1)]
    for r in reversed(reqs):
        r.wait()
    same(from_left, sent(left, 1), "ring, both directions (from the left)")
    same(from_right, sent(right, 2), "ring, both directions (from the right)")
    # A receive posted before a collective and the send its peer needs after it: the
    # all_reduce runs while the receive waits, and the data is right.
    partner = rank ^ 1
    if partner < n:
        x = torch.zeros(big)
        req = dist.irecv(x, partner)
        s = torch.full((3,), float(rank + 1))
        dist.all_reduce(s)
        same(s, torch.full((3,), float(n * (n + 1) // 2)), "all_reduce while a receive waits")
        dist.send(sent(rank, 3), partner)
        req.wait()
        same(x, sent(partner, 3), "receive posted before the collective")
    dist.barrier()
    dist.destroy_process_group()
    return checked


def tagged(rank, n):
    """Rank 0 sends tag 1 (4 MiB, more than a link buffers) then tag 2; rank 1 receives
    tag 2 first, then tag 1. Tag 0 runs alongside both."""
    dist.init_process_group("hetccl", rank=rank, world_size=n)
    one = torch.arange(1 << 20, dtype=torch.float32) * 3
    two = torch.arange(5, dtype=torch.int64) + 20
    out = None
    if rank == 0:
        reqs = [dist.isend(one, 1, tag=1), dist.isend(two, 1, tag=2),
                dist.isend(torch.tensor([7.0]), 1)]
        for r in reqs:
            r.wait()
    elif rank == 1:
        a, b, c = torch.zeros(5, dtype=torch.int64), torch.zeros(1 << 20), torch.zeros(1)
        dist.recv(a, 0, tag=2)
        dist.recv(b, 0, tag=1)
        dist.recv(c, 0)
        out = [a.tolist(), torch.equal(b, one), c.tolist()]
    dist.barrier()
    dist.destroy_process_group()
    return out


def mismatched_recv(rank, n):
    """Rank 1 receives 4 elements where rank 0 sent 3 with tag 5; the next message still
    arrives intact."""
    dist.init_process_group("hetccl", rank=rank, world_size=n)
    out = None
    if rank == 0:
        dist.send(torch.ones(3), 1, tag=5)
        dist.send(torch.full((2,), 9.0), 1, tag=5)
    else:
        try:
            dist.recv(torch.zeros(4), 0, tag=5)
            out = "no error"
        except dist.DistBackendError as e:
            out = str(e)
        y = torch.zeros(2)
        dist.recv(y, 0, tag=5)
        out = [out, y.tolist()]
    dist.barrier()
    dist.destroy_process_group()
    return out


def timeout_changed(rank, n):
    """The group starts with torch's default timeout and HETCCL_TIMEOUT=300 s; after
    set_timeout(3 s) rank 1 never makes the second call, and rank 0 waits 3 s for it."""
    from datetime import timedelta

    dist.init_process_group("hetccl", rank=rank, world_size=n)
    store = dist.distributed_c10d._get_default_store()
    dist.all_reduce(torch.ones(8))
    dist.set_timeout(timedelta(seconds=3))
    if rank == 1:
        store.wait(["timeout_changed/done"], timedelta(seconds=120))
        store.set("timeout_changed/seen", "1")
        return None
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(8))
        out = {"error": None}
    except dist.DistBackendError as e:
        out = {"error": str(e), "seconds": time.monotonic() - t0}
    store.set("timeout_changed/done", "1")
    store.wait(["timeout_changed/seen"], timedelta(seconds=120))
    return out


def compressed(rank, n):
    import hetccl_torch

    dist.init_process_group("gloo", rank=rank, world_size=n)
    g = dist.new_group(backend="hetccl", pg_options=hetccl_torch.Options(compress="all",
                                                                         compress_format="bf16"))
    # 1 + 2^-10 is not a bfloat16 value: the compressed sum rounds it, the plain one not.
    t = torch.full((1024,), 1.0 + 2.0 ** -10)
    dist.all_reduce(t, group=g)
    plain = torch.full((1024,), 1.0 + 2.0 ** -10)
    dist.all_reduce(plain)
    return [t[0].item(), plain[0].item()]


BERT = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=64)


def ddp_bert(rank, n, backend, steps=24, seq=32, batch=4, device=None):
    """Losses of DDP training of a small BertForMaskedLM; on CUDA `device` if given."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import BertConfig, BertForMaskedLM

    if device is not None:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=n)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**BERT)).to(device or "cpu")
    model.train()
    ddp = DDP(model, device_ids=None if device is None else [device.index])
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1000 + rank)
    losses = []
    for _ in range(steps):
        ids = torch.randint(5, BERT["vocab_size"], (batch, seq), generator=gen)
        labels = ids.clone()
        mask = torch.rand(ids.shape, generator=gen) < 0.15
        labels[~mask] = -100
        ids[mask] = 4
        if device is not None:
            ids, labels = ids.to(device), labels.to(device)
        loss = ddp(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    dist.destroy_process_group()
    return losses


def traced(rank, n):
    """An all_reduce and a send/recv with HETCCL_TRACE set: the rank's trace file."""
    dist.init_process_group("hetccl", rank=rank, world_size=n)
    x = torch.ones(1024)
    dist.all_reduce(x)
    if rank == 0:
        dist.send(torch.full((4,), 3.0), 1)
    elif rank == 1:
        y = torch.zeros(4)
        dist.recv(y, 0)
    dist.barrier()
    dist.destroy_process_group()
    return os.environ["HETCCL_TRACE"].replace("%r", str(rank))


def ddp_bert_hetccl(rank, n):
    return ddp_bert(rank, n, "hetccl")


def ddp_bert_gloo(rank, n):
    return ddp_bert(rank, n, "gloo")


class Backend(unittest.TestCase):
    def check_collectives(self, n):
        res = run_ranks(collectives, n)
        for r, x in enumerate(res):
            self.assertIn("ok", x, f"rank {r}: {x}")
        # Rank 0, per dtype: all_reduce and reduce_scatter_tensor x 5 ops, broadcast,
        # two gathers, send; the 4 asynchronous calls. The root adds reduce x 5 ops.
        self.assertEqual(len(res[0]["ok"]), len(DTYPES) * (2 * 5 + 3) + 4)
        self.assertEqual(len(res[n - 1]["ok"]),
                         len(DTYPES) * (3 * 5 + 3 + (n - 1 == 1)) + 4)
        for dtype in DTYPES:
            for name in OPS:
                self.assertIn(f"reduce {name} {dtype}", res[n - 1]["ok"])
                self.assertIn(f"reduce_scatter_tensor {name} {dtype}", res[0]["ok"])
            self.assertIn(f"send/recv {dtype}", res[1]["ok"])

    def test_collectives_match_gloo_on_2_ranks(self):
        self.check_collectives(2)

    def test_collectives_match_gloo_on_4_ranks(self):
        self.check_collectives(4)

    def check_grouped(self, n):
        res = run_ranks(grouped_exchanges, n)
        for r, x in enumerate(res):
            self.assertIn("ok", x, f"rank {r}: {x}")
            self.assertEqual(x["ok"], ["ring right", "ring left", "all_to_all_single uneven",
                                       "all_to_all_single", "all_to_all",
                                       "coalesced all_reduce"])

    def test_grouped_point_to_point_matches_gloo_on_2_ranks(self):
        self.check_grouped(2)

    def test_grouped_point_to_point_matches_gloo_on_4_ranks(self):
        self.check_grouped(4)

    def check_mismatched_shapes(self, n):
        res = run_ranks(mismatched_shapes, n, env={"HETCCL_TIMEOUT": "20"})
        for r, x in enumerate(res):
            self.assertIsInstance(x, dict, f"rank {r}: {res}")
            msg = x.get("ok", "")
            self.assertTrue(msg.startswith("hetccl: hetcclAllReduce failed (invalid usage"),
                            f"rank {r}: {x}")
            # hetccl's own message: this rank, the call, its shape and a disagreeing peer's.
            self.assertRegex(msg, rf"rank {r}: all_reduce #0 does not match what peer \d+ "
                                  rf"sent: expected all_reduce #0 of {4 + 4 * r} x f32")

    def test_mismatched_shapes_raise_on_every_rank_of_2(self):
        self.check_mismatched_shapes(2)

    def test_mismatched_shapes_raise_on_every_rank_of_4(self):
        self.check_mismatched_shapes(4)

    def test_wrong_output_size_is_refused_at_the_call(self):
        res = run_ranks(wrong_output_size, 2)
        self.assertEqual(
            res[0]["ok"],
            "hetccl backend: all_gather_into_tensor's output has 3 elements; it must have "
            "world size (2) times the input's 2, of the same dtype",
        )

    def test_a_dead_rank_is_named_not_waited_for(self):
        res = run_ranks(dead_rank, 2, env={"HETCCL_TIMEOUT": "60"})
        out = res[0]["ok"]
        self.assertIsNotNone(out["error"], res)
        self.assertIn("peer 1 is gone during all_reduce", out["error"])
        self.assertLess(out["seconds"], 30, out)

    def test_a_dead_rank_of_4_is_named_on_every_other_rank(self):
        res = run_ranks(dead_rank, 4, env={"HETCCL_TIMEOUT": "60"})
        self.assertIsNone(res[2], res)  # it ended before writing anything
        for r in (0, 1, 3):
            out = res[r]["ok"]
            self.assertIsNotNone(out["error"], res)
            self.assertTrue(out["error"].startswith(
                "hetccl: hetcclAllReduce failed (remote process exited"), out)
            # Its neighbours lost it; the others hear it from a peer that gave up (hetccl
            # words that two ways, depending on how the peer learnt of the loss).
            self.assertRegex(out["error"], rf"rank {r}: peer \d is gone during all_reduce #1: "
                                           r"peer (2 \(pid \d+\) process has exited|"
                                           r"\d gave up (after losing rank 2|on news that rank 2 was lost) )")
            self.assertLess(out["seconds"], 30, out)

    def test_the_process_group_timeout_is_hetccls(self):
        res = run_ranks(silent_peer, 2, env={"HETCCL_TIMEOUT": "300"})
        self.assertEqual(res[1], {"ok": None}, res)
        out = res[0]["ok"]
        self.assertIsNotNone(out["error"], res)
        self.assertTrue(out["error"].startswith("hetccl: hetcclAllReduce failed ("), out)
        self.assertRegex(out["error"],
                         r"rank 0: all_reduce #1 timed out after 4(\.\d+)?s waiting for peer 1 ")
        # Not before the timeout, and well before HETCCL_TIMEOUT's 300 s.
        self.assertGreater(out["seconds"], 3.5, out)
        self.assertLess(out["seconds"], 4 + 10, out)

    def check_unordered(self, n):
        res = run_ranks(unordered_point_to_point, n, env={"HETCCL_TIMEOUT": "30"}, timeout=180)
        for r, x in enumerate(res):
            self.assertIn("ok", x, f"rank {r}: {x}")
            want = ["ring, receive first", "ring, both directions (from the left)",
                    "ring, both directions (from the right)"]
            if r ^ 1 < n:
                want += ["all_reduce while a receive waits",
                         "receive posted before the collective"]
            self.assertEqual(x["ok"], want, f"rank {r}")

    def test_plain_isend_irecv_progress_out_of_order_on_2_ranks(self):
        self.check_unordered(2)

    def test_plain_isend_irecv_progress_out_of_order_on_4_ranks(self):
        self.check_unordered(4)

    def test_tags_match_sends_to_receives(self):
        res = run_ranks(tagged, 2, env={"HETCCL_TIMEOUT": "30"}, timeout=180)
        self.assertEqual(res[0], {"ok": None}, res)
        self.assertEqual(res[1], {"ok": [[20, 21, 22, 23, 24], True, [7.0]]}, res)

    def test_a_receive_of_the_wrong_size_is_refused_and_the_next_arrives(self):
        res = run_ranks(mismatched_recv, 2, env={"HETCCL_TIMEOUT": "30"}, timeout=180)
        self.assertEqual(res[0], {"ok": None}, res)
        msg, nxt = res[1]["ok"]
        self.assertEqual(
            msg, "hetccl backend: rank 1's recv from rank 0 with tag 5 was posted for 4 "
                 "elements of Float; rank 0 sent 3 elements of Float")
        self.assertEqual(nxt, [9.0, 9.0])

    def test_set_timeout_applies_to_the_next_call(self):
        res = run_ranks(timeout_changed, 2, env={"HETCCL_TIMEOUT": "300"})
        self.assertEqual(res[1], {"ok": None}, res)
        out = res[0]["ok"]
        self.assertIsNotNone(out["error"], res)
        self.assertTrue(out["error"].startswith("hetccl: hetcclAllReduce failed ("), out)
        self.assertRegex(out["error"],
                         r"rank 0: all_reduce #1 timed out after 3(\.\d+)?s waiting for peer 1 ")
        self.assertGreater(out["seconds"], 2.5, out)
        self.assertLess(out["seconds"], 3 + 10, out)

    def test_a_trace_has_one_file_per_rank_that_point_to_point_channels_leave_alone(self):
        d = tempfile.mkdtemp(prefix="hetccl-torch-trace-")
        self.addCleanup(shutil.rmtree, d, ignore_errors=True)
        res = run_ranks(traced, 2, env={"HETCCL_TRACE": os.path.join(d, "t-%r.json")})
        self.assertEqual(sorted(os.listdir(d)), ["t-0.json", "t-1.json"])
        for r in range(2):
            with open(res[r]["ok"]) as f:
                events = json.load(f)
            # The group's own rank, with its all_reduce.
            ranks = {e["pid"] for e in events if e.get("ph") == "X"}
            self.assertEqual(ranks, {r}, events)
            names = [e["name"] for e in events if e.get("ph") == "X"]
            self.assertIn("all_reduce", names, names)

    def test_compression_is_a_process_group_option(self):
        res = run_ranks(compressed, 2)
        got, plain = res[0]["ok"]
        self.assertEqual(plain, 2 * (1.0 + 2.0 ** -10))
        self.assertEqual(got, 2.0)

    def test_ddp_bert_losses_equal_gloo(self):
        het = run_ranks(ddp_bert_hetccl, 2)
        glo = run_ranks(ddp_bert_gloo, 2)
        for r in range(2):
            self.assertIn("ok", het[r], het[r])
            self.assertIn("ok", glo[r], glo[r])
            self.assertEqual(len(het[r]["ok"]), 24)
            for i, (a, b) in enumerate(zip(het[r]["ok"], glo[r]["ok"])):
                self.assertAlmostEqual(a, b, delta=1e-4 * abs(b), msg=f"rank {r} step {i}")
        # The model learns: the last losses are below the first.
        self.assertLess(sum(het[0]["ok"][-4:]), sum(het[0]["ok"][:4]))


if __name__ == "__main__":
    unittest.main()
