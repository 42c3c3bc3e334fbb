#!/bin/bash
# The cold start of an old tree against this one on one host (benchmarks/cold_start.py, --ranks 2,16, one cold and
# one warm run each), ROUNDS times, old and new in turn: the hosts' spread (seconds between leases) is larger than
# most changes, so only one call's pairs compare. A table last: each round's cold starts, the 16 / 2 ratio, the
# longest compile (and when it started). Prepare the old tree on your own machine and carry it:
#   git archive OLD | (mkdir -p .Z && tar -x -C .Z)
#   run(command="source .device/on-device.sh && ROUNDS=3 bash benchmarks/cold_ab.sh .Z", carry=[".device", ".Z"])
# MODEL (default random:gpt2) is passed to cold_start.py's --model. Output: OUT/cold_ab.jsonl (every run's line, with
# its tree and round) and OUT/cold_ab.log.
export PYTHONUNBUFFERED=1
OLD=$(cd "${1:?usage: cold_ab.sh OLD_TREE}" && pwd)
cd "$(dirname "$0")/.." || exit 1
ROUNDS=${ROUNDS:-2}
MODEL=${MODEL:-random:gpt2}
rm -f "$OUT/cold_ab.jsonl" "$OUT/cold_ab.log"   # (this run's lines only)
OUT=$(mkdir -p "${OUT:-bench-out/cold-ab}" && cd "${OUT:-bench-out/cold-ab}" && pwd)
for r in $(seq "$ROUNDS"); do
    for tree in old new; do
        dir=.; [ "$tree" = old ] && dir=$OLD
        (cd "$dir" && timeout -k 5 240 python3 benchmarks/cold_start.py --ranks 2,16 --repeats 1 --model "$MODEL" \
            --out "$OUT/$tree-$r") > "$OUT/run.log" 2>&1
        rc=$?
        { echo "=== $tree round $r rc=$rc"; cat "$OUT/run.log"; } >> "$OUT/cold_ab.log"
        echo "=== $tree round $r rc=$rc: $(grep 'cold 16 ranks / cold 2' "$OUT/run.log")"
    done
done
rm -f "$OUT/run.log"
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, os, shutil, sys
out, rounds = sys.argv[1], int(sys.argv[2])
print("\nround tree  cold 2 / 16 ranks (s)  16/2   longest compile 2 / 16 (s; start)   warm 2 / 16 (s)  ready  rc")
for r in range(1, rounds + 1):
    for tree in ("old", "new"):
        path = os.path.join(out, f"{tree}-{r}", "cold_start.jsonl")
        if not os.path.exists(path):
            print(f"{r:5d} {tree:4s}  (no lines)")
            continue
        lines = [dict(json.loads(x), tree=tree, round=r) for x in open(path)]
        with open(os.path.join(out, "cold_ab.jsonl"), "a") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)
        shutil.rmtree(os.path.dirname(path))
        rec = {(x["ranks"], x["start"]): x for x in lines}
        c2, c16, w2, w16 = (rec.get(k, {}) for k in ((2, "cold"), (16, "cold"), (2, "warm"), (16, "warm")))
        t2, t16 = c2.get("time_to_ready_s"), c16.get("time_to_ready_s")
        ratio = f"{t16 / t2:.2f}" if t2 and t16 else "-"
        t2, t16, w2, w16 = (f"{x:.2f}" if x else "-" for x in (t2, t16, w2.get("time_to_ready_s"),
                                                                 w16.get("time_to_ready_s")))
        lg = " / ".join(f"{x.get('nvcc_longest_s')} ({x.get('nvcc_longest_start_s', '-')})" for x in (c2, c16))
        print(f"{r:5d} {tree:4s}  {t2:>6s} / {t16:<6s}      {ratio:>6s}   {lg:34s}  {w2} / {w16}   "
              f"{c16.get('workers_ready')}/{c16.get('workers')}  {','.join(str(x.get('rc')) for x in (c2, c16))}")
PY
