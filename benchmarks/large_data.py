r"""Peak memory of :func:`pyro_mixflow.fit` on a memory-mapped ``.npy`` file against in memory.

A ``(N, 8)`` float32 ``.npy`` file (full: :math:`N = 10^7`, 320 MB) of draws from an 8-component
Gaussian mixture is written chunk by chunk to a temporary folder (deleted afterwards). Each row
of the table is one fresh process that fits an :class:`pyro_mixflow.nn.GMM` (8 components, EM
start on 100,000 random rows) with :func:`~pyro_mixflow.fit` (batch 512, validation 0.1,
evaluated every 100 steps), the file given as

* ``memory-mapped``: ``np.load(path, mmap_mode="r")``, read batch by batch;
* ``in memory``: ``np.load(path)``, the whole array loaded first.

Columns: peak resident memory (``VmHWM``: anonymous memory plus the pages of the file the
process has touched, which the kernel can drop at any time), the peak of anonymous memory alone
(sampled every 20 ms), the resident memory after the imports (the floor), and seconds.

Outputs in ``--out``: ``large_data.md`` (the table) and ``large_data.png`` (the peaks).

Usage::

    python benchmarks/large_data.py --quick --out /tmp/large   # seconds (smoke test)
    flock /tmp/bench.lock python benchmarks/large_data.py      # full: benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FULL = {"rows": 10_000_000, "steps": 300}
QUICK = {"rows": 100_000, "steps": 30}
DIM, COMPONENTS, INIT_ROWS = 8, 8, 100_000
MODES = ("memory-mapped", "in memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10^5 rows, 30 steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--data-dir", type=Path, help="where to write the file (a temp folder)")
    parser.add_argument(
        "--worker", nargs=3, metavar=("MODE", "PATH", "STEPS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        mode, path, steps = args.worker
        print(json.dumps(_measure(mode, Path(path), int(steps))))
        return
    config = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.data_dir) as folder:
        path = Path(folder) / "rows.npy"
        _write_rows(path, config["rows"])
        size = path.stat().st_size
        records = []
        for mode in MODES:
            command = [sys.executable, __file__, "--worker", mode, str(path), str(config["steps"])]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            records.append({"mode": mode, **json.loads(done.stdout.splitlines()[-1])})
    table = _table(records, config, size)
    print(table)
    (args.out / "large_data.md").write_text(table)
    _plot(records, args.out / "large_data.png")


def _write_rows(path: Path, num_rows: int) -> None:
    """Draws of an 8-component mixture in 8-D, written in chunks (never all in memory)."""
    import numpy as np

    rng = np.random.default_rng(0)
    centers = rng.normal(scale=4.0, size=(COMPONENTS, DIM))
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(num_rows, DIM))
    for start in range(0, num_rows, 1_000_000):
        stop = min(num_rows, start + 1_000_000)
        labels = rng.integers(COMPONENTS, size=stop - start)
        out[start:stop] = centers[labels] + rng.normal(size=(stop - start, DIM))
    out.flush()
    del out


def _measure(mode: str, path: Path, steps: int) -> dict[str, float]:
    """Fits in this process; returns its memory figures in MiB and the seconds."""
    import numpy as np
    import torch

    from pyro_mixflow import fit
    from pyro_mixflow.nn import GMM

    floor = _status("VmRSS")
    peak_anon = [0.0]
    running = True

    def sample() -> None:
        while running:
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    data = np.load(path, mmap_mode="r" if mode == "memory-mapped" else None)
    generator = np.random.default_rng(0)
    chosen = np.sort(generator.choice(len(data), size=min(INIT_ROWS, len(data)), replace=False))
    torch.manual_seed(0)
    model = GMM(DIM, COMPONENTS).init_from_data(torch.from_numpy(np.asarray(data[chosen])))
    history = fit(model, data, steps=steps, eval_every=100, seed=0, progress=False)
    seconds = time.perf_counter() - start
    running = False
    thread.join()
    return {
        "peak_rss": _status("VmHWM"),
        "peak_anon": max(peak_anon[0], _status("RssAnon")),
        "floor": floor,
        "seconds": seconds,
        "best_val_loss": history.best_val_loss,
    }


def _status(field: str) -> float:
    """A ``/proc/self/status`` figure in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _table(records: list[dict], config: dict[str, int], size: int) -> str:
    lines = [
        f"`fit` of nn.GMM({DIM}, {COMPONENTS}) on a {config['rows']:,} x {DIM} float32 .npy "
        f"({size / 2**20:.0f} MiB), {config['steps']} steps of batch 512, validation 0.1",
        "",
        "| data | peak RSS (MiB) | peak anonymous (MiB) | after imports (MiB) | seconds "
        "| best validation NLL |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['mode']} | {r['peak_rss']:.0f} | {r['peak_anon']:.0f} | {r['floor']:.0f} "
            f"| {r['seconds']:.1f} | {r['best_val_loss']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def _plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5, 3))
    where = np.arange(len(records))
    ax.bar(where - 0.2, [r["peak_rss"] for r in records], 0.4, label="peak RSS")
    ax.bar(where + 0.2, [r["peak_anon"] for r in records], 0.4, label="peak anonymous")
    ax.axhline(1024, color="grey", ls="--", lw=0.8, label="1 GiB")
    ax.set_xticks(where, [r["mode"] for r in records])
    ax.set_ylabel("MiB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
