"""`fit`: convergence, reproducibility, best-state restore, early stopping, and bad input."""

from __future__ import annotations

import copy
import math

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal

from pyro_mixflow import DiagNormalMixture
from pyro_mixflow.fitting import History, fit

matplotlib.use("Agg")


class Mixture(nn.Module):
    def __init__(self, locs, dtype=torch.float32):
        super().__init__()
        self.locs = nn.Parameter(torch.tensor(locs, dtype=dtype))
        self.log_scales = nn.Parameter(torch.zeros_like(self.locs))
        self.logits = nn.Parameter(torch.zeros(len(locs), dtype=dtype))

    def forward(self):
        return DiagNormalMixture(self.locs, self.log_scales.exp(), self.logits)


class Gaussian(nn.Module):
    """Diagonal Gaussian; ``noise`` > 0 jitters the mean with the global RNG at every call."""

    def __init__(self, dim=2, noise=0.0, dtype=torch.float32):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(dim, dtype=dtype))
        self.log_scale = nn.Parameter(torch.zeros(dim, dtype=dtype))
        self.noise = noise

    def forward(self):
        loc = self.loc + self.noise * torch.randn_like(self.loc)
        return Independent(Normal(loc, self.log_scale.exp()), 1)


def two_blobs(n, dtype=torch.float32):
    """Half the rows around (-2, 0), half around (2, 1), scale 0.5."""
    g = torch.Generator().manual_seed(123)
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=dtype)
    labels = torch.arange(n) % 2
    return means[labels] + 0.5 * torch.randn(n, 2, generator=g, dtype=dtype), means


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, expected):
    actual = model.state_dict()
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_recovers_mixture_means():
    n = 4000
    data, means = two_blobs(n)
    model = Mixture([[-1.0, 0.0], [1.0, 0.0]])
    history = fit(model, data, steps=400, lr=0.05, batch_size=256, seed=0, progress=False)
    first, last = np.mean(history.train_loss[:20]), np.mean(history.train_loss[-20:])
    assert last < first - 0.5
    assert history.val_loss[-1] < history.val_loss[0]
    assert history.best_step == history.val_steps[int(np.argmin(history.val_loss))]
    locs = model.locs.detach()
    locs = locs[locs[:, 0].argsort()]
    # Standard error of a component mean from the training rows: sigma / sqrt(N_train / 2).
    n_train = n - round(0.1 * n)
    tolerance = 6 * 0.5 / math.sqrt(n_train / 2)
    assert (locs - means).abs().max() < tolerance, (locs, tolerance)
    torch.testing.assert_close(
        model.log_scales.detach().exp(), torch.full((2, 2), 0.5), atol=0.05, rtol=0
    )
    torch.testing.assert_close(
        model.logits.detach().softmax(-1), torch.full((2,), 0.5), atol=0.05, rtol=0
    )


def test_history_shape_and_defaults():
    data, _ = two_blobs(1000)
    history = fit(Gaussian(), data, steps=45, seed=0, progress=False)
    assert isinstance(history, History)
    assert len(history.train_loss) == 45
    # 900 training rows, batch 512: 2 steps per epoch < ceil(45 / 20) = 3, so once per epoch,
    # plus the last step.
    assert history.val_steps == [0, *range(2, 45, 2), 45]  # 0: the initial state
    assert not history.stopped_early
    assert history.seconds > 0
    assert "History(steps=45" in repr(history)
    history = fit(Gaussian(), data, epochs=3, batch_size=100, validation=None, progress=False)
    assert len(history.train_loss) == 3 * 10
    assert history.val_loss == [] and history.best_step is None and history.best_val_loss is None
    history = fit(Gaussian(), data[:10], validation=None, progress=False)
    assert len(history.train_loss) == 1000  # the default length


def test_reproducible_with_seed():
    data, _ = two_blobs(600)
    model = Gaussian(noise=0.1)  # samples from the global RNG inside the model
    runs = []
    for seed in (7, 7, 8):
        m = copy.deepcopy(model)
        torch.manual_seed(1000 + len(runs))  # the global state before fit must not matter
        history = fit(m, data, steps=30, batch_size=64, lr=0.01, seed=seed, progress=False)
        runs.append((history, state(m)))
    (h1, s1), (h2, s2), (h3, _) = runs
    assert h1.train_loss == h2.train_loss and h1.val_loss == h2.val_loss
    assert h1.val_steps == h2.val_steps and h1.best_step == h2.best_step
    for key in s1:
        assert torch.equal(s1[key], s2[key])
    assert h1.train_loss != h3.train_loss
    # Without `seed`, torch's global seed decides.
    losses = []
    for _ in range(2):
        torch.manual_seed(5)
        losses.append(fit(copy.deepcopy(model), data, steps=5, progress=False).train_loss)
    assert losses[0] == losses[1]


