# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # A variational autoencoder whose encoder is a conditional mixture
#
# A variational autoencoder (VAE; Kingma & Welling 2014, arXiv:1312.6114) fits a decoder
# $p_\theta(x \mid z)$ with a prior $p(z) = \mathcal{N}(0, I)$ and, alongside it, an encoder
# $q_\phi(z \mid x)$: a network that maps an image to an approximate posterior over its latent
# code. The encoder is almost always a diagonal Gaussian. `nn.GMM(latent_dim, num_components,
# context_dim=64)` is a drop-in alternative: called on a batch of images it returns one
# `DiagNormalMixture` per image (batch shape `(N,)`, event shape `(latent_dim,)`), with an exact
# `log_prob` and exact pathwise `rsample`, so that Pyro's `Trace_ELBO` trains it like any
# reparameterized guide, and `RaoBlackwellELBO` better still: it sums each image's component
# out.
#
# Model → Guide → Fit → Check → Plot, on scikit-learn's 8x8 digits, with the two encoders
# trained the same way and scored on held-out digits by the importance-weighted bound (IWAE;
# Burda, Grosse & Salakhutdinov 2016, arXiv:1509.00519). With a 2-D latent the exact posterior
# $p(z \mid x) \propto p(x \mid z)\, p(z)$ of one image can be drawn on a grid and compared
# with the encoder's $q(z \mid x)$.
#
# Run with `CI=1` for a few-step smoke run; figures go to `tutorials/output/`.

# %%
import math
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from pyro_mixflow.infer import RaoBlackwellELBO
from pyro_mixflow.nn import GMM

smoke_test = "CI" in os.environ
steps = 20 if smoke_test else 4000
num_importance = 10 if smoke_test else 1000  # S, importance samples per held-out digit
eval_every = 10 if smoke_test else 250
seeds = (0,) if smoke_test else (0, 1, 2)
latent_dim, num_components, hidden_dims, batch_size = 2, 5, (128, 128), 128
out_dir = Path(__file__).resolve().parent / "output" if "__file__" in globals() else Path("output")
out_dir.mkdir(parents=True, exist_ok=True)
# Small networks and batches: one thread is fastest, and leaves the other cores alone.
torch.set_num_threads(1)
torch.set_flush_denormal(True)
start_time = time.perf_counter()

# %% [markdown]
# ## Data: binarized digits
# 1797 images of 8x8 pixels with values 0..16, binarized at $> 8$. A Bernoulli likelihood is
# a normalized distribution only over $\{0, 1\}^{64}$: used on grey values $v / 16$, its
# "log-likelihood" is not the log-density of anything (the continuous Bernoulli of
# Loaiza-Ganem & Cunningham 2019, arXiv:1907.06845, is the normalized fix), so its nats could
# not be read as $\log p(x)$. Binarized, $\log p(x)$ is the log-probability of one of the
# $2^{64}$ binary images, and the bounds below are true bounds on it. 20% of the digits are
# held out (stratified by class, fixed seed).

# %%
digits = load_digits()
images = torch.tensor(digits.data > 8, dtype=torch.float32)  # [1797, 64]
labels = torch.tensor(digits.target)
train_index, test_index = train_test_split(
    torch.arange(len(images)), test_size=0.2, random_state=0, stratify=labels
)
x_train, x_test, y_test = images[train_index], images[test_index], labels[test_index]
num_train = len(x_train)
print(f"{num_train} training digits, {len(x_test)} held out; {x_train.mean():.3f} of pixels on")

# %% [markdown]
# ## Model
# $z_i \sim \mathcal{N}(0, I_2)$ and $x_i \mid z_i \sim \text{Bernoulli}(\text{logits} =
# f_\theta(z_i))$, 64 independent pixels, with the decoder $f_\theta$ an MLP `[2, 128, 128,
# 64]`. The plate subsamples a mini-batch of training indices and scales its log-likelihood by
# `num_train / batch_size`, so each step is an unbiased estimate of the full-data ELBO
# (`poutine.scale(scale=1 / num_train)` then makes it an ELBO per digit).


# %%
def make_decoder() -> nn.Module:
    return nn.Sequential(
        nn.Linear(latent_dim, hidden_dims[0]),
        nn.ELU(),
        nn.Linear(hidden_dims[0], hidden_dims[1]),
        nn.ELU(),
        nn.Linear(hidden_dims[1], 64),
    )


