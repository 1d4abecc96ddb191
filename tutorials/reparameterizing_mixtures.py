# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Reparameterizing a mixture: exact, Gumbel-softmax and straight-through gradients
#
# A mixture draw has two stages: a discrete component index, then a continuous draw from that
# component. The second stage is easy to reparameterize; the first is not. This tutorial
# compares three ways of getting a pathwise gradient of an expectation
# $\nabla_\theta E_{q_\theta}[f(X)]$ when $q_\theta$ is a mixture of Gaussians:
#
# * **exact** (`DiagNormalMixture.rsample`): exact mixture draws, with the gradient of the
#   weights obtained by implicit reparameterization (differentiate the CDF, not the sampler).
#   Unbiased.
# * **Gumbel-softmax** (`GumbelSoftmaxMixture.rsample`): replace the one-hot index by a point
#   $c$ of the simplex, a softmax of perturbed log weights at temperature $\tau$, and
#   soft-select the component's mean and scale. The draws follow a *different*, relaxed
#   distribution $p_\tau$; the gradient is exact for $E_{p_\tau}[f]$, biased for $E_q[f]$.
# * **straight-through** (`straight_through=True`): exact mixture draws in the forward pass,
#   the relaxed gradient in the backward pass. Biased (for the weights).
#
# Then the temperature trade-off (bias against variance), and the three densities that go
# with a Gumbel-softmax mixture: the exact mixture density, the joint density of the relaxed
# weights and the point, and the relaxed marginal.
#
# Run with `CI=1` for a smoke run (few estimates); figures go to `tutorials/output/`.

# %%
import math
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy import stats

from pyro_mixflow import DiagNormalMixture, GumbelSoftmaxMixture

smoke_test = "CI" in os.environ
reps = 100 if smoke_test else 4000  # independent gradient estimates per estimator
batch = 64 if smoke_test else 256  # draws per estimate
out_dir = Path(__file__).resolve().parent / "output" if "__file__" in globals() else Path("output")
out_dir.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
torch.set_flush_denormal(True)
# Small tensors: one thread avoids synchronization overhead (on a busy 2-core machine several
# threads made each training step 15 times slower).
torch.set_num_threads(1)
dtype = torch.float64
start_time = time.perf_counter()

# %% [markdown]
# ## Model: a two-component mixture in one dimension and a test function
#
# We take $q(x) = \pi_1 \mathcal{N}(x; \mu_1, \sigma_1^2) + \pi_2 \mathcal{N}(x; \mu_2,
# \sigma_2^2)$ with $\pi = \operatorname{softmax}(\ell)$ (two components keep the simplex
# one-dimensional, so the joint density below can be drawn), and
# $f(x) = \cos(a x + b)$. Under one Gaussian component, $E[\cos(aX + b)] = e^{-a^2\sigma^2/2}
# \cos(a\mu + b)$, so the objective has a closed form,
#
# $$E_q[f] = \sum_k \pi_k\, e^{-a^2 \sigma_k^2 / 2} \cos(a \mu_k + b),$$
#
# and autograd through this formula gives the true gradient with respect to
# $\theta = (\mu, \sigma, \ell)$.

# %%
locs = torch.tensor([[-2.0], [1.5]], dtype=dtype)
scales = torch.tensor([[0.5], [1.0]], dtype=dtype)
logits = torch.tensor([0.3, 0.7], dtype=dtype).log()
a, b = 1.3, 2.6
names = ("locs", "scales", "logits")


def f(x):
    return torch.cos(a * x[..., 0] + b)


def closed_form(locs, scales, logits):
    probs = logits.softmax(-1)
    damping = torch.exp(-0.5 * a**2 * scales[..., 0] ** 2)
    return (probs * damping * torch.cos(a * locs[..., 0] + b)).sum(-1)


params = [p.clone().requires_grad_() for p in (locs, scales, logits)]
true_grad = torch.autograd.grad(closed_form(*params), params)
print(f"E_q[f] = {closed_form(locs, scales, logits).item():.5f}")
for name, g in zip(names, true_grad, strict=True):
    print(f"true gradient wrt {name}: {g.flatten().tolist()}")