def test_restores_best_state():
    data, _ = two_blobs(1000)
    model = Mixture([[-1.0, 0.0], [1.0, 0.0]])
    snapshots = {}

    def perturb_after_step_20(step, history):
        snapshots[step] = state(model)
        if step == 20:
            with torch.no_grad():
                model.locs.add_(5.0)  # far from the data: later evaluations are much worse

    history = fit(
        model, data, steps=40, lr=0.01, eval_every=10, seed=0, progress=False,
        callback=perturb_after_step_20,
    )  # fmt: skip
    assert history.val_steps == [0, 10, 20, 30, 40]
    assert history.best_step in (10, 20)
    assert history.val_loss[-1] > history.best_val_loss + 1.0
    assert history.best_val_loss == min(history.val_loss)
    assert_state_equal(model, snapshots[history.best_step])


def test_interrupted_run_keeps_best_state_and_mode():
    data, _ = two_blobs(1000)
    model = Mixture([[-1.0, 0.0], [1.0, 0.0]])
    model.eval()
    snapshots = {}

    class Interrupt(Exception):
        pass

    def perturb_then_interrupt(step, history):
        snapshots[step] = state(model)
        if step == 20:
            with torch.no_grad():
                model.locs.add_(5.0)
        if step == 30:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(
            model, data, steps=40, lr=0.01, eval_every=10, seed=0, progress=False,
            callback=perturb_then_interrupt,
        )  # fmt: skip
    assert_state_equal(model, snapshots[20])
    assert not model.training


def test_early_stopping_with_patience():
    data, _ = two_blobs(500)
    calls = []
    history = fit(
        Gaussian(), data, steps=100, eval_every=5, patience=2, schedule=lambda t: 0.0,
        seed=0, progress=False, callback=lambda step, h: calls.append(step),
    )  # fmt: skip
    # lr = 0: the loss never improves on the initial state's (step 0).
    assert history.stopped_early
    assert history.val_steps == [0, 5, 10] and calls == [5, 10]
    assert len(history.train_loss) == 10
    assert history.best_step == 0


def test_callback_can_stop():
    data, _ = two_blobs(500)
    history = fit(
        Gaussian(), data, steps=100, eval_every=4, validation=None, seed=0, progress=False,
        callback=lambda step, h: step >= 8,
    )  # fmt: skip
    assert history.stopped_early and len(history.train_loss) == 8


def test_non_finite_loss_restores_best_state():
    data, _ = two_blobs(500)
    model = Gaussian()
    snapshots = {}

    def poison_after_step_10(step, history):
        snapshots[step] = state(model)
        if step == 10:
            with torch.no_grad():
                model.log_scale[0] = math.inf

    with pytest.raises(
        RuntimeError,
        match=r"diverged at step 11 of 50: the training loss is inf; .*best validated.*lower `lr`",
    ):
        fit(
            model, data, steps=50, lr=0.01, eval_every=5, seed=0, progress=False,
            callback=poison_after_step_10,
        )  # fmt: skip
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert_state_equal(model, snapshots[10])  # the loss decreases: step 10 was the best


def test_non_finite_loss_without_validation_restores_last_finite_state():
    data, _ = two_blobs(500)
    model = Gaussian()
    snapshots = {}

    def poison_at_step_6(step, history):
        if step == 6:
            with torch.no_grad():
                model.loc[1] = math.nan
        snapshots[step] = state(model)

    with pytest.raises(
        RuntimeError,
        match=r"step 7 of 20: the parameters are not finite \(ValueError: .*from step 5, the last",
    ):
        fit(
            model, data, steps=20, eval_every=3, validation=None, seed=0, progress=False,
            callback=poison_at_step_6,
        )  # fmt: skip
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert not torch.equal(model.loc, snapshots[3]["loc"])  # steps 4 and 5 were kept

    bad = Gaussian()
    with torch.no_grad():
        bad.loc.fill_(1e30)  # finite parameters whose float32 loss overflows
        bad.log_scale.fill_(-30.0)
    with pytest.raises(
        RuntimeError,
        match=r"at step 1 of 5: .*the model holds its initial parameters.*initialization",
    ):
        fit(bad, data, steps=5, progress=False)


