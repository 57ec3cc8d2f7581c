"""bench/mqar_layouts.py: every layout asks the briefing's pairs, and the labels are the values."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from bench_scripts import load_bench

from nestlm.envs.mqar import KEYS, VALUES
from nestlm.envs.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _module():
    return load_bench("mqar_layouts")


@pytest.mark.parametrize("layout", _module().LAYOUTS)
def test_queries_ask_the_briefing_pairs(layout):
    mod = _module()
    tok = get_tokenizer()
    keys, values = {tok.token_to_id(k) for k in KEYS}, {tok.token_to_id(v) for v in VALUES}
    seq, targets = mod.make_sequence(random.Random(5), layout, n_queries=11)
    brief = [t for t in seq[: targets[0]] if t in keys or t in values][:16]
    pairs = dict(zip(brief[1::2], brief[0::2])) if layout == "dsl-vk" else dict(zip(brief[0::2], brief[1::2]))
    assert len(pairs) == 8 and len(targets) == 11
    assert (tok.token_to_id("[/P]") in seq) == (layout not in mod.OPEN_BRIEFING)
    for j in targets:
        key = seq[j] if layout in ("echo", "no-a", *mod.BARE_QUERIES) else seq[j - 1]
        assert seq[j + 1] == pairs[key], (layout, j)
    ids, labels = mod.make_batch(random.Random(5), layout, 11, batch=3)
    assert ids.shape == labels.shape and int((labels != -100).sum()) == 33
    assert set(labels[labels != -100].tolist()) <= values


@pytest.mark.parametrize(
    ("layout", "same_parity"), [("prefix", True), ("brief", False), ("brief-even", True), ("prefix-odd", False)]
)
def test_parity_controls_place_the_query_keys(layout, same_parity):
    mod = _module()
    keys = {get_tokenizer().token_to_id(k) for k in KEYS}
    seq, targets = mod.make_sequence(random.Random(3), layout, n_queries=5)
    first_key = next(i for i, t in enumerate(seq) if t in keys)
    assert all((j - first_key) % 2 == 0 for j in targets) == same_parity
    assert all((j - first_key) % 2 == 1 for j in targets) == (not same_parity)