def model(x, index, decoder):
    pyro.module("decoder", decoder)
    with pyro.plate("data", num_train, subsample=index), poutine.scale(scale=1 / num_train):
        batch = x[index]
        prior = dist.Normal(batch.new_zeros(len(index), latent_dim), 1.0).to_event(1)
        z = pyro.sample("z", prior)
        pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=batch)


def log_joint(decoder, x, z):
    """log p(x, z) for images x [B, 64] (or [64]) and codes z [*S, B, 2]: shape [*S, B]."""
    logits = decoder(z)
    log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
    return log_lik.sum(-1) + dist.Normal(0.0, 1.0).log_prob(z).sum(-1)


# %% [markdown]
# ## Guide: two encoders
# Both map the 64 pixels to a distribution over $z$, through MLPs of the same depth and
# activation (ELU, `nn.GMM`'s):
#
# * **mixture**: `GMM(2, num_components=5, context_dim=64, hidden_dims=(128, 128))`: the
#   network outputs the logits, means and log-scales of 5 diagonal Gaussians,
#   $q(z \mid x) = \sum_k \pi_k(x)\, \mathcal{N}(z; \mu_k(x), \operatorname{diag}
#   \sigma_k^2(x))$;
# * **Normal**: the usual $q(z \mid x) = \mathcal{N}(z; \mu(x), \operatorname{diag}
#   \sigma^2(x))$ with $\sigma = \operatorname{softplus}(\cdot)$. With the same widths it
#   would have fewer parameters (4 outputs instead of 25), so its hidden layers are widened
#   to the smallest width that gives it at least as many parameters as the mixture's.
#
# The guide draws each image's code from its encoder inside the same subsampled plate.