# %% [markdown]
# ## Gradient estimates: many at once with batched parameters
#
# One estimate is $\hat g = \nabla_\theta \frac1M \sum_{m=1}^M f(x_m)$ from $M$ reparameterized
# draws. To get $R$ independent estimates in one backward pass, we give the distribution $R$
# copies of the parameters as a batch dimension: the draws of copy $r$ depend only on
# copy $r$, so the gradient with respect to copy $r$ is the $r$-th estimate.


# %%
def estimates(make, num_reps=reps, num_draws=batch):
    """``num_reps`` gradient estimates of M draws each: a tensor (R, 6) per estimator."""
    leaves = [p.expand(num_reps, *p.shape).clone().requires_grad_() for p in (locs, scales, logits)]
    x = make(*leaves).rsample((num_draws,))  # [M, R, 1]
    grads = torch.autograd.grad(f(x).mean(0).sum(), leaves)
    return torch.cat([g.reshape(num_reps, -1) for g in grads], -1)


def exact(locs, scales, logits):
    return DiagNormalMixture(locs, scales, logits)


def gumbel(tau, straight_through=False):
    def make(locs, scales, logits):
        return GumbelSoftmaxMixture(
            locs, scales, logits, temperature=tau, straight_through=straight_through
        )

    return make


groups = {"locs": slice(0, 2), "scales": slice(2, 4), "logits": slice(4, 6)}
truth = torch.cat([g.flatten() for g in true_grad])


def summarize(est):
    """Per group: relative bias, its noise floor, z-score of the bias, relative variance."""
    out = {}
    for name, sl in groups.items():
        e, g = est[:, sl], truth[sl]
        cov = torch.cov(e.T)  # covariance of one estimate
        mean, var = e.mean(0), cov.trace()
        sq_err = (mean - g).square().sum()
        norm2 = g.square().sum()
        # For an unbiased estimator ||mean - g||^2 has expectation tr Cov / R and, the mean
        # being nearly Gaussian, standard deviation sqrt(2 tr Cov^2) / R: the z-score is the
        # excess in units of that standard deviation.
        z = (sq_err - var / len(e)) / ((2 * (cov @ cov).trace()).sqrt() / len(e))
        out[name] = {
            "bias": (sq_err / norm2).sqrt().item(),
            "floor": (var / len(e) / norm2).sqrt().item(),
            "z": z.item(),
            "var": (var / norm2).item(),
            "mean": mean,
        }
    return out


