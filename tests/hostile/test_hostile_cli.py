"""Mistaken command lines and data: one line naming the flag, field or file, exit code 2 for usage and
1 for failure, never a traceback (unless NESTLM_DEBUG=1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_helpers import assert_one_line, error_lines, fit_args, make_shards, run, tiny_model

from nestlm.train.prepare import prepare


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "e"
    tiny_model().save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--model.preset", "nope"], ["preset", "nope"]),
        (["--model.size", "huge"], ["size", "huge"]),
        (["--model.overrides", "{layers: XYZ}"], ["layers", "XYZ"]),
        (["--model.overrides", "{d_modle: 32}"], ["d_modle", "did you mean 'd_model'"]),
        (["--trainer.max_steps", "-5"], ["max_steps", "-5"]),
        (["--data.init_args.batch_size", "0"], ["batch_size=0"]),
        (["--data.init_args.seq_len", "abc"], ["--data.seq_len", "abc"]),
        (["--model.no_such_key", "1"], ["no_such_key"]),
    ],
)
def test_fit_usage_errors(tmp_path, capfd, shards, extra, needles):
    code, _, err = run(capfd, *fit_args(tmp_path / "run", shards, 2), *extra)
    assert_one_line(code, err, "fit", *needles, exit_code=2)
    assert not (tmp_path / "run" / "checkpoints").exists()


def copy_shards(src: Path, dst: Path) -> Path:
    """A copy of the shard folder src at dst, for a test to damage."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_shards_of_a_larger_vocabulary_than_the_model(tmp_path, capfd, shards):
    meta = json.loads((shards / "meta.json").read_text())
    big = copy_shards(shards, tmp_path / "big")
    (big / "meta.json").write_text(json.dumps({**meta, "vocab_size": 50257}))
    code, _, err = run(capfd, *fit_args(tmp_path / "run", big, 2))
    assert_one_line(code, err, "fit", "vocab_size is 50257", "257", exit_code=1)


def test_token_ids_past_the_model_vocabulary(tmp_path, capfd, shards):
    bad = copy_shards(shards, tmp_path / "bad")
    arr = np.fromfile(bad / "train_000.bin", dtype=np.uint16)
    arr[arr != 256] = 300  # a corrupt shard: ids the meta.json vocabulary does not have
    arr.tofile(bad / "train_000.bin")
    code, _, err = run(capfd, *fit_args(tmp_path / "run", bad, 2))
    assert_one_line(code, err, "fit", "token id 300", "[0, 257)", exit_code=1)


def test_empty_validation_shard_is_named(tmp_path, capfd, shards):
    empty = copy_shards(shards, tmp_path / "empty")
    for f in empty.glob("val_*"):
        f.write_bytes(b"")
    code, _, err = run(capfd, *fit_args(tmp_path / "run", empty, 2, "--trainer.val_check_interval", "1"))
    assert_one_line(code, err, "fit", "val_000.bin is empty", exit_code=1)


