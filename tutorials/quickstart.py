# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Quick start: a mixture as a density model and as a reparameterized sampler
#
# `DiagNormalMixture` is an exact mixture of diagonal Gaussians. Its `log_prob` is exact and
# memory-lean, and its `rsample` returns exact mixture draws with exact (unbiased) pathwise
# gradients. `GumbelSoftmaxMixture` is the same mixture with the Gumbel-softmax relaxed sampler.
#
# Run with `CI=1` for a few-step smoke run; figures go to `tutorials/output/`.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tqdm.auto import trange

from pyro_mixflow import DiagNormalMixture, GumbelSoftmaxMixture

smoke_test = "CI" in os.environ
steps = 20 if smoke_test else 1500
out_dir = Path(__file__).resolve().parent / "output" if "__file__" in globals() else Path("output")
out_dir.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
# Subnormal floats (gradients of far-off components, Adam's second moments) are slow on x86
# CPUs. `pyro_mixflow.fit` flushes them to zero while it trains; this tutorial's own loops
# do it for the whole script (the setting is the calling thread's).
torch.set_flush_denormal(True)

# %% [markdown]
# ## The target: four separated modes with unequal weights
# An exact mixture, so that both fits can be checked against the truth.

# %%
target = DiagNormalMixture(
    locs=torch.tensor([[-3.0, -3.0], [-3.0, 3.0], [3.0, -3.0], [3.0, 3.0]]),
    scales=torch.full((4, 2), 0.5),
    probs=torch.tensor([0.1, 0.2, 0.3, 0.4]),
)
data = target.sample((5000,))


# %% [markdown]
# ## A trainable mixture
# Unconstrained parameters; the distribution is rebuilt at every step (it is light).


# %%
class Mixture(torch.nn.Module):
    def __init__(self, num_components: int, dim: int):
        super().__init__()
        self.locs = torch.nn.Parameter(2 * torch.randn(num_components, dim))
        self.log_scales = torch.nn.Parameter(torch.zeros(num_components, dim))
        self.logits = torch.nn.Parameter(torch.zeros(num_components))

    def forward(self):
        return DiagNormalMixture(self.locs, self.log_scales.exp(), self.logits)


def train(loss_fn, model, desc):
    optim = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in trange(steps, desc=desc, disable=smoke_test, mininterval=1.0):
        optim.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        optim.step()
    return model


# %% [markdown]
# ## 1. Density model: maximum likelihood on data

# %%
density = train(lambda m: -m().log_prob(data).mean(), Mixture(8, 2), "maximum likelihood")

# %% [markdown]
# ## 2. Samplers: exact draws and relaxed draws
# Both samplers are differentiable. The exact `rsample` draws follow the mixture and carry
# unbiased gradients; the Gumbel-softmax `rsample` draws follow a relaxed distribution and carry
# the gradient of a relaxed objective (bias and variance of each: see
# `benchmarks/gradient_estimators.py`).

# %%
locs, log_scales, logits = (p.detach() for p in (density.locs, density.log_scales, density.logits))
exact_draws = DiagNormalMixture(locs, log_scales.exp(), logits).rsample((2000,))
relaxed_draws = GumbelSoftmaxMixture(locs, log_scales.exp(), logits, temperature=1.0).rsample(
    (2000,)
)

# %% [markdown]
# ## Check: KL to the truth and share of each mode

# %%
with torch.no_grad():
    q = density()
    x = target.sample((20000,))
    kl = (target.log_prob(x) - q.log_prob(x)).mean().item()  # KL(p || q)
    share = target.log_responsibilities(q.sample((20000,))).argmax(-1).bincount(minlength=4) / 20000
print(
    f"maximum likelihood fit: KL(p || q) = {kl:.4f} nats; share of each mode "
    + " ".join(f"{s:.3f}" for s in share.tolist())
    + " (truth 0.100 0.200 0.300 0.400)"
)

# %% [markdown]
# ## Plot: the truth, the fit, and exact versus relaxed draws
# Relaxed draws at a high temperature fall between the modes: they follow a different
# distribution than the mixture, which is why `log_prob` is not their density.

# %%
grid = torch.stack(
    torch.meshgrid(torch.linspace(-6, 6, 200), torch.linspace(-6, 6, 200), indexing="xy"), -1
)
fig, axes = plt.subplots(1, 4, figsize=(14, 3.6), sharex=True, sharey=True)
with torch.no_grad():
    for ax, (name, dist) in zip(
        axes[:2], [("truth", target), ("maximum likelihood", density())], strict=True
    ):
        ax.contourf(grid[..., 0], grid[..., 1], dist.log_prob(grid).exp(), levels=30)
        ax.set_title(name)
    for ax, (name, z) in zip(
        axes[2:],
        [("exact rsample", exact_draws), ("Gumbel-softmax rsample, tau=1", relaxed_draws)],
        strict=True,
    ):
        ax.scatter(z[:, 0], z[:, 1], s=2, alpha=0.4)
        ax.set_title(name)
for ax in axes:
    ax.set_aspect("equal")
fig.tight_layout()
fig.savefig(out_dir / "quickstart.png", dpi=90)
print(f"figure: {out_dir / 'quickstart.png'}")
