"""DataModules: synthetic agent trajectories and memmapped token shards.

Both are infinite streams of ready-made batches ({"input_ids", "labels"[, "reset"]}, see
nestlm.train.module). Batch k of rank r is a pure function of (seed, k, r), and the stream starts
at k = trainer.global_step * accumulate_grad_batches, so a resumed run sees exactly the batches the
interrupted one would have seen next.

Every sample starts at a document start (an episode, or the token after an end-of-document token)
with a fresh recurrent state; targets past the end of the document are masked (-100), so no loss
ever depends on another document. With `segment_len`, each window of `seq_len` tokens is fed as
consecutive batches of `segment_len` tokens with the state carried between them (truncated BPTT:
gradients stop at segment edges, memory grows with `segment_len`, not `seq_len`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

IGNORE = -100


def batch_rng(seed: int, index: int, rank: int) -> np.random.Generator:
    """The random generator of batch `index` on `rank` (independent streams, no shared state)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(rank), int(index)]))


def window_sample(tokens: np.ndarray, seq_len: int, pad_id: int, eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets [seq_len] from a document's first seq_len + 1 tokens.

    Targets after the document's end (its first `eos_id`, or the end of `tokens`) are IGNORE.
    """
    x = np.full(seq_len + 1, pad_id, dtype=np.int64)
    n = min(len(tokens), seq_len + 1)
    x[:n] = tokens[:n]
    end = n  # tokens [0, end) belong to the document
    if eos_id is not None:
        hits = np.flatnonzero(x[:n] == eos_id)
        if len(hits):
            end = int(hits[0]) + 1
    y = x[1:].copy()
    y[max(end - 1, 0) :] = IGNORE
    return x[:-1], y


class StepIndexedBatches(IterableDataset):
    """Yields make_batch(k) for k = start, start + 1, ... (forever). With DataLoader workers,
    worker w makes k = start + w + j * n_workers; the loader's round-robin keeps the order."""

    def __init__(self, make_batch: Callable[[int], dict[str, torch.Tensor]], start: int = 0) -> None:
        self.make_batch = make_batch
        self.start = start

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        k, stride = self.start, 1
        if info is not None:
            k, stride = self.start + info.id, info.num_workers
        while True:
            yield self.make_batch(k)
            k += stride


class _StreamDataModule(L.LightningDataModule):
    """Shared machinery: segmenting, resume offset, rank, loaders."""

    def __init__(self, seed: int, batch_size: int, seq_len: int, segment_len: int | None, num_workers: int) -> None:
        super().__init__()
        for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{type(self).__name__}.{name}={v!r} is invalid: expected an int >= 1")
        if segment_len is not None and (segment_len < 1 or seq_len % segment_len):
            raise ValueError(
                f"{type(self).__name__}.segment_len={segment_len!r} is invalid: expected a divisor of seq_len={seq_len}"
            )
        self.seed, self.batch_size, self.seq_len = seed, batch_size, seq_len
        self.segment_len, self.num_workers = segment_len, num_workers
        self._cache: tuple[int, dict[str, torch.Tensor]] | None = None

    # subclasses: a [batch_size, seq_len] window batch, a pure function of (index, rank)
    def window_batch(self, index: int, rank: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    @property
    def n_segments(self) -> int:
        return 1 if self.segment_len is None else self.seq_len // self.segment_len

    def train_batch(self, k: int) -> dict[str, torch.Tensor]:
        """Training batch number k of this rank (segment k % n of window k // n when segmenting)."""
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if self.segment_len is None:
            return self.window_batch(k, rank)
        w, s = divmod(k, self.n_segments)
        if self._cache is None or self._cache[0] != w:
            self._cache = (w, self.window_batch(w, rank))
        full = self._cache[1]
        sl = slice(s * self.segment_len, (s + 1) * self.segment_len)
        reset = torch.full((self.batch_size,), s == 0, dtype=torch.bool)
        return {"input_ids": full["input_ids"][:, sl], "labels": full["labels"][:, sl], "reset": reset}

    def _start_index(self) -> int:
        if self.trainer is None:
            return 0
        return self.trainer.global_step * self.trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        ds = StepIndexedBatches(self.train_batch, start=self._start_index())
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers, persistent_workers=False, pin_memory=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_batches(), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def _stack(rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.from_numpy(np.stack([r[0] for r in rows])),
        "labels": torch.from_numpy(np.stack([r[1] for r in rows])),
    }


class SyntheticTrajectories(_StreamDataModule):
    """Seeded, infinite agent trajectories from nestlm.envs, the environments mixed.

    Each row is one episode of `min_steps..max_steps` agent steps (env, length and episode seed
    drawn from the batch's generator), cut or padded to `seq_len` tokens. Validation: a fixed set of
    `val_batches_n` batches from the `val_split` episodes.
    """

    def __init__(
        self,
        envs: list[str] | None = None,
        seed: int = 0,
        batch_size: int = 8,
        seq_len: int = 512,
        min_steps: int = 20,
        max_steps: int = 200,
        segment_len: int | None = None,
        split: str = "train",
        val_split: str = "val",
        val_batches_n: int = 4,
        num_workers: int = 0,
    ) -> None:
        super().__init__(seed, batch_size, seq_len, segment_len, num_workers)
        from nestlm import envs as env_lib
        from nestlm.envs.tokenizer import get_tokenizer

        self.envs = list(envs) if envs is not None else list(env_lib.ENVS)
        unknown = [e for e in self.envs if e not in env_lib.ENVS]
        if unknown or not self.envs:
            raise ValueError(
                f"SyntheticTrajectories.envs={envs!r} is invalid: expected names from {list(env_lib.ENVS)}"
            )
        if not 1 <= min_steps <= max_steps:
            raise ValueError(
                f"SyntheticTrajectories.min_steps/max_steps={min_steps}/{max_steps} are invalid: "
                "expected 1 <= min_steps <= max_steps"
            )
        self.min_steps, self.max_steps = min_steps, max_steps
        self.split, self.val_split, self.val_batches_n = split, val_split, val_batches_n
        self._gen = env_lib.generate_episode
        tok = get_tokenizer()
        self.pad_id, self.vocab_size = tok.pad_id, tok.vocab_size

    def episode_specs(self, rng: np.random.Generator) -> list[tuple[str, int, int]]:
        """(env, n_steps, episode seed) of each row, drawn from the batch's generator."""
        specs = []
        for _ in range(self.batch_size):
            env = self.envs[int(rng.integers(len(self.envs)))]
            n_steps = int(rng.integers(self.min_steps, self.max_steps + 1))
            specs.append((env, n_steps, int(rng.integers(2**31 - 1))))
        return specs

    def _rows(self, rng: np.random.Generator, split: str) -> dict[str, torch.Tensor]:
        rows = []
        for env, n_steps, seed in self.episode_specs(rng):
            ep = self._gen(env, n_steps=n_steps, seed=seed, split=split)
            rows.append(window_sample(np.asarray(ep.tokens, dtype=np.int64), self.seq_len, self.pad_id, None))
        return _stack(rows)

    def window_batch(self, index: int, rank: int) -> dict[str, torch.Tensor]:
        return self._rows(batch_rng(self.seed, index, rank), self.split)

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        # a fixed set (same on every rank and every run), seeded apart from the training stream
        return [self._rows(batch_rng(self.seed + 1_000_003, i, 0), self.val_split) for i in range(self.val_batches_n)]


class TokenShards(_StreamDataModule):
    """Memmapped token shards written by `nestlm prepare-data` (nanoGPT-style .bin files).

    `data_dir` holds meta.json ({"dtype", "eos_id", "vocab_size", ...}), train_*.bin and val_*.bin.
    Samples are `seq_len`-token windows starting at a document start or `seq_len`, `2*seq_len`, ...
    tokens into a document, drawn uniformly by the batch's generator; targets past the document's
    end-of-document token are masked.
    """

    def __init__(
        self,
        data_dir: str,
        seed: int = 0,
        batch_size: int = 8,
        seq_len: int = 512,
        segment_len: int | None = None,
        val_batches_n: int = 8,
        num_workers: int = 0,
    ) -> None:
        super().__init__(seed, batch_size, seq_len, segment_len, num_workers)
        self.data_dir = Path(data_dir)
        meta_file = self.data_dir / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"TokenShards.data_dir: no meta.json in {self.data_dir} (write shards with `nestlm prepare-data`)"
            )
        self.meta = json.loads(meta_file.read_text())
        self.eos_id, self.vocab_size = int(self.meta["eos_id"]), int(self.meta["vocab_size"])
        self.dtype = np.dtype(self.meta["dtype"])
        self.val_batches_n = val_batches_n
        self._splits: dict[str, tuple[list[np.memmap], np.ndarray]] = {}

    def _index(self, split: str) -> tuple[list[np.memmap], np.ndarray]:
        """Shards of `split` and the sample starts as rows (shard, offset)."""
        if split not in self._splits:
            files = sorted(self.data_dir.glob(f"{split}_*.bin"))
            if not files:
                raise FileNotFoundError(f"TokenShards.data_dir: no {split}_*.bin shards in {self.data_dir}")
            shards, starts = [], []
            for i, f in enumerate(files):
                arr = np.memmap(f, dtype=self.dtype, mode="r")
                shards.append(arr)
                doc_starts = np.concatenate([[0], np.flatnonzero(arr == self.eos_id) + 1]).astype(np.int64)
                n = -(-(np.append(doc_starts[1:], len(arr)) - doc_starts) // self.seq_len)  # windows per document
                doc = np.repeat(np.arange(len(n)), n)
                within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
                offs = doc_starts[doc] + within * self.seq_len  # each window of a long document is a sample
                starts.append(np.stack([np.full(len(offs), i), offs], 1))
            self._splits[split] = (shards, np.concatenate(starts).astype(np.int64))
        return self._splits[split]

    def _rows(self, rng: np.random.Generator, split: str) -> dict[str, torch.Tensor]:
        shards, starts = self._index(split)
        rows = []
        for j in rng.integers(len(starts), size=self.batch_size):
            shard, off = starts[j]
            window = np.asarray(shards[shard][off : off + self.seq_len + 1], dtype=np.int64)
            rows.append(window_sample(window, self.seq_len, self.eos_id, self.eos_id))
        return _stack(rows)

    def window_batch(self, index: int, rank: int) -> dict[str, torch.Tensor]:
        return self._rows(batch_rng(self.seed, index, rank), "train")

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        return [self._rows(batch_rng(self.seed + 1_000_003, i, 0), "val") for i in range(self.val_batches_n)]
