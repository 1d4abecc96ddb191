"""The ``pyro-mixflow`` command line: demo, fit/score/sample round trips, one-line errors, atomic
outputs and Ctrl-C, the model file format, and the module entry point."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro_mixflow
import pyro_mixflow.io
from pyro_mixflow.cli import files, main
from pyro_mixflow.fitting import split_validation
from pyro_mixflow.io import MODELS, build_model, load_model_file, save_model

# Tiny, fast models: a few Adam steps, two components, narrow networks, one thread.
FAST = ["--steps", "3", "--components", "2", "--threads", "1", "--no-progress"]
HIDDEN = {"gmm": [], "flow": ["--hidden-dims", "8"], "cwm": ["--hidden-dims", "8"]}
HIDDEN["rad"] = ["--hidden-dims", "8"]
INTERRUPTED = "pyro-mixflow: interrupted; output files are left as they were\n"


def _data(num_rows: int = 120, dim: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.choice([-2.0, 2.0], size=(num_rows, 1))
    return centers + 0.5 * rng.standard_normal((num_rows, dim))


def _csv(path: Path, values: np.ndarray, header: str | None = None) -> Path:
    np.savetxt(path, values, delimiter=",", header=header or "", comments="", fmt="%.17g")
    return path


def _run(capsys, *args: str) -> tuple[int, str, str]:
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _fit(capsys, tmp_path: Path, data: Path, model: str = "gmm", *extra: str) -> Path:
    out = tmp_path / f"{model}.pt"
    status, _, err = _run(capsys, "fit", data, "--model", model, *FAST, *extra, "--out", out)
    assert status == 0, err
    return out


def _one_line_error(err: str, pattern: str) -> None:
    assert err.startswith("pyro-mixflow") and ": error: " in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err


def _leftovers(folder: Path) -> list[Path]:
    return list(folder.glob(".*.tmp"))


# --- demo (unchanged behaviour) -------------------------------------------------------------


def test_demo_prints_a_table_and_writes_a_picture(tmp_path, capsys):
    out = tmp_path / "demo.png"
    args = ["demo", "--datasets", "8gaussians", "--steps", "5", "--num-train", "500", "--threads=1"]
    status = main([*args, "--num-test", "500", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "| 8gaussians | gmm |" in printed and "| 8gaussians | flow |" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not _leftovers(tmp_path)


# --- fit / score / sample -------------------------------------------------------------------


@pytest.mark.parametrize("model", list(MODELS))
def test_fit_score_sample_round_trip(model, tmp_path, capsys):
    x = _data()
    data = _csv(tmp_path / "data.csv", x, header="a,b")
    out = tmp_path / f"{model}.pt"
    args = ["fit", data, "--model", model, *FAST, *HIDDEN[model], "--out", out]
    status, printed, err = _run(capsys, *args)
    assert status == 0, err
    assert printed.count("\n") == 1 and printed.startswith(f"{model} (")
    assert re.search(r"train log-lik -?\d+\.\d+, validation log-lik -?\d+\.\d+ \(12 rows", printed)
    assert "on 108 rows of dimension 2" in printed and str(out) in printed
    assert not _leftovers(tmp_path)

    # The file reloads with its configuration; score is that model's log_prob, exactly.
    loaded = load_model_file(out)
    assert loaded.name == model and loaded.input_dim == 2 and loaded.columns == ("a", "b")
    assert loaded.kwargs[MODELS[model].components] == 2
    if HIDDEN[model]:
        assert loaded.kwargs["hidden_dims"] == (8,)
    assert loaded.info["steps"] == 3 and loaded.info["train_rows"] == 108
    status, printed, err = _run(capsys, "score", out, data)
    assert status == 0, err
    scores = np.array(printed.split(), dtype=np.float64).astype(np.float32)
    with torch.no_grad():
        expected = loaded.model().log_prob(torch.as_tensor(x, dtype=torch.float32)).numpy()
    assert scores.shape == (120,) and np.array_equal(scores, expected)

    # Samples: the training header, N rows, reproducible with a seed.
    status, printed, err = _run(capsys, "sample", out, "-n", "7", "--seed", "3")
    assert status == 0, err
    lines = printed.splitlines()
    assert lines[0] == "a,b" and len(lines) == 8
    draws = np.loadtxt(lines[1:], delimiter=",")
    assert draws.shape == (7, 2) and np.isfinite(draws).all()
    assert _run(capsys, "sample", out, "-n", "7", "--seed", "3")[1] == printed


def test_csv_with_and_without_header_and_npy_agree(tmp_path, capsys):
    x = _data()
    with_header = _csv(tmp_path / "h.csv", x, header="a,b")
    plain = _csv(tmp_path / "p.csv", x)
    array = tmp_path / "x.npy"
    np.save(array, x)
    model = _fit(capsys, tmp_path, plain)
    assert load_model_file(model).columns is None
    outputs = [_run(capsys, "score", model, path)[1] for path in (with_header, plain, array)]
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0].split()) == 120
    # No header in training data: none in samples either.
    first = _run(capsys, "sample", model, "-n", "2")[1].splitlines()[0]
    assert len(np.array(first.split(","), dtype=float)) == 2


def test_score_checks_column_names_when_both_have_them(tmp_path, capsys):
    x = _data()
    model = _fit(capsys, tmp_path, _csv(tmp_path / "ab.csv", x, header="a,b"))
    swapped = _csv(tmp_path / "ba.csv", x[:, ::-1], header="b,a")
    status, printed, err = _run(capsys, "score", model, swapped)
    assert status == 2 and printed == ""
    _one_line_error(err, r"has columns \(b, a\) but MODEL \S+ was fitted to \(a, b\); reorder")
    assert _run(capsys, "score", model, _csv(tmp_path / "plain.csv", x))[0] == 0


@pytest.mark.parametrize(
    "text",
    ["a, b\n1, 2\n3, 4.5\n", "1,2\n\n3,4\n", "\ufeffx\n1\n2\n", ' "a","b"\n1,-2e3\n', "1\n2\n"],
)
def test_fast_and_careful_csv_readers_agree(text, tmp_path):
    path = tmp_path / "x.csv"
    path.write_text(text, encoding="utf-8")
    fast = files._read_text_fast(path)
    assert fast is not None
    values, columns, _ = files._read_text(path, "DATA")
    assert np.array_equal(fast[0], values) and fast[1] == columns


def test_one_dimensional_npy(tmp_path, capsys):
    array = tmp_path / "x.npy"
    np.save(array, _data(dim=1)[:, 0].astype(np.float32))
    model = _fit(capsys, tmp_path, array)
    assert load_model_file(model).input_dim == 1
    status, printed, _ = _run(capsys, "sample", model, "-n", "4", "--seed", "0")
    assert status == 0 and np.loadtxt(printed.splitlines()).shape == (4,)


def test_score_and_sample_write_csv_and_npy_files(tmp_path, capsys):
    data = _csv(tmp_path / "data.csv", _data())
    model = _fit(capsys, tmp_path, data)
    stdout = np.array(_run(capsys, "score", model, data)[1].split(), dtype=np.float32)
    assert _run(capsys, "score", model, data, "--out", tmp_path / "s.csv") == (0, "", "")
    assert _run(capsys, "score", model, data, "--out", tmp_path / "out" / "s.npy")[0] == 0
    assert np.array_equal(np.loadtxt(tmp_path / "s.csv", dtype=np.float32), stdout)
    assert np.array_equal(np.load(tmp_path / "out" / "s.npy"), stdout)
    for name in ("d.csv", "d.npy"):
        assert _run(capsys, "sample", model, "-n", "9", "--seed", "0", "--out", tmp_path / name)
    from_csv = np.loadtxt(tmp_path / "d.csv", delimiter=",", dtype=np.float32)
    from_npy = np.load(tmp_path / "d.npy")
    assert from_npy.shape == (9, 2) and np.array_equal(from_csv, from_npy)
    assert not _leftovers(tmp_path) and not _leftovers(tmp_path / "out")


def test_sample_in_chunks_and_without_validation(tmp_path, capsys, monkeypatch):
    data = _csv(tmp_path / "data.csv", _data())
    model = tmp_path / "m.pt"
    args = ["fit", data, "--model", "gmm", *FAST, "--validation", "0", "--out", model]
    status, printed, _ = _run(capsys, *args)
    assert status == 0 and "no validation" in printed and "on 120 rows" in printed
    monkeypatch.setattr("pyro_mixflow.cli.commands.CHUNK_ROWS", 4)
    status, printed, _ = _run(capsys, "sample", model, "-n", "10", "--no-progress")
    assert status == 0 and np.loadtxt(printed.splitlines(), delimiter=",").shape == (10, 2)


def test_threads_option_is_restored(tmp_path, capsys):
    threads = torch.get_num_threads()
    data = _csv(tmp_path / "data.csv", _data())
    _fit(capsys, tmp_path, data)  # runs with --threads 1
    assert torch.get_num_threads() == threads


# --- bad input: one line on stderr, exit status 2, nothing written --------------------------


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(
    "name,content,pattern",
    [
        ("missing.csv", None, r"DATA \S*missing.csv does not exist"),
        ("empty.csv", "", r"empty.csv is empty: it has no data rows"),
        ("blank.csv", "\n  \n", r"is empty: it has no data rows"),
        ("header.csv", "a,b\n", r"is empty: it has a header but no data rows"),
        ("ragged.csv", "1,2\n3,4\n5,6,7\n", r"line 3 has 3 value\(s\), but line 1 has 2$"),
        ("ragged2.csv", "a,b\n1\n", r"line 2 has 1 value\(s\), but the header has 2$"),
        ("text.csv", "1,2\n3,x\n", r"line 2, column 2: 'x' is not a number$"),
        ("hole.csv", "1,2\n,4\n", r"line 2, column 1: an empty field is not a number$"),
        ("mixed.csv", "a,1\n2,3\n", r"line 1, column 1: 'a' is not a number$"),
        ("nan.csv", "1,2\n\n3,nan\n4,-inf\n", r"2 row\(s\) with NaN or inf.* \(first: line 3\)"),
        ("big.csv", "1,2\n1e39,0\n", r"1 row\(s\) with values beyond the float32 range \(first"),
        ("binary.csv", b"\x89PNG\r\n\x1a\n\xff\xfe", r"binary.csv is not UTF-8 text"),
        ("inf.npy", np.array([[0.0, 1.0], [np.inf, 0.0]]), r"NaN or infinite.* \(first: index 1\)"),
        ("objects.npy", np.array([{}, 1], dtype=object), r"cannot be read \(it holds Python obj"),
        ("cube.npy", np.zeros((3, 2, 2)), r"must have shape \(N, D\) or \(N,\), got \(3, 2, 2\)"),
        ("none.npy", np.zeros((0, 2)), r"none.npy is empty \(shape \(0, 2\)\)"),
        ("flags.npy", np.ones((3, 2), dtype=bool), r"must hold real numbers, got dtype bool"),
        ("fake.npy", "1,2\n", r"fake.npy cannot be read \(not a .npy array\)"),
    ],
)  # fmt: skip
def test_bad_data_is_one_line_and_nothing_is_written(name, content, pattern, tmp_path, capsys):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content, allow_pickle=True)
    elif content is not None:
        _write(path, content)
    out = tmp_path / "m.pt"
    status, printed, err = _run(capsys, "fit", path, "--model", "gmm", *FAST, "--out", out)
    assert status == 2 and printed == ""
    _one_line_error(err, pattern)
    assert not out.exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--components", "200"], r"`--components` \(200\) is more than the 108 training row"),
        (["--hidden-dims", "8"], r"`--hidden-dims` does not apply to `--model gmm`"),
        (["--model", "flow", "--hidden-dims", "8", "16"], r"`--model flow`: `hidden_dims` must"),
        (["--steps", "0"], r"fit: error: argument --steps: expected a positive integer, got '0'"),
        (["--epochs", "2"], r"argument --epochs: not allowed with argument --steps"),
        (["--lr", "-1"], r"argument --lr: expected a positive number, got '-1'"),
        (["--validation", "1"], r"argument --validation: expected a fraction in \[0, 1\)"),
        (["--model", "nope"], r"argument --model: invalid choice: 'nope'"),
    ],
)
def test_bad_fit_options(args, pattern, tmp_path, capsys):
    data = _csv(tmp_path / "data.csv", _data())
    out = tmp_path / "m.pt"
    status, _, err = _run(capsys, "fit", data, "--model", "gmm", *FAST, *args, "--out", out)
    assert status == 2
    _one_line_error(err, pattern)
    assert not out.exists()


def test_fit_needs_out_and_training_rows(tmp_path, capsys):
    data = _csv(tmp_path / "data.csv", _data(num_rows=1))
    status, _, err = _run(capsys, "fit", data, "--model", "gmm")
    assert status == 2
    _one_line_error(err, r"the following arguments are required: --out")
    args = ["fit", data, "--model", "gmm", "--validation", "0.5", "--out", tmp_path / "m.pt"]
    _one_line_error(_run(capsys, *args)[2], r"`--validation 0.5` leaves no training rows out of 1")
    args = ["fit", data, "--model", "gmm", "--out", tmp_path]
    _one_line_error(_run(capsys, *args)[2], r"`--out` \S+ is a directory; give a file name")


class _Boom:
    """A pickle that would run code when unpickled; a safe load must refuse it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _bad_model_files(folder: Path) -> dict[str, tuple[Path, str]]:
    model = build_model("gmm", 2, num_components=2)
    kwargs = pyro_mixflow.io.stored_arguments(model)
    good = folder / "good.pt"
    save_model(model, good)
    files = {}

    def variant(name: str, pattern: str, **changes) -> None:
        payload = torch.load(good, weights_only=True)
        payload.update(changes)
        torch.save(payload, folder / name)
        files[name] = (folder / name, pattern)

    boom = folder / "boom.pt"
    boom.write_bytes(pickle.dumps({"x": _Boom(folder / "SHOULD_NOT_EXIST")}))
    files["boom"] = (boom, r"holds Python objects that a safe load refuses to run")
    files["missing"] = (folder / "nope.pt", r"MODEL \S*nope.pt does not exist")
    files["folder"] = (folder, r"is a directory, not a model file")
    files["text"] = (_write(folder / "t.pt", "hello\n"), r"is not a readable PyTorch file")
    files["empty"] = (_write(folder / "e.pt", ""), r"is not a readable PyTorch file \(EOFError\)")
    torch.save(model.state_dict(), folder / "weights.pt")
    files["state_dict"] = (folder / "weights.pt", r"is a PyTorch file but not a pyro-mixflow model")
    variant("future.pt", r"has format version 2, newer than this pyro-mixflow reads \(1\)",
            format_version=2)  # fmt: skip
    variant("unknown.pt", r"holds model 'vae', which this pyro-mixflow does not know", model="vae")
    variant("mismatch.pt", r"its parameters do not fit model 'gmm' with its saved configuration",
            kwargs={**kwargs, "num_components": 5})  # fmt: skip
    variant("damaged.pt", r"is damaged: no configuration or no parameters", state_dict=None)
    return files


