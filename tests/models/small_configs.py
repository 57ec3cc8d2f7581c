"""Config fields of the small models the model tests build (every chunk, period and window tiny, so
short sequences cross many boundaries), and the random cutting of a sequence into pieces."""

from __future__ import annotations

import random

SMALL = dict(vocab_size=61, d_model=32, n_heads=4, window=7, ssm_headdim=16, ssm_d_state=8, ssm_chunk_size=8)
SMALL.update(mem_heads=2, mem_head_dim=8, mem_chunk_size=5, hope_chunk_size=3, cms_periods=[None, 3, 7])


def random_pieces(t: int, rng: random.Random, lengths=(1, 1, 2, 5, 11, 17)) -> list[tuple[int, int]]:
    """Split [0, t) into consecutive pieces of lengths drawn from `lengths` (single tokens included)."""
    cuts, a = [], 0
    while a < t:
        n = rng.choice(lengths)
        cuts.append((a, min(t, a + n)))
        a += n
    return cuts