# %%
class NormalEncoder(nn.Module):
    """q(z | x) = Normal(loc(x), softplus(s(x))), independent coordinates."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.network = nn.Sequential(
            nn.Linear(64, width),
            nn.ELU(),
            nn.Linear(width, width),
            nn.ELU(),
            nn.Linear(width, 2 * latent_dim),
        )

    def forward(self, x):
        loc, raw_scale = self.network(x).chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(raw_scale)).to_event(1)


def guide(x, index, encoder):
    pyro.module("encoder", encoder)
    with pyro.plate("data", num_train, subsample=index), poutine.scale(scale=1 / num_train):
        pyro.sample("z", encoder(x[index]))


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_encoder(name: str) -> nn.Module:
    if name == "mixture":
        return GMM(latent_dim, num_components, context_dim=64, hidden_dims=hidden_dims)
    return NormalEncoder(normal_width)


mixture_size = count(GMM(latent_dim, num_components, context_dim=64, hidden_dims=hidden_dims))
normal_width = next(
    w for w in range(hidden_dims[0], 1000) if count(NormalEncoder(w)) >= mixture_size
)
encoder_names = ("mixture", "Normal")
sizes = {name: count(make_encoder(name)) for name in encoder_names}
print(
    f"parameters: mixture encoder {sizes['mixture']:,} (widths {hidden_dims}), "
    f"Normal encoder {sizes['Normal']:,} (widths ({normal_width}, {normal_width})), "
    f"decoder {count(make_decoder()):,}"
)

# %% [markdown]
# ## Fit
# `SVI` with mini-batches of 128 training digits; each encoder with its estimator of the ELBO:
#
# * **Normal**: `Trace_ELBO`, one reparameterized draw per image.
# * **mixture**: `RaoBlackwellELBO`, which sums each image's component index out: every image
#   draws one code from each of its 5 components, the decoder runs on all 5 (5 rows per
#   image), and each row's terms are weighted by that image's mixture weights. The weights
#   then get their exact gradient. With `Trace_ELBO` they only get the pathwise one, through
#   the regions between the components, which is heavy-tailed there (see
#   `DiagNormalMixture`'s docstring). While writing this tutorial (decayed schedule, seed 0,
#   4000 steps), `Trace_ELBO` left the mixture VAE at a held-out ELBO of −19.46 and an IWAE
#   bound of −18.97 nats per digit, `RaoBlackwellELBO` took it to −18.88 and −18.50, for
#   1.4 times the training time. (Over three seeds, the mixture VAE trained with
#   `Trace_ELBO` had tied with the Normal VAE in exact held-out $\log p(x)$: $-0.07 \pm
#   0.06$ nats per digit at the constant rate, $0.00 \pm 0.05$ decayed.)
#
# Both losses are scaled by `1 / num_train` (`poutine.scale` in model and guide), so that
# `svi.step` returns $-$ELBO per digit. The optimizer is Pyro's `ClippedAdam` (its default
# clipping at 10 per gradient entry) under two schedules, both run for both encoders:
#
# * **constant**: learning rate $10^{-3}$ throughout, the usual VAE recipe;
# * **decayed**: $3 \cdot 10^{-3}$ decaying geometrically to $3 \cdot 10^{-5}$ at the last step.
#
# Both encoders start from the same decoder weights (same seed) and see the same mini-batches.
# Every `eval_every` steps the held-out ELBO is estimated with 10 draws per digit.


# %%
schedules = {
    "constant": {"lr": 1e-3},
    "decayed": {"lr": 3e-3, "lrd": 0.01 ** (1 / steps)},
}
estimators = {"mixture": lambda: RaoBlackwellELBO(max_plate_nesting=1), "Normal": Trace_ELBO}


@torch.no_grad()
def log_weights(encoder, decoder, x, num_samples, chunk=100):
    """log p(x, z_s) - log q(z_s | x) for z_s ~ q(z | x): shape [S, B]."""
    q = encoder(x)
    blocks = []
    for start in range(0, num_samples, chunk):
        z = q.sample((min(chunk, num_samples - start),))  # [s, B, 2]
        blocks.append(log_joint(decoder, x, z) - q.log_prob(z))
    return torch.cat(blocks)


def train(name: str, schedule: str, seed: int) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    decoder, encoder = make_decoder(), make_encoder(name)  # same decoder start for both
    batches = torch.Generator().manual_seed(seed)  # same mini-batches for both
    svi = SVI(
        lambda x, index: model(x, index, decoder),
        lambda x, index: guide(x, index, encoder),
        pyro.optim.ClippedAdam(schedules[schedule]),
        estimators[name](),
    )
    losses, curve = [], []
    clock = time.perf_counter()
    for step in range(1, steps + 1):
        index = torch.randperm(num_train, generator=batches)[:batch_size]
        losses.append(svi.step(x_train, index))  # -ELBO per training digit
        if step % eval_every == 0 or step == steps:
            curve.append((step, log_weights(encoder, decoder, x_test, 10).mean().item()))
    seconds = time.perf_counter() - clock
    return {"decoder": decoder, "encoder": encoder, "losses": losses, "curve": curve, "s": seconds}


runs = {
    (name, sched, seed): train(name, sched, seed)
    for seed in seeds
    for sched in schedules
    for name in encoder_names
}
for (name, sched, seed), run in runs.items():
    print(f"{name:7} encoder, {sched:8} schedule, seed {seed}: {steps} steps in {run['s']:4.1f} s")

# %% [markdown]
# ## Check: held-out log-likelihood by the importance-weighted bound
# For each held-out digit, $S$ draws $z_s \sim q(z \mid x)$ give the log-weights
# $\log w_s = \log p(x, z_s) - \log q(z_s \mid x)$, and
#
# $$\log p(x) \ \ge\ \mathcal{L}_S = E\Big[\log \tfrac{1}{S} \textstyle\sum_s w_s\Big]
# \ \ge\ \mathcal{L}_1 = E[\log w] = \text{ELBO}.$$
#
# $\mathcal{L}_S$ tightens towards $\log p(x)$ as $S$ grows; at $S = 1000$ it scores mainly
# the trained model $p_\theta$ (the encoder only needs to cover the posterior), while the
# ELBO also pays $\mathrm{KL}(q \,\|\, p(z \mid x))$ for the encoder's misfit.
#
# With a 2-D latent, $\log p(x) = \log \int p(x \mid z)\, p(z)\, dz$ itself can be
# computed by quadrature: a 601 x 601 grid over $[-6, 6]^2$ (spacing 0.02; while writing this
# tutorial, a grid 4 times finer and a box $[-8, 8]^2$ changed the mean by less than
# $10^{-4}$ nats). So the table also gives the exact held-out log-likelihood of each trained
# model, how far the IWAE bound falls short of it, and exact − ELBO, the mean of
# $\mathrm{KL}(q \,\|\, p(z \mid x))$: how well the encoder fits each digit's posterior.
#
# All are in nats per digit, higher is better, ± one standard error over the held-out digits,
# of each digit's score averaged over the seeds (in brackets, the range of the seeds' means).
# "ESS" is the relative effective sample size $(\sum w)^2 / (S \sum
# w^2)$ of the importance sampling, averaged over digits (1 when $q$ is the exact posterior).
# The differences between encoders are paired over digits (same digits, same $S$, same seed),
# with each seed's difference in brackets; "best of each" takes each encoder's schedule with
# the higher held-out ELBO, a choice made on the held-out digits themselves, so slightly
# flattering to both.

# %%
grid_axis = torch.linspace(-6, 6, 201 if smoke_test else 601)
grid = torch.stack(torch.meshgrid(grid_axis, grid_axis, indexing="xy"), -1)  # [G, G, 2]


@torch.no_grad()
def exact_log_evidence(decoder, x, chunk=20_000):
    """log p(x) by quadrature on `grid`, for images x [B, 64]: shape [B]."""
    total = torch.full((len(x),), -math.inf)
    for z in grid.reshape(-1, 2).split(chunk):
        logits = decoder(z)  # [G, 64]
        log_on, log_off = F.logsigmoid(logits), F.logsigmoid(-logits)  # log P(pixel = 1 or 0)
        log_lik = x @ log_on.T + (1 - x) @ log_off.T  # [B, G]
        log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)  # [G]
        total = torch.logaddexp(total, (log_lik + log_prior).logsumexp(-1))
    return total + 2 * math.log(grid_axis[1] - grid_axis[0])


scores = {}
for key, run in runs.items():
    pyro.set_rng_seed(100 + key[-1])
    w = log_weights(run["encoder"], run["decoder"], x_test, num_importance)  # [S, B]
    iwae = w.logsumexp(0) - math.log(num_importance)  # [B]
    ess = (2 * w.logsumexp(0) - (2 * w).logsumexp(0)).exp() / num_importance
    exact = exact_log_evidence(run["decoder"], x_test)
    scores[key] = {"iwae": iwae, "elbo": w.mean(0), "exact": exact, "ess": ess}


def mean_se(values: torch.Tensor) -> str:
    return f"{values.mean():.2f} ± {values.std() / len(values) ** 0.5:.2f}"


def summary(name: str, sched: str, key: str) -> str:
    """Mean ± SE over digits of the seed-averaged score, and the range of the seeds' means."""
    per_seed = torch.stack([scores[name, sched, seed][key] for seed in seeds])  # [seeds, B]
    text = mean_se(per_seed.mean(0))
    if len(seeds) > 1:
        means = per_seed.mean(1)
        text += f" ({means.min():.2f} to {means.max():.2f})"
    return text


