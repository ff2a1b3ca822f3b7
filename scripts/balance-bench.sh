#!/usr/bin/env bash
# The trainer's load balancing against its targets, on two ranks started by `hetccl run`:
#
#   1. rank 1 slowed 2x from the start, global batch 16 and 64: --balance equal against
#      --balance auto; the speed-up set against the ideal for the speeds measured in the
#      equal run (continuous shares, and the best split in whole samples);
#   2. rank 1 slowed 2x from the middle of the run: --balance start (split measured at the
#      start only) against --balance auto (re-split as speeds drift), over the steps after
#      the slowdown.
#
# Step times come from the runs' metrics (global batch / step time); the first steps of a
# run (cold caches) are left out of the start-of-run comparison. Prints one table.
#
# Beside the target's figure (speeds from the equal run) it prints what bounds it: the ideal
# for the speeds the auto run itself measured (both ranks computing at once, where in the
# equal run the slowed rank sleeps while the other computes), each rank's compute time per
# sample in the auto run against the equal run, and the median time per step outside the
# slowest rank's compute (optimizer, counters, exposed communication), which no split
# shortens.
#
# Every case runs REPEATS times (default 3), the runs of a repeat one after another so
# that the runs compared sit in the same minutes; the table lists every repeat and the
# median of the ratios.
#
# Usage: scripts/balance-bench.sh [OUT_DIR]   (after cargo build --release)
#        BIN_DIR=DIR REPEATS=N scripts/balance-bench.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/balance-bench}
mkdir -p "$out"
bin=${BIN_DIR:-target/release}
launcher=$bin/hetccl
bert=$bin/hetccl-bert
for b in "$launcher" "$bert"; do
    [[ -x $b ]] || { echo "missing $b: run cargo build --release first" >&2; exit 1; }
done
common=(--config configs/bert-tiny.toml --eval-every 100000 --val-samples 16 --threads 1
        --no-checkpoint --no-progress --slow-ranks 1 --slowdown 2.0)

run() { # tag, extra flags...
    local tag=$1
    shift
    "$launcher" run -n 2 -- "$bert" "${common[@]}" --metrics-out "$out/$tag.jsonl" \
        --plot-out "$out/$tag.png" "$@" >"$out/$tag.log" 2>&1 \
        || { echo "run $tag failed, see $out/$tag.log" >&2; exit 1; }
}

repeats=${REPEATS:-3}
for ((i = 1; i <= repeats; i++)); do
    echo "repeat $i, $(date -u +%H:%M:%S) UTC, load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    run equal16-$i --batch-size 16 --steps 40 --balance equal
    run auto16-$i --batch-size 16 --steps 40 --balance auto
    run equal64-$i --batch-size 64 --steps 24 --balance equal
    run auto64-$i --batch-size 64 --steps 24 --balance auto
    run start-mid-$i --batch-size 16 --steps 80 --slowdown-from 30 --balance start
    run auto-mid-$i --batch-size 16 --steps 80 --slowdown-from 30 --balance auto
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$out" "$repeats" <<'PY'
import json, statistics, sys
out, repeats = sys.argv[1], int(sys.argv[2])

def steps(tag):
    with open(f"{out}/{tag}.jsonl") as f:
        recs = [json.loads(l) for l in f if l.strip()]
    return [r for r in recs if r.get("kind") == "train"]

def split_time(split, speeds):
    return max(b / s for b, s in zip(split, speeds))

def best_split(g, speeds):
    # The trainer's rule: one each, then each sample to the rank that finishes it first.
    share = [1] * len(speeds)
    for _ in range(g - len(speeds)):
        r = min(range(len(speeds)), key=lambda r: ((share[r] + 1) / speeds[r], r))
        share[r] += 1
    return share

def samples_per_s(recs, batch):
    # Samples over the summed step times (tokens per step / tokens per second).
    secs = sum(batch * 128 / r["tokens_per_s"] for r in recs)
    return len(recs) * batch / secs

