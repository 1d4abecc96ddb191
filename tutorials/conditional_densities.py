# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Conditional densities: a mixture density network
#
# Every model of `pyro_mixflow.nn` takes `context_dim`: `model(c)` for a context of shape
# `(*batch, C)` returns one distribution per context row. `nn.GMM(..., context_dim=C)` is a
# mixture density network (Bishop 1994): a network maps the context to the weights, means and
# scales of a Gaussian mixture, so that `p(y | c)` can have several modes, skew and a spread
# that changes with `c`, all with an exact `log_prob` and exact pathwise `rsample`.
#
# Model → Fit → Check → Plot, on a regression whose noise is bimodal, with the exact
# conditional density known so that the fit can be scored per context.
#
# Run with `CI=1` for a few-step smoke run; figures go to `tutorials/output/`.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from pyro_mixflow import DiagNormalMixture, fit
from pyro_mixflow.nn import GMM

smoke_test = "CI" in os.environ
steps = 30 if smoke_test else 3000
num_rows = 2000 if smoke_test else 20000
out_dir = Path(__file__).resolve().parent / "output" if "__file__" in globals() else Path("output")
out_dir.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

# %% [markdown]
# ## The truth: a bimodal noise whose modes and weights move with the context
# For a context $c \in [-2, 2]$ the response $y$ is one of two branches around $\sin 2c$,
# $\pm (0.8 + 0.3 c)$ away from it, with weights $\sigma(2c)$ and $1 - \sigma(2c)$ and a
# spread $0.1 + 0.05 c^2$ that grows towards the ends. The exact conditional density is a
# two-component mixture for every $c$.


# %%
def truth(c: torch.Tensor) -> DiagNormalMixture:
    """The exact p(y | c), one mixture per context row of `c` (shape (N, 1))."""
    centre, gap = torch.sin(2 * c), 0.8 + 0.3 * c
    locs = torch.stack([centre + gap, centre - gap], -2)  # [N, 2, 1]
    scales = (0.1 + 0.05 * c.square()).unsqueeze(-2).expand_as(locs)
    weight = torch.sigmoid(2 * c)
    return DiagNormalMixture(locs, scales, probs=torch.cat([weight, 1 - weight], -1))


context = 4 * torch.rand(num_rows, 1) - 2
response = truth(context).sample()  # [N, 1]

# %% [markdown]
# ## Model and fit
# `init_from_data(y, c)` fits an unconditional EM mixture to `y` and starts the network's
# last layer at zero weights with that mixture as its bias, so the untrained model is the EM
# fit for every context; it also sets the model's context standardization. `fit(...,
# context=c)` trains on the pairs $(y_i, c_i)$.

# %%
model = GMM(1, num_components=5, context_dim=1, hidden_dims=(64, 64))
model.init_from_data(response, context)
start = GMM(1, num_components=5, context_dim=1, hidden_dims=(64, 64))
start.load_state_dict(model.state_dict())  # the EM start, kept for comparison
history = fit(
    model, response, context=context, steps=steps, lr=3e-3, seed=0, progress=not smoke_test
)
print(history)

# %% [markdown]
# ## Check: KL(truth ‖ model) per context
# $\mathrm{KL} = E_{y \sim p(\cdot \mid c)}[\log p(y \mid c) - \log q(y \mid c)]$, by Monte
# Carlo with 20,000 draws per context (± two standard errors).

# %%
probe = torch.tensor([[-1.5], [-0.5], [0.0], [0.5], [1.5]])
with torch.no_grad():
    draws = truth(probe).sample((20000,))  # [M, 5, 1]
    log_p = truth(probe).log_prob(draws)
    for name, q in (("EM start", start), ("trained", model)):
        gap = log_p - q(probe).log_prob(draws)
        kl, se = gap.mean(0), gap.std(0) / gap.shape[0] ** 0.5
        cells = ", ".join(
            f"c={c:+.1f}: {k:.3f} ± {2 * s:.3f}"
            for c, k, s in zip(probe.flatten().tolist(), kl, se, strict=True)
        )
        print(f"{name:9} {cells}")

# %% [markdown]
# ## Plot: the conditional density over (c, y), and three slices

# %%
cs = torch.linspace(-2, 2, 200).unsqueeze(-1)
ys = torch.linspace(-3.5, 3.5, 300)
with torch.no_grad():
    grid_truth = truth(cs).log_prob(ys.view(-1, 1, 1)).exp()  # [Y, C]
    grid_model = model(cs).log_prob(ys.view(-1, 1, 1)).exp()
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
for ax, grid, title in (
    (axes[0], grid_truth, "truth p(y | c)"),
    (axes[1], grid_model, "mixture density network q(y | c)"),
):
    ax.imshow(grid.numpy(), origin="lower", aspect="auto", extent=(-2, 2, -3.5, 3.5), cmap="magma")
    ax.set_xlabel("context c")
    ax.set_ylabel("y")
    ax.set_title(title)
