r"""Record keeping shared by the benchmark scripts (a helper module, not a benchmark itself).

A benchmark process writes one run, ``<stem>-<tag>.json``, rewritten after every record so that
a run cut short keeps what it measured; the report combines runs (the latest record of each
key wins) into ``<stem>.json``, ``{"runs": [...]}``, from which it can be rendered again.
"""

from __future__ import annotations

import json
import os
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