def difference(mixture_sched: str, normal_sched: str, key: str) -> str:
    """Mixture − Normal, paired over digits and seeds; the seeds' differences in brackets."""
    gaps = torch.stack(
        [
            scores["mixture", mixture_sched, seed][key] - scores["Normal", normal_sched, seed][key]
            for seed in seeds
        ]
    )  # [seeds, B]
    text = mean_se(gaps.mean(0))
    if len(seeds) > 1:
        text += " (" + ", ".join(f"{gap:+.2f}" for gap in gaps.mean(1)) + ")"
    return text


def average(name: str, sched: str, value) -> float:
    return sum(float(value(scores[name, sched, seed])) for seed in seeds) / len(seeds)


rows = [
    f"| encoder | schedule | parameters | IWAE bound, S = {num_importance} | held-out ELBO | "
    "exact log p(x) | exact − IWAE | exact − ELBO | ESS | training s |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
for sched in schedules:
    for name in encoder_names:
        iwae_short = average(name, sched, lambda s: (s["exact"] - s["iwae"]).mean())
        kl = average(name, sched, lambda s: (s["exact"] - s["elbo"]).mean())
        ess = average(name, sched, lambda s: s["ess"].mean())
        seconds = sum(runs[name, sched, seed]["s"] for seed in seeds) / len(seeds)
        rows.append(
            f"| {name} | {sched} | {sizes[name]:,} | {summary(name, sched, 'iwae')} | "
            f"{summary(name, sched, 'elbo')} | {summary(name, sched, 'exact')} | "
            f"{iwae_short:.3f} | {kl:.2f} | {ess:.3f} | {seconds:.0f} |"
        )
best = {
    name: max(schedules, key=lambda sched, n=name: average(n, sched, lambda s: s["elbo"].mean()))
    for name in encoder_names
}
comparisons = [(sched, sched, sched) for sched in schedules]
comparisons.append((f"best of each: {best['mixture']} − {best['Normal']}", *best.values()))
for title, mixture_sched, normal_sched in comparisons:
    rows.append(
        f"| mixture − Normal | {title} | | {difference(mixture_sched, normal_sched, 'iwae')} | "
        f"{difference(mixture_sched, normal_sched, 'elbo')} | "
        f"{difference(mixture_sched, normal_sched, 'exact')} | | | | |"
    )

# %% [markdown]
# ## Plot: training curves
# Left, the training loss ($-$ELBO per training digit, a running mean over 50 steps); right,
# the held-out ELBO along training (10 draws per digit); one line per seed.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for (name, sched, seed), run in runs.items():
    style = {"color": "C0" if name == "mixture" else "C1", "ls": "-" if sched == "decayed" else ":"}
    label = f"{name} encoder, {sched}" if seed == seeds[0] else None
    losses = torch.tensor(run["losses"])
    window = min(50, len(losses))
    smooth = losses.unfold(0, window, 1).mean(-1)
    axes[0].plot(range(window, len(losses) + 1), smooth, **style, label=label)
    step, elbo = zip(*run["curve"], strict=True)
    axes[1].plot(step, elbo, **style, label=label)
axes[0].set_ylabel("training loss, nats per digit")
axes[1].set_ylabel("held-out ELBO, nats per digit")
for ax in axes:
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
axes[0].set_ylim(top=sum(runs["Normal", "decayed", seeds[0]]["losses"][:50]) / 50)
fig.tight_layout()
fig.savefig(out_dir / "vae_mixture_encoder_training.png", dpi=90)

# %% [markdown]
# ## Plot: the latent codes of the held-out digits
# The mean of $q(z \mid x)$ of each held-out digit, coloured by its class (decayed schedule,
# seed 0, as in the next figure).

# %%
shown_runs = {name: runs[name, "decayed", seeds[0]] for name in encoder_names}
shown_scores = {name: scores[name, "decayed", seeds[0]] for name in encoder_names}
fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharex=True, sharey=True)
for ax, name in zip(axes, encoder_names, strict=True):
    with torch.no_grad():
        codes = shown_runs[name]["encoder"](x_test).mean
    points = ax.scatter(*codes.T, c=y_test, cmap="tab10", s=8, vmin=-0.5, vmax=9.5)
    ax.set_title(f"{name} encoder: mean of q(z | x)")
    ax.set_xlabel("z₁")
