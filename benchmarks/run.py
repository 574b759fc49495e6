"""Run every lrmult benchmark in one process and write RESULTS.md (the tables and the machine).

python benchmarks/run.py                    # full mode, writes benchmarks/RESULTS.md
python benchmarks/run.py --quick --strict   # smoke test, prints only (or --out DIR)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import first_call
import frozen
import harness as h
import layouts
import recompiles
import scaling
import schedules
import stacked
import step_overhead

HERE = Path(__file__).resolve().parent
BENCHMARKS = (step_overhead, scaling, recompiles, frozen, stacked, schedules, first_call, layouts)


def main(argv=None) -> int:
    parser = h.parser(__doc__)
    parser.add_argument("--out", type=Path, help="folder for RESULTS.md (full mode: benchmarks/)")
    parser.add_argument("--json", type=Path, help="also write the checks and figures as JSON")
    args = parser.parse_args(argv)
    out = args.out or (None if args.quick else HERE)
    env, start, reports = h.machine(), time.perf_counter(), []
    for bench in BENCHMARKS:
        t0 = time.perf_counter()
        reports.append(bench.run(args.quick))
        print(reports[-1].markdown(), f"[{bench.__name__}: {time.perf_counter() - t0:.0f} s]\n")
    env["load average"] += f" at start, {' '.join(f'{x:.2f}' for x in os.getloadavg())} at end"
    env["run time"] = f"{time.perf_counter() - start:.0f} s ({'quick' if args.quick else 'full'})"
    mode = " --quick" if args.quick else ""
    text = [
        "# lrmult benchmarks\n",
        f"`python benchmarks/run.py{mode}`; each table is also printed by its own script "
        "(`python benchmarks/<name>.py [--quick] [--strict]`). Timings are noisy and "
        "machine-dependent: read section 1's ratios next to its A/A control (noise).\n",
        *(r.markdown() for r in reports),
        "## Machine\n",
        h.table(["item", "value"], list(env.items())) + "\n",
    ]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "RESULTS.md").write_text("\n".join(text))
        print(f"wrote {out / 'RESULTS.md'}")
    checks = {k: v for r in reports for k, v in r.checks.items()}
    if args.json is not None:
        figures = {b.__name__: r.figures for b, r in zip(BENCHMARKS, reports, strict=True)}
        args.json.write_text(json.dumps({"checks": checks, "figures": figures, "env": env}))
    failed = [k for k, ok in checks.items() if not ok]
    print(f"{len(checks) - len(failed)} of {len(checks)} deterministic targets met", *failed)
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