@pytest.mark.parametrize("container", [torch.tensor, np.asarray])
def test_non_finite_data(container):
    data, _ = two_blobs(100)
    data[7, 1] = math.nan
    data[12, 0] = math.inf
    data[40] = -math.inf
    with pytest.raises(
        ValueError, match=r"`data` has 3 row\(s\) with NaN or infinite values \(first: row 7\)"
    ):
        fit(Gaussian(), container(data.numpy()), steps=2, progress=False)
    clean, _ = two_blobs(100)
    with pytest.raises(ValueError, match=r"`validation` has 3 row\(s\).*first: row 7"):
        fit(Gaussian(), clean, validation=container(data.numpy()), steps=2, progress=False)


def test_overflow_to_float32_is_explained():
    data = np.zeros((5, 2))
    data[3, 0] = 1e300
    with pytest.raises(ValueError, match=r"1 row\(s\).*row 3; its values overflow torch.float32"):
        fit(Gaussian(), data, steps=2, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"steps": 10, "epochs": 2},
            ValueError,
            r"at most one of `steps` \(10\) and `epochs` \(2\)",
        ),
        ({"steps": 0}, ValueError, r"`steps` must be a positive integer, got 0"),
        ({"epochs": 1.5}, TypeError, r"`epochs` must be an integer, got float"),
        ({"batch_size": 0}, ValueError, r"`batch_size` must be a positive integer, got 0"),
        ({"batch_size": -3}, ValueError, r"`batch_size` must be a positive integer, got -3"),
        (
            {"validation": 1.0},
            ValueError,
            r"`validation` as a fraction must be in \[0, 1\), got 1.0",
        ),
        ({"validation": -0.1}, ValueError, r"must be in \[0, 1\), got -0.1"),
        ({"validation": True}, TypeError, r"`validation` must be a fraction"),
        ({"validation": [[0.0, 0.0]]}, TypeError, r"`validation` must be a fraction"),
        ({"lr": 0.0}, ValueError, r"`lr` must be a finite positive number, got 0.0"),
        ({"lr": math.nan}, ValueError, r"`lr` must be a finite positive number"),
        ({"weight_decay": -1.0}, ValueError, r"`weight_decay` must be a finite non-negative"),
        (
            {"schedule": "linear"},
            ValueError,
            r'`schedule` must be "cosine", "constant" or a callable',
        ),
        (
            {"schedule": lambda t: -1.0},
            ValueError,
            r"`schedule\(0\)` must return a finite number >= 0",
        ),
        ({"patience": 0}, ValueError, r"`patience` must be a positive integer"),
        ({"patience": 3, "validation": None}, ValueError, r"`patience` needs validation data"),
        ({"eval_every": 0}, ValueError, r"`eval_every` must be a positive integer"),
        ({"clip_grad_norm": 0.0}, ValueError, r"`clip_grad_norm` must be a finite positive"),
        ({"callback": 3}, TypeError, r"`callback` must be callable"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    data, _ = two_blobs(50)
    length = {} if {"steps", "epochs"} & kwargs.keys() else {"steps": 2}
    with pytest.raises(error, match=match):
        fit(Gaussian(), data, progress=False, **length, **kwargs)


def test_validation_fraction_leaves_no_training_rows():
    with pytest.raises(ValueError, match=r"`validation=0.5` leaves no training rows out of 1"):
        fit(Gaussian(), torch.zeros(1, 2), validation=0.5, steps=2, progress=False)


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ([[0.0, 1.0]], TypeError, r"`data` must be a torch.Tensor or numpy.ndarray, got list"),
        (np.array([["a", "b"]]), TypeError, r"`data` must hold real numbers, got dtype <U1"),
        (np.zeros((3, 2), dtype=object), TypeError, r"got dtype object"),
        (torch.zeros(3, 2, dtype=torch.bool), TypeError, r"got dtype torch.bool"),
        (torch.zeros(3, 2, dtype=torch.complex64), TypeError, r"got dtype torch.complex64"),
        (torch.zeros(0, 2), ValueError, r"`data` is empty \(shape \(0, 2\)\)"),
        (
            torch.zeros(4, 2, 1),
            ValueError,
            r"`data` must have shape \(N, D\) or \(N,\), got \(4, 2, 1\)",
        ),
        (torch.tensor(1.0), ValueError, r"got \(\)"),
        (torch.zeros(4, 3), ValueError, r"`data` has rows of shape \(3,\) .* event_shape \(2,\)"),
    ],
)
def test_bad_data(data, error, match):
    with pytest.raises(error, match=match):
        fit(Gaussian(), data, steps=2, progress=False)