def test_bad_model_files_are_one_line_errors(tmp_path, capsys):
    data = _csv(tmp_path / "data.csv", _data())
    for name, (path, pattern) in _bad_model_files(tmp_path).items():
        for command in (["score", path, data], ["sample", path, "-n", "3"]):
            status, printed, err = _run(capsys, *command)
            assert not (tmp_path / "SHOULD_NOT_EXIST").exists()  # the pickle did not run
            assert status == 2 and printed == "", name
            _one_line_error(err, pattern)
    assert not (tmp_path / "SHOULD_NOT_EXIST").exists()


@pytest.mark.parametrize(
    "command,pattern",
    [
        (["score", "{model}", "{data3}"], r"has 3 column\(s\) but MODEL \S+ \(gmm\) was fitted to"),
        (["score", "{model}", "{data}", "--out", "s.txt"], r"`--out` must end in .csv or .npy, "),
        (["sample", "{model}", "-n", "3", "--out", "s.json"], r"`--out` must end in .csv or .npy"),
        (["sample", "{model}", "-n", "0"], r"sample: error: argument -n/--num-samples: expected a"),
        (["sample", "{model}", "-n", "1.5"], r"expected a positive integer, got '1.5'"),
        (["sample", "{model}", "-n", "ten"], r"expected a positive integer, got 'ten'"),
        (["sample", "{model}"], r"the following arguments are required: -n/--num-samples"),
        (["score", "{model}"], r"the following arguments are required: DATA"),
    ],
)  # fmt: skip
def test_bad_score_and_sample_arguments(command, pattern, tmp_path, capsys):
    data = _csv(tmp_path / "data.csv", _data())
    paths = {
        "model": _fit(capsys, tmp_path, data),
        "data": data,
        "data3": _csv(tmp_path / "data3.csv", _data(dim=3)),
    }
    status, printed, err = _run(capsys, *(part.format(**paths) for part in command))
    assert status == 2 and printed == ""
    _one_line_error(err, pattern)


