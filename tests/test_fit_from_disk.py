"""`fit` on data that stays on disk: memory-mapped arrays and map-style Datasets give the same
result as the same rows in memory, are read batch by batch, and are checked with clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from pyro_mixflow import DiagNormalMixture
from pyro_mixflow.fitting import fit


class Mixture(nn.Module):
    def __init__(self, dim=2, num_components=2):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.locs = nn.Parameter(torch.randn(num_components, dim, generator=gen))
        self.log_scales = nn.Parameter(torch.zeros(num_components, dim))
        self.logits = nn.Parameter(torch.zeros(num_components))

    def forward(self):
        return DiagNormalMixture(self.locs, self.log_scales.exp(), self.logits)


class ConditionalNormal(nn.Module):
    """x | c ~ N(a c + b, 1)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, context):
        return Independent(Normal(self.a * context + self.b, 1.0), 1)


class Rows(Dataset):
    """Items from a tensor, one by one (``pairs``: ``(row, context)``); counts what is read."""

    def __init__(self, rows, context=None, *, batched=False):
        self.rows, self.context, self.reads = rows, context, []
        if batched:
            self.__getitems__ = self._getitems

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        self.reads.append(1)
        return self.rows[i] if self.context is None else (self.rows[i], self.context[i])

    def _getitems(self, indices):
        self.reads.append(len(indices))
        return [
            self.rows[i] if self.context is None else (self.rows[i], self.context[i])
            for i in indices
        ]


def _blobs(n=600, dim=2):
    gen = torch.Generator().manual_seed(1)
    centers = torch.tensor([-2.0, 2.0])[torch.arange(n) % 2].unsqueeze(-1)
    return centers + 0.5 * torch.randn(n, dim, generator=gen)


def _memmap(tmp_path, array, name="x.npy"):
    np.save(tmp_path / name, array)
    return np.load(tmp_path / name, mmap_mode="r")


def _fit(model, data, **kwargs):
    options = {"epochs": 3, "batch_size": 64, "lr": 0.05, "seed": 3, "progress": False}
    history = fit(model, data, **{**options, **kwargs})
    return history, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(a, b):
    (history_a, state_a), (history_b, state_b) = a, b
    assert history_a.train_loss == history_b.train_loss
    assert history_a.val_loss == history_b.val_loss and history_a.best_step == history_b.best_step
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0)


@pytest.mark.parametrize("validation", [0.2, None, "explicit"])
def test_memmap_gives_the_result_of_the_same_rows_in_memory(tmp_path, validation):
    x = _blobs()
    kwargs = {"validation": validation}
    mapped_kwargs = dict(kwargs)
    if validation == "explicit":
        kwargs["validation"] = x[:100]
        mapped_kwargs["validation"] = _memmap(tmp_path, x[:100].numpy(), "v.npy")
        x = x[100:]
    mapped = _memmap(tmp_path, x.numpy().astype(np.float64))  # converted batch by batch
    assert isinstance(mapped, np.memmap)
    _assert_same(_fit(Mixture(), x, **kwargs), _fit(Mixture(), mapped, **mapped_kwargs))


def test_memmap_scalar_rows_and_memmap_context(tmp_path):
    x = _blobs(300, dim=1)
    in_memory = _fit(Mixture(dim=1), x[:, 0])
    _assert_same(in_memory, _fit(Mixture(dim=1), _memmap(tmp_path, x[:, 0].numpy())))
    c = torch.randn(300, 1, generator=torch.Generator().manual_seed(2))
    y = 2.0 * c - 1.0 + x
    expected = _fit(ConditionalNormal(), y, context=c[:, 0])
    for context in (_memmap(tmp_path, c[:, 0].numpy(), "c.npy"), c[:, 0].numpy()):
        mapped = _memmap(tmp_path, y.numpy(), "y.npy")
        _assert_same(expected, _fit(ConditionalNormal(), mapped, context=context))


@pytest.mark.parametrize("batched", [False, True])
def test_dataset_gives_the_result_of_the_same_rows_and_reads_batch_by_batch(batched):
    x = _blobs()
    dataset = Rows(x, batched=batched)
    _assert_same(_fit(Mixture(), x), _fit(Mixture(), dataset))
    if batched:  # the batches, the probe row, the validation batches; never all rows at once
        assert max(dataset.reads) == 64 and 1 in dataset.reads
    else:
        assert set(dataset.reads) == {1}
    assert sum(dataset.reads) < 6 * len(x)  # 3 epochs of 480 rows, ~8 evaluations of 120 rows
    # (row, context) pairs, and a Dataset for the validation rows too.
    c = torch.randn(600, 1, generator=torch.Generator().manual_seed(2))
    y = 2.0 * c - 1.0 + x[:, :1]
    expected = _fit(ConditionalNormal(), y, context=c)
    _assert_same(expected, _fit(ConditionalNormal(), Rows(y, c, batched=batched)))
    _assert_same(
        _fit(
            ConditionalNormal(),
            y[:500],
            context=c[:500],
            validation=y[500:],
            validation_context=c[500:],
        ),
        _fit(ConditionalNormal(), Rows(y[:500], c[:500]), validation=Rows(y[500:], c[500:])),
    )
    _assert_same(
        _fit(
            ConditionalNormal(),
            y[:500],
            context=c[:500],
            validation=y[500:],
            validation_context=c[500:],
        ),
        _fit(
            ConditionalNormal(),
            Rows(y[:500], c[:500]),
            validation=y[500:],
            validation_context=c[500:],
        ),
    )
    # A TensorDataset's items are 1-tuples: give its tensor, or a Dataset of rows.
    assert len(TensorDataset(x)[0]) == 1


