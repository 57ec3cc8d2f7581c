"""Config fields of the small models the model tests build (every chunk, period and window tiny, so
short sequences cross many boundaries)."""

from __future__ import annotations

SMALL = dict(vocab_size=61, d_model=32, n_heads=4, window=7, ssm_headdim=16, ssm_d_state=8, ssm_chunk_size=8)
SMALL.update(mem_heads=2, mem_head_dim=8, mem_chunk_size=5, hope_chunk_size=3, cms_periods=[None, 3, 7])