def test_demo_bad_input(capsys):
    for args, message in [
        (["demo", "--datasets", "nope", "--steps", "1"], "nope"),
        (["demo", "--steps", "0"], "`--steps` must be >= 1"),
    ]:
        assert main(args) == 2
        _one_line_error(capsys.readouterr().err, re.escape(message))


@pytest.mark.parametrize("suffix", [".csv", ".npy"])
def test_score_names_a_row_whose_log_density_is_not_finite(suffix, tmp_path, capsys):
    """-1e30 is finite data, but its log-density overflows float32: an error naming the row,
    never a silent ``nan`` or ``-inf`` score."""
    data = _csv(tmp_path / "data.csv", _data(), header="a,b")
    model = _fit(capsys, tmp_path, data)
    x = np.array([[0.0, 0.0], [1.0, -1.0], [-1e30, 0.0], [1e30, 1e30]])
    if suffix == ".csv":
        far, where = _csv(tmp_path / "far.csv", x, header="a,b"), "line 4"
    else:
        far, where = tmp_path / "far.npy", "index 2"
        np.save(far, x)
    out = tmp_path / "s.csv"
    status, printed, err = _run(capsys, "score", model, far, "--out", out)
    assert status == 2 and printed == "" and not out.exists()
    pattern = rf"has 2 row\(s\) whose log-density under MODEL \S+ is not finite \(first: {where}, "
    _one_line_error(err, rf"DATA \S*far{suffix} {pattern}")
    status, printed, err = _run(capsys, "score", model, data)
    assert status == 0 and np.isfinite(np.array(printed.split(), dtype=float)).all()


