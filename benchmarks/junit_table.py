"""A pytest JUnit report (pytest --junitxml=FILE -o junit_logging=system-out) as a short table, for a GPU run's end:
one line per test whose name matches --show (default: every test that did not pass, and those matching it), then
the totals by outcome. A test's note is its failure message, else the last line it printed.

    python benchmarks/junit_table.py FILE [--show REGEX]
"""
import argparse
import re
import sys
import xml.etree.ElementTree as ET


def cases(path):
    for tc in ET.parse(path).getroot().iter("testcase"):
        name = f"{tc.get('classname', '').split('.')[-1]}::{tc.get('name')}"
        outcome, note = "passed", ""
        for kind in ("failure", "error", "skipped"):
            el = tc.find(kind)
            if el is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[kind]
                note = (el.get("message") or el.text or "").strip().splitlines()[0:1]
                note = note[0] if note else ""
                break
        if not note:
            out = tc.findtext("system-out") or ""
            lines = [x.strip() for x in out.splitlines()
                     if x.strip() and not x.startswith(("RNG seed", "-----", "=====")) and "Captured" not in x]
            note = lines[-1] if lines else ""
        yield name, outcome, float(tc.get("time") or 0), note


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("junit")
    ap.add_argument("--show", default="test_cuda_faults|full_sequences|rows_are_the_same|test_layernorm\\[768",
                    help="regex of the tests listed even when they pass")
    a = ap.parse_args()
    rows = list(cases(a.junit))
    show = re.compile(a.show)
    totals = {}
    print(f"{'test':<78} {'outcome':<8} {'s':>6}  note")
    for name, outcome, t, note in rows:
        totals[outcome] = totals.get(outcome, 0) + 1
        if outcome != "passed" or show.search(name):
            print(f"{name[:78]:<78} {outcome:<8} {t:6.1f}  {note[:160]}")
    print("totals: " + ", ".join(f"{v} {k}" for k, v in sorted(totals.items())) + f" (of {len(rows)})")
    return 1 if totals.get("FAILED") or totals.get("ERROR") else 0


if __name__ == "__main__":
    sys.exit(main())
