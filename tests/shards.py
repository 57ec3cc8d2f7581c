"""Tiny byte-level token shards for the training and hostile-input tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = "alpha beta gamma delta ledger shell courier state memory token".split()


def make_shards(root: Path, n_docs: int, max_words: int, val_fraction: float, seed: int = 0) -> Path:
    """Shards (via `nestlm prepare-data`) of `n_docs` random documents of 10 to `max_words` - 1
    words, written under root/txt; returns root/shards."""
    from nestlm.train.prepare import prepare

    rng = np.random.default_rng(seed)
    txt = root / "txt"
    txt.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        n = int(rng.integers(10, max_words))
        (txt / f"doc{i:03d}.txt").write_text(" ".join(WORDS[j] for j in rng.integers(len(WORDS), size=n)))
    out = root / "shards"
    prepare([str(txt)], str(out), val_fraction=val_fraction, seed=seed)
    return out
