r"""Maximum-likelihood training loop for any module that returns a distribution."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.distributions import Distribution
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from pyro_mixflow._checks import check_integer, check_non_negative_float, check_positive_int
from pyro_mixflow.fitting._rows import (
    LazyPairs,
    Pairs,
    held_out,
    index_dtype,
    is_conditional,
    read_pairs,
    split_validation,
)
from pyro_mixflow.fitting.distributed import all_reduce_sum, broadcast_state, rank_and_world_size

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["History", "Pairs", "cpu_training", "fit", "split_validation"]

DEFAULT_STEPS = 1000
EVALUATIONS_PER_RUN = 20


@dataclass(repr=False)
class History:
    """What :func:`fit` measured.

    Steps count optimizer updates: the state "at step ``s``" is the parameters after ``s``
    updates, step 0 being the initial parameters.

    Attributes:
        train_loss: Mean negative log-likelihood of each step's mini-batch, one per step,
            measured before that step's update (``train_loss[s - 1]`` is that of step ``s``).
        val_loss: Mean negative log-likelihood of the validation rows, one per evaluation.
        val_steps: The step of each evaluation (the loss of the state at that step).
        best_step: The step whose state had the lowest validation loss, the state :func:`fit`
            leaves in the model; ``None`` without validation (or if no validation loss was
            finite).
        best_val_loss: The validation loss at ``best_step``, or ``None``.
        stopped_early: Whether training ended before the last step, by ``patience`` or by the
            callback.
        seconds: Wall-clock duration of :func:`fit`.
    """

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    best_step: int | None = None
    best_val_loss: float | None = None
    stopped_early: bool = False
    seconds: float = 0.0

    def __repr__(self) -> str:
        best = None if self.best_val_loss is None else f"{self.best_val_loss:.6g}"
        return (
            f"History(steps={len(self.train_loss)}, evaluations={len(self.val_loss)}, "
            f"best_step={self.best_step}, best_val_loss={best}, "
            f"stopped_early={self.stopped_early}, seconds={self.seconds:.3g})"
        )

    def plot(self, ax: Axes | None = None) -> Axes:
        """Draws the training loss per step, the validation loss and the best step.

        Args:
            ax: Matplotlib axes to draw on; a new figure when ``None``.

        Returns:
            The axes.
        """
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots()
        steps = np.arange(1, len(self.train_loss) + 1)
        ax.plot(steps, self.train_loss, lw=0.8, alpha=0.6, label="training (mini-batch)")
        if self.val_loss:
            ax.plot(self.val_steps, self.val_loss, marker="o", ms=3, label="validation")
        if self.best_step is not None:
            ax.axvline(self.best_step, color="grey", ls="--", lw=0.8, label="best")
        ax.set_xlabel("step")
        ax.set_ylabel("negative log-likelihood")
        ax.legend()
        return ax


def fit(
    model: nn.Module,
    data: torch.Tensor | np.ndarray | Dataset,
    *,
    context: torch.Tensor | np.ndarray | None = None,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int = 512,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    schedule: str | Callable[[int], float] = "cosine",
    validation: float | torch.Tensor | np.ndarray | Dataset | None = 0.1,
    validation_context: torch.Tensor | np.ndarray | None = None,
    eval_every: int | None = None,
    patience: int | None = None,
    clip_grad_norm: float | None = 10.0,
    seed: int | None = None,
    device: str | torch.device | None = None,
    threads: int | None = 1,
    progress: bool = True,
    callback: Callable[[int, History], bool | None] | None = None,
) -> History:
    r"""Fits ``model`` to ``data`` by maximum likelihood with mini-batch Adam.

    ``model()`` must return a distribution :math:`q_\theta` (a fresh one per call, rebuilt at
    every step) whose ``event_shape`` is the shape of a row of ``data`` and whose
    ``batch_shape`` is ``()``. The objective is the mean negative log-likelihood

    .. math::

        \min_\theta \; -\frac{1}{N} \sum_{i=1}^N \log q_\theta(x_i),

    estimated on mini-batches of ``batch_size`` rows drawn without replacement, reshuffled every
    epoch (the last batch of an epoch may be smaller).

    With ``context``, the model is conditional: ``model(c)`` for context rows ``c`` of shape
    ``(B, C)`` returns a distribution with ``batch_shape`` ``(B,)``, one per row (the models of
    :mod:`pyro_mixflow.nn` built with ``context_dim``), and the objective is
    :math:`-\frac{1}{N} \sum_i \log q_\theta(x_i \mid c_i)` over the pairs
    :math:`(x_i, c_i)`, which the mini-batches and the validation split keep together. ``fit``
    does not rescale the context: the models of :mod:`pyro_mixflow.nn` standardize it
    themselves (``init_from_data(data, context)`` sets their standardization).

    The optimizer is :class:`torch.optim.Adam`, or :class:`torch.optim.AdamW` (decoupled
    weight decay) when ``weight_decay > 0``. Gradients are clipped to a total norm of
    ``clip_grad_norm``; the default, 10, only touches outlier steps of a mean log-likelihood, so
    that one extreme batch cannot wreck Adam's moment estimates.

    With validation data, the mean validation loss is computed every ``eval_every`` steps and at
    the last step, in batches of ``batch_size`` under :func:`torch.no_grad` with the model in
    ``eval()`` mode; a copy of the best ``state_dict`` is kept and loaded back into the model at
    the end. Without validation the model keeps its final parameters. If training fails (a
    non-finite loss, an exception, Ctrl-C), the model is first restored to the best validated
    state, or without one to the last parameters whose training loss was finite.

    Data larger than memory stays on disk: give a memory-mapped array
    (``np.load(path, mmap_mode="r")`` or a :class:`numpy.memmap`) or a map-style
    :class:`torch.utils.data.Dataset`. ``fit`` then reads each mini-batch when it needs it (the
    rows of a batch in increasing index order, for locality; the batch keeps its shuffled
    order), splits off the validation rows by index and evaluates them in batches, so memory
    holds only the indices (8 bytes a row) and a few batches. It draws the same split and the
    same batches as for the same rows in memory, and gives the same result. A memory-mapped
    array is checked for NaN and infinite values once, in chunks, with the messages of
    in-memory data; a ``Dataset``, whose items are rows ``(D,)`` (or scalars) or
    ``(row, context)`` pairs for a conditional model, is checked batch by batch as it is read
    (read with its ``__getitems__`` when it has one, else item by item). A
    :class:`~torch.utils.data.DataLoader` is refused: ``fit`` chooses its batches itself (the
    split, the seeded shuffling), so give its ``dataset``. ``fit`` computes no statistics of the
    data; start a model from a random subsample of a large file (``init_from_data`` on a
    hundred thousand rows estimates means and scales to a fraction of a percent).

    Under ``torchrun``: when the script has initialized a :mod:`torch.distributed` process
    group (``init_process_group("gloo")`` on CPUs, ``"nccl"`` on GPUs, the model on the rank's
    GPU; ``fit`` does not create one), every rank runs the same ``fit`` on the same data (or
    the same file or ``Dataset``) and ``fit`` trains one model with them. All ranks start from
    rank 0's parameters and buffers (so an EM start computed on rank 0 alone is enough), draw
    the same split and permutations (rank 0's seed when ``seed`` is ``None``), and split each
    mini-batch of ``batch_size`` rows into contiguous shares, one per rank: a disjoint part of
    every epoch. Each rank back-propagates its rows' negative log-likelihood divided by the
    batch size, and the gradients are summed over the ranks with one
    :func:`torch.distributed.all_reduce` per step, which is the gradient of the batch's mean
    loss: training on :math:`R` ranks takes the steps of one process on the same batches, to
    floating-point rounding, :math:`R` times fewer rows per process. This is the arithmetic of
    :class:`~torch.nn.parallel.DistributedDataParallel` (summed, rather than averaged,
    because the shares may differ by a row), done after the backward pass because DDP's
    contract does not fit here: its ``forward`` must return the tensors the loss is computed
    from, while our models return a distribution, and it fails on parameters that get no
    gradient in a step. Validation rows are shared out likewise and their log-likelihoods
    summed over the ranks, so the validation losses, early stopping, the callback's stop (any
    rank's) and the best state agree on every rank; the final state is broadcast from rank 0.
    Only rank 0 shows the progress bar; ``fit`` writes no files (save on rank 0). Every rank
    must make the same calls: an exception on one rank alone (a bad item of a ``Dataset``
    read by that rank) leaves the others waiting until the group's timeout. ``batch_size`` is
    the global batch: for :class:`~torch.nn.parallel.DistributedDataParallel`'s convention of
    a batch per process, pass it times the number of ranks. What it gains
    (``benchmarks/distributed.py``, 2 gloo processes on 2 cores): an ``nn.MixtureFlow(8)``
    processes 1.94 times the rows per second of one process with 4096 rows per process, 1.54
    times with 4096 rows split in two; a light ``nn.GMM(8, 50)`` (a 3.4 ms step) gains nothing,
    since each step's ``all_reduce`` costs about 1.7 ms there.

    Randomness: the split and the shuffling use a private :class:`torch.Generator` seeded with
    ``seed``. A given ``seed`` also seeds torch's global generators (``torch.manual_seed``),
    which the model uses for any sampling of its own; they are not restored afterwards. With
    ``seed=None`` the private generator is seeded from torch's global generator, so
    ``torch.manual_seed`` before :func:`fit` makes a run reproducible too. NumPy's and Python's
    generators are not touched.

    Args:
        model: A module whose call ``model()`` returns a
            :class:`~torch.distributions.Distribution`. It is trained in place (moved to
            ``device`` if given) and left in the training mode it had.
        data: Observations, a tensor or NumPy array of shape ``(N, D)``, or ``(N,)`` for
            scalar rows; ``(N,)`` and ``(N, 1)`` are interchangeable for models with
            ``event_shape`` ``(1,)`` or ``()``. Integer or floating dtype; converted to the
            dtype of the model's first floating-point parameter (float32 for most models)
            and copied to the device. A memory-mapped array or a ``Dataset`` is read batch
            by batch instead (see above).
        context: Context rows of a conditional model, ``(N, C)`` (or ``(N,)`` for
            ``C = 1``), one per row of ``data``; a tensor or array of real numbers, converted
            like ``data`` (a memory-mapped one is read per batch with a memory-mapped
            ``data``). ``None`` for an unconditional model, or when ``data`` is a ``Dataset``
            of ``(row, context)`` pairs.
        steps: Number of optimizer steps. Give at most one of ``steps`` and ``epochs``; with
            neither, 1000 steps.
        epochs: Number of passes over the training rows, ``ceil(N_train / batch_size)``
            steps each.
        batch_size: Rows per mini-batch (all training rows if there are fewer).
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay of AdamW; 0 uses Adam.
        schedule: Learning-rate factor per step ``t = 0, ..., T - 1`` (``T`` the number of
            steps): ``"cosine"`` is :math:`\frac12 (1 + \cos(\pi t / T))`, from 1 down to
            nearly 0 at the last step; ``"constant"`` is 1; or a callable ``t -> factor``
            returning a finite number :math:`\geq 0`.
        validation: Held-out rows: a fraction in :math:`[0, 1)` of ``data`` split off at
            random (at least one row), explicit rows (a tensor, array, memory-mapped array
            or ``Dataset`` shaped like ``data``), or ``None``/``0`` for no validation. The
            initial parameters are evaluated too (step 0), so a good initialization such as
            an EM fit is kept when training does not improve on it.
        validation_context: The context rows of explicit ``validation`` rows of a conditional
            model (a validation fraction takes them from ``context``).
        eval_every: Steps between evaluations (validation loss and ``callback``). Default:
            once per epoch or 20 times per run, whichever is more often, so that evaluation
            costs at most a few percent of an epoch and the curve has enough points.
        patience: Stop after this many evaluations in a row without a lower validation loss;
            ``None`` never stops early. Needs validation.
        clip_grad_norm: Maximum total gradient norm; ``None`` does not clip.
        seed: Seed for the split, the shuffling and torch's global generators.
        device: Device to train on; ``None`` keeps the model's device.
        threads: CPU threads of torch's operations while training on the CPU (see
            :func:`cpu_training`, which also flushes subnormal floats to zero); ``None`` keeps
            torch's setting. One thread is the default: for mini-batches of a few hundred rows
            it is as fast as two on an idle 2-core machine, and 30 times faster when another
            process keeps one core busy (OpenMP threads then wait for a descheduled peer).
            Give more for large models or batches.
        progress: Show a tqdm progress bar with the smoothed training loss and the last
            validation loss.
        callback: ``callback(step, history)``, called at every evaluation after its
            validation loss is recorded; a true return value stops training.

    Returns:
        A :class:`History` of the losses, the best step and the duration.

    Raises:
        TypeError: If ``model`` is not a module or does not return a distribution, or
            ``data``/``validation`` is not a tensor, array or ``Dataset`` of numbers (a
            ``DataLoader`` included).
        ValueError: If ``data``/``validation`` (or their context rows) is empty, has the wrong
            number of dimensions, holds NaN or infinite values (the message counts the rows
            and names the first), or does not match the model's ``event_shape``; if context
            and data rows differ in number; if a model parameter is not finite; if an
            argument is out of range; or, while training, if a batch read from a ``Dataset``
            holds NaN or infinite values or items of different shapes.
        RuntimeError: If the training loss, the gradient or the parameters become NaN or
            infinite (including a distribution's own ``ValueError`` on NaN parameters, chained
            as the cause); the model is restored first (see above).

    Example:
        >>> from pyro_mixflow import DiagNormalMixture
        >>> class Mixture(torch.nn.Module):
        ...     def __init__(self, num_components, dim):
        ...         super().__init__()
        ...         self.locs = torch.nn.Parameter(torch.randn(num_components, dim))
        ...         self.log_scales = torch.nn.Parameter(torch.zeros(num_components, dim))
        ...         self.logits = torch.nn.Parameter(torch.zeros(num_components))
        ...
        ...     def forward(self):
        ...         return DiagNormalMixture(self.locs, self.log_scales.exp(), self.logits)
        >>> data = torch.cat([torch.randn(500, 2) - 3.0, torch.randn(500, 2) + 3.0])
        >>> model = Mixture(num_components=2, dim=2)
        >>> history = fit(model, data, steps=40, lr=0.05, eval_every=10, seed=0, progress=False)
        >>> len(history.train_loss), history.val_steps
        (40, [0, 10, 20, 30, 40])
        >>> history.best_val_loss < history.val_loss[0]
        True
    """
    start = time.perf_counter()
    params = _trainable_parameters(model)
    settings = _check_settings(
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        schedule=schedule,
        validation=validation,
        eval_every=eval_every,
        patience=patience,
        clip_grad_norm=clip_grad_norm,
        seed=seed,
        threads=threads,
        callback=callback,
    )
    x, x_val, generator = _prepare_rows(
        model, data, context, validation, validation_context, settings, params, device
    )
    steps, eval_every = settings.plan(len(x))
    rank, world_size = rank_and_world_size()
    broadcast_state(model)  # every rank starts from rank 0's state (an EM start included)
    optimizer = _optimizer(params, settings)
    history = History()
    checkpoints = _Checkpoints(model, history, settings.patience)
    if isinstance(x, Pairs):
        batches = _shuffled_batches(len(x), settings.batch_size, generator, x.rows.device)
    else:  # the same permutations in half the memory (int32 indices)
        dtype = index_dtype(len(x))
        batches = _shuffled_batches(len(x), settings.batch_size, generator, "cpu", dtype)
    bar = tqdm(total=steps, desc="fit", disable=not progress or rank != 0, mininterval=0.5)
    was_training = model.training
    model.train()
    step = 0
    smoothed = math.nan
    with cpu_training(settings.threads if params[0].device.type == "cpu" else None):
        if x_val is not None:
            # The starting state competes too, so a good initialization (EM) is never lost.
            checkpoints.validate(0, _mean_nll(model, x_val, settings.batch_size))
        try:
            for step in range(1, steps + 1):
                for group in optimizer.param_groups:
                    group["lr"] = settings.lr * settings.factor(step - 1, steps)
                batch = next(batches)
                if world_size == 1:
                    loss = _batch_loss(model, x.take(batch))
                    value = loss.item()
                    if not math.isfinite(value):
                        raise _Divergence(f"the training loss is {value}")
                    checkpoints.mark_good(step)
                    norm = _update(optimizer, loss, params, settings.clip_grad_norm)
                else:
                    value = _summed_gradients(model, x, batch, params, optimizer)
                    if not math.isfinite(value):
                        raise _Divergence(f"the training loss is {value}")
                    checkpoints.mark_good(step)
                    norm = _clipped_step(optimizer, params, settings.clip_grad_norm)
                if not math.isfinite(norm):
                    raise _Divergence(f"the gradient norm is {norm}")
                history.train_loss.append(value)
                smoothed = value if step == 1 else 0.95 * smoothed + 0.05 * value

                stop = False
                if step % eval_every == 0 or step == steps:
                    if x_val is not None:
                        val = _mean_nll(model, x_val, settings.batch_size)
                        stop = checkpoints.validate(step, val)
                    if callback is not None and callback(step, history):
                        stop = True
                    if world_size > 1:  # stop together if any rank's callback says so
                        flag = torch.tensor([float(stop)], device=params[0].device)
                        all_reduce_sum([flag])
                        stop = bool(flag.item() > 0)
                _show_progress(bar, smoothed, history)
                if stop and step < steps:
                    history.stopped_early = True
                    break
        except _Divergence as divergence:
            restored = checkpoints.restore()
            raise _diverged_error(str(divergence), step, steps, settings.lr, restored) from None
        except BaseException as exc:
            # A distribution that validates its arguments raises on NaN parameters: divergence.
            if all(bool(torch.isfinite(p).all()) for p in params):
                checkpoints.load_best()
                raise
            restored = checkpoints.restore()
            first_line = next(iter(str(exc).splitlines()), "")
            problem = f"the parameters are not finite ({type(exc).__name__}: {first_line})"
            raise _diverged_error(problem, step, steps, settings.lr, restored) from exc
        finally:
            bar.close()
            model.train(was_training)
            history.seconds = time.perf_counter() - start
        checkpoints.load_best()
        broadcast_state(model)  # the same model on every rank, whatever their arithmetic
    return history


@contextlib.contextmanager
def cpu_training(threads: int | None = 1) -> Iterator[None]:
    r"""Within the block, torch runs on ``threads`` CPU threads and flushes subnormal floats.

    Both settings are restored on exit. Subnormal floats (magnitudes below
    :math:`2^{-126} \approx 1.2 \times 10^{-38}` in float32) appear in training, in Adam's
    moment estimates of parameters whose gradient stays near zero, and x86 CPUs process them
    tens of times slower than ordinary floats; flushing them to zero changes no result beyond
    that magnitude. :func:`torch.set_flush_denormal` acts on the calling thread only, so with
    one thread it covers all the work. :func:`fit` trains inside this block.

    Args:
        threads: Intra-op threads (:func:`torch.set_num_threads`); ``None`` keeps torch's.

    Example:
        >>> before = torch.get_num_threads()
        >>> with cpu_training(threads=1):
        ...     torch.get_num_threads(), torch.tensor([1e-39]).mul(1.0).item()
        (1, 0.0)
        >>> torch.get_num_threads() == before
        True
    """
    if threads is not None:
        threads = check_positive_int("threads", threads)
    old_threads, old_flush = torch.get_num_threads(), _flushes_denormals()
    try:
        if threads is not None and threads != old_threads:
            torch.set_num_threads(threads)
        torch.set_flush_denormal(True)
        yield
    finally:
        torch.set_flush_denormal(old_flush)
        if torch.get_num_threads() != old_threads:
            torch.set_num_threads(old_threads)


@dataclass(frozen=True)
class _Settings:
    """The checked arguments of :func:`fit`."""

    steps: int | None
    epochs: int | None
    batch_size: int
    lr: float
    weight_decay: float
    factor: Callable[[int, int], float]  # (t, total) -> learning-rate factor
    eval_every: int | None
    patience: int | None
    clip_grad_norm: float | None
    seed: int | None
    threads: int | None
    fraction: float | None  # held-out fraction (0: no validation), None for explicit rows

    def plan(self, num_rows: int) -> tuple[int, int]:
        """Returns ``(steps, eval_every)`` for ``num_rows`` training rows."""
        steps_per_epoch = math.ceil(num_rows / self.batch_size)
        steps = self.steps
        if steps is None:
            steps = DEFAULT_STEPS if self.epochs is None else self.epochs * steps_per_epoch
        eval_every = self.eval_every
        if eval_every is None:
            eval_every = max(1, min(steps_per_epoch, math.ceil(steps / EVALUATIONS_PER_RUN)))
        return steps, eval_every


def _check_settings(
    *,
    steps: Any,
    epochs: Any,
    batch_size: Any,
    lr: Any,
    weight_decay: Any,
    schedule: Any,
    validation: Any,
    eval_every: Any,
    patience: Any,
    clip_grad_norm: Any,
    seed: Any,
    threads: Any,
    callback: Any,
) -> _Settings:
    """Checks the arguments of :func:`fit`; raises naming the first one that is wrong."""

    def positive(name: str, value: Any) -> int:
        return check_positive_int(name, check_integer(name, value))

    if steps is not None and epochs is not None:
        raise ValueError(f"Give at most one of `steps` ({steps}) and `epochs` ({epochs})")
    settings = _Settings(
        steps=None if steps is None else positive("steps", steps),
        epochs=None if epochs is None else positive("epochs", epochs),
        batch_size=positive("batch_size", batch_size),
        lr=check_non_negative_float("lr", lr, positive=True),
        weight_decay=check_non_negative_float("weight_decay", weight_decay),
        factor=_schedule_factor(schedule),
        eval_every=None if eval_every is None else positive("eval_every", eval_every),
        patience=None if patience is None else positive("patience", patience),
        clip_grad_norm=None
        if clip_grad_norm is None
        else check_non_negative_float("clip_grad_norm", clip_grad_norm, positive=True),
        seed=None if seed is None else check_integer("seed", seed),
        threads=None if threads is None else positive("threads", threads),
        fraction=None,
    )
    if callback is not None and not callable(callback):
        raise TypeError(f"`callback` must be callable, got {type(callback).__name__}")
    fraction = _validation_fraction(validation)
    if settings.patience is not None and fraction == 0.0:
        raise ValueError("`patience` needs validation data, but `validation` is None or 0")
    return dataclasses.replace(settings, fraction=fraction)


def _trainable_parameters(model: Any) -> list[nn.Parameter]:
    """The parameters :func:`fit` updates; checks that there are some and that they are finite."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("`model` has no parameters that require grad; there is nothing to fit")
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ValueError(f"`model` parameter `{name}` holds NaN or infinite values")
    return params