taus = [0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
results = {"exact": summarize(estimates(exact))}
for tau in taus:
    results[f"gumbel {tau:g}"] = summarize(estimates(gumbel(tau)))
    results[f"straight-through {tau:g}"] = summarize(estimates(gumbel(tau, True)))

# %% [markdown]
# ## Check: bias and variance against the closed form
#
# Relative bias is $\lVert \bar g - g \rVert / \lVert g \rVert$ with $\bar g$ the mean of the
# $R$ estimates; even an unbiased estimator shows a small value, the noise floor
# $\sqrt{\operatorname{tr}\Sigma / R} / \lVert g \rVert$. The z-score measures the excess over
# that floor (above about 3: a real bias). Relative variance is
# $\operatorname{tr}\Sigma / \lVert g \rVert^2$ for one estimate of $M$ draws.

# %%
print(f"\n{reps} estimates of {batch} draws each (float64)\n")
print("| estimator | " + " | ".join(f"bias {n} (z)" for n in names) + " | var logits |")
print("|---|---|---|---|---:|")
for key in ["exact"] + [f"{k} {t:g}" for k in ("gumbel", "straight-through") for t in taus]:
    row = results[key]
    cells = [f"{row[n]['bias']:.3f} ± {row[n]['floor']:.3f} ({row[n]['z']:+.3g})" for n in names]
    print(f"| {key} | " + " | ".join(cells) + f" | {row['logits']['var']:.3g} |")

# %% [markdown]
# What to read in the table (full run):
#
# * **exact**: every z-score is of order one: no detectable bias for any parameter.
# * **Gumbel-softmax**: biased for every parameter, the bias growing with $\tau$: the draws
#   follow $p_\tau$, which at large $\tau$ puts mass between the modes (soft-selected means).
# * **straight-through**: unbiased for the means and scales (the forward pass is an exact
#   mixture draw and the Gaussian part is reparameterized exactly), biased for the weights at
#   every temperature. Its weight gradient is a linearization: it multiplies the slope of $f$
#   at the drawn point by the distance to the other component's mean. When $f$ turns over
#   between the components, as the cosine does here, the slope misjudges the change of $f$,
#   and the average can even point the wrong way:

# %%
print("mean estimate of d E[f] / d logit_1:")
print(f"  closed form: {truth[4].item():+.4f}")
for key in ["exact", "gumbel 0.1", "straight-through 0.1", "straight-through 1"]:
    print(f"  {key:>20}: {results[key]['logits']['mean'][0].item():+.4f}")

# %% [markdown]
#
# The Gumbel-softmax estimator is unbiased for something: the gradient of the relaxed
# objective $E_{p_\tau}[f]$. Its bias for our objective is the gap between the two
# objectives' gradients. The gap in value is easy to see with many relaxed draws:

# %%
with torch.no_grad():
    value_gap = {}
    for tau in taus:
        draws = GumbelSoftmaxMixture(locs, scales, logits, temperature=tau).rsample((200_000,))
        fx = f(draws)
        value_gap[tau] = (
            fx.mean().item() - closed_form(locs, scales, logits).item(),
            fx.std().item() / math.sqrt(len(fx)),
        )
for tau, (gap, se) in value_gap.items():
    print(f"tau = {tau:<4g}: E_p_tau[f] - E_q[f] = {gap:+.4f} ± {se:.4f}")

# %% [markdown]
# ## The temperature trade-off
#
# The mean squared error of one estimate is bias² + variance. As $\tau \to 0$ the relaxed
# weights approach one-hot vectors, the bias vanishes and the variance grows (the softmax gets
# steep: a small change of the logits moves the draw a long way, for a few draws). The
# relative root-mean-square error $\sqrt{\text{bias}^2 + \text{var}}\,/\lVert g\rVert$ of a
# single $M$-draw estimate, per temperature, shows where the balance lies; the exact
# estimator is a horizontal line.

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
colors = {"locs": "tab:blue", "scales": "tab:orange", "logits": "tab:green"}
for name, color in colors.items():
    for family, style in (("gumbel", "-o"), ("straight-through", "--s")):
        rows = [results[f"{family} {t:g}"][name] for t in taus]
        axes[0].plot(taus, [r["bias"] for r in rows], style, color=color)
        axes[1].plot(taus, [r["var"] for r in rows], style, color=color)
        axes[2].plot(taus, [math.sqrt(r["bias"] ** 2 + r["var"]) for r in rows], style, color=color)
    ex = results["exact"][name]
    axes[0].axhline(ex["floor"], color=color, lw=0.8, ls="-.")
    axes[1].axhline(ex["var"], color=color, lw=1.2, ls=":")
    axes[2].axhline(math.sqrt(ex["bias"] ** 2 + ex["var"]), color=color, lw=1.2, ls=":")
titles = [
    "relative bias (dash-dot: noise floor)",
    "relative variance of one estimate",
    "relative RMSE of one estimate",
]
for ax, title in zip(axes, titles, strict=True):
    ax.set(xscale="log", yscale="log", xlabel="temperature τ", title=title)
    ax.grid(alpha=0.3)
handles = [plt.Line2D([], [], color=c, lw=5, label=n) for n, c in colors.items()]
handles += [
    plt.Line2D([], [], color="0.3", ls="-", marker="o", label="Gumbel-softmax"),
    plt.Line2D([], [], color="0.3", ls="--", marker="s", label="straight-through"),
    plt.Line2D([], [], color="0.3", ls=":", label="exact"),
]
fig.legend(handles=handles, loc="lower center", ncols=6, fontsize=9, frameon=False)
fig.tight_layout(rect=(0, 0.08, 1, 1))
fig.savefig(out_dir / "reparameterizing_gradients.png", dpi=90)
print(f"figure: {out_dir / 'reparameterizing_gradients.png'}")

# %% [markdown]
# In this one-dimensional example (full run) the exact estimator has the smallest error of
# one estimate for every parameter group and every temperature: its weight gradient is
# unbiased *and* less noisy than the Gumbel-softmax one at small $\tau$, and at large $\tau$
# the relaxation's bias dominates. The balance shifts in higher dimensions: the exact weight
# gradient moves mass between components through the low-density regions between them, and
# with many well-separated components in sixteen dimensions it becomes heavy-tailed, so that
# a biased but tame Gumbel-softmax estimate at $\tau \approx 0.1$ has the smaller error for the
# weights (`benchmarks/gradient_estimators.py`).

# %% [markdown]
# ## The three densities of a Gumbel-softmax mixture
#
# A relaxed draw is a pair: weights $c$ on the simplex and a point
# $x = c^\top\mu + \omega\, c^\top\sigma$, $\omega \sim \mathcal{N}(0, 1)$. Three densities go
# with it, and mixing them up is a classic mistake:
#
# 1. **the mixture density** $q(x) = \sum_k \pi_k \mathcal{N}(x; \mu_k, \sigma_k^2)$
#    (`log_prob`): the density of exact draws (`sample`, the exact `rsample`, straight-through
#    draws), *not* of relaxed draws;
# 2. **the joint density** of $(c, x)$ (`joint_log_prob(x, log_c)`): the Concrete density of
#    $c$ times the Gaussian $\mathcal{N}(x; c^\top\mu, (c^\top\sigma)^2)$. The Concrete density
#    (Maddison et al. 2017; Jang et al. 2017) is
#    $p_\tau(c) = \Gamma(K)\,\tau^{K-1} \big(\sum_k \pi_k c_k^{-\tau}\big)^{-K}
#    \prod_k \pi_k c_k^{-\tau-1}$, a density with respect to the first $K - 1$ coordinates;
# 3. **the relaxed marginal** $p_\tau(x) = \int p_\tau(c)\, \mathcal{N}(x; c^\top\mu,
#    (c^\top\sigma)^2)\, dc$, the density of relaxed draws. No closed form; `relaxed_log_prob`
#    estimates it by averaging the Gaussian over $M$ fresh weight draws (nested Monte Carlo).
#    The average is unbiased for $p_\tau(x)$; its logarithm is biased low (Jensen's
#    inequality), by about $\operatorname{Var}/(2 M p_\tau^2)$.
#
# With two components we can check all three independently of the library. Write
# $c_1 = \operatorname{sigmoid}(u)$: the Gumbel-softmax construction makes
# $u = (\log(\pi_1/\pi_2) + L)/\tau$ with $L$ a standard logistic variable (the difference of
# two Gumbels). So $p_\tau(c_1) = \tau\, s(1 - s) / (c_1 c_2)$ with
# $s = \operatorname{sigmoid}(\tau u - \log(\pi_1/\pi_2))$, and $p_\tau(x)$ is a
# one-dimensional integral over $L$, which we compute by quadrature.

# %%
tau = 0.5
relaxed = GumbelSoftmaxMixture(locs, scales, logits, temperature=tau)
log_ratio = (logits[0] - logits[1]).item()

# (2) the Concrete factor against the logistic closed form, on a grid of u.
u = torch.linspace(-12, 12, 401, dtype=dtype)
log_c = torch.stack([torch.nn.functional.logsigmoid(u), torch.nn.functional.logsigmoid(-u)], -1)
x0 = torch.zeros(len(u), 1, dtype=dtype)
c = log_c.exp()
cond = torch.distributions.Normal(c @ locs[:, 0], c @ scales[:, 0])
library = relaxed.joint_log_prob(x0, log_c) - cond.log_prob(x0[:, 0])
t = tau * u - log_ratio
logistic = math.log(tau) + torch.nn.functional.logsigmoid(t) + torch.nn.functional.logsigmoid(-t)
closed = logistic - log_c.sum(-1)
print(
    f"Concrete density (eq. 2) vs logistic closed form: max |diff| = "
    f"{(library - closed).abs().max().item():.2e}"
)


# (3) the relaxed marginal by quadrature over v = logistic CDF of L (midpoint rule).
def relaxed_marginal(x, tau, nodes=20_000):
    v = (torch.arange(nodes, dtype=dtype) + 0.5) / nodes
    c1 = torch.sigmoid((log_ratio + torch.logit(v)) / tau)  # [V]
    weights = torch.stack([c1, 1 - c1], -1)
    normal = torch.distributions.Normal(weights @ locs[:, 0], weights @ scales[:, 0])
    return normal.log_prob(x[..., None]).exp().mean(-1)  # average over v: [X]


xs = torch.linspace(-6, 6, 601, dtype=dtype)
dx = (xs[1] - xs[0]).item()
p_exact = relaxed.log_prob(xs[:, None]).exp()
p_relaxed = relaxed_marginal(xs, tau)
with torch.no_grad():
    p_nested = {m: relaxed.relaxed_log_prob(xs[:, None], num_samples=m).exp() for m in (16, 1024)}
print(
    f"integral over x: mixture {p_exact.sum().item() * dx:.4f}, "
    f"relaxed marginal (quadrature) {p_relaxed.sum().item() * dx:.4f}"
)

# %% [markdown]
# The joint density must integrate to one over $(c_1, x)$; so must its $x$-marginal match the
# quadrature of $p_\tau(x)$ when we integrate `joint_log_prob` over $c_1$ numerically
# (in $u$, with the Jacobian $dc_1/du = c_1 c_2$):

# %%
uu = torch.linspace(-60, 60, 2401, dtype=dtype)
du = (uu[1] - uu[0]).item()
log_cc = torch.stack([torch.nn.functional.logsigmoid(uu), torch.nn.functional.logsigmoid(-uu)], -1)
xg = torch.linspace(-6, 6, 241, dtype=dtype)
joint = relaxed.joint_log_prob(
    xg[:, None, None].expand(-1, len(uu), 1), log_cc.expand(len(xg), -1, -1)
)  # [X, U]
density_u = (joint + log_cc.sum(-1)).exp()  # density in (u, x)
marginal_from_joint = density_u.sum(-1) * du
total = marginal_from_joint.sum().item() * (xg[1] - xg[0]).item()
gap = (marginal_from_joint - relaxed_marginal(xg, tau)).abs().max().item()
print(
    f"integral of the joint density: {total:.4f}; "
    f"max |x-marginal of the joint - quadrature p_tau| = {gap:.2e}"
)

# %% [markdown]
# Which density belongs to which draws? A Kolmogorov-Smirnov test of draws against each
# candidate CDF answers it: relaxed draws match $p_\tau$ and not the mixture; exact draws
# match the mixture.

# %%
num_ks = 2000 if smoke_test else 20000
with torch.no_grad():
    relaxed_draws = relaxed.rsample((num_ks,))[:, 0].numpy()
    exact_draws = DiagNormalMixture(locs, scales, logits).rsample((num_ks,))[:, 0].numpy()
    st_draws = GumbelSoftmaxMixture(locs, scales, logits, temperature=tau, straight_through=True)
    st_draws = st_draws.rsample((num_ks,))[:, 0].numpy()
grid_np = xs.numpy()


def cdf_from(p):
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (p[1:] + p[:-1]) * dx)])
    return lambda x: np.interp(x, grid_np, cdf / cdf[-1])


