r"""``torch.compile`` of our log-densities and samplers: graph breaks, and compiled against eager.

**Graph capture.** ``torch._dynamo.explain`` of each workload reports how many graphs
TorchDynamo captures and why it breaks between them (the first reasons, with the line of our
code or of the library that causes them). One graph and no break is the ideal.

**Timing.** Each workload runs eagerly and through ``torch.compile`` (``--backend``, inductor
by default: it generates C++ for the CPU), forward and backward of ``.sum()``, gradients
cleared before each call. The first compiled call (compilation) is timed on its own; then
all workloads run round-robin, eager and compiled in turn, and the table gives the medians
and their ratio. One torch thread, float32.

Workloads:

* ``DiagNormalMixture.log_prob`` at (N, K, D) = (8192, 32, 16);
* the same without the check that sends overflowing rows to the exact fallback (its
  ``if`` on a tensor is the graph break): what the break costs;
* ``MultivariateNormalMixture.log_prob`` (full covariance) at (8192, 32, 16);
* the conditional ``nn.GMM(5, 10, context_dim=5)`` (a mixture density network),
  ``model(c).log_prob(x)`` at batch 4096;
* ``DiagNormalMixture.rsample`` + backward of ``z.sin().sum()`` at (2048, 16, 16): exact draws
  with implicit gradients, a custom ``torch.autograd.Function``;
* the conditional ``nn.MixtureFlow(2, context_dim=3)`` (nflows spline couplings over the
  mixture), ``log_prob`` at batch 1024: graph capture only (see the notes).

Usage::

    python benchmarks/compiled.py                   # inductor, full sizes (compilation: minutes)
    python benchmarks/compiled.py --quick --out DIR # aot_eager backend, small sizes: a smoke test
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from speed_memory import environment_line

from pyro_mixflow import DiagNormalMixture, MultivariateNormalMixture
from pyro_mixflow import nn as pmn

SEED = 0


@dataclass
class Workload:
    """``step()`` runs the timed call eagerly; ``compiled`` is its ``torch.compile`` twin."""

    name: str
    function: Callable[..., torch.Tensor]  # the function torch.compile sees
    inputs: tuple[torch.Tensor, ...]
    parameters: list[torch.Tensor]
    timed: bool = True


def workloads(quick: bool) -> list[Workload]:
    torch.manual_seed(SEED)
    scale = 16 if quick else 1
    n, k, d = 8192 // scale, 32, 16
    locs = torch.randn(k, d).requires_grad_()
    scales = (0.5 + torch.rand(k, d)).requires_grad_()
    logits = torch.randn(k).requires_grad_()
    x = torch.randn(n, d)
    tril = (torch.eye(d) + 0.1 * torch.randn(k, d, d).tril(-1)).requires_grad_()

    def diag_log_prob(locs, scales, logits, x):
        return DiagNormalMixture(locs, scales, logits, validate_args=False).log_prob(x)

    def diag_log_prob_unchecked(locs, scales, logits, x):
        # log_prob's fast path alone, without the check that picks the overflow fallback
        d = DiagNormalMixture(locs, scales, logits, validate_args=False)
        return d._expanded_log_prob(x, d._expansion_weight()[0])

    def mvn_log_prob(locs, tril, logits, x):
        return MultivariateNormalMixture(locs, tril, logits, validate_args=False).log_prob(x)

    mdn = pmn.GMM(5, 10, context_dim=5)
    context, y = torch.randn(4096 // scale, 5), torch.randn(4096 // scale, 5)
    mdn.init_from_data(y, context)

    def mdn_log_prob(y, context):
        return mdn(context).log_prob(y)

    n_draws, d_draws = 2048 // scale, 16
    draw_locs = torch.randn(16, d_draws).requires_grad_()
    draw_scales = (0.5 + torch.rand(16, d_draws)).requires_grad_()
    draw_logits = torch.randn(16).requires_grad_()

    def rsample(locs, scales, logits):
        z = DiagNormalMixture(locs, scales, logits, validate_args=False).rsample((n_draws,))
        return z.sin()

    flow = pmn.MixtureFlow(2, 8, context_dim=3)
    flow_x, flow_c = torch.randn(1024 // scale, 2), torch.randn(1024 // scale, 3)

    def flow_log_prob(x, context):
        return flow(context).log_prob(x)

    return [
        Workload(
            f"DiagNormalMixture.log_prob ({n}, {k}, {d})",
            diag_log_prob,
            (locs, scales, logits, x),
            [locs, scales, logits],
        ),
        Workload(
            f"the same without the overflow check (the break's cost) ({n}, {k}, {d})",
            diag_log_prob_unchecked,
            (locs, scales, logits, x),
            [locs, scales, logits],
        ),
        Workload(
            f"MultivariateNormalMixture.log_prob ({n}, {k}, {d})",
            mvn_log_prob,
            (locs, tril, logits, x),
            [locs, tril, logits],
        ),
        Workload(
            f"nn.GMM(context_dim=5) log_prob, batch {len(y)}",
            mdn_log_prob,
            (y, context),
            list(mdn.parameters()),
        ),
        Workload(
            f"DiagNormalMixture.rsample + backward ({n_draws}, 16, {d_draws})",
            rsample,
            (draw_locs, draw_scales, draw_logits),
            [draw_locs, draw_scales, draw_logits],
        ),
        Workload(
            f"nn.MixtureFlow(context_dim=3) log_prob, batch {len(flow_x)}",
            flow_log_prob,
            (flow_x, flow_c),
            list(flow.parameters()),
            timed=False,
        ),
    ]


def capture(workload: Workload) -> tuple[int, int, list[str]]:
    """Graphs, breaks and the distinct break reasons (with the line that causes each)."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(workload.function)(*workload.inputs)
    reasons = []
    for item in explained.break_reasons:
        reason = str(item.reason).split("\n")[0][:90]
        where = ""
        if item.user_stack:
            frame = item.user_stack[-1]
            where = f" ({Path(frame.filename).name}:{frame.lineno})"
        if reason + where not in reasons:
            reasons.append(reason + where)
    return explained.graph_count, explained.graph_break_count, reasons