def test_score_refuses_blank_lines_between_rows(tmp_path, capsys):
    """One score per data row: a blank line inside the data would shift the scores against
    the lines, so it is an error naming it; blank lines around the data are fine."""
    model = _fit(capsys, tmp_path, _csv(tmp_path / "data.csv", _data(), header="a,b"))
    for name, text, line in [
        ("inner.csv", "a,b\n0,0\n1,1\n \n2,2\n", 4),
        ("header.csv", "a,b\n\n0,0\n", 2),
        ("crlf.csv", "0,0\r\n\r\n1,1\r\n", 2),
        ("commas.csv", "\n0,0\n,\n1,1\n", 3),
    ]:
        status, printed, err = _run(capsys, "score", model, _write(tmp_path / name, text))
        assert status == 2 and printed == "", name
        pattern = rf"{name} line {line} is blank; remove blank lines between data rows"
        _one_line_error(err, pattern)
    edges = _write(tmp_path / "edges.csv", "\n \na,b\n0,0\n1,1\n\n\n")
    status, printed, err = _run(capsys, "score", model, edges)
    assert status == 0 and len(printed.split()) == 2, err
    # `fit` has no output per row: it still skips blank lines.
    _fit(capsys, tmp_path, _write(tmp_path / "gaps.csv", "0,0\n\n1,1\n\n0,1\n1,0\n"))