cdf_mixture, cdf_relaxed = cdf_from(p_exact.numpy()), cdf_from(p_relaxed.numpy())
print(f"Kolmogorov-Smirnov p-values ({num_ks} draws; tau = {tau}):")
for draws_name, draws in (
    ("relaxed", relaxed_draws),
    ("exact", exact_draws),
    ("straight-through", st_draws),
):
    p_mix = stats.kstest(draws, cdf_mixture).pvalue
    p_rel = stats.kstest(draws, cdf_relaxed).pvalue
    print(f"  {draws_name:>16} draws vs mixture: {p_mix:.3g}   vs relaxed marginal: {p_rel:.3g}")

# %% [markdown]
# ### The bias of the nested estimate, and three entropies
#
# `relaxed_log_prob` averages $M$ Gaussians inside the logarithm: its mean is below
# $\log p_\tau(x)$ by roughly $\operatorname{Var}/(2 M p_\tau^2)$, a $1/M$ decay. We measure the
# bias at a point between the modes, where it is largest.
#
# Which entropy a maximum-entropy objective computes matters as well: a sampler that returns
# the pair $(c, x)$ invites a *joint* entropy. The three candidates differ: $H(q)$ of the
# mixture, $H(p_\tau)$ of the relaxed marginal (the entropy of the relaxed draws), and
# $H(c, x) = H(c) + H(x \mid c)$, where $H(c)$ is a differential entropy on the simplex
# (it can be very negative at small $\tau$).

