"""DataModules and prepare-data: determinism in (seed, step, rank), document starts, masking,
segments with carried state, and the shard files."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from train_helpers import make_shards

from nestlm.train.data import IGNORE, TokenShards, window_sample
from nestlm.train.module import LitHybridLM
from nestlm.train.prepare import main as prepare_main
from nestlm.train.prepare import prepare


def test_window_sample_masks_after_the_document_end():
    x, y = window_sample(np.array([5, 6, 7, 9, 1, 2]), seq_len=8, pad_id=0, eos_id=9)
    assert x.tolist() == [5, 6, 7, 9, 1, 2, 0, 0]
    assert y.tolist() == [6, 7, 9] + [IGNORE] * 5
    x, y = window_sample(np.array([5, 6, 7]), seq_len=4, pad_id=0, eos_id=None)
    assert x.tolist() == [5, 6, 7, 0] and y.tolist() == [6, 7, IGNORE, IGNORE]
    x, y = window_sample(np.arange(1, 20), seq_len=4, pad_id=0, eos_id=None)
    assert x.tolist() == [1, 2, 3, 4] and y.tolist() == [2, 3, 4, 5]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), n_docs=25)


def _dm(shards, **kw):
    args = dict(batch_size=3, seq_len=32, seed=7)
    args.update(kw)
    return TokenShards(str(shards), **args)


def test_batches_are_a_function_of_seed_step_rank(shards):
    a, b = _dm(shards), _dm(shards)
    k0 = a.window_batch(5, rank=0)
    assert torch.equal(k0["input_ids"], b.window_batch(5, rank=0)["input_ids"])
    assert not torch.equal(k0["input_ids"], a.window_batch(5, rank=1)["input_ids"])
    assert not torch.equal(k0["input_ids"], a.window_batch(6, rank=0)["input_ids"])
    assert not torch.equal(k0["input_ids"], _dm(shards, seed=8).window_batch(5, rank=0)["input_ids"])


def test_resumed_loader_continues_at_the_global_step(shards):
    dm = _dm(shards)
    dm.trainer = SimpleNamespace(global_step=4, accumulate_grad_batches=2, global_rank=1)
    it = iter(dm.train_dataloader())
    for k in (8, 9, 10):
        assert torch.equal(next(it)["input_ids"], dm.window_batch(k, rank=1)["input_ids"])


def test_samples_start_at_documents_and_never_train_across_them(shards):
    dm = _dm(shards, batch_size=16)
    meta = json.loads((shards / "meta.json").read_text())
    flat = np.fromfile(shards / "train_000.bin", dtype=meta["dtype"]).astype(np.int64)
    eos = meta["eos_id"]
    starts = {0} | {int(i) + 1 for i in np.flatnonzero(flat == eos)}
    for k in range(6):
        batch = dm.window_batch(k, 0)
        for x, y in zip(batch["input_ids"].numpy(), batch["labels"].numpy()):
            hits = [s for s in range(len(flat) - 32) if np.array_equal(flat[s : s + 32], x)]
            assert hits, "a sample is not a window of the shard"
            s = hits[0]
            doc_start = max(st for st in starts if st <= s)
            assert (s - doc_start) % 32 == 0  # at a document start, or a whole number of windows into it
            valid = y != IGNORE
            n = int(valid.sum())
            assert valid[:n].all() and not valid[n:].any()  # targets: one prefix, then masked
            assert eos not in y[: n - 1]  # no target after the first end-of-document


def test_segments_carry_state_and_equal_one_long_call(shards):
    torch.manual_seed(0)
    dm = _dm(shards, batch_size=2, seq_len=24, segment_len=8)
    full = dm.window_batch(0, 0)
    module = LitHybridLM(
        preset="swa-transformer",
        size="tiny",
        overrides={"vocab_size": 257, "d_model": 32, "n_heads": 2, "window": 5, "layers": ["swa", "attn"]},
    )
    module.double()
    segs = [dm.train_batch(k) for k in range(3)]
    assert [bool(s["reset"].all()) for s in segs] == [True, False, False]
    assert torch.equal(torch.cat([s["input_ids"] for s in segs], 1), full["input_ids"])
    logits = []
    for s in segs:
        out = module(s["input_ids"], state=module._incoming_state(s))
        module._carry = out.state.detach()
        logits.append(out.logits)
    want = module(full["input_ids"]).logits
    torch.testing.assert_close(torch.cat(logits, 1), want, rtol=1e-9, atol=1e-12)
    # a reset row starts over: its output equals a fresh call on that segment alone (bounded-state layers)
    swa_only = LitHybridLM(
        preset="swa-transformer",
        size="tiny",
        overrides={"vocab_size": 257, "d_model": 32, "n_heads": 2, "window": 5, "layers": ["swa"]},
    )
    swa_only.double()
    swa_only._carry = swa_only(segs[0]["input_ids"]).state
    s = dict(segs[1], reset=torch.tensor([True, False]))
    out = swa_only(s["input_ids"], state=swa_only._incoming_state(s))
    torch.testing.assert_close(out.logits[0], swa_only(s["input_ids"][:1]).logits[0], rtol=1e-9, atol=1e-12)
    carried = swa_only(s["input_ids"][1:], state=swa_only._carry.map(lambda t: t[1:])).logits[0]
    torch.testing.assert_close(out.logits[1], carried, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="reset whole batches"):
        module._incoming_state(s)


def test_prepare_data_byte_roundtrip_and_no_overwrite(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    docs = ["héllo world", "second\ndocument", "third one"]
    for i, d in enumerate(docs):
        (src / f"{i}.txt").write_text(d)
    meta = prepare([str(src)], str(tmp_path / "out"), val_fraction=0.0)
    flat = np.fromfile(tmp_path / "out" / "train_000.bin", dtype=meta["dtype"]).tolist()
    parts, cur = [], []
    for t in flat:
        if t == 256:
            parts.append(bytes(cur).decode())
            cur = []
        else:
            cur.append(t)
    assert parts == docs and meta["train_docs"] == 3 and meta["eos_id"] == 256
    with pytest.raises(SystemExit, match="not empty"):
        prepare_main([str(src), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "train_000.bin").read_bytes()  # untouched
    with pytest.raises(SystemExit, match="does not exist"):
        prepare_main([str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o2")])
    assert not (tmp_path / "o2").exists()


def test_prepare_data_with_a_local_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("hello world\nworld hello hello\n")
    meta = prepare(
        [str(tmp_path / "a.txt")],
        str(tmp_path / "out"),
        tokenizer=str(tmp_path / "tokenizer.json"),
        split_docs="line",
        val_fraction=0.0,
    )
    assert meta["eos_id"] == 1 and meta["vocab_size"] == 4
    assert np.fromfile(tmp_path / "out" / "train_000.bin", dtype=meta["dtype"]).tolist() == [2, 3, 1, 3, 2, 2, 1]


def test_bad_data_arguments(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        TokenShards(str(tmp_path))
    with pytest.raises(ValueError, match="segment_len"):
        _dm(shards, segment_len=5)
    with pytest.raises(ValueError, match="batch_size"):
        _dm(shards, batch_size=0)