def rank_speeds(recs):
    # Per-rank speeds: samples of compute per second, median over steps.
    return [statistics.median(r["split"][k] * 1e3 / r["rank_ms_compute"][k] for r in recs)
            for k in range(2)]

def outside_ms(recs, batch):
    # Median time per step outside the slowest rank's forward and backward.
    return statistics.median(batch * 128 / r["tokens_per_s"] * 1e3 - max(r["rank_ms_compute"])
                             for r in recs)

rows, bounds, ratios = [], [], {}
for i in range(1, repeats + 1):
    for g, skip in ((16, 5), (64, 2)):
        eq, au = steps(f"equal{g}-{i}")[skip:], steps(f"auto{g}-{i}")[skip:]
        speeds = rank_speeds(eq)
        t_eq = split_time(eq[0]["split"], speeds)
        ideal = t_eq / (g / sum(speeds))
        whole = t_eq / split_time(best_split(g, speeds), speeds)
        got = samples_per_s(au, g) / samples_per_s(eq, g)
        ratios.setdefault(f"batch {g}, of the ideal", []).append(got / ideal)
        # What no balancer can beat: the best whole-sample split for the same speeds.
        ratios.setdefault(f"batch {g}, best whole-sample split, of the ideal",
                          []).append(whole / ideal)
        rows.append((f"{i}: slowed 2x from the start, batch {g}",
                     f"equal {eq[0]['split']} {samples_per_s(eq, g):.1f} samples/s, "
                     f"auto {au[-1]['split']} {samples_per_s(au, g):.1f}",
                     f"{got:.3f}x; ideal {ideal:.3f}x ({got / ideal:.1%}), "
                     f"best whole-sample split {whole:.3f}x ({got / whole:.1%}); "
                     f"speeds {speeds[0]:.1f} / {speeds[1]:.1f} samples/s"))
        own = rank_speeds(au)
        own_ideal = split_time(eq[0]["split"], own) / (g / sum(own))
        bounds.append(f"{i}: batch {g}: auto run's own speeds {own[0]:.1f} / {own[1]:.1f} "
                      f"samples/s, ideal for them {own_ideal:.3f}x ({got / own_ideal:.1%}); "
                      f"compute per sample auto / equal {speeds[0] / own[0]:.3f} (rank 0), "
                      f"{speeds[1] / own[1]:.3f} (rank 1); outside compute per step "
                      f"{outside_ms(eq, g):.1f} ms (equal), {outside_ms(au, g):.1f} ms (auto) of "
                      f"{statistics.median(g * 128 / r['tokens_per_s'] * 1e3 for r in au):.1f}")
    st, au = steps(f"start-mid-{i}"), steps(f"auto-mid-{i}")
    after = lambda recs: [r for r in recs if r["step"] >= 30]
    splits = []
    for r in au:
        if not splits or splits[-1][1] != r["split"]:
            splits.append((r["step"], r["split"]))
    a, s = samples_per_s(after(au), 16), samples_per_s(after(st), 16)
    ratios.setdefault("mid-run, auto / start", []).append(a / s)
    rows.append((f"{i}: slowed 2x from step 30 of 80, batch 16, steps 30-79",
                 f"start {st[-1]['split']} {s:.1f} samples/s, auto {a:.1f} "
                 f"(splits {splits})", f"{a / s:.3f}x"))
for name, v in ratios.items():
    fmt = (lambda x: f"{x:.1%}") if "ideal" in name else (lambda x: f"{x:.3f}x")
    rows.append((f"median of {len(v)}: {name}", ", ".join(fmt(x) for x in v),
                 fmt(statistics.median(v))))
print("| case | runs | result |")
print("| --- | --- | --- |")
for row in rows:
    print("| " + " | ".join(row) + " |")
print()
for b in bounds:
    print(b)
PY