# %%
point = torch.tensor([[-0.5]], dtype=dtype)
truth_at_point = relaxed_marginal(point[:, 0], tau).log().item()
calls = 100 if smoke_test else 2000
ms = [4, 16, 64, 256, 1024]
nested_bias = {}
with torch.no_grad():
    for m in ms:
        values = torch.stack(
            [relaxed.relaxed_log_prob(point, num_samples=m)[0] for _ in range(calls)]
        )
        nested_bias[m] = (
            values.mean().item() - truth_at_point,
            values.std().item() / math.sqrt(calls),
        )
# The predicted bias -Var / (2 M p^2), Var the variance over c of the Gaussian at the point
# (by the same quadrature over v as above).
v = (torch.arange(20_000, dtype=dtype) + 0.5) / 20_000
c1 = torch.sigmoid((log_ratio + torch.logit(v)) / tau)
w = torch.stack([c1, 1 - c1], -1)
gauss_at_point = (
    torch.distributions.Normal(w @ locs[:, 0], w @ scales[:, 0]).log_prob(point[0]).exp()
)
relative_var = (gauss_at_point.var() / gauss_at_point.mean() ** 2).item()
for m, (bias_m, se) in nested_bias.items():
    print(
        f"M = {m:>5}: E[relaxed_log_prob] - log p_tau = {bias_m:+.5f} ± {se:.5f}"
        f"   (predicted {-relative_var / (2 * m):+.5f})"
    )