def step(function: Callable[..., torch.Tensor], workload: Workload) -> None:
    for p in workload.parameters:
        p.grad = None
    function(*workload.inputs).sum().backward()


def timing(
    cases: list[Workload], backend: str, repeats: int
) -> dict[str, tuple[float, float, float]]:
    """Per workload: compilation seconds, eager and compiled median milliseconds.

    Every workload is compiled first; then all of them run round-robin, eager and compiled
    in turn, so that the medians of different rows share the machine's conditions.
    """
    compiled, compile_seconds = {}, {}
    for workload in cases:
        torch._dynamo.reset()
        compiled[workload.name] = torch.compile(workload.function, backend=backend)
        start = time.perf_counter()
        step(compiled[workload.name], workload)
        compile_seconds[workload.name] = time.perf_counter() - start
        step(workload.function, workload)
    times = {(w.name, kind): [] for w in cases for kind in ("eager", "compiled")}
    for _ in range(repeats):
        for workload in cases:
            for kind, function in (
                ("eager", workload.function),
                ("compiled", compiled[workload.name]),
            ):
                start = time.perf_counter()
                step(function, workload)
                times[(workload.name, kind)].append(time.perf_counter() - start)
    return {
        w.name: (
            compile_seconds[w.name],
            1e3 * statistics.median(times[(w.name, "eager")]),
            1e3 * statistics.median(times[(w.name, "compiled")]),
        )
        for w in cases
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="aot_eager, sizes / 16, 3 repeats")
    parser.add_argument("--backend", default=None, help="torch.compile backend (inductor)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (30)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    backend = args.backend or ("aot_eager" if args.quick else "inductor")
    repeats = args.repeats or (3 if args.quick else 30)
    torch.set_num_threads(1)
    torch._logging.set_logs(dynamo=logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)

    rows, reasons, results = [], [], []
    cases = workloads(args.quick)
    timed = timing([w for w in cases if w.timed], backend, repeats)
    for workload in cases:
        graphs, breaks, why = capture(workload)
        reasons += [f"- {workload.name}: {reason}" for reason in why]
        if workload.timed:
            compile_seconds, eager, fast = timed[workload.name]
            results.append((workload.name, eager, fast))
            cells = f"{compile_seconds:.1f} | {eager:.2f} | {fast:.2f} | {eager / fast:.2f}"
        else:
            cells = "– | – | – | –"
        rows.append(f"| {workload.name} | {graphs} | {breaks} | {cells} |")
    lines = [
        "# torch.compile: graph breaks, and compiled against eager (forward + backward)",
        "",
        f"Generated by `benchmarks/compiled.py`. {environment_line()}; backend `{backend}`, "
        f"medians of {repeats} calls.",
        "",
        "| workload | graphs | breaks | compile (s) | eager (ms) | compiled (ms) | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Why the graphs break (distinct reasons, first line):",
        "",
        *(reasons or ["- none"]),
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "compiled.md").write_text(text)
    save_figure(results, backend, args.out / "compiled.png")
    print(text)


def save_figure(results: list[tuple[str, float, float]], backend: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * len(results)))
    names = [name for name, _, _ in results]
    positions = range(len(results))
    ax.barh([p + 0.2 for p in positions], [e for _, e, _ in results], 0.4, label="eager")
    ax.barh(
        [p - 0.2 for p in positions], [c for _, _, c in results], 0.4, label=f"compiled ({backend})"
    )
    ax.set_yticks(list(positions), names, fontsize=7)
    ax.set_xlabel("forward + backward (ms, median)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