def _prepare_rows(
    model: nn.Module,
    data: Any,
    context: Any,
    validation: Any,
    validation_context: Any,
    settings: _Settings,
    params: list[nn.Parameter],
    device: str | torch.device | None,
) -> tuple[Pairs | LazyPairs, Pairs | LazyPairs | None, torch.Generator]:
    """Checks the rows, moves the model, seeds, splits: ``(train, validation, generator)``.

    The rows (and context rows) take the dtype of the model's first floating-point parameter
    and go to ``device`` (default: the parameters' device), where the model goes too. A
    memory-mapped array or a ``Dataset`` stays where it is: its rows are read per batch.
    """
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = params[0].device if device is None else torch.device(device)
    explicit = settings.fraction is None
    carried = isinstance(data, Dataset)  # a Dataset's items carry their context
    if validation_context is not None and (not explicit or (context is None and not carried)):
        raise ValueError(
            "`validation_context` goes with `context` and explicit `validation` rows; "
            "a validation fraction takes its context rows from `context`"
        )
    if (
        context is not None
        and explicit
        and validation_context is None
        and not isinstance(validation, Dataset)
    ):
        raise ValueError(
            "`validation` rows of a conditional model need their `validation_context` rows"
        )
    x = read_pairs("data", data, "context", context, dtype)
    x_val = None
    if explicit:
        x_val = read_pairs(
            "validation", validation, "validation_context", validation_context, dtype
        )
        if is_conditional(x) != is_conditional(x_val):
            raise ValueError(
                "`data` and `validation` must both carry context rows or both not: "
                f"`data` {'has' if is_conditional(x) else 'has no'} context rows, "
                f"`validation` {'has' if is_conditional(x_val) else 'has none'}"
            )
    model.to(device)
    seed = settings.seed
    if seed is not None:
        torch.manual_seed(seed)
    else:
        seed = int(torch.randint(0, 2**62, ()).item())
        rank, world_size = rank_and_world_size()
        if world_size > 1:  # rank 0's: every rank must draw the same split and batches
            agreed = torch.tensor([seed if rank == 0 else 0], device=device)
            all_reduce_sum([agreed])
            seed = int(agreed.item())
    generator = torch.Generator().manual_seed(seed)
    probe = x.take(slice(0, 1)).to(device)
    with torch.no_grad():
        try:
            dist = probe.distribution(model)
        except TypeError as error:
            if probe.context is None:
                raise
            raise TypeError(
                f"`model` was given a `context` but calling it with one failed ({error}); "
                "is the model conditional?"
            ) from error
        x, x_val = _match_event_shape(dist, x, x_val, probe.context)
    if settings.fraction and isinstance(x, Pairs):
        train, val = split_validation(torch.arange(len(x)), settings.fraction, generator=generator)
        x, x_val = x.take(train), x.take(val)
    elif settings.fraction:  # the same split, by index: the rows stay on disk
        order, num_val = held_out(len(x), settings.fraction, generator, index_dtype(len(x)))
        x, x_val = x.subset(order[num_val:]), x.subset(order[:num_val])
    return x.to(device), None if x_val is None else x_val.to(device), generator