num_h = 5000 if smoke_test else 50000
with torch.no_grad():
    h_mixture = -relaxed.log_prob(relaxed.sample((num_h,))).mean().item()
    log_p_rel = torch.as_tensor(np.log(np.interp(relaxed_draws, grid_np, p_relaxed.numpy())))
    h_relaxed = -log_p_rel.mean().item()
    pairs = relaxed.rsample_with_weights((num_h,))
    h_joint = -relaxed.joint_log_prob(*pairs).mean().item()
print(
    f"entropies (nats): mixture H(q) = {h_mixture:.3f}, relaxed marginal H(p_tau) = "
    f"{h_relaxed:.3f}, joint H(c, x) = {h_joint:.3f}"
)

# %% [markdown]
# ## Plot: the three densities
#
# First: the mixture density and the relaxed marginal with histograms of exact and relaxed
# draws, and the nested estimate with $M = 16$ and $M = 1024$. Second: the joint density of
# $(c_1, x)$ with relaxed pairs on top: for each $c_1$ a Gaussian whose mean and scale slide
# from component 2 ($c_1 = 0$) to component 1 ($c_1 = 1$); the Concrete density piles up near
# the corners at low $\tau$. Third: the relaxed marginal over temperatures: as $\tau \to 0$
# it approaches the mixture. Last: the bias of the nested estimate against $M$, with the
# predicted $1/M$ law.

