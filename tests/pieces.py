"""Random cuts of a sequence into consecutive pieces, for the streaming tests."""

from __future__ import annotations

import random


def random_pieces(t: int, rng: random.Random, lengths=(1, 1, 2, 5, 11, 17)) -> list[tuple[int, int]]:
    """Split [0, t) into consecutive pieces of lengths drawn from `lengths` (single tokens included)."""
    cuts, a = [], 0
    while a < t:
        n = rng.choice(lengths)
        cuts.append((a, min(t, a + n)))
        a += n
    return cuts