def test_bad_models():
    data = torch.zeros(10, 2)
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module, got function"):
        fit(lambda: None, data, progress=False)

    class NotADistribution(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2))

        def forward(self):
            return self.w

    with pytest.raises(TypeError, match=r"must return a torch.distributions.Distribution"):
        fit(NotADistribution(), data, progress=False)

    class Batched(NotADistribution):
        def forward(self):
            return Normal(self.w, 1.0)  # batch_shape (2,), event_shape ()

    with pytest.raises(
        ValueError, match=r"batch_shape \(2,\); fit needs batch_shape \(\).*Independent"
    ):
        fit(Batched(), data, progress=False)
    bad = Gaussian()
    with torch.no_grad():
        bad.log_scale[1] = math.nan
    with pytest.raises(ValueError, match=r"`model` parameter `log_scale` holds NaN or infinite"):
        fit(bad, data, progress=False)
    with pytest.raises(ValueError, match=r"no parameters that require grad"):
        fit(nn.Module(), data, progress=False)


def test_one_dimensional_rows():
    data = torch.randn(300) + 3.0
    model = Mixture([[0.0], [1.0]])  # event_shape (1,): (N,) is read as (N, 1)
    fit(model, data, steps=5, progress=False)

    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = nn.Parameter(torch.zeros(()))

        def forward(self):
            return Normal(self.loc, 1.0)  # event_shape (): (N, 1) is read as (N,)

    scalar = Scalar()
    history = fit(scalar, data[:, None].numpy(), steps=100, lr=0.1, seed=0, progress=False)
    assert history.val_loss[-1] < history.val_loss[0]
    assert abs(scalar.loc.item() - 3.0) < 0.5