axes[0].scatter(context[:300, 0], response[:300, 0], s=2, c="white", alpha=0.4)
for c, color in ((-1.5, "C0"), (0.0, "C1"), (1.5, "C2")):
    row = torch.tensor([[c]])
    with torch.no_grad():
        axes[2].plot(
            ys,
            truth(row).log_prob(ys.view(-1, 1, 1)).exp()[:, 0],
            color=color,
            label=f"truth, c={c:+.1f}",
        )
        axes[2].plot(
            ys,
            model(row).log_prob(ys.view(-1, 1, 1)).exp()[:, 0],
            color=color,
            ls="--",
            label=f"model, c={c:+.1f}",
        )
axes[2].set_xlabel("y")
axes[2].set_title("slices")
axes[2].legend(fontsize=7)
fig.tight_layout()
fig.savefig(out_dir / "conditional_densities.png", dpi=90)

# %% [markdown]
# # Part 2: neural posterior estimation with sbi on "two moons"
#
# Neural posterior estimation (NPE; Papamakarios & Murray 2016, arXiv:1605.06376) draws
# parameters $\theta$ from the prior, simulates data $x$ for each, and trains a conditional
# density $q(\theta \mid x)$ on the pairs by maximum likelihood. Once trained, it gives the
# posterior of any observation $x_o$ without further simulations: sample and evaluate
# $q(\theta \mid x_o)$.
#
# The `sbi` package runs NPE with its own flows; `pyro_mixflow.sbi.density_estimator(...)`
# returns a build function that sbi calls in their place, so that an sbi user changes one
# argument, `NPE(prior, density_estimator=density_estimator("mixtureflow"))`, and keeps the
# rest of the workflow (`append_simulations`, `train`, `build_posterior`, `sample`).
#
# The task is "two moons" (Greenberg, Nonnenmacher & Macke 2019, APT, arXiv:1905.07488;
# the sbibm version): $\theta \sim U([-1, 1]^2)$, $a \sim U(-\pi/2, \pi/2)$,
# $r \sim \mathcal{N}(0.1, 0.01^2)$, $p = (r \cos a + 0.25,\ r \sin a)$ and
# $x = p + \left(-|\theta_1 + \theta_2| / \sqrt{2},\ (-\theta_1 + \theta_2) / \sqrt{2}\right)$.
# The absolute value makes the posterior of an observation bimodal, and the arc of $p$
# makes each mode a thin crescent; at $x_o = (0, 0)$ the posterior is symmetric under
# $\theta \mapsto -\theta$, so the two crescents are point reflections of each other.

# %%
import math
import tempfile
import time

from sbi.inference import NPE
from sbi.utils import BoxUniform
from sbi.utils.tracking import TensorBoardTracker
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neural_network import MLPClassifier
from torch.utils.tensorboard import SummaryWriter

from pyro_mixflow.sbi import density_estimator

num_simulations = 300 if smoke_test else 10_000
max_epochs = 2 if smoke_test else 60
num_draws = 500 if smoke_test else 5000
# Networks and batches this small gain little from more threads, and on a CPU shared with
# other work extra threads slowed sbi's training several-fold here: use one.
torch.set_num_threads(1)
# sbi logs each training run for TensorBoard, by default to ./sbi-logs; keep them out of
# the working directory (under tutorials/output/, or a temporary directory).
log_dir = out_dir / "sbi-logs" if "__file__" in globals() else Path(tempfile.mkdtemp())
torch.manual_seed(0)


def two_moons(theta: torch.Tensor) -> torch.Tensor:
    """One simulation x (shape (N, 2)) per row of theta (shape (N, 2))."""
    a = math.pi * (torch.rand(len(theta)) - 0.5)
    r = 0.1 + 0.01 * torch.randn(len(theta))
    p = torch.stack([r * torch.cos(a) + 0.25, r * torch.sin(a)], -1)
    shift = torch.stack([-(theta[:, 0] + theta[:, 1]).abs(), theta[:, 1] - theta[:, 0]], -1)
    return p + shift / math.sqrt(2)


prior = BoxUniform(-torch.ones(2), torch.ones(2))
theta = prior.sample((num_simulations,))
x = two_moons(theta)

