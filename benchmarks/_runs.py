r"""Record keeping shared by the benchmark scripts (a helper module, not a benchmark itself).

A benchmark process writes one run, ``<stem>-<tag>.json``, rewritten after every record so that
a run cut short keeps what it measured; the report combines runs (the latest record of each
key wins) into ``<stem>.json``, ``{"runs": [...]}``, from which it can be rendered again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm


def save_run(out: Path, stem: str, tag: str | None, result: dict[str, Any]) -> None:
    """Writes ``result`` to ``out/<stem>-<tag>.json`` (no tag: ``<stem>.json``), atomically."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"{stem}.json" if tag is None else f"{stem}-{tag}.json")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, separators=(",", ":"), allow_nan=True) + "\n")
    tmp.replace(path)


def load_runs(paths: Sequence[Path], stem: str) -> list[dict[str, Any]]:
    """The runs in ``paths``, oldest first; refuses to mix budgets.

    Args:
        paths: ``<stem>-<tag>.json`` files (one process's run each) or ``<stem>.json`` (the runs
            a report shows, ``{"runs": [...]}``).
        stem: The benchmark's file stem, for the messages.

    Returns:
        The runs, each with the file it came from (``source``) when read from a run file.
    """
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        runs += data["runs"] if "runs" in data else [{**data, "source": Path(path).name}]
    if not runs:
        raise SystemExit(f"no {stem}-*.json results to report")
    runs.sort(key=lambda r: r["started"])
    if any(r["budget"] != runs[0]["budget"] for r in runs):
        raise SystemExit("refusing to combine runs with different budgets")
    return runs


def record_each(
    jobs: Iterable[tuple[str, Callable[[], Any], Callable[[str], Any]]],
    result: dict[str, Any],
    save: Callable[[], None],
    bar: tqdm,
) -> None:
    """Runs every job, appending its record (a dataclass) to ``result["records"]``, then saves.

    Each job is ``(label, score, failed)``: ``score()`` returns the record; if it raises, the
    traceback is printed and ``failed(message)`` gives the record that stores the error (a
    failing guide is a result, not a crash). Marks the run complete at the end.
    """
    started = result["started"]
    for label, score, failed in jobs:
        bar.set_postfix_str(label)
        try:
            record = score()
        except Exception as exc:
            traceback.print_exc()
            record = failed(f"{type(exc).__name__}: {str(exc).partition(chr(10))[0][:200]}")
        result["records"].append(asdict(record))
        result["runtime"] = time.time() - started
        save()
        bar.update()
    bar.close()
    result["complete"] = True
    result["runtime"] = time.time() - started
    result["load_after"] = os.getloadavg()
    save()


def add_run_arguments(parser: argparse.ArgumentParser, stem: str) -> None:
    """The options every record-keeping benchmark takes: threads, tag, report."""
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    parser.add_argument("--tag", default=None, help="name of this process's JSON")
    parser.add_argument("--no-report", action="store_true", help="write the JSON only")
    parser.add_argument(
        "--report",
        nargs="*",
        type=Path,
        metavar="JSON",
        help=f"combine these results (default: {stem}.json and every {stem}-*.json in --out) "
        "into the report, without running anything",
    )


def output_folder(args: argparse.Namespace, stem: str, script: str) -> Path:
    """``--out``, else ``benchmarks/results`` (a temporary folder with ``--quick``)."""
    if args.out is not None:
        return args.out
    if args.quick:
        return Path(tempfile.gettempdir()) / f"pyro_mixflow-{stem}-quick"
    return Path(script).resolve().parent / "results"


def report_paths(args: argparse.Namespace, stem: str) -> list[Path]:
    """The run files ``--report`` combines: those given, else ``<stem>.json`` and its parts."""
    if args.report:
        return list(args.report)
    candidates = [args.out / f"{stem}.json", *sorted(args.out.glob(f"{stem}-*.json"))]
    return [p for p in candidates if p.exists()]


def run_tag(
    args: argparse.Namespace, items: list[str], methods: list[str], every: list[str]
) -> str:
    """The run's name: ``--tag``, else the items and (unless all) the methods, ``quick-`` first."""
    tag = args.tag or "+".join(items) + ("" if methods == every else "-" + "+".join(methods))
    return "quick-" + tag if args.quick else tag


def run_meta(
    args: argparse.Namespace, argv: Sequence[str] | None, versions: dict, cpu: str
) -> dict[str, Any]:
    """What a run stores about where it ran."""
    return {
        "versions": versions,
        "quick": args.quick,
        "threads": args.threads,
        "cpu": cpu,
        "load_before": os.getloadavg(),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }


def panel_grid(rows: Sequence[str], columns: Sequence[str], titles: dict[str, str]) -> tuple:
    """A figure with one small panel per (row, column), ticks off, columns titled, rows named.

    Returns:
        ``(figure, axes)``, ``axes[i, j]`` the panel of ``rows[i]`` and ``columns[j]``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(rows),
        len(columns),
        figsize=(1.9 * len(columns), 1.9 * len(rows) + 0.5),
        squeeze=False,
        layout="constrained",
    )
    for i, row in enumerate(rows):
        for j, column in enumerate(columns):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[column].replace(", ", ",\n", 1), fontsize=6)
            if j == 0:
                ax.set_ylabel(row, fontsize=8)
    return fig, axes


def latest_records(
    runs: Sequence[dict[str, Any]],
) -> tuple[dict[tuple[str, str, int], dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """Combines runs (oldest first) keyed by ``(target, guide, seed)``: the latest record wins.

    Returns:
        ``(records, truth, shown_runs)``: the winning record of each key, every run's truth
        merged, and the runs cut to their winning records (runs left empty dropped), which is
        what the report stores in ``<stem>.json``.
    """
    records: dict[tuple[str, str, int], dict[str, Any]] = {}
    truth: dict[str, Any] = {}
    for run in runs:
        for r in run["records"]:
            records[r["target"], r["guide"], r["seed"]] = r
        truth.update(run["truth"])
    shown_runs = []
    for run in runs:
        shown = [r for r in run["records"] if records[r["target"], r["guide"], r["seed"]] is r]
        if shown:
            shown_runs.append({**run, "records": shown})
    return records, truth, shown_runs


def runs_of(records: dict, name: str, guide: str) -> list[dict[str, Any]]:
    """The records of one target and guide (keys ``(target, guide, seed)``), by seed."""
    return [r for (t, g, _), r in sorted(records.items()) if t == name and g == guide]


def finite_mean(values: Sequence[float | None]) -> float | None:
    """The mean of the finite values, ``None`` when there is none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def fmt(value: float | None, spec: str = "+.3f") -> str:
    """A number for a markdown cell, a dash for a missing one."""
    return "—" if value is None else format(value, spec)
