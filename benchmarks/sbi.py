r"""Neural posterior estimation on sbibm tasks: our conditional models against sbi's estimators.

Every estimator is trained by the same stock ``sbi.inference.NPE`` loop on the same simulations
and scored by C2ST against sbibm's reference posterior samples:

* **Tasks** (``sbibm``): ``two_moons`` (2-D, a crescent posterior), ``slcp`` (5-D, four
  symmetric modes, 8-D data) and ``gaussian_mixture`` (2-D, a broad and a narrow component),
  at 10^3 and 10^4 simulations drawn from the task's prior (one set per task and budget, the same
  for every estimator).
* **Estimators**, each with its defaults: ours through
  :func:`pyro_mixflow.sbi.density_estimator` (``"gmm"``: a mixture density network with 10
  diagonal components, ``pyro_mixflow.sbi.NUM_COMPONENTS``; ``"mixtureflow"``; ``"cwm"``;
  ``"rad"``), sbi's through
  ``sbi.neural_nets.posterior_nn`` (``"mdn"``: 10 full-covariance components; ``"maf"``;
  ``"nsf"``; ``"zuko_nsf"``). All take sbi's default z-scoring of theta and x and sbi's default
  training (``NPE.train()``: Adam 5e-4, batch 200, 10 % validation, stop after 20 epochs
  without improvement, gradient norm clipped at 5).
* **Score**: for observations ``--observations`` (default 1-10, the full protocol; ``1-3``
  for a quicker look), draw ``--draws`` (10,000) samples from ``build_posterior()`` (which
  rejects draws outside the prior's support, for all estimators alike) and compute
  ``sbibm.metrics.c2st`` against the first ``--draws`` reference samples: the 5-fold
  cross-validated accuracy of a classifier telling the two sets apart, 0.5 when it cannot.
  Reported as the mean ± standard error over observations.
* **Seconds**: wall clock of ``NPE.train()`` on one torch thread (sampling and C2ST not
  counted); **params**: trainable parameters of the trained estimator.

C2ST is the costly part (25-50 s of one core per observation and estimator): it runs in
``--jobs`` worker processes (one thread each) while the main process trains the next
estimator, so training seconds are measured while the workers run. The report gives the share
of CPU time other processes took while training.

**Outputs** (in ``--out``): ``sbi-<tag>.json`` (one process, rewritten after every cell so
partial runs survive and resume: cells already there are skipped; a cell trained again, say
for observations it was not scored on, keeps the scores on record when it reproduces the
recorded estimator, as seeded one-thread training does), then ``--report`` merges
every ``sbi-*.json`` into ``sbi.json``, ``sbi.md`` and ``sbi.png`` (or re-renders them from
``sbi.json`` alone when there is no ``sbi-*.json``) (draws of each estimator against the
reference for observation 1 at the largest budget, one row per task). The draws of every
cell and observation are kept in ``draws/`` for a resumed run. The report
covers the observations ``--observations`` names; a cell not scored on all of them is left
out of the table and listed below it.

**Seeds**: one trained estimator per cell leaves out how much a new set of simulations and a
new training seed move its score. A run with another ``--seed`` (and its own ``--tag``) repeats
the protocol for the cells it names; the report sets those records beside the main run's
(C2ST per seed, mean ± standard error over seeds) and checks the targets again over seeds.

Usage::

    python benchmarks/sbi.py --tag a --tasks two_moons slcp   # part of the run (hours), resumable
    python benchmarks/sbi.py --tag b --tasks gaussian_mixture
    python benchmarks/sbi.py --report                          # merge and write sbi.{md,png}
    python benchmarks/sbi.py --report --observations 1-3       # the same over observations 1-3
    python benchmarks/sbi.py --tag seed1 --seed 1 --tasks slcp --budgets 1000  # a repeat
    python benchmarks/sbi.py --quick --out DIR                 # smoke test, about a minute

Needs the ``[sbi]`` extra and sbibm (``pip install --no-deps sbibm future autograd``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# This file is named sbi.py: its folder leaves the import path while the sbi package loads.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import sbi  # noqa: E402
from sbi.inference import NPE  # noqa: E402
from sbi.neural_nets import posterior_nn  # noqa: E402

from pyro_mixflow.sbi import density_estimator  # noqa: E402

sys.path.insert(0, str(HERE))
# speed_memory.py (this folder): the environment line and the CPU share of other processes.
from speed_memory import busy_cpu_seconds, environment_line  # noqa: E402

TASKS = ("two_moons", "slcp", "gaussian_mixture")
BUDGETS = (1_000, 10_000)
OURS = ("gmm", "mixtureflow", "cwm", "rad")
PEERS = ("mdn", "maf", "nsf", "zuko_nsf")
LABELS = {
    "gmm": "GMM (MDN, ours)",
    "mixtureflow": "MixtureFlow (ours)",
    "cwm": "CWM (ours)",
    "rad": "RAD (ours)",
    "mdn": "sbi mdn",
    "maf": "sbi maf",
    "nsf": "sbi nsf",
    "zuko_nsf": "sbi zuko_nsf",
}
# The two coordinates the figure shows: slcp's four modes are the sign flips of theta_3, theta_4.
FIGURE_DIMS = {"two_moons": (0, 1), "slcp": (2, 3), "gaussian_mixture": (0, 1)}
FIGURE_DRAWS = 500
FIGURE_OBSERVATION = 1
SEED = 0
# The anchors the issue measured (sbi 0.27, NPE, observations 1-3, 10,000 draws).
ANCHORS = {("two_moons", 1_000, "nsf"): 0.649, ("two_moons", 1_000, "mdn"): 0.792}
ANCHOR_OBSERVATIONS = [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# One cell: a task, a budget, an estimator
# ---------------------------------------------------------------------------------------------


def builder(name: str) -> Any:
    """The ``density_estimator`` argument of sbi's NPE for an estimator name."""
    return density_estimator(name) if name in OURS else posterior_nn(model=name)