# %%
fig, axes = plt.subplots(1, 4, figsize=(21, 4.4))
ax = axes[0]
ax.hist(exact_draws, bins=120, density=True, alpha=0.3, color="tab:blue", label="exact draws")
ax.hist(relaxed_draws, bins=120, density=True, alpha=0.3, color="tab:red", label="relaxed draws")
ax.plot(xs, p_exact, color="tab:blue", label="mixture q(x) (log_prob)")
ax.plot(xs, p_relaxed, color="tab:red", label=f"relaxed p_τ(x), τ={tau} (quadrature)")
for m, style in ((16, ":"), (1024, "--")):
    ax.plot(xs, p_nested[m], style, color="k", lw=1, label=f"relaxed_log_prob, M={m}")
ax.set(xlabel="x", ylabel="density", title="mixture vs relaxed marginal")
ax.legend(fontsize=7)

ax = axes[1]
c1_grid = torch.linspace(0.002, 0.998, 250, dtype=dtype)
log_c_grid = torch.stack([c1_grid.log(), (1 - c1_grid).log()], -1)
xj = torch.linspace(-5, 5, 250, dtype=dtype)
joint_grid = relaxed.joint_log_prob(
    xj[:, None, None].expand(-1, len(c1_grid), 1), log_c_grid.expand(len(xj), -1, -1)
)
mesh = ax.pcolormesh(c1_grid, xj, joint_grid.clamp(min=-8), shading="auto", cmap="viridis")
fig.colorbar(mesh, ax=ax, label="log p(c₁, x) (clipped at -8)")
z_pairs, log_w_pairs = pairs
ax.scatter(log_w_pairs[:400, 0].exp(), z_pairs[:400, 0], s=2, color="w", alpha=0.6)
ax.set(xlabel="c₁ (relaxed weight of component 1)", ylabel="x", title="joint density (eq. 2)")

ax = axes[2]
ax.plot(xs, p_exact, color="k", lw=2, label="mixture (τ → 0)")
for t_plot in (0.1, 0.3, 1.0, 3.0):
    ax.plot(xs, relaxed_marginal(xs, t_plot), label=f"p_τ, τ={t_plot:g}")
ax.set(xlabel="x", ylabel="density", title="relaxed marginal over temperatures")
ax.legend(fontsize=8)

ax = axes[3]
ax.errorbar(
    ms,
    [-nested_bias[m][0] for m in ms],
    yerr=[2 * nested_bias[m][1] for m in ms],
    marker="o",
    capsize=3,
    label="measured (± 2 se)",
)
ax.plot(ms, [relative_var / (2 * m) for m in ms], "k--", label="Var / (2 M p²)")
ax.set(
    xscale="log",
    yscale="symlog",
    xlabel="M (weight draws per call)",
    title=f"Jensen bias of relaxed_log_prob at x = {point.item():g}",
)
ax.set_yscale("symlog", linthresh=1e-3)
ax.set_ylabel("log p_τ − E[relaxed_log_prob]")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out_dir / "reparameterizing_densities.png", dpi=90)
print(f"figure: {out_dir / 'reparameterizing_densities.png'}")
print(f"total time {time.perf_counter() - start_time:.1f} s")

# %% [markdown]
# ## Take-aways
#
# * For an objective under the mixture itself, the exact (implicit) `rsample` of
#   `DiagNormalMixture` is the unbiased choice; its weight gradient is the noisiest part.
# * Gumbel-softmax trades variance for bias, controlled by $\tau$; it is the right tool when
#   the relaxed model *is* the model (then score its draws with `joint_log_prob` or
#   `relaxed_log_prob`, never with `log_prob`).
# * Straight-through keeps exact draws and exact gradients for means and scales, at the price
#   of a biased weight gradient.
# * `benchmarks/gradient_estimators.py` repeats the bias and variance measurement in two and
#   sixteen dimensions.
#
# ## References
#
# * M. Figurnov, S. Mohamed, A. Mnih. Implicit Reparameterization Gradients. 2018.
#   arXiv:1805.08498.
# * E. Jang, S. Gu, B. Poole. Categorical Reparameterization with Gumbel-Softmax. 2017.
#   arXiv:1611.01144.
# * C. Maddison, A. Mnih, Y. W. Teh. The Concrete Distribution. 2017. arXiv:1611.00712.
