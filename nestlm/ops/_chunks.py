"""Cutting a segment of a stream at chunk boundaries fixed on absolute positions."""

from __future__ import annotations


def chunk_pieces(p0: int, t: int, C: int) -> tuple[list[int], list[bool]]:
    """Lengths of the consecutive pieces of tokens [p0, p0 + t) cut at absolute multiples of C,
    and whether each piece starts a chunk (the first one may continue an open chunk).

    Callers split their inputs with these lengths (`x.split(lengths, dim)`) rather than slicing
    per piece: the backward of every slice adds into a full-length zero tensor, O(t^2 / C) work
    over a segment, while split's backward concatenates once.
    """
    if t <= 0:
        return [], []
    first = min(t, C - p0 % C)
    rest = t - first
    lengths = [first] + [C] * (rest // C) + ([rest % C] if rest % C else [])
    return lengths, [p0 % C == 0] + [True] * (len(lengths) - 1)