def test_data_given_as_model_says_it_is_not_a_model_file(tmp_path, capsys):
    data = _csv(tmp_path / "data.csv", _data(), header="a,b")
    array = tmp_path / "x.npy"
    np.save(array, _data())
    for path, kind in [(data, "CSV text"), (array, "a .npy array")]:
        for command in (["score", path, data], ["sample", path, "-n", "3"]):
            status, printed, err = _run(capsys, *command)
            assert status == 2 and printed == ""
            _one_line_error(err, rf"MODEL \S+ is not a model file \(it looks like {kind}\); ")


def test_fit_holds_out_the_rows_of_split_validation(tmp_path, capsys):
    x = _data()
    model = _fit(capsys, tmp_path, _csv(tmp_path / "data.csv", x), "gmm", "--seed", "4")
    loaded = load_model_file(model)
    rows = torch.as_tensor(x, dtype=torch.float32)
    generator = torch.Generator().manual_seed(4)
    _, val = split_validation(rows, 0.1, generator=generator)
    with torch.no_grad():
        expected = loaded.model().log_prob(val).double().sum().item() / len(val)
    assert loaded.info["validation_rows"] == 12
    assert loaded.info["validation_log_lik"] == expected


# --- Ctrl-C and failures: exit status, one line, no half-written output ---------------------