def _optimizer(params: list[nn.Parameter], settings: _Settings) -> torch.optim.Optimizer:
    """Adam, or AdamW (decoupled weight decay) when ``weight_decay > 0``."""
    if settings.weight_decay > 0:
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.Adam(params, lr=settings.lr)


def _batch_loss(model: nn.Module, pairs: Pairs, total: int | None = None) -> torch.Tensor:
    """Mean negative log-likelihood of one mini-batch; checks the shape of ``log_prob``.

    With ``total``, the sum divided by ``total`` (a rank's part of a global batch's mean).
    """
    batch = pairs.rows
    log_prob = pairs.distribution(model).log_prob(batch)
    if log_prob.shape != batch.shape[:1]:
        raise ValueError(
            f"`model().log_prob` of a batch of shape {tuple(batch.shape)} has shape "
            f"{tuple(log_prob.shape)}, expected ({len(batch)},)"
        )
    return -log_prob.mean() if total is None else -log_prob.sum() / total


def _update(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    params: list[nn.Parameter],
    clip_grad_norm: float | None,
) -> float:
    """One optimizer step on ``loss`` with clipped gradients; returns the gradient norm.

    A non-finite norm skips the step (the caller stops training).
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return _clipped_step(optimizer, params, clip_grad_norm)


def _summed_gradients(
    model: nn.Module,
    x: Pairs | LazyPairs,
    batch: torch.Tensor,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
) -> float:
    """This rank's share of a global batch, its gradient summed over the ranks; the loss.

    Each rank takes a contiguous part of ``batch`` (the same on every rank) and back-propagates
    its rows' negative log-likelihood divided by the size of the whole batch; summing these
    gradients over the ranks gives, whatever the shares' sizes, the gradient of the batch's
    mean loss, which the returned loss (summed too) is.
    """
    rank, world_size = rank_and_world_size()
    share = batch.tensor_split(world_size)[rank]
    optimizer.zero_grad(set_to_none=True)
    if len(share):
        loss = _batch_loss(model, x.take(share), total=len(batch))
        loss.backward()
        local = loss.detach().reshape(1)
    else:  # fewer rows than ranks at the end of an epoch
        local = params[0].new_zeros(1)
    local = local.to(params[0].dtype)
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault((p.dtype, p.device), []).append(p.grad)
    groups[(local.dtype, local.device)].append(local)
    for tensors in groups.values():  # one collective per dtype (one in all, as a rule)
        all_reduce_sum(tensors)
    return local.item()


def _clipped_step(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter], clip_grad_norm: float | None
) -> float:
    """The optimizer step on the clipped gradients; the norm (not finite: no step)."""
    max_norm = math.inf if clip_grad_norm is None else clip_grad_norm
    norm = float(nn.utils.clip_grad_norm_(params, max_norm))
    if math.isfinite(norm):
        optimizer.step()
    return norm


def _show_progress(bar: tqdm, smoothed: float, history: History) -> None:
    """Advances the progress bar, showing the smoothed loss and the last validation loss."""
    postfix = {"loss": f"{smoothed:.4g}"}
    if history.val_loss:
        postfix["val"] = f"{history.val_loss[-1]:.4g}"
    bar.set_postfix(postfix, refresh=False)
    bar.update()


class _Checkpoints:
    """The states that :func:`fit` can return to, and the validation record.

    The best validated state is what :func:`fit` leaves in the model. Until there is one, the
    last state whose training loss was finite is kept (updated in place, without allocation)
    so that a divergence can be undone.
    """

    def __init__(self, model: nn.Module, history: History, patience: int | None) -> None:
        self.model, self.history, self.patience = model, history, patience
        self.best_state: dict[str, Any] | None = None
        self.since_best = 0  # evaluations since the best one
        self.last_good = copy.deepcopy(model.state_dict())
        self.last_good_step = 0

    def validate(self, step: int, loss: float) -> bool:
        """Records the validation ``loss`` of the state at ``step``; returns whether to stop."""
        history = self.history
        history.val_loss.append(loss)
        history.val_steps.append(step)
        best = math.inf if history.best_val_loss is None else history.best_val_loss
        if loss < best:
            history.best_step, history.best_val_loss = step, loss
            self.best_state = copy.deepcopy(self.model.state_dict())
            self.since_best = 0
        elif step > 0:
            self.since_best += 1
        return self.patience is not None and self.since_best >= self.patience

    def mark_good(self, step: int) -> None:
        """Notes that the state before step ``step`` had a finite training loss."""
        if self.best_state is None:
            _copy_state(self.last_good, self.model)
            self.last_good_step = step - 1

    def load_best(self) -> None:
        """Loads the best validated state into the model, if there is one."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def restore(self) -> str:
        """Loads the best validated state, else the last with a finite loss; says which."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
            return (
                f"the best validated parameters, from step {self.history.best_step} "
                f"(validation loss {self.history.best_val_loss:.6g})"
            )
        self.model.load_state_dict(self.last_good)
        if self.last_good_step == 0:
            return "its initial parameters"
        return f"its parameters from step {self.last_good_step}, the last with a finite loss"


class _Divergence(Exception):
    """The training loss or the gradient norm became non-finite (says which, and its value)."""


def _schedule_factor(schedule: str | Callable[[int], float]) -> Callable[[int, int], float]:
    """Checks ``schedule`` and returns ``(t, total) -> learning-rate factor``."""
    if callable(schedule):

        def checked(t: int, total: int) -> float:
            value = schedule(t)
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"`schedule({t})` must return a finite number >= 0, got {value!r}")
            return float(value)

        return checked
    if schedule == "constant":
        return lambda t, total: 1.0
    if schedule == "cosine":
        return lambda t, total: 0.5 * (1.0 + math.cos(math.pi * t / total))
    raise ValueError(
        f'`schedule` must be "cosine", "constant" or a callable step -> factor, got {schedule!r}'
    )


def _validation_fraction(validation: Any) -> float | None:
    """Returns the held-out fraction (0 for none), or ``None`` for explicit rows."""
    if validation is None:
        return 0.0
    if isinstance(validation, torch.Tensor | np.ndarray | Dataset):
        return None
    if isinstance(validation, bool) or not isinstance(validation, numbers.Real):
        raise TypeError(
            "`validation` must be a fraction, a tensor or array of rows, or None, "
            f"got {type(validation).__name__}"
        )
    if not 0.0 <= validation < 1.0:
        raise ValueError(f"`validation` as a fraction must be in [0, 1), got {validation}")
    return float(validation)


def _match_event_shape(
    dist: Any,
    x: Pairs | LazyPairs,
    x_val: Pairs | LazyPairs | None,
    probe_context: torch.Tensor | None,
) -> tuple[Pairs | LazyPairs, Pairs | LazyPairs | None]:
    """Checks the model's distribution against the rows; swaps ``(N,)`` and ``(N, 1)`` rows.

    ``dist`` is ``model()``, or ``model(context)`` for the first context row (shape ``(1, C)``),
    whose batch shape must then be ``(1,)``: one distribution per context row.
    """
    call = "model()" if probe_context is None else "model(context)"
    if not isinstance(dist, Distribution):
        raise TypeError(
            f"`{call}` must return a torch.distributions.Distribution, got {type(dist).__name__}"
        )
    if probe_context is None and dist.batch_shape:
        raise ValueError(
            f"`model()` returned a distribution with batch_shape {tuple(dist.batch_shape)}; fit "
            "needs batch_shape () (wrap it in torch.distributions.Independent to move batch "
            "dimensions into event_shape)"
        )
    if probe_context is not None and tuple(dist.batch_shape) != (1,):
        raise ValueError(
            f"`model(context)` for a context of shape {tuple(probe_context.shape)} returned "
            f"batch_shape {tuple(dist.batch_shape)}; fit needs one distribution per context "
            "row, batch_shape (1,) (is the model conditional?)"
        )
    event_shape = tuple(dist.event_shape)

    def match(name: str, pairs: Pairs | LazyPairs) -> Pairs | LazyPairs:
        lazy = isinstance(pairs, LazyPairs)
        row_shape = pairs.row_shape if lazy else tuple(pairs.rows.shape[1:])
        if row_shape == event_shape:
            return pairs
        if (row_shape, event_shape) in (((), (1,)), ((1,), ())):
            if lazy:  # reshaped as it is read
                return dataclasses.replace(pairs, row_shape=event_shape)
            return Pairs(pairs.rows.reshape(len(pairs), *event_shape), pairs.context)
        raise ValueError(
            f"`{name}` has rows of shape {row_shape} (shape {(len(pairs), *row_shape)}) but "
            f"the model's distribution has event_shape {event_shape}"
        )

    return match("data", x), None if x_val is None else match("validation", x_val)


def _shuffled_batches(
    num_rows: int,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype = torch.int64,
) -> Iterator[torch.Tensor]:
    """Yields index batches forever, one fresh permutation per epoch."""
    while True:
        order = torch.randperm(num_rows, generator=generator, dtype=dtype)
        yield from order.to(device).split(batch_size)


@torch.no_grad()
def _mean_nll(model: nn.Module, pairs: Pairs | LazyPairs, batch_size: int) -> float:
    """Mean negative log-likelihood of the rows in batches, in eval mode, summed in float64."""
    model.eval()
    try:
        total = 0.0
        # One distribution for all rows of an unconditional model.
        dist = model() if not is_conditional(pairs) else None
        rank, world_size = rank_and_world_size()
        first, last = len(pairs) * rank // world_size, len(pairs) * (rank + 1) // world_size
        for start in range(first, last, batch_size):  # this rank's part of the rows
            chunk = pairs.take(slice(start, min(last, start + batch_size)))
            current = dist if dist is not None else chunk.distribution(model)
            log_prob = current.log_prob(chunk.rows)
            total -= log_prob.sum().item()
    finally:
        model.train()
    if world_size > 1:  # the sum over all ranks' rows, the same on every rank
        summed = torch.tensor([total], dtype=torch.float64, device=_device(model))
        all_reduce_sum([summed])
        total = summed.item()
    return total / len(pairs)


def _device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer), where collectives run."""
    first = next(iter([*model.parameters(), *model.buffers()]), None)
    return torch.device("cpu") if first is None else first.device


def _copy_state(target: dict[str, Any], model: nn.Module) -> None:
    """Copies the model's ``state_dict`` into ``target`` in place (no allocation)."""
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and target.get(key) is not None:
            if target[key].shape == value.shape:
                target[key].copy_(value)
                continue
        target[key] = copy.deepcopy(value)


def _diverged_error(problem: str, step: int, steps: int, lr: float, restored: str) -> RuntimeError:
    hint = (
        "check the model's initialization and that its support covers the data"
        if step == 1
        else f"try a lower `lr` (now {lr:g}) or a smaller `clip_grad_norm`"
    )
    return RuntimeError(
        f"Training diverged at step {step} of {steps}: {problem}; the model holds {restored}. "
        f"Hint: {hint}."
    )


def _flushes_denormals() -> bool:
    """Whether the calling thread flushes subnormal floats (torch has no getter)."""
    return torch.tensor([1e-39], dtype=torch.float32).mul(1.0).item() == 0.0
