"""The one chunk cutter (nestlm.ops._chunks) that the CMS and HOPE scans split their inputs with."""

from nestlm.ops._chunks import chunk_pieces


def test_chunk_pieces_cover_and_cut_at_chunk_boundaries():
    assert chunk_pieces(0, 0, 4) == ([], [])
    assert chunk_pieces(0, 5, 4) == ([4, 1], [True, True])
    assert chunk_pieces(3, 5, 4) == ([1, 4], [False, True])
    assert chunk_pieces(1, 2, 4) == ([2], [False])
    for L, C, off in [(63, 16, 0), (63, 16, 5), (257, 7, 13), (1, 16, 15)]:
        lengths, fresh = chunk_pieces(off, L, C)
        assert sum(lengths) == L and all(n > 0 for n in lengths)
        ends = [off + sum(lengths[: i + 1]) for i in range(len(lengths))]
        assert all(e % C == 0 for e in ends[:-1])  # every cut is at an absolute chunk boundary
        assert fresh == [(e - n) % C == 0 for e, n in zip(ends, lengths)]