def test_ctrl_c_during_training_leaves_no_model(tmp_path, capsys, monkeypatch):
    data = _csv(tmp_path / "data.csv", _data())
    calls = []
    forward = pyro_mixflow.nn.GMM.forward

    def interrupted(self, context=None):
        calls.append(1)
        if len(calls) > 3:  # after EM and the first steps: in the middle of training
            raise KeyboardInterrupt
        return forward(self, context)

    monkeypatch.setattr(pyro_mixflow.nn.GMM, "forward", interrupted)
    out = tmp_path / "m.pt"
    args = ["fit", data, "--model", "gmm", *FAST[2:], "--steps", "50", "--out", out]
    status, printed, err = _run(capsys, *args)
    assert status == 130 and printed == "" and len(calls) == 4
    assert err == INTERRUPTED
    assert not out.exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize("target", ["model", "csv", "npy"])
def test_ctrl_c_while_writing_keeps_the_old_file(target, tmp_path, capsys, monkeypatch):
    data = _csv(tmp_path / "data.csv", _data())
    model = _fit(capsys, tmp_path, data)
    out = tmp_path / {"model": "m.pt", "csv": "s.csv", "npy": "s.npy"}[target]
    out.write_bytes(b"previous content")

    def half_written(file, *args, **kwargs):
        file.write(b"partial" if "b" in getattr(file, "mode", "b") else "partial")
        raise KeyboardInterrupt

    if target == "model":
        monkeypatch.setattr(pyro_mixflow.io.torch, "save", lambda obj, file: half_written(file))
        command = ["fit", data, "--model", "gmm", *FAST, "--out", out]
    else:
        monkeypatch.setattr(files.np, "savetxt" if target == "csv" else "save", half_written)
        command = ["score", model, data, "--out", out]
    status, _, err = _run(capsys, *command)
    assert status == 130 and err == INTERRUPTED
    assert out.read_bytes() == b"previous content" and not _leftovers(tmp_path)


def test_divergence_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
    def diverges(*args, **kwargs):
        raise RuntimeError("Training diverged at step 2 of 3: the training loss is nan;\nhint")

    monkeypatch.setattr(pyro_mixflow, "fit", diverges)
    data = _csv(tmp_path / "data.csv", _data())
    out = tmp_path / "m.pt"
    status, _, err = _run(capsys, "fit", data, "--model", "gmm", *FAST, "--out", out)
    assert status == 1 and not out.exists()
    _one_line_error(err, r"Training diverged at step 2 of 3: the training loss is nan; hint$")


def test_closed_stdout_is_quiet(tmp_path, capsys, monkeypatch):
    model = _fit(capsys, tmp_path, _csv(tmp_path / "data.csv", _data()))

    def broken_pipe(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("pyro_mixflow.cli.commands.write_rows", broken_pipe)
    status, _, err = _run(capsys, "sample", model, "-n", "3")
    assert status == 1 and err == ""


def test_atomic_write_gives_normal_permissions(tmp_path):
    with pyro_mixflow.io.atomic_write(tmp_path / "a" / "b.txt", text=True) as file:
        file.write("x")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert (tmp_path / "a" / "b.txt").stat().st_mode == plain.stat().st_mode


# --- help, version, entry point -------------------------------------------------------------


def test_help_and_version(capsys):
    assert main([]) == 2
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("demo", "fit", "score", "sample", "examples:"))
    for command, expected in [
        ("fit", "--components K"),
        ("score", "log p(x)"),
        ("sample", "-n N, --num-samples N"),
    ]:
        assert main([command, "--help"]) == 0
        assert expected in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"pyro-mixflow {pyro_mixflow.__version__}\n"


