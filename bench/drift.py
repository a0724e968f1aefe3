"""The drift monitor's false alarms and detection on generated tabular data, against the PSI
comparison of registry/formats/drift.py on the same windows.

    .venv/bin/python -m bench.drift                 # 1,000 windows per scenario; about a minute
    .venv/bin/python -m bench.drift --quick         # smoke check: 100 windows per scenario

Data: 5 columns: `age` (normal), `income` (log-normal), `score` (uniform), `city` (4 values,
skewed) and `device` (8 values, skewed). The reference is the profile of 100,000 rows built by
the profiler's own accumulators (registry/formats/profiling.py: a 10,000-value reservoir per
numeric column, exact top values). Windows have --rows rows (1,000) and are drawn fresh:

- no drift: from the reference's generator;
- all numeric shifted: `age`, `income` and `score` each moved by --shift (0.3) of their standard
  deviation (3 of 5 columns);
- one numeric shifted: `age` alone (1 of 5 columns).

Ours: serving.drift.compare_window with the issue's thresholds (column 0.1, share 0.5), once
against the profile as recorded today (with percentiles) and once with the percentiles removed
(profiles recorded before they were kept, read through their 20-bin histogram). Baseline: each
window profiled the same way and compared with registry.formats.drift.compare_profiles (PSI
>= 0.25, mean shift >= 0.5 std, or null rate change >= 0.05 per column), the window drifted
under the same share rule. Windows to detect: the shifted windows cut into streams of 10; per
stream, the number of windows until the first detection (a stream without one counts as never);
the p50 over streams. The table goes to stdout, ending with one `RESULT {json}` line; progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from registry.formats.drift import compare_profiles  # noqa: E402
from registry.formats.profiling import NumericSummary, TopValues  # noqa: E402
from serving import drift  # noqa: E402

CITIES = (["north", "south", "east", "west"], [0.4, 0.3, 0.2, 0.1])
DEVICES = ([f"d{i}" for i in range(8)], [0.3, 0.2, 0.15, 0.1, 0.1, 0.07, 0.05, 0.03])
NUMERIC = ("age", "income", "score")
STREAM = 10
TARGET_FALSE_ALARMS = 0.05
TARGET_DETECTION = 0.95


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def generate(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    return {
        "age": rng.normal(40, 12, rows),
        "income": rng.lognormal(10, 0.5, rows),
        "score": rng.uniform(0, 100, rows),
        "city": rng.choice(CITIES[0], rows, p=CITIES[1]),
        "device": rng.choice(DEVICES[0], rows, p=DEVICES[1]),
    }


def profile(columns: dict[str, np.ndarray], seed: int) -> dict:
    result = {}
    for name, values in columns.items():
        if name in NUMERIC:
            summary = NumericSummary(sample_size=10_000, seed=seed)
            summary.add_array(values)
            result[name] = summary.profile(nulls=0)
        else:
            top = TopValues(10_000)
            for value in values.tolist():
                top.add(value)
            result[name] = top.profile(count=len(values), nulls=0)
    return result


def as_rows(columns: dict[str, np.ndarray]) -> list[dict]:
    names = list(columns)
    lists = [columns[name].tolist() for name in names]
    return [dict(zip(names, values, strict=True)) for values in zip(*lists, strict=True)]


def shifted(columns: dict[str, np.ndarray], names, stds: dict[str, float], shift: float):
    return {
        name: values + shift * stds[name] if name in names else values
        for name, values in columns.items()
    }


def judge(reference: dict, legacy: dict, window: dict[str, np.ndarray], seed: int) -> dict:
    rows = as_rows(window)
    started = time.perf_counter()
    ours = drift.compare_window(reference, rows)
    ours_s = time.perf_counter() - started
    old = drift.compare_window(legacy, rows)
    started = time.perf_counter()
    psi = compare_profiles(reference, profile(window, seed))
    psi_s = time.perf_counter() - started
    psi_share = len(psi["drifted_columns"]) / len(psi["columns"])
    return {
        "ours": ours.drifted,
        "old": old.drifted,
        "psi": psi_share >= drift.DEFAULT_SHARE_THRESHOLD,
        "ours_columns": {name: c["drifted"] for name, c in ours.columns.items()},
        "ours_distance": {name: c["distance"] for name, c in ours.columns.items()},
        "psi_columns": {name: c["drifted"] for name, c in psi["columns"].items()},
        "psi_value": {name: c["psi"] for name, c in psi["columns"].items()},
        "ours_s": ours_s,
        "psi_s": psi_s,
    }


def scenario(name, windows, make, reference, legacy, seed) -> list[dict]:
    results = []
    for index in range(windows):
        results.append(judge(reference, legacy, make(), seed + index))
        if (index + 1) % 200 == 0:
            progress(f"  {name}: {index + 1}/{windows} windows")
    return results


def rate(results: list[dict], key: str) -> float:
    return sum(result[key] for result in results) / len(results)


def column_rate(results: list[dict], key: str, column: str) -> float:
    return sum(result[key][column] for result in results) / len(results)


def windows_to_detect(results: list[dict], key: str) -> float | None:
    """p50 over streams of STREAM windows of the windows until the first detection; None when
    most streams never detect."""
    counts = []
    for start in range(0, len(results) - STREAM + 1, STREAM):
        stream = results[start : start + STREAM]
        first = next((i + 1 for i, result in enumerate(stream) if result[key]), None)
        counts.append(first if first is not None else float("inf"))
    median = statistics.median(counts) if counts else float("inf")
    return None if median == float("inf") else median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=1000, help="windows per scenario")
    parser.add_argument("--rows", type=int, default=1000, help="rows per window")
    parser.add_argument("--shift", type=float, default=0.3, help="mean shift in std")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    windows = 100 if args.quick else args.windows

    rng = np.random.default_rng(args.seed)
    progress("profiling 100,000 reference rows")
    base = generate(rng, 100_000)
    reference = profile(base, args.seed)
    legacy = {
        name: {key: value for key, value in column.items() if key != "quantiles"}
        for name, column in reference.items()
    }
    stds = {name: float(np.std(base[name], ddof=1)) for name in NUMERIC}

    scenarios = {
        "no drift": lambda: generate(rng, args.rows),
        "all numeric shifted": lambda: shifted(generate(rng, args.rows), NUMERIC, stds, args.shift),
        "one numeric shifted": lambda: shifted(
            generate(rng, args.rows), ("age",), stds, args.shift
        ),
    }
    results = {}
    for name, make in scenarios.items():
        progress(f"{name}: {windows} windows of {args.rows} rows")
        results[name] = scenario(name, windows, make, reference, legacy, args.seed)

    quiet, moved, one = (results[name] for name in scenarios)
    print(
        f"Drift monitor: {windows} windows of {args.rows} rows per scenario, 5 columns "
        f"(3 numeric, 2 categorical); shift {args.shift} std; thresholds column "
        f"{drift.DEFAULT_COLUMN_THRESHOLD}, share {drift.DEFAULT_SHARE_THRESHOLD}\n"
    )
    header = f"  {'':44}{'ours':>12}{'ours, old':>12}{'PSI':>12}"
    print(header)
    print(f"  {'':44}{'':>12}{'profiles':>12}{'baseline':>12}")
    for label, data in [
        ("false alarms (no drift), windows", quiet),
        ("detection, all 3 numeric shifted, windows", moved),
        ("detection, only `age` shifted, windows", one),
    ]:
        print(
            f"  {label:44}{rate(data, 'ours'):>12.1%}{rate(data, 'old'):>12.1%}"
            f"{rate(data, 'psi'):>12.1%}"
        )
    p50 = {key: windows_to_detect(moved, key) for key in ("ours", "old", "psi")}
    print(
        f"  {'windows to detect (p50), all shifted':44}"
        + "".join(f"{p50[key] if p50[key] is not None else 'never'!s:>12}" for key in p50)
    )
    print("\n  per column, share of windows flagged        ours (no drift / shifted)   PSI")
    for column in [*NUMERIC, "city", "device"]:
        ours_quiet = column_rate(quiet, "ours_columns", column)
        ours_moved = column_rate(moved, "ours_columns", column)
        psi_quiet = column_rate(quiet, "psi_columns", column)
        psi_moved = column_rate(moved, "psi_columns", column)
        distances_quiet = [r["ours_distance"][column] for r in quiet]
        distances_moved = [r["ours_distance"][column] for r in moved]
        print(
            f"  {column:10} distance p50 {statistics.median(distances_quiet):.3f} / "
            f"{statistics.median(distances_moved):.3f}   flagged {ours_quiet:6.1%} / "
            f"{ours_moved:6.1%}      {psi_quiet:6.1%} / {psi_moved:6.1%}"
        )
    ours_ms = statistics.median(r["ours_s"] for r in quiet) * 1000
    psi_ms = statistics.median(r["psi_s"] for r in quiet) * 1000
    print(
        f"\n  time per window (p50): ours {ours_ms:.2f} ms; PSI baseline {psi_ms:.2f} ms "
        "(its window profile included)"
    )
    false_alarms, detection = rate(quiet, "ours"), rate(moved, "ours")
    print(
        f"  target false alarms < {TARGET_FALSE_ALARMS:.0%}: "
        f"{'met' if false_alarms < TARGET_FALSE_ALARMS else 'missed'}; "
        f"target detection >= {TARGET_DETECTION:.0%} (all numeric shifted): "
        f"{'met' if detection >= TARGET_DETECTION else 'missed'}; only one of 5 columns "
        f"shifted: {rate(one, 'ours'):.1%} of windows (its column flagged in "
        f"{column_rate(one, 'ours_columns', 'age'):.1%})"
    )
    result = {
        "false_alarm_rate": round(false_alarms, 4),
        "detection_rate": round(detection, 4),
        "detection_windows_p50": p50["ours"],
        "one_column_detection_rate": round(rate(one, "ours"), 4),
        "one_column_flagged_rate": round(column_rate(one, "ours_columns", "age"), 4),
        "old_profile_false_alarm_rate": round(rate(quiet, "old"), 4),
        "old_profile_detection_rate": round(rate(moved, "old"), 4),
        "baseline_false_alarm_rate": round(rate(quiet, "psi"), 4),
        "baseline_detection_rate": round(rate(moved, "psi"), 4),
        "baseline_detection_windows_p50": p50["psi"],
        "windows": windows,
        "rows": args.rows,
    }
    print(f"RESULT {json.dumps(result)}")


if __name__ == "__main__":
    main()
