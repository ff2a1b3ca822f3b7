"""Alternated launches of scripts/torch-ddp-bench.py: hetccl and Gloo, with and without
gradient communication, round after round, each launch with the load average it started
under.

    python scripts/torch-ddp-series.py [--rounds 5] [--steps 12] [--tcp] [--max-load 3]
                                       [--paired]

Per round the four launches run in the order hetccl sync, gloo sync, hetccl no-sync,
gloo no-sync, so that a change of load hits both backends alike. A launch waits (up to
--wait seconds) for the 1-minute load average to fall under --max-load and runs anyway
after that, marked "loaded" unless it started under --max-load and ended under
--max-load + 2 (its own two ranks). At the end: every launch, then per backend the median
step time with and without communication over the quiet rounds (every launch quiet), the exposed communication (step - step without communication) and its
ratio hetccl / Gloo, and samples/s.

--paired runs per round one hetccl and one Gloo launch of `torch-ddp-bench.py --paired`,
whose steps alternate between all-reducing the buckets and DDP's noop hook, so that each
launch measures its own exposed communication in its own minutes; it prints every launch,
each backend's median, and the per-round ratios.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LINE = re.compile(r"step median (\d+) ms .* ([\d.]+) samples/s")
PAIRED = re.compile(r"noop-hook steps: median (\d+) ms; exposed (-?[\d.]+) ms")


def load1():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def launch(backend, no_sync, a, extra=()):
    deadline = time.monotonic() + a.wait
    while load1() >= a.max_load and time.monotonic() < deadline:
        time.sleep(5)
    before = load1()
    env = dict(os.environ)
    if a.tcp:
        env["HETCCL_SHM_DISABLE"] = "1"
    cmd = [sys.executable, os.path.join(HERE, "torch-ddp-bench.py"), "--backend", backend,
           "--steps", str(a.steps)] + (["--no-sync"] if no_sync else []) + list(extra)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    after = load1()
    m = LINE.search(out.stdout)
    if out.returncode != 0 or m is None:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    cpu = [l.strip() for l in out.stdout.splitlines() if "cpu per step" in l]
    paired = PAIRED.search(out.stdout)
    return {"backend": backend, "sync": not no_sync, "step_ms": float(m.group(1)),
            "samples": float(m.group(2)), "load": (before, after),
            # The launch's own two ranks add about 2 to the average it ends with.
            "quiet": before < a.max_load and after < a.max_load + 2, "cpu": cpu[0] if cpu else "",
            "bare_ms": float(paired.group(1)) if paired else None,
            "exposed": float(paired.group(2)) if paired else None}


def paired_series(a):
    rounds = []
    for r in range(a.rounds):
        runs = {b: launch(b, False, a, ("--paired",)) for b in ("hetccl", "gloo")}
        for b, x in runs.items():
            print(f"round {r} {b:6} step {x['step_ms']:5.0f} ms, noop-hook step "
                  f"{x['bare_ms']:5.0f} ms, exposed {x['exposed']:6.1f} ms, load "
                  f"{x['load'][0]:.2f}->{x['load'][1]:.2f}{'' if x['quiet'] else ' loaded'}",
                  flush=True)
        rounds.append(runs)
    for b in ("hetccl", "gloo"):
        v = [rd[b]["exposed"] for rd in rounds]
        print(f"{b}: exposed median {statistics.median(v):.1f} ms over {len(v)} launches; "
              f"step median {statistics.median(rd[b]['step_ms'] for rd in rounds):.0f} ms, "
              f"noop-hook step median {statistics.median(rd[b]['bare_ms'] for rd in rounds):.0f} ms")
    per = [rd["hetccl"]["exposed"] / rd["gloo"]["exposed"] for rd in rounds
           if rd["gloo"]["exposed"] > 0]
    if per:
        print("per-round exposed hetccl / gloo: " + ", ".join(f"{x:.2f}" for x in per)
              + f"; median {statistics.median(per):.2f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--tcp", action="store_true", help="HETCCL_SHM_DISABLE=1")
    p.add_argument("--max-load", type=float, default=3.0)
    p.add_argument("--wait", type=float, default=120.0)
    p.add_argument("--paired", action="store_true")
    a = p.parse_args()
    if a.paired:
        paired_series(a)
        return
    rounds = []
    for r in range(a.rounds):
        runs = [launch(b, ns, a) for ns in (False, True) for b in ("hetccl", "gloo")]
        for x in runs:
            print(f"round {r} {x['backend']:6} {'sync' if x['sync'] else 'no-sync':7} "
                  f"step {x['step_ms']:5.0f} ms {x['samples']:5.2f} samples/s load "
                  f"{x['load'][0]:.2f}->{x['load'][1]:.2f}"
                  f"{'' if x['quiet'] else ' loaded'}  {x['cpu']}", flush=True)
        rounds.append(runs)
    quiet = [rd for rd in rounds if all(x["quiet"] for x in rd)]
    print(f"{len(quiet)} of {len(rounds)} rounds quiet (load average under {a.max_load} "
          "before each launch)")
    if not quiet:
        return
    med = {}
    for b in ("hetccl", "gloo"):
        for s in (True, False):
            med[b, s] = statistics.median(x["step_ms"] for rd in quiet for x in rd
                                          if x["backend"] == b and x["sync"] == s)
    exposed = {b: med[b, True] - med[b, False] for b in ("hetccl", "gloo")}
    for b in ("hetccl", "gloo"):
        print(f"{b}: step {med[b, True]:.0f} ms, without communication "
              f"{med[b, False]:.0f} ms, exposed {exposed[b]:.0f} ms, "
              f"{2 * 8 * 1000 / med[b, True]:.2f} samples/s")
    if exposed["gloo"] > 0:
        print(f"exposed hetccl / gloo: {exposed['hetccl'] / exposed['gloo']:.2f}; "
              f"samples/s hetccl / gloo: {med['gloo', True] / med['hetccl', True]:.2f}")
    # The ratio of the medians hides the spread: per round, with that round's launches.
    per = [(rd[0]["step_ms"] - rd[2]["step_ms"]) / (rd[1]["step_ms"] - rd[3]["step_ms"])
           for rd in quiet if rd[1]["step_ms"] > rd[3]["step_ms"]]
    if per:
        print("per-round exposed ratios: " + ", ".join(f"{x:.2f}" for x in per))


if __name__ == "__main__":
    main()