def test_memmap_is_checked_in_chunks_with_the_messages_of_rows_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr("pyro_mixflow.fitting._rows.CHECK_ROWS", 16)
    data = _blobs(100).numpy()
    data[37, 1] = math.nan
    data[52, 0] = math.inf
    data[90] = -math.inf
    with pytest.raises(
        ValueError, match=r"`data` has 3 row\(s\) with NaN or infinite values \(first: row 37\)"
    ):
        fit(Mixture(), _memmap(tmp_path, data), steps=2, progress=False)
    with pytest.raises(ValueError, match=r"`validation` has 3 row\(s\).*first: row 37"):
        fit(
            Mixture(),
            _blobs(),
            validation=_memmap(tmp_path, data, "v.npy"),
            steps=2,
            progress=False,
        )
    big = np.zeros((40, 2))
    big[33, 0] = 1e300
    with pytest.raises(ValueError, match=r"1 row\(s\).*row 33; its values overflow torch.float32"):
        fit(Mixture(), _memmap(tmp_path, big, "big.npy"), steps=2, progress=False)
    cases = [
        (np.zeros((3, 2), dtype=bool), TypeError, r"`data` must hold real numbers, got dtype bool"),
        (np.zeros((0, 2)), ValueError, r"`data` is empty \(shape \(0, 2\)\)"),
        (np.zeros((4, 2, 1)), ValueError, r"`data` must have shape \(N, D\) or \(N,\), got \(4, 2"),
        (
            np.zeros((4, 3)),
            ValueError,
            r"rows of shape \(3,\) \(shape \(4, 3\)\) .*event_shape \(2,\)",
        ),
    ]
    for i, (array, error, match) in enumerate(cases):
        mapped = np.memmap(tmp_path / f"{i}.bin", dtype=array.dtype, mode="w+", shape=array.shape)
        with pytest.raises(error, match=match):
            fit(Mixture(), mapped, steps=2, progress=False)
    mapped = _memmap(tmp_path, _blobs(50).numpy(), "ok.npy")
    with pytest.raises(ValueError, match=r"`context` has 49 row\(s\) but `data` has 50"):
        fit(ConditionalNormal(), mapped[:, :1], context=np.zeros(49), steps=2, progress=False)


class Infinite(IterableDataset):
    def __iter__(self):
        yield torch.zeros(2)


PAIRS = Rows(_blobs(), torch.zeros(600, 1))


@pytest.mark.parametrize(
    ("data", "kwargs", "error", "match"),
    [
        (DataLoader(PAIRS), {}, TypeError, r"is a DataLoader; give its dataset \(`loader.dataset`"),
        (
            Infinite(),
            {},
            TypeError,
            r"a map-style Dataset with a length \(`__len__`\), got Infinite",
        ),
        (Rows(_blobs()[:0]), {}, ValueError, r"`data` is empty \(a Dataset of 0 items\)"),
        (
            PAIRS,
            {"context": PAIRS.context},
            ValueError,
            r"`context` goes with tensor or array `data`",
        ),
        (Rows(_blobs() > 0), {}, TypeError, r"real numbers, got dtype torch.bool \(item 0\)"),
        (Rows(["a", "b"]), {}, TypeError, r"real numbers, got dtype <U1 \(item 0\)"),
        (Rows(torch.zeros(4, 2, 2)), {}, ValueError, r"item 0 has a row of shape \(2, 2\); items"),
        (
            PAIRS,
            {"validation": _blobs()},
            ValueError,
            r"`data` has context rows, `validation` has no",
        ),
    ],
)
def test_bad_datasets(data, kwargs, error, match):
    model = ConditionalNormal() if "context rows" in match else Mixture()
    with pytest.raises(error, match=match):
        fit(model, data, steps=2, progress=False, **kwargs)


def test_a_bad_dataset_item_is_named_when_its_batch_is_read():
    class Ragged(Rows):
        def __getitem__(self, i):
            return self.rows[i, :1] if i == 450 else self.rows[i]

    x = _blobs()
    x[450, 0] = math.nan
    model = Mixture()
    with pytest.raises(ValueError, match=r"`data` item 450 has NaN or infinite values; remove"):
        fit(model, Rows(x), epochs=1, batch_size=600, validation=None, progress=False)
    with pytest.raises(
        ValueError, match=r"`data` item 450 has shape \(1,\) but item \d+ has \(2,\)"
    ):
        fit(model, Ragged(x), epochs=1, batch_size=600, validation=None, progress=False)
    pairs = Rows(x[:, :1], torch.randn(600, 1))
    pairs.rows[450] = 0.0
    pairs.context[450] = math.inf
    with pytest.raises(ValueError, match=r"`data` item 450 has NaN or infinite context values"):
        fit(ConditionalNormal(), pairs, epochs=1, batch_size=600, validation=None, progress=False)