axes[0].set_ylabel("z₂")
fig.colorbar(points, ax=axes, ticks=range(10), label="digit")
fig.savefig(out_dir / "vae_mixture_encoder_latents.png", dpi=90)

# %% [markdown]
# ## Plot: the encoder's q(z | x) against the exact posterior
# $p(z \mid x) = p(x, z) / p(x)$, with $p(x)$ from the quadrature above. The quadrature grid
# finds where the posterior's mass lies (99.99% of it) and draws of $q$ where the encoder's
# does (99%); a fine 200 x 200 grid over the box that holds both gives the contours. Two
# held-out digits: the one with the median gap IWAE − ELBO under the mixture VAE (typical),
# and the one with the largest gap under the Normal VAE (where a Gaussian fits worst). Each
# VAE's encoder is compared with its own model's posterior. One IWAE estimate with $S = 1000$
# can land above the exact $\log p(x)$ (the bound holds in expectation): where $q$ covers the
# posterior only with a low-weight component, a few draws carry most of the weight, and the
# estimate is noisy.


# %%
@torch.no_grad()
def posterior_on_grid(decoder, encoder, x, log_evidence, size=200):
    """Densities of p(z | x) and q(z | x) on a fine grid around both: [size, size] each."""
    log_p = log_joint(decoder, x, grid)  # [G, G]
    mass = (log_p - log_p.logsumexp((0, 1))).exp()
    ranked = mass.flatten().sort(descending=True).values
    keep = grid[mass >= ranked[int((ranked.cumsum(0) < 0.9999).sum())]]  # [M, 2]
    draws = encoder(x.unsqueeze(0)).sample((2000,))[:, 0]  # [2000, 2]
    points = torch.cat([keep, draws.quantile(torch.tensor([0.005, 0.995]), 0)])
    low, high = points.min(0).values - 0.1, points.max(0).values + 0.1
    axes_z = [torch.linspace(low[i], high[i], size) for i in range(2)]
    fine = torch.stack(torch.meshgrid(*axes_z, indexing="xy"), -1)  # [size, size, 2]
    posterior = (log_joint(decoder, x, fine) - log_evidence).exp()
    q = encoder(x.unsqueeze(0)).log_prob(fine.unsqueeze(-2)).squeeze(-1).exp()
    return fine, posterior, q


