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