# %% [markdown]
# ## Train: ours and sbi's neural spline flow, on the same simulations
# The same `NPE(...).append_simulations(theta, x).train(...)` for both; only
# `density_estimator=` differs. sbi holds 10% of the simulations out and stops when their
# loss has not improved for 20 epochs, or after `max_num_epochs` (60 here, 2 in the smoke
# run; sbi counts from 0, so it trains 61). In the full run the cap is what stops both
# estimators, and sbi warns that they have not fully converged: a budget of about a minute
# and a half each on a 2-core CPU, for a run of about 3.5 minutes. The held-out loss is
# the mean of $-\log q(\theta \mid x)$ over the held-out pairs, in the units of $\theta$ for
# both estimators, so it compares them directly (lower is better).

# %%
estimators = {
    "MixtureFlow (ours)": density_estimator(
        "mixtureflow", num_components=10, num_transforms=4, hidden_dims=(64, 64)
    ),
    "sbi NSF": "nsf",
}
x_o = torch.zeros(2)
posteriors, draws_at_x_o = {}, {}
for name, estimator in estimators.items():
    torch.manual_seed(1)
    tracker = TensorBoardTracker(SummaryWriter(log_dir / name.split()[0].lower()))
    npe = NPE(prior, density_estimator=estimator, tracker=tracker, show_progress_bars=False)
    start_time = time.perf_counter()
    npe.append_simulations(theta, x).train(max_num_epochs=max_epochs)
    seconds = time.perf_counter() - start_time
    posteriors[name] = npe.build_posterior()
    draws_at_x_o[name] = posteriors[name].sample((num_draws,), x=x_o, show_progress_bars=False)
    # The posterior rejects the draws of q(theta | x_o) outside the prior's box; the mass
    # of q inside the box is the fraction it keeps (1 for a perfect estimator).
    raw = posteriors[name].posterior_estimator.sample((num_draws,), x_o[None])[:, 0]
    inside = float(((raw > -1) & (raw < 1)).all(-1).float().mean())
    summary = npe.summary
    print(
        f"{name:19} {summary['epochs_trained'][-1]:3d} epochs in {seconds:5.1f} s, "
        f"held-out -log q(theta | x): {summary['best_validation_loss'][-1]:.3f}, "
        f"mass of q(theta | x_o) inside the prior box: {inside:.3f}"
    )

# %% [markdown]
# ## Check: can a classifier tell our draws from sbi's?
# A classifier two-sample test (C2ST; Lopez-Paz & Oquab 2017): a small MLP learns to tell
# the draws of our posterior at $x_o$ from those of sbi's NSF posterior, scored by 5-fold
# cross-validated accuracy. 0.5 means it cannot tell them apart; 1.0 that they do not
# overlap. This compares the two estimators with each other, not with the exact posterior
# (we have no reference draws here), so it measures agreement, not accuracy.

# %%
ours, theirs = draws_at_x_o.values()
features = torch.cat([ours, theirs]).numpy()
features = (features - features.mean(0)) / features.std(0)
labels = torch.cat([torch.zeros(len(ours)), torch.ones(len(theirs))]).numpy()
classifier = MLPClassifier(hidden_layer_sizes=(20, 20), max_iter=1000, random_state=0)
folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
accuracy = cross_val_score(classifier, features, labels, cv=folds).mean()
print(f"C2ST accuracy, our draws vs sbi NSF's at x_o = (0, 0): {accuracy:.3f} (0.5 = alike)")

# %% [markdown]
# ## Plot: the posterior draws at $x_o = (0, 0)$
# Each panel shows the draws of one estimator's posterior, zoomed on $[-0.5, 0.5]^2$ of the
# prior's box $[-1, 1]^2$ (the count of draws outside the zoom is in the title). Both
# should show two thin crescents, point reflections of each other.

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 4.4), sharex=True, sharey=True)
for ax, (name, draws) in zip(axes, draws_at_x_o.items(), strict=True):
    outside = int((draws.abs() > 0.5).any(-1).sum())
    ax.scatter(*draws.T.numpy(), s=1, alpha=0.3, color="C0" if "ours" in name else "C1")
    ax.set_title(f"{name}\n{len(draws)} draws of q(θ | x_o), {outside} outside the zoom")
    ax.set_xlabel("θ₁")
    ax.set_xlim(-0.5, 0.5)
    ax.set_ylim(-0.5, 0.5)
    ax.set_aspect("equal")
axes[0].set_ylabel("θ₂")
fig.tight_layout()
fig.savefig(out_dir / "conditional_densities_npe.png", dpi=90)