def simulations(task: Any, budget: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``budget`` pairs ``(theta, x)`` from the task's prior and simulator, seeded."""
    torch.manual_seed(seed)
    theta = task.get_prior()(num_samples=budget)
    return theta, task.get_simulator()(theta)


def train_and_sample(
    task: Any,
    name: str,
    theta: torch.Tensor,
    x: torch.Tensor,
    observations: list[int],
    draws: int,
    max_epochs: int | None,
    seed: int,
) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """Trains one estimator by sbi's NPE loop; returns its record and its draws per observation."""
    torch.manual_seed(seed)
    npe = NPE(
        prior=task.get_prior_dist(), density_estimator=builder(name), show_progress_bars=False
    )
    kwargs = {} if max_epochs is None else {"max_num_epochs": max_epochs}
    (busy0, own0), start = busy_cpu_seconds(), time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sbi warns when max_num_epochs stops training early
        estimator = npe.append_simulations(theta, x).train(**kwargs)
    seconds = time.perf_counter() - start
    busy1, own1 = busy_cpu_seconds()
    others = max(0.0, (busy1 - busy0) - (own1 - own0))
    posterior = npe.build_posterior()
    samples = {}
    for i in observations:
        torch.manual_seed(seed + i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # leakage warnings of an untrained estimator
            drawn = posterior.sample(
                (draws,), x=task.get_observation(num_observation=i), show_progress_bars=False
            )
        samples[i] = drawn.detach().numpy().astype(np.float32)
    record = {
        "seconds": seconds,
        # CPU seconds other processes used, as a share of the other cores' time.
        "other_cpu": others / (seconds * max(1, (os.cpu_count() or 1) - 1)),
        "epochs": int(npe._summary["epochs_trained"][-1]),
        "params": sum(p.numel() for p in estimator.parameters() if p.requires_grad),
        "best_validation_loss": float(npe._summary["best_validation_loss"][-1]),
        "c2st": {},
    }
    return record, samples


def c2st_job(draws: np.ndarray, reference: np.ndarray) -> float:
    """The C2ST of sbibm for two sample sets, on one thread (runs in a worker process)."""
    from sbibm.metrics import c2st
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    with threadpool_limits(1):
        return float(c2st(torch.from_numpy(draws), torch.from_numpy(reference))[0])


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def cell_key(task: str, budget: int, name: str) -> str:
    return f"{task}/{budget}/{name}"


def run(args: argparse.Namespace) -> Path:
    """Trains and scores every cell not already in ``sbi-<tag>.json``; returns that file."""
    import sbibm

    path = args.out / f"sbi-{args.tag}.json"
    config = {
        "observations": args.observations,
        "draws": args.draws,
        "max_epochs": args.max_epochs,
        "seed": args.seed,
        "quick": args.quick,
    }
    result = {"cells": {}, "figure": {}}
    if path.exists():
        result = json.loads(path.read_text())
        if {**result["config"], "observations": config["observations"]} != config:
            raise SystemExit(f"{path} holds a run with other settings: pass another --tag")
    result["environment"] = environment_line(f"sbi {sbi.__version__}, sbibm {sbibm.__version__}")
    result["config"] = config
    draws_dir = args.out / "draws"
    draws_dir.mkdir(exist_ok=True)
    spawn = mp.get_context("spawn")
    pools = [ProcessPoolExecutor(max_workers=args.jobs, mp_context=spawn)]
    pending: list[Score] = []
    try:
        for task_name in args.tasks:
            task = sbibm.get_task(task_name)
            references = {
                i: task.get_reference_posterior_samples(num_observation=i)[: args.draws]
                .numpy()
                .astype(np.float32)
                for i in args.observations
            }
            for budget in args.budgets:
                for name in args.estimators:
                    key = cell_key(task_name, budget, name)
                    draws_file = draws_dir / f"{args.tag}-{task_name}-{budget}-{name}.npz"
                    record = result["cells"].get(key)
                    scored = record is not None and all(
                        str(i) in record["c2st"] for i in args.observations
                    )
                    # The figure shows observation 1 at the largest budget the records hold:
                    # a run over smaller budgets or other observations, or a repeat with
                    # another seed, leaves it as it is.
                    figure_budget = result.setdefault("figure_budget", {})
                    for_figure = (
                        args.seed == SEED
                        and budget == max(args.budgets)
                        and budget >= figure_budget.get(task_name, 0)
                        and FIGURE_OBSERVATION in args.observations
                    )
                    if scored and not (
                        for_figure and f"{task_name}/{name}" not in result["figure"]
                    ):
                        continue
                    drawn = []
                    if draws_file.exists():
                        with np.load(draws_file) as stored:
                            drawn = stored.files
                    if record is None or not {str(i) for i in args.observations} <= set(drawn):
                        print(f"{key}: training", flush=True)
                        theta, x = simulations(task, budget, args.seed + budget)
                        record, samples = train_and_sample(
                            task,
                            name,
                            theta,
                            x,
                            args.observations,
                            args.draws,
                            args.max_epochs,
                            args.seed,
                        )
                        np.savez(draws_file, **{str(i): v for i, v in samples.items()})
                        stored_record = result["cells"].get(key)
                        if stored_record is not None and reproduces(record, stored_record):
                            # The same estimator again (seeded training, one thread): its
                            # draws, hence the scores already on record, are the same.
                            record["c2st"] = stored_record["c2st"]
                        result["cells"][key] = record
                        print(f"{key}: {record['seconds']:.1f} s, {record['epochs']} epochs")
                    with np.load(draws_file) as stored:
                        draws = {i: stored[str(i)] for i in args.observations}
                    if for_figure:
                        figure = draws[FIGURE_OBSERVATION][:FIGURE_DRAWS]
                        reference = references[FIGURE_OBSERVATION][:FIGURE_DRAWS]
                        result["figure"][f"{task_name}/{name}"] = np.round(figure, 4).tolist()
                        result["figure"][f"{task_name}/reference"] = np.round(reference, 4).tolist()
                        figure_budget[task_name] = budget
                    for i in args.observations:
                        if str(i) not in record["c2st"]:
                            inputs = (draws[i], references[i])
                            job = pools[0].submit(c2st_job, *inputs)
                            pending.append(Score(key, i, inputs, job))
                    pending = collect(pending, result, path, block=False)
        # Training is over: the scores still queued move to a pool on the other cores.
        if args.final_jobs > args.jobs:
            pools.append(ProcessPoolExecutor(args.final_jobs - args.jobs, mp_context=spawn))
            for score in pending:
                if score.job.cancel():
                    score.job = pools[1].submit(c2st_job, *score.inputs)
        collect(pending, result, path, block=True)
    finally:
        for pool in pools:
            pool.shutdown(cancel_futures=True)
    return path


def reproduces(record: dict[str, Any], stored: dict[str, Any]) -> bool:
    """Whether a retrained cell is the stored one: same epochs, validation loss and size.

    Training is seeded and runs on one thread, so a cell trained again with the same settings
    gives the same estimator (and, seeded per observation, the same draws). A record file
    carried from an earlier run with fewer observations then keeps its scores, and only the
    new observations are scored.
    """
    return all(record[k] == stored.get(k) for k in ("epochs", "best_validation_loss", "params"))


@dataclass
class Score:
    """A C2ST in a worker: the cell, the observation, its inputs and the future."""

    key: str
    observation: int
    inputs: tuple[np.ndarray, np.ndarray]
    job: Future


def collect(
    pending: list[Score], result: dict[str, Any], path: Path, *, block: bool
) -> list[Score]:
    """Stores the finished C2ST scores (all of them when ``block``), rewrites the record file."""
    left = []
    for score in pending:
        if block or score.job.done():
            result["cells"][score.key]["c2st"][str(score.observation)] = score.job.result()
            if block:
                write(result, path)
        else:
            left.append(score)
    write(result, path)
    return left


def write(result: dict[str, Any], path: Path) -> None:
    """Rewrites the record file atomically."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def merge(paths: list[Path]) -> dict[str, Any]:
    """The cells and figure draws of several record files (later files win); one environment.

    Records of a run with another ``--seed`` (new simulations, new training) go to
    ``"seeds"`` (cell key to seed to record) rather than into the table: the report sets them
    beside the main run's.
    """
    merged: dict[str, Any] = {
        "cells": {},
        "figure": {},
        "environment": [],
        "config": [],
        "seeds": {},
    }
    for path in paths:
        part = json.loads(path.read_text())
        seed = part.get("config", {}).get("seed", SEED)
        if seed != SEED:
            for key, record in part["cells"].items():
                merged["seeds"].setdefault(key, {})[str(seed)] = record
            continue
        merged["cells"].update(part["cells"])
        merged["figure"].update(part.get("figure", {}))
        for field in ("environment", "config"):
            if part.get(field) not in merged[field]:
                merged[field].append(part.get(field))
    return merged


def restrict(merged: dict[str, Any], observations: list[int]) -> dict[str, Any]:
    """The merged records with each cell's scores cut to ``observations``.

    A cell not yet scored on all of them keeps no score (the table shows "–") and is listed
    under ``"incomplete"``, so that no mean mixes different sets of observations. A record of
    another seed not scored on all of them is dropped.
    """
    keep = [str(i) for i in observations]

    def cut(record: dict[str, Any]) -> dict[str, float]:
        scores = {i: record["c2st"][i] for i in keep if i in record["c2st"]}
        return scores if len(scores) == len(keep) else {}

    cells, incomplete = {}, []
    for key, record in merged["cells"].items():
        scores = cut(record)
        if not scores:
            done = sum(i in record["c2st"] for i in keep)
            incomplete.append(f"{key} ({done} of {len(keep)})")
        cells[key] = {**record, "c2st": scores}
    seeds = {}
    for key, records in merged.get("seeds", {}).items():
        kept = {seed: {**r, "c2st": scores} for seed, r in records.items() if (scores := cut(r))}
        if kept:
            seeds[key] = kept
    return {
        **merged,
        "cells": cells,
        "seeds": seeds,
        "scored": merged["cells"],  # every score, for the anchors' own observations
        "observations": observations,
        "incomplete": incomplete,
    }


def mean_se(scores: dict[str, float]) -> tuple[float, float]:
    values = list(scores.values())
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def report(merged: dict[str, Any], out: Path) -> str:
    cells = merged["cells"]
    tasks = [t for t in TASKS if any(k.startswith(f"{t}/") for k in cells)]
    budgets = sorted({int(k.split("/")[1]) for k in cells})
    names = [n for n in (*OURS, *PEERS) if any(k.endswith(f"/{n}") for k in cells)]
    columns = [(t, b) for t in tasks for b in budgets]
    lines = [
        "# Neural posterior estimation on sbibm tasks (C2ST, lower is better, 0.5 is best)",
        "",
        "Generated by `benchmarks/sbi.py`. " + "; ".join(map(str, merged["environment"])) + ".",
        "Settings: " + "; ".join(json.dumps(c) for c in merged["config"]) + ".",
        "",
        f"C2ST mean ± standard error over observations {_span(merged['observations'])} (as "
        "many draws as the settings say, sbibm's classifier). Bold: the best of each column; "
        "**mean** is over the columns.",
        "",
        "| estimator | " + " | ".join(f"{t} {b:,}" for t, b in columns) + " | mean |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    means = {
        (n, c): mean_se(cells[cell_key(*c, n)]["c2st"])
        for n in names
        for c in columns
        if cell_key(*c, n) in cells and cells[cell_key(*c, n)]["c2st"]
    }
    best = {
        c: min((m for (n, cc), (m, _) in means.items() if cc == c), default=math.nan)
        for c in columns
    }
    overall = {}
    for n in names:
        row = []
        for c in columns:
            if (n, c) not in means:
                row.append("–")
                continue
            m, se = means[(n, c)]
            text = f"{m:.3f} ± {se:.3f}"
            row.append(f"**{text}**" if m == best[c] else text)
        if all((n, c) in means for c in columns):
            overall[n] = sum(means[(n, c)][0] for c in columns) / len(columns)
        lines.append(f"| {LABELS[n]} | " + " | ".join(row) + f" | {overall.get(n, math.nan):.3f} |")
    if merged["incomplete"]:
        lines += ["", "Not yet scored on every observation: " + ", ".join(merged["incomplete"])]
    lines += ["", *target_lines(means, overall, columns), ""]
    lines += seed_lines(merged, columns)
    lines += [
        "Training (`NPE.train()`, one torch thread): seconds / epochs / trainable parameters; "
        "the share of the other cores' CPU time used by other processes while training (the "
        "C2ST workers among them) in brackets.",
        "",
        "| estimator | " + " | ".join(f"{t} {b:,}" for t, b in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for n in names:
        row = []
        for c in columns:
            r = cells.get(cell_key(*c, n))
            row.append(
                "–"
                if r is None
                else f"{r['seconds']:.0f} s / {r['epochs']} / {r['params']:,} "
                f"[{r['other_cpu']:.0%}]"
            )
        lines.append(f"| {LABELS[n]} | " + " | ".join(row) + " |")
    # The anchors were measured over observations 1-3, so they are compared over those.
    anchors = []
    for (t, b, n), v in ANCHORS.items():
        scores = merged["scored"].get(cell_key(t, b, n), {}).get("c2st", {})
        if all(str(i) in scores for i in ANCHOR_OBSERVATIONS):
            m, _ = mean_se({str(i): scores[str(i)] for i in ANCHOR_OBSERVATIONS})
            anchors.append(f"{t} {b:,} {n}: {v:.3f} (this run: {m:.3f})")
    if anchors:
        span = _span(ANCHOR_OBSERVATIONS)
        lines += ["", f"The issue's anchors (observations {span}): " + "; ".join(anchors) + "."]
    text = "\n".join(lines) + "\n"
    (out / "sbi.md").write_text(text)
    save_figure(merged, tasks, names, out / "sbi.png")
    return text


def target_lines(
    means: dict[tuple[str, tuple[str, int]], tuple[float, float]],
    overall: dict[str, float],
    columns: list[tuple[str, int]],
    title: str = "Targets:",
) -> list[str]:
    """The issue's targets: our best at or below sbi's best in each column, and over all."""
    lines = [title]
    for c in columns:
        ours = {n: means[(n, c)][0] for n in OURS if (n, c) in means}
        peers = {n: means[(n, c)][0] for n in PEERS if (n, c) in means}
        if not ours or not peers:
            continue
        o, p = min(ours, key=ours.get), min(peers, key=peers.get)
        verdict = "met" if ours[o] <= peers[p] else "not met"
        lines.append(
            f"- {c[0]} {c[1]:,}: ours best {LABELS[o]} {ours[o]:.3f}, sbi best "
            f"{LABELS[p]} {peers[p]:.3f}: {verdict}."
        )
    ours_all = {n: v for n, v in overall.items() if n in OURS}
    peers_all = {n: v for n, v in overall.items() if n in PEERS}
    if ours_all and peers_all:
        o = min(ours_all, key=ours_all.get)
        verdict = "met" if all(ours_all[o] < v for v in peers_all.values()) else "not met"
        lines.append(
            f"- Mean over the columns: ours best {LABELS[o]} {ours_all[o]:.3f}, below "
            f"each of sbi's ({', '.join(f'{v:.3f}' for v in peers_all.values())}): "
            f"{verdict}."
        )
    return lines


def seed_lines(merged: dict[str, Any], columns: list[tuple[str, int]]) -> list[str]:
    """The cells run again with other seeds: C2ST per seed, and the targets over seeds.

    One trained estimator per cell leaves out how much the simulations and the training seed
    move its score; the cells repeated with ``--seed`` show it, and the targets are checked
    again on the mean over seeds of the estimators scored on every seed.
    """
    seeds = merged.get("seeds", {})
    if not seeds:
        return []
    cells = merged["cells"]
    every = [SEED, *sorted({int(s) for records in seeds.values() for s in records} - {SEED})]
    lines = [
        "Repeated runs (`--seed`: new simulations and new training, the same protocol) of "
        f"some cells: C2ST mean over observations {_span(merged['observations'])} for each "
        "seed, then the mean ± standard error over seeds.",
        "",
        "| cell | estimator | " + " | ".join(f"seed {s}" for s in every) + " | over seeds |",
        "|---|---|" + "---|" * (len(every) + 1),
    ]
    over: dict[tuple[str, tuple[str, int]], tuple[float, float]] = {}
    for c in columns:
        for n in (*OURS, *PEERS):
            key = cell_key(*c, n)
            if key not in seeds:
                continue
            runs = {s: r["c2st"] for s, r in seeds[key].items()}
            if cells.get(key, {}).get("c2st"):
                runs[str(SEED)] = cells[key]["c2st"]
            per_seed = {s: mean_se(scores)[0] for s, scores in runs.items()}
            m, se = mean_se(per_seed)
            if len(per_seed) == len(every):
                over[(n, c)] = (m, se)
            row = [f"{per_seed[str(s)]:.3f}" if str(s) in per_seed else "–" for s in every]
            lines.append(
                f"| {c[0]} {c[1]:,} | {LABELS[n]} | " + " | ".join(row) + f" | {m:.3f} ± {se:.3f} |"
            )
    title = f"Targets over seeds {', '.join(map(str, every))}:"
    checked = target_lines(over, {}, columns, title)
    return [*lines, "", *(checked if len(checked) > 1 else []), ""]


def save_figure(merged: dict[str, Any], tasks: list[str], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = merged["figure"]
    fig, axes = plt.subplots(
        len(tasks), len(names), figsize=(2.1 * len(names), 2.1 * len(tasks)), squeeze=False
    )
    for row, task in zip(axes, tasks, strict=True):
        reference = np.asarray(figure.get(f"{task}/reference", []))
        i, j = FIGURE_DIMS[task]
        for ax, name in zip(row, names, strict=True):
            draws = np.asarray(figure.get(f"{task}/{name}", []))
            if len(draws):
                color = "C3" if name in OURS else "C0"
                ax.scatter(draws[:, i], draws[:, j], s=1, c=color, alpha=0.5, linewidths=0)
            if len(reference):  # on top, so that draws cannot hide it; one frame per row
                ax.scatter(reference[:, i], reference[:, j], s=0.5, c="k", alpha=0.35, linewidths=0)
                for limits, values in (
                    (ax.set_xlim, reference[:, i]),
                    (ax.set_ylim, reference[:, j]),
                ):
                    low, high = np.quantile(values, [0.005, 0.995])
                    pad = 0.25 * (high - low)
                    limits(low - pad, high + pad)
            ax.set_xticks([])
            ax.set_yticks([])
            if task == tasks[0]:
                ax.set_title(LABELS[name], fontsize=8)
            if name == names[0]:
                ax.set_ylabel(f"{task}\nθ{j + 1} vs θ{i + 1}", fontsize=8)
    fig.suptitle(
        f"Posterior draws (color) against the reference (black), observation "
        f"{FIGURE_OBSERVATION}; the frame is "
        "the reference's 99% range, padded",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _span(observations: list[int]) -> str:
    """``[1, 2, 3]`` as ``"1-3"``, other lists as ``"1, 4, 7"``."""
    if observations == list(range(observations[0], observations[-1] + 1)):
        return f"{observations[0]}-{observations[-1]}"
    return ", ".join(map(str, observations))


def observations(text: str) -> list[int]:
    """``"1-3"`` or ``"1,4,7"`` to a list of observation numbers (sbibm has 1 to 10)."""
    parts = text.split("-") if "-" in text else None
    values = (
        list(range(int(parts[0]), int(parts[1]) + 1))
        if parts
        else [int(v) for v in text.split(",")]
    )
    if not values or not all(1 <= v <= 10 for v in values):
        raise argparse.ArgumentTypeError(f"observations are 1 to 10, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 300 simulations, 2 epochs, 300 draws, observation 1",
    )
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    parser.add_argument("--estimators", nargs="+", choices=[*OURS, *PEERS], default=[*OURS, *PEERS])
    parser.add_argument("--observations", type=observations, default=observations("1-10"))
    parser.add_argument("--draws", type=int, default=10_000)
    parser.add_argument("--max-epochs", type=int, default=None, help="default: sbi's (no cap)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--jobs", type=int, default=1, help="C2ST worker processes while training runs"
    )
    parser.add_argument(
        "--final-jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="C2ST worker processes for the scores still queued when training is over",
    )
    parser.add_argument("--tag", default="run", help="record file sbi-<tag>.json in --out")
    parser.add_argument(
        "--report",
        action="store_true",
        help="only merge the sbi-*.json files in --out and write the report",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.budgets, args.max_epochs, args.draws = [300], 2, 300
        args.observations = [1]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        run(args)
    paths = sorted(p for p in args.out.glob("sbi-*.json"))
    if paths:
        merged = merge(paths)
        (args.out / "sbi.json").write_text(json.dumps(merged, separators=(",", ":")) + "\n")
    else:  # only the merged records (no per-process file in --out)
        merged = json.loads((args.out / "sbi.json").read_text())
    print(report(restrict(merged, args.observations), args.out))


if __name__ == "__main__":
    main()