gap = {name: shown_scores[name]["iwae"] - shown_scores[name]["elbo"] for name in encoder_names}
picks = [int(gap["mixture"].argsort()[len(x_test) // 2]), int(gap["Normal"].argmax())]
fig, axes = plt.subplots(2, 2, figsize=(10, 9))
for column, pick in enumerate(picks):
    for row, name in enumerate(encoder_names):
        run, s, ax = shown_runs[name], shown_scores[name], axes[row, column]
        fine, posterior, q = posterior_on_grid(
            run["decoder"], run["encoder"], x_test[pick], s["exact"][pick]
        )
        # Levels at fractions of each density's peak: no contour traces float underflow.
        levels = torch.tensor([0.01, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0])
        ax.contourf(*fine.unbind(-1), posterior, levels=levels * posterior.max(), cmap="Greys")
        ax.contour(*fine.unbind(-1), q, levels=levels[:-1] * q.max(), cmap="viridis")
        ax.set_title(
            f"{name} VAE, held-out digit {pick} (a {int(y_test[pick])})\n"
            f"log p(x) {s['exact'][pick]:.2f}, IWAE {s['iwae'][pick]:.2f}, "
            f"ELBO {s['elbo'][pick]:.2f}",
            fontsize=9,
        )
        ax.set_xlabel("z₁")
        ax.set_ylabel("z₂")
        inset = ax.inset_axes((0.78, 0.78, 0.2, 0.2))
        inset.imshow(x_test[pick].view(8, 8), cmap="Greys")
        inset.set_axis_off()
fig.suptitle("exact posterior p(z | x) (grey, filled) and the encoder's q(z | x) (lines)")
fig.tight_layout()
fig.savefig(out_dir / "vae_mixture_encoder_posteriors.png", dpi=90)

# %% [markdown]
# ## Results
# In the full run (3 seeds, 4000 steps each), **the mixture VAE is better, under both
# schedules**:
#
# * The trained model: the exact held-out $\log p(x)$ is higher by $0.32 \pm 0.07$ nats per
#   digit at the constant rate and $0.36 \pm 0.08$ decayed (paired over digits; the seeds'
#   differences range from $-0.01$ to $+0.64$). The encoder's posteriors shape the decoder:
#   a decoder trained with a better fitting $q$ is pushed less towards posteriors that a
#   Gaussian can fit.
# * The encoder: $\mathrm{KL}(q \,\|\, p(z \mid x))$ (exact − ELBO) is 0.78 against 0.98
#   nats at the constant rate and 0.38 against 0.74 decayed, and the IWAE bound falls 0.056
#   and 0.007 nats short of $\log p(x)$, against 0.137 and 0.078 for the Normal encoder.
#   The held-out ELBO is higher by 0.52 and 0.72 nats.
# * The cost: 2.2 to 2.6 times the training time of the Normal VAE (5 decoder evaluations per
#   image and step instead of 1, on a machine shared with other jobs).
#
# The schedule matters as much as the encoder: the constant rate gives models about 0.4 nats
# better than the decayed one, for both. The figure above shows the amortization gap
# (Cremer, Li & Duvenaud 2018, arXiv:1801.03558) where the Normal VAE fits worst (right
# column, decayed schedule, seed 0): its encoder puts $q$ beside the posterior, 12 nats of
# ELBO below $\log p(x)$, while the mixture VAE's $q$ covers its own posterior of that digit
# (0.3 nats). The IWAE bound at $S = 1000$ is within 0.14 nats of the exact $\log p(x)$ here, so at
# this size the two scores agree.

# %%
print("\n".join(rows))
print(f"total run time {time.perf_counter() - start_time:.0f} s")
