"""What flywheel survives: run the reliability and security suites and keep the figures they measured.

Each test in ``tests/reliability`` and ``tests/security`` injects a fault or an attack into the
real engines (Redis stopped and paused under load, a Ray Train worker and a Serve replica
killed, the serving process ``kill -9``-ed mid-stream of feedback, racing promotions, corrupt
datasets, poisoned and injected feedback, a fuzzed API) and records its figures with the
``figures`` fixture; a figure that misses its goal fails its test. This script runs both suites
with pytest, prints the figures as a table and writes ``benchmarks/results/reliability.json``
(each figure, its goal and whether it met it, the date, the outcome of every test).

    python benchmarks/reliability.py
    python benchmarks/reliability.py -k cache      # a subset (pytest's -k)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SUITES = ("tests/reliability", "tests/security")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-k", dest="keyword", help="only tests matching this pytest expression")
    parser.add_argument("--out", type=Path, default=RESULTS / "reliability.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fw-figures-") as tmp:
        figures_file, report_file = Path(tmp) / "figures.jsonl", Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", *SUITES, "-p", "no:cacheprovider", f"--junitxml={report_file}"]
        if args.keyword:
            cmd += ["-k", args.keyword]
        started = time.perf_counter()
        code = subprocess.run(
            cmd, cwd=ROOT, env={**os.environ, "FLYWHEEL_FIGURES": str(figures_file)}
        ).returncode
        seconds = time.perf_counter() - started
        figures = (
            [json.loads(line) for line in figures_file.read_text().splitlines()]
            if figures_file.exists()
            else []
        )
        outcomes = _outcomes(report_file)

    print(f"\n{'test':<48} {'figure':<44} {'value':>10} {'unit':<6} {'goal':<14} met")
    for row in figures:
        met = {True: "yes", False: "NO", None: "-"}[row["ok"]]
        print(
            f"{row['test'].split('::')[-1][:48]:<48} {row['name'][:44]:<44} {row['value']!s:>10} "
            f"{row['unit']:<6} {row['goal']:<14} {met}"
        )
    passed = sum(1 for o in outcomes.values() if o == "passed")
    print(f"\n{passed}/{len(outcomes)} tests passed in {seconds:.0f} s (pytest exit {code})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "seconds": round(seconds, 1),
                "pytest_exit": code,
                "tests": outcomes,
                "figures": figures,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    return code


def _outcomes(report: Path) -> dict[str, str]:
    """Each test's outcome from pytest's JUnit XML: passed, failed, error or skipped."""
    import xml.etree.ElementTree as ET

    if not report.exists():
        return {}
    out = {}
    for case in ET.parse(report).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        out[name] = next((t for t in ("failure", "error", "skipped") if t in tags), "passed").replace(
            "failure", "failed"
        )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