@pytest.mark.scripts
def test_module_entry_point_fits_a_model(tmp_path):
    _csv(tmp_path / "data.csv", _data())
    env = {**os.environ, "PYTHONPATH": str(Path(pyro_mixflow.__file__).parents[1])}
    command = [sys.executable, "-m", "pyro_mixflow", "fit", "data.csv", "--model", "gmm", *FAST]
    out = subprocess.run(
        [*command, "--out", "m.pt"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("gmm (num_components=2") and (tmp_path / "m.pt").is_file()


def _conditional_table(num_rows: int = 200, seed: int = 0) -> np.ndarray:
    """Columns (x1, c, x2): x = c * (1, -1) + noise, so the context moves the data."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(-2.0, 2.0, size=(num_rows, 1))
    x = c * np.array([1.0, -1.0]) + 0.3 * rng.standard_normal((num_rows, 2))
    return np.concatenate([x[:, :1], c, x[:, 1:]], axis=1)


@pytest.mark.parametrize("model", list(MODELS))
def test_conditional_fit_score_sample_round_trip(tmp_path, capsys, model):
    table = _conditional_table()
    data = _csv(tmp_path / "table.csv", table, header="x1,c,x2")
    out = _fit(capsys, tmp_path, data, model, *HIDDEN[model], "--context-columns", "c")
    loaded = load_model_file(out)
    assert loaded.input_dim == 2 and loaded.kwargs["context_dim"] == 1
    assert loaded.info["context_columns"] == (1,) and loaded.columns == ("x1", "c", "x2")

    status, stdout, err = _run(capsys, "score", out, data)
    assert status == 0, err
    scores = np.array(stdout.split(), dtype=float)
    x = torch.as_tensor(table[:, [0, 2]], dtype=torch.float32)
    c = torch.as_tensor(table[:, [1]], dtype=torch.float32)
    with torch.no_grad():
        expected = loaded.model(c).log_prob(x).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-6)

    context = _csv(tmp_path / "context.csv", np.array([[-1.5], [1.5]]))
    status, stdout, err = _run(
        capsys, "sample", out, "-n", "3", "--context", context, "--seed", "0"
    )
    assert status == 0, err
    lines = stdout.splitlines()
    assert lines[0] == "x1,c,x2" and len(lines) == 1 + 2 * 3
    drawn = np.array([line.split(",") for line in lines[1:]], dtype=float)
    np.testing.assert_array_equal(drawn[:, 1], [-1.5] * 3 + [1.5] * 3)  # context where it was


def test_conditional_fit_learns_the_context_dependence(tmp_path, capsys):
    table = _conditional_table(2000)
    data = _csv(tmp_path / "table.csv", table)  # no header: positions
    out = tmp_path / "mdn.pt"
    args = ["--components", "3", "--steps", "300", "--lr", "0.01", "--no-progress"]
    status, stdout, err = _run(
        capsys,
        "fit",
        data,
        "--model",
        "gmm",
        "--context-columns",
        "1",
        "--hidden-dims",
        "16",
        *args,
        "--out",
        out,
    )
    assert status == 0, err
    assert "given 1 context column(s)" in stdout
    model = load_model_file(out).model
    with torch.no_grad():
        means = model(torch.tensor([[-1.5], [1.5]])).mean
    # E[x | c] = c * (1, -1); 0.3 noise on 2000 rows puts the fitted means within ~0.1.
    torch.testing.assert_close(means, torch.tensor([[-1.5, 1.5], [1.5, -1.5]]), atol=0.2, rtol=0)


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--context-columns", "z"], r"`--context-columns`: 'z' is not one of the header's names"),
        (
            ["--context-columns", "3"],
            r"'3' is not one of the header's names \(x1, c, x2\) or the positions 0 to 2",
        ),
        (["--context-columns", "c,c"], r"names a column twice"),
        (["--context-columns", "x1,c,x2"], r"leaves no data columns"),
        (
            ["--hidden-dims", "8"],
            r"`--hidden-dims` does not apply to `--model gmm` without `--context-columns`",
        ),
    ],
)
def test_bad_context_columns(tmp_path, capsys, args, pattern):
    data = _csv(tmp_path / "table.csv", _conditional_table(), header="x1,c,x2")
    status, _, err = _run(
        capsys, "fit", data, "--model", "gmm", *FAST, *args, "--out", tmp_path / "m.pt"
    )
    assert status == 2
    _one_line_error(err, pattern)


def test_conditional_sample_and_score_errors(tmp_path, capsys):
    table = _conditional_table()
    data = _csv(tmp_path / "table.csv", table, header="x1,c,x2")
    out = _fit(capsys, tmp_path, data, "gmm", "--context-columns", "c")
    status, _, err = _run(capsys, "sample", out, "-n", "2")
    assert status == 2
    _one_line_error(err, r"is conditional \(1 context column\(s\)\): give `--context FILE`")
    wide = _csv(tmp_path / "wide.csv", np.zeros((2, 2)))
    status, _, err = _run(capsys, "sample", out, "-n", "2", "--context", wide)
    _one_line_error(err, r"CONTEXT .* has 2 column\(s\) but MODEL .* takes 1")
    narrow = _csv(tmp_path / "narrow.csv", table[:, [0, 2]])
    status, _, err = _run(capsys, "score", out, narrow)
    _one_line_error(
        err, r"has 2 column\(s\) but MODEL .* was fitted to 2 and 1 context column\(s\)"
    )
    plain = _fit(capsys, tmp_path, _csv(tmp_path / "x.csv", _data()), "flow", *HIDDEN["flow"])
    status, _, err = _run(capsys, "sample", plain, "-n", "2", "--context", wide)
    _one_line_error(err, r"`--context` applies to conditional models")


# --- a .npy DATA is memory-mapped: read batch by batch, never whole -------------------------


def test_fit_memory_maps_npy_and_holds_out_the_rows_of_split_validation(
    tmp_path, capsys, monkeypatch
):
    x = _data().astype(np.float32)
    array = tmp_path / "x.npy"
    np.save(array, x)
    modes = []
    load = np.load

    def spy(*args, **kwargs):
        modes.append(kwargs.get("mmap_mode"))
        return load(*args, **kwargs)

    monkeypatch.setattr(files.np, "load", spy)
    from pyro_mixflow.nn import GMM

    starts = []
    init = GMM.init_from_data

    def spy_init(self, data, context=None, **kwargs):
        starts.append(data.clone())
        return init(self, data, context, **kwargs)

    monkeypatch.setattr(GMM, "init_from_data", spy_init)
    model = _fit(capsys, tmp_path, array, "gmm", "--seed", "4")
    assert modes == ["r"]
    loaded = load_model_file(model)
    train, val = split_validation(
        torch.as_tensor(x), 0.1, generator=torch.Generator().manual_seed(4)
    )
    assert torch.equal(starts[0], train)  # fewer rows than INIT_ROWS: all training rows, in order
    with torch.no_grad():
        expected = loaded.model().log_prob(val).double().sum().item() / len(val)
    assert loaded.info["validation_rows"] == 12 and loaded.info["train_rows"] == 108
    assert loaded.info["validation_log_lik"] == expected
    # More training rows than INIT_ROWS: the model starts from a random subsample of them.
    monkeypatch.setattr("pyro_mixflow.cli.commands.INIT_ROWS", 50)
    _fit(capsys, tmp_path, array, "gmm", "--seed", "4")
    sample = starts[1]
    assert sample.shape == (50, 2) and not torch.equal(sample, train[:50])
    assert all(bool((row == train).all(-1).any()) for row in sample)  # training rows only


def test_fit_on_memory_mapped_npy_with_context_columns(tmp_path, capsys):
    x = _data(dim=3)
    array = tmp_path / "x.npy"
    np.save(array, x)
    out = _fit(capsys, tmp_path, array, "gmm", "--context-columns", "2", "--validation", "0.2")
    loaded = load_model_file(out)
    assert tuple(loaded.info["context_columns"]) == (2,) and loaded.input_dim == 2
    assert loaded.info["train_rows"] == 96 and loaded.info["validation_rows"] == 24
    status, printed, err = _run(capsys, "score", out, array)
    assert status == 0 and len(printed.split()) == 120, err


def test_memory_mapped_npy_is_checked_in_chunks(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("pyro_mixflow.cli.files.CHECK_ROWS", 4)
    x = _data()
    x[[9, 30], 1] = np.nan
    path = tmp_path / "nan.npy"
    np.save(path, x)
    status, _, err = _run(capsys, "fit", path, "--model", "gmm", *FAST, "--out", tmp_path / "m")
    assert status == 2
    _one_line_error(err, r"nan.npy has 2 row\(s\) with NaN or infinite values \(first: index 9\)")
    x[[9, 30], 1] = [0.0, 1e39]
    np.save(path, x)
    status, _, err = _run(capsys, "fit", path, "--model", "gmm", *FAST, "--out", tmp_path / "m")
    assert status == 2
    _one_line_error(err, r"1 row\(s\) with values beyond the float32 range \(first: index 30\)")