def test_float64_model_keeps_float64_and_numpy_input():
    data, _ = two_blobs(400)
    model = Mixture([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    history = fit(model, data.numpy().astype(np.float32), steps=10, seed=0, progress=False)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert len(history.train_loss) == 10
    model32 = Mixture([[-1.0, 0.0], [1.0, 0.0]])
    fit(model32, data.double().numpy(), validation=data.numpy()[:50], steps=10, progress=False)
    assert all(p.dtype == torch.float32 for p in model32.parameters())
    # Integer data is accepted and converted.
    fit(Gaussian(), np.arange(20).reshape(10, 2), steps=2, progress=False)


def test_explicit_validation_and_options():
    data, _ = two_blobs(400)
    model = Gaussian()
    model.eval()
    history = fit(
        model, data, validation=data[:100], steps=20, eval_every=10, weight_decay=0.01,
        schedule="constant", clip_grad_norm=None, device="cpu", progress=False,
    )  # fmt: skip
    assert history.val_steps == [0, 10, 20]
    assert not model.training  # the mode it had is restored


def test_progress_bar(capfd):
    data, _ = two_blobs(200)
    fit(Gaussian(), data, steps=5, progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    fit(Gaussian(), data, steps=5, progress=True)
    out, err = capfd.readouterr()
    assert "fit" in err and "5/5" in err and "val=" in err


def test_history_plot():
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes

    data, _ = two_blobs(200)
    history = fit(Gaussian(), data, steps=10, seed=0, progress=False)
    ax = history.plot()
    assert isinstance(ax, Axes)
    assert len(ax.lines) == 3  # training, validation, best step
    _, given = plt.subplots()
    assert history.plot(given) is given
    plt.close("all")


@pytest.fixture
def _threads_restored():
    num_threads = torch.get_num_threads()
    yield
    torch.set_num_threads(num_threads)


def _flushes_denormals():
    return torch.tensor([1e-39], dtype=torch.float32).mul(1.0).item() == 0.0


@pytest.mark.usefixtures("_threads_restored")
@pytest.mark.parametrize("threads", [1, 2, None])
def test_training_runs_on_the_given_threads_with_subnormals_flushed_then_restores(threads):
    seen = []

    def callback(step, history):
        seen.append((torch.get_num_threads(), _flushes_denormals()))

    data = torch.randn(64, 1)
    torch.set_num_threads(3)
    assert not _flushes_denormals()
    fit(
        Mixture([[0.0]]),
        data,
        steps=4,
        eval_every=2,
        threads=threads,
        progress=False,
        callback=callback,
    )
    assert seen == [(3 if threads is None else threads, True)] * 2
    assert torch.get_num_threads() == 3 and not _flushes_denormals()


@pytest.mark.usefixtures("_threads_restored")
def test_cpu_training_restores_after_an_error_and_keeps_a_flush_already_on():
    from pyro_mixflow.fitting import cpu_training

    torch.set_num_threads(2)
    with pytest.raises(RuntimeError, match="inside"), cpu_training(threads=1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2 and not _flushes_denormals()
    torch.set_flush_denormal(True)
    try:
        with cpu_training(threads=None):
            pass
        assert _flushes_denormals() and torch.get_num_threads() == 2
    finally:
        torch.set_flush_denormal(False)
    with pytest.raises(ValueError, match="`threads` must be a positive integer, got 0"):
        fit(Mixture([[0.0]]), torch.randn(8, 1), steps=1, threads=0, progress=False)


class ConditionalNormal(nn.Module):
    """x | c ~ N(a c + b, 1): a conditional model whose call takes context rows (B, 1)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, context=None):
        if context is None:
            raise ValueError("needs a context")
        return Independent(Normal(self.a * context + self.b, 1.0), 1)


def _conditional_data(n=2000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(n, 1, generator=gen)
    return 2.0 * c - 1.0 + torch.randn(n, 1, generator=gen), c


def test_conditional_fit_learns_the_regression_and_keeps_pairs_together():
    x, c = _conditional_data()
    model = ConditionalNormal()
    history = fit(model, x, context=c, steps=300, lr=0.05, seed=0, progress=False)
    # Least squares of x on c is the maximum-likelihood fit; its standard errors are ~1/sqrt(n).
    design = torch.cat([c, torch.ones_like(c)], -1)
    a_hat, b_hat = torch.linalg.lstsq(design, x).solution.flatten().tolist()
    assert abs(model.a.item() - a_hat) < 0.05 and abs(model.b.item() - b_hat) < 0.05
    assert history.best_val_loss < history.val_loss[0]
    # Shuffling pairs apart would leave no signal: the same data with shuffled context fits a = 0.
    shuffled = ConditionalNormal()
    perm = torch.randperm(len(c), generator=torch.Generator().manual_seed(1))
    fit(shuffled, x, context=c[perm], steps=300, lr=0.05, seed=0, progress=False)
    assert abs(shuffled.a.item()) < 0.15


def test_conditional_fit_validation_split_is_over_pairs_and_explicit_rows_need_context():
    x, c = _conditional_data(400)
    seen = []

    class Spy(ConditionalNormal):
        def forward(self, context=None):
            seen.append(context.shape)
            return super().forward(context)

    fit(Spy(), x, context=c.squeeze(-1), steps=2, batch_size=64, seed=0, progress=False)
    assert (1, 1) in seen and (64, 1) in seen and (40, 1) in seen  # probe, batch, validation
    fit(
        ConditionalNormal(),
        x[:300],
        context=c[:300],
        validation=x[300:],
        validation_context=c[300:],
        steps=2,
        progress=False,
    )
    with pytest.raises(ValueError, match="`validation` rows of a conditional model need"):
        fit(ConditionalNormal(), x, context=c, validation=x, steps=1, progress=False)
    with pytest.raises(ValueError, match="`validation_context` goes with `context`"):
        fit(ConditionalNormal(), x, validation_context=c, steps=1, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"context": torch.randn(399, 1)},
            ValueError,
            r"`context` has 399 row\(s\) but `data` has 400",
        ),
        (
            {"context": torch.full((400, 1), math.nan)},
            ValueError,
            r"`context` has 400 row\(s\) with NaN",
        ),
        (
            {"context": [[0.0]] * 400},
            TypeError,
            r"`context` must be a torch.Tensor or numpy.ndarray",
        ),
        ({"context": torch.randn(400, 1, 2)}, ValueError, r"`context` must have shape \(N, D\)"),
    ],
)
def test_conditional_fit_rejects_bad_context(kwargs, error, match):
    x, _ = _conditional_data(400)
    with pytest.raises(error, match=match):
        fit(ConditionalNormal(), x, steps=1, progress=False, **kwargs)


def test_context_given_to_an_unconditional_model_is_an_error():
    x, c = _conditional_data(100)
    with pytest.raises(TypeError, match=r"`model` was given a `context` but calling it"):
        fit(Mixture([[0.0]]), x, context=c, steps=1, progress=False)

    class IgnoresContext(Mixture):
        def forward(self, context=None):
            return super().forward()

    with pytest.raises(ValueError, match=r"batch_shape \(1,\) \(is the model conditional\?\)"):
        fit(IgnoresContext([[0.0]]), x, context=c, steps=1, progress=False)