def test_eval_usage_errors(tmp_path, capfd, export_dir):
    base = ["eval", "--ckpt", export_dir, "--horizons", "5", "--episodes", "1", "--no-progress"]
    out = ["--out", tmp_path / "r.json"]
    cases = [
        (["--envs", ",", *out], ["--envs"]),
        (["--envs", "maze", *out], ["--envs", "maze"]),
        (["--threads", "-2", *out], ["--threads=-2"]),
        (["--threads", "x", *out], ["--threads", "'x'"]),
        (["--out", tmp_path], ["--out", str(tmp_path), "folder"]),
        (["--chunk-size", "0", *out], ["--chunk-size"]),
        (["--device", "tpu9", *out], ["--device", "tpu9"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda", *out], ["--device cuda", "CUDA"]))
    for extra, needles in cases:
        code, _, err = run(capfd, *base, *extra)
        assert_one_line(code, err, "eval", *needles, exit_code=2)
    code, _, err = run(capfd, "eval", "--ckpt", tmp_path / "nope", *out)
    assert_one_line(code, err, "eval", "nope", "does not exist", exit_code=2)
    assert not (tmp_path / "r.json").exists()


def test_eval_plot_into_a_missing_folder(tmp_path, capfd, export_dir):
    plot = tmp_path / "figs" / "new" / "r.png"
    code, _, err = run(
        capfd, "eval", "--ckpt", export_dir, "--envs", "shell", "--horizons", "5", "--episodes", "1",
        "--out", tmp_path / "r.json", "--plot", plot, "--no-progress",
    )  # fmt: skip
    assert code == 0 and "Traceback" not in err, err[-2000:]
    assert plot.is_file() and (tmp_path / "r.json").is_file()


def test_export_usage_errors(tmp_path, capfd, export_dir):
    code, _, err = run(capfd, "export", tmp_path / "none.ckpt", tmp_path / "out")
    assert_one_line(code, err, "export", "none.ckpt", "does not exist", exit_code=2)
    code, _, err = run(capfd, "export", export_dir, export_dir.parent)
    assert_one_line(code, err, "export", "not empty", exit_code=2)
    code, _, err = run(capfd, "export", "--bogus", export_dir, tmp_path / "out")
    assert_one_line(code, err, "export", "--bogus", exit_code=2)


def test_prepare_data_round_trips_bytes_exactly(tmp_path, capfd):
    src = tmp_path / "src"
    src.mkdir()
    docs = {"latin1.txt": "café au lait".encode("latin-1"), "random.bin": bytes(range(1, 256)) * 3}
    for name, data in docs.items():
        (src / name).write_bytes(data)
    code, _, err = run(capfd, "prepare-data", src, "--out", tmp_path / "out", "--val-fraction", "0")
    assert code == 0, err
    flat = np.fromfile(tmp_path / "out" / "train_000.bin", dtype=np.uint16).tolist()
    got, cur = [], []
    for t in flat:
        if t == 256:
            got.append(bytes(cur))
            cur = []
        else:
            cur.append(t)
    assert got == [docs["latin1.txt"], docs["random.bin"]]


def test_prepare_data_refuses_non_utf8_for_a_text_tokenizer(tmp_path, capfd):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>"))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_bytes("café".encode("latin-1"))
    code, _, err = run(
        capfd, "prepare-data", tmp_path / "a.txt", "--out", tmp_path / "out", "--tokenizer", tmp_path / "tokenizer.json"
    )
    assert_one_line(code, err, "prepare-data", "a.txt", "not UTF-8", exit_code=1)


def test_prepare_data_never_reads_its_own_output(tmp_path, capfd):
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(6):
        (src / f"{i}.txt").write_text(f"document number {i} " * 20)
    first = prepare([str(src)], str(src / "shards"), val_fraction=0.3, seed=1)
    again = prepare([str(src)], str(src / "shards"), val_fraction=0.3, seed=1, force=True)
    assert again["train_tokens"] == first["train_tokens"] and len(again["sources"]) == 6
    code, _, err = run(capfd, "prepare-data", src / "0.txt", "--out", src, "--force")
    assert_one_line(code, err, "prepare-data", "contains the input", exit_code=2)
    assert (src / "0.txt").is_file()


def test_prepare_data_single_document_and_bad_flags(tmp_path, capfd):
    (tmp_path / "one.txt").write_text("just one document")
    code, _, err = run(capfd, "prepare-data", tmp_path / "one.txt", "--out", tmp_path / "out")
    assert_one_line(code, err, "prepare-data", "validation split", "--val-fraction 0", exit_code=1)
    assert not (tmp_path / "out").exists()
    code, _, err = run(capfd, "prepare-data", tmp_path / "one.txt", "--out", tmp_path / "o", "--val-fraction", "0")
    assert code == 0 and not list((tmp_path / "o").glob("val_*.bin")), err  # no empty shard written
    for extra, needle in ((["--val-fraction", "1.5"], "--val-fraction"), (["--shard-tokens", "0"], "--shard-tokens")):
        code, _, err = run(capfd, "prepare-data", tmp_path / "one.txt", "--out", tmp_path / "o2", *extra)
        assert_one_line(code, err, "prepare-data", needle, exit_code=2)


def test_debug_shows_the_traceback(tmp_path):
    env = {"NESTLM_DEBUG": "1", "PYTHONPATH": ":".join(sys.path)}
    p = subprocess.run(
        [sys.executable, "-m", "nestlm", "export", str(tmp_path / "x.ckpt"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode != 0 and "Traceback" in p.stderr and "UsageError" in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "nestlm", "export", str(tmp_path / "x.ckpt"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env={k: v for k, v in env.items() if k != "NESTLM_DEBUG"},
        timeout=120,
    )
    assert p.returncode == 2 and p.stderr.strip().splitlines() == error_lines(p.stderr, "export")
