# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Classifier Weighted Mixtures on the Euler image
#
# A classifier weighted mixture (CWM) keeps the components of a Gaussian mixture but lets a
# neural classifier choose their weights *as a function of where the point falls inside each
# component*:
#
# $$p(x) = \sum_k w_k(z_k)\, \mathcal N(z_k; 0, I) \prod_d \sigma_{kd}^{-1}, \qquad
#   z_k = (x - \mu_k)/\sigma_k, \quad w = \mathrm{softmax}(f(z)).$$
#
# Because $\sum_k w_k(z) = 1$ for every $z$ it is still normalized, and it samples exactly:
# $z \sim \mathcal N(0, I)$, $k \sim \mathrm{Cat}(w(z))$, $x = \mu_k + \sigma_k z$. A constant
# classifier is an ordinary mixture, so EM gives the starting point; training then carves each
# Gaussian bump into the shape the data needs. We reproduce the paper's 2-D image experiment:
# the density of Euler's portrait (bright pixels are likely) on the unit square.
#
# Run with `CI=1` for a smoke run (seconds); figures go to `tutorials/output/`. The full
# comparison with a neural spline flow is `benchmarks/cwm_image.py`.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from pyro_mixflow import fit
from pyro_mixflow.datasets import euler
from pyro_mixflow.nn import CWM

smoke_test = "CI" in os.environ
num_components = 9 if smoke_test else 49
hidden_dims = (16, 16) if smoke_test else (64, 64, 64)
steps = 20 if smoke_test else 3000
num_train = 5000 if smoke_test else 200_000
out_dir = Path(__file__).resolve().parent / "output" if "__file__" in globals() else Path("output")
out_dir.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
torch.set_flush_denormal(True)  # subnormals are slow on x86 CPUs; a script's choice

# %% [markdown]
# ## The target: a piecewise-constant image density
# `euler()` turns the portrait into grey levels $g = 0.2989R + 0.5870G + 0.1140B$; a draw picks
# a pixel with probability $\propto g$ and a uniform point inside it. Its exact log-density is
# known, so the best possible mean log-density (the oracle) is known too: about 0.2245 nats.

# %%
truth = euler()
data = truth.sample(num_train, generator=torch.Generator().manual_seed(0)).float()
test = truth.sample(20_000, generator=torch.Generator().manual_seed(1)).float()
print(f"image {truth.shape}, oracle mean log-density {truth.optimal_mean_log_prob:.4f} nats")

# %% [markdown]
# ## Fit: EM first, then the classifier
# `init_from_data` runs scikit-learn's EM for a diagonal Gaussian mixture and sets the
# classifier's last layer to weight 0 and bias $\log\pi$: the CWM *is* the EM mixture at this
# point. We keep a copy of that density to compare with.

# %%
model = CWM(2, num_components, hidden_dims=hidden_dims).init_from_data(data)
size = 60 if smoke_test else 200
centres = (torch.arange(size) + 0.5) / size
yy, xx = torch.meshgrid(centres, centres, indexing="ij")
grid = torch.stack([xx.flatten(), yy.flatten()], -1)


def mean_log_density(dist, x):
    with torch.no_grad():
        return torch.cat([dist.log_prob(c) for c in x.split(8192)]).double().mean().item()


with torch.no_grad():
    em_grid = model().log_prob(grid).reshape(size, size)
em_score = mean_log_density(model(), test)
fit(
    model,
    data,
    steps=steps,
    batch_size=512,
    lr=5e-3,
    weight_decay=5e-5,
    seed=0,
    progress=not smoke_test,
)

# %% [markdown]
# ## Check: mean log-density on held-out draws
# Higher is better, and nothing beats the oracle. The paper reports 0.150 for the GMM and
# 0.221 for the CWM after a much longer training (1000 epochs of 300,000 draws).

# %%
cwm_score = mean_log_density(model(), test)
print(f"EM mixture (the CWM at its start): {em_score:.4f} nats")
print(f"CWM after {steps} Adam steps:       {cwm_score:.4f} nats")
print(f"oracle:                            {truth.optimal_mean_log_prob:.4f} nats")

# %% [markdown]
# ## Plot: image, EM mixture, CWM, and CWM samples
# Log-densities on one grey scale, from 4 nats below the image's maximum to that maximum.

# %%
with torch.no_grad():
    dist = model()
    cwm_grid = dist.log_prob(grid).reshape(size, size)
    samples = dist.sample((200_000,))
true_grid = truth.log_prob(grid.double()).reshape(size, size)
vmax = float(true_grid[torch.isfinite(true_grid)].max())
fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
panels = [("image", true_grid), ("EM mixture", em_grid), ("CWM", cwm_grid)]
for ax, (title, values) in zip(axes, panels, strict=False):
    ax.imshow(
        values.clamp(min=vmax - 4).nan_to_num(vmax - 4),
        origin="lower",
        extent=(0, 1, 0, 1),
        cmap="gray",
        vmin=vmax - 4,
        vmax=vmax,
    )
    ax.set_title(title)
axes[3].hist2d(*samples.T.numpy(), bins=100, range=((0, 1), (0, 1)), cmap="gray")
axes[3].set_aspect("equal")
axes[3].set_title("CWM samples (histogram)")
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
fig.savefig(out_dir / "cwm_euler.png", dpi=90)

# %% [markdown]
# ## The learned weight maps
# For a component $k$, the map $x \mapsto w_k\big((x - \mu_k)/\sigma_k\big)$ is the share of
# its Gaussian bump that the classifier keeps at $x$ (it was the constant $\pi_k$ after EM).
# The circles mark $\mu_k \pm 2\sigma_k$: inside them the classifier cuts each bump to the
# shapes of the portrait.

# %%
with torch.no_grad():
    z = (grid.unsqueeze(-2) - dist.locs) / dist.scales  # [G, K, D]
    weights = dist.classifier(z).softmax(-1).diagonal(dim1=-2, dim2=-1)  # [G, K]
shown = (weights * torch.distributions.Normal(0, 1).log_prob(z).sum(-1).exp()).sum(0)
shown = shown.argsort(descending=True)[:6]
fig, axes = plt.subplots(1, len(shown), figsize=(2.4 * len(shown), 2.6))
for ax, k in zip(axes, shown.tolist(), strict=True):
    ax.imshow(
        weights[:, k].reshape(size, size),
        origin="lower",
        extent=(0, 1, 0, 1),
        cmap="viridis",
        vmin=0,
        vmax=1,
    )
    (mx, my), (sx, sy) = dist.locs[k].detach(), dist.scales[k].detach()
    ax.add_patch(matplotlib.patches.Ellipse((mx, my), 4 * sx, 4 * sy, fill=False, color="w"))
    ax.set_title(f"w_{k}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
fig.savefig(out_dir / "cwm_euler_weights.png", dpi=90)
print(f"figures: {out_dir / 'cwm_euler.png'}, {out_dir / 'cwm_euler_weights.png'}")
