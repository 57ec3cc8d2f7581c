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
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nestlm import envs as env_lib
from nestlm.envs.base import lag_bucket
from nestlm.envs.tokenizer import get_tokenizer

IGNORE = -100
DEFAULT_ENVS = ("ledger", "shell", "courier")


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
        out = {k: v[:, sl] for k, v in full.items()}
        out["reset"] = torch.full((len(full["input_ids"]),), s == 0, dtype=torch.bool)
        return out

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


def _stack(rows: Sequence[tuple[np.ndarray, ...]], keys: Sequence[str] = ("input_ids", "labels")) -> dict:
    return {k: torch.from_numpy(np.stack([r[i] for r in rows])) for i, k in enumerate(keys)}


LOSSES = ("answers", "all", "weighted")
STAGE_KEYS = {"envs", "min_steps", "max_steps", "seq_len", "batch_size", "until_step", "gate"}
GATE_KEYS = {"min_accuracy", "every", "episodes"}


def answer_ids(ep, length: int) -> np.ndarray:
    """Per target position j of an episode's first `length` + 1 tokens: the number of the probe whose
    answer holds token j + 1, else -1 (the target is not an answer token). [length] int64."""
    out = np.full(length, -1, dtype=np.int64)
    for i, p in enumerate(ep.probes):
        a, b = p.span
        out[max(a - 1, 0) : min(b - 1, length)] = i
    return out


def loss_weights(answer: np.ndarray, labels: np.ndarray, loss: str, other_weight: float) -> np.ndarray:
    """Per-position loss weight: `answers` 1 on answer tokens only, `all` 1 on every labelled token,
    `weighted` 1 on answer tokens and `other_weight` on the other labelled tokens."""
    labelled = labels != IGNORE
    if loss == "all":
        return labelled.astype(np.float32)
    other = 0.0 if loss == "answers" else other_weight
    return np.where(answer >= 0, 1.0, np.where(labelled, other, 0.0)).astype(np.float32)


class SyntheticTrajectories(_StreamDataModule):
    """Seeded, infinite agent trajectories from nestlm.envs, the environments mixed.

    Each row is one episode of `min_steps..max_steps` agent steps (env, length and episode seed
    drawn from the batch's generator), cut or padded to `seq_len` tokens; with `segment_len` it is fed
    as consecutive windows with the recurrent state carried (truncated BPTT), so episodes longer than
    one window are trained through. `envs` entries are `ENV` or `ENV:LEVEL` (`ledger:1`).

    Batches hold, besides input_ids and labels, `answer` [B, T] (the probe whose answer each target
    token belongs to, -1 elsewhere) and `loss_weight` [B, T] from `loss` (`answers`: answer tokens
    only; `all`: every token; `weighted`: answer tokens 1, the others `other_weight`).

    `curriculum`: a list of stages, each a dict overriding `envs` / `min_steps` / `max_steps` /
    `seq_len` / `batch_size` (a stage's values carry over to the next), ended by `until_step: N` (the
    optimizer step where the next stage starts) and/or `gate: {min_accuracy, every, episodes}` (every
    `every` steps the model answers `episodes` val episodes of the stage; at or above `min_accuracy`
    the next stage starts two steps later, so batches already fetched keep their stage). The last
    stage has no end. Batch k stays a pure function of (seed, k, rank, stage); the gates' decisions
    are part of the checkpoint (`state_dict`). A stage's `seq_len` is at most the top-level one,
    which stays the trained context that evaluation reads (a length curriculum: short episodes in
    short rows first, then episodes as long as the scored ones).

    Validation: whole `val_split` episodes (`val_batches_n` batches per env named anywhere in the
    run, lengths from `min_steps..max_steps` of the last stage), so every probe is scored.
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
        loss: str = "all",
        other_weight: float = 0.1,
        curriculum: list[dict[str, Any]] | None = None,
        split: str = "train",
        val_split: str = "val",
        val_batches_n: int = 4,
        num_workers: int = 0,
    ) -> None:
        super().__init__(seed, batch_size, seq_len, segment_len, num_workers)
        name = type(self).__name__
        if loss not in LOSSES:
            raise ValueError(f"{name}.loss={loss!r} is invalid: expected one of {LOSSES}")
        if not 0.0 <= other_weight <= 1.0:
            raise ValueError(f"{name}.other_weight={other_weight!r} is invalid: expected a number in [0, 1]")
        prev = {
            "envs": list(envs) if envs is not None else list(DEFAULT_ENVS),
            "min_steps": min_steps,
            "max_steps": max_steps,
            "seq_len": seq_len,
            "batch_size": batch_size,
        }
        self.stages: list[dict[str, Any]] = []
        for i, st in enumerate(curriculum or [{}]):
            if not isinstance(st, dict) or set(st) - STAGE_KEYS:
                raise ValueError(
                    f"{name}.curriculum[{i}]={st!r} is invalid: expected a mapping with keys from {sorted(STAGE_KEYS)}"
                )
            prev = self._check_stage(prev, st, f".curriculum[{i}]" if curriculum else "", seq_len)
            # a segment's optimizer step is found from a fixed number of segments per window
            if segment_len is not None and prev["seq_len"] != seq_len:
                raise ValueError(
                    f"{name}.curriculum[{i}].seq_len={prev['seq_len']} is invalid with segment_len: "
                    f"expected the top-level seq_len={seq_len}"
                )
            self.stages.append(prev)
        staged = sorted({e for st in self.stages for e in st["envs"]})
        # a config layered on one with a curriculum (the default run's) would otherwise train on the
        # stages' envs while it names others
        if curriculum and envs is not None and sorted(env_lib.parse_envs(envs, f"{name}.envs")) != staged:
            raise ValueError(
                f"{name}.envs={list(envs)} differs from the envs of its curriculum stages ({staged}): "
                "expected curriculum: null to train on envs alone, or envs equal to the stages' envs"
            )
        self._check_ends(name)
        if num_workers and any("gate" in st for st in self.stages):
            raise ValueError(
                f"{name}.num_workers={num_workers} is invalid with curriculum gates: expected 0 "
                "(a gate's decision must reach the process that makes the batches)"
            )
        self.loss, self.other_weight = loss, other_weight
        self.split, self.val_split, self.val_batches_n = split, val_split, val_batches_n
        self.gate_passed: dict[int, int] = {}  # stage -> optimizer step at which its gate was passed
        tok = get_tokenizer()
        self.pad_id, self.vocab_size = tok.pad_id, tok.vocab_size

    @staticmethod
    def _check_stage(prev: dict[str, Any], st: dict[str, Any], where: str, max_seq_len: int) -> dict[str, Any]:
        out = {k: v for k, v in prev.items() if k not in ("until_step", "gate")} | st
        field = f"SyntheticTrajectories{where}"
        for key, most in (("seq_len", max_seq_len), ("batch_size", None)):
            v = out[key]
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= (most or v):
                bound = f"an int in [1, {most}] (at most the top-level {key})" if most else "an int >= 1"
                raise ValueError(f"{field}.{key}={v!r} is invalid: expected {bound}")
        out["envs"] = env_lib.parse_envs(out["envs"], f"{field}.envs")
        lo, hi = out["min_steps"], out["max_steps"]
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= env_lib.MAX_TRAIN_STEPS):
            raise ValueError(
                f"{field}.min_steps/max_steps={lo}/{hi} are invalid: expected ints with "
                f"1 <= min_steps <= max_steps <= {env_lib.MAX_TRAIN_STEPS}"
            )
        gate = out.get("gate")
        if gate is not None:
            if not isinstance(gate, dict) or set(gate) - GATE_KEYS or "min_accuracy" not in gate:
                raise ValueError(
                    f"{field}.gate={gate!r} is invalid: expected a mapping with min_accuracy "
                    f"(and optionally every, episodes)"
                )
            out["gate"] = {"every": 25, "episodes": 64, **gate}
            if not 0 <= out["gate"]["min_accuracy"] <= 1 or out["gate"]["every"] < 1 or out["gate"]["episodes"] < 1:
                raise ValueError(
                    f"{field}.gate={gate!r} is invalid: expected 0 <= min_accuracy <= 1, every >= 1, episodes >= 1"
                )
        return out

    def _check_ends(self, name: str) -> None:
        """Every stage but the last ends (until_step and/or a gate), at increasing until_steps."""
        ends = [st.get("until_step") for st in self.stages[:-1]]
        for i, (st, end) in enumerate(zip(self.stages[:-1], ends)):
            if end is None and "gate" not in st:
                raise ValueError(f"{name}.curriculum[{i}] is invalid: a stage before the last needs until_step or gate")
            if end is not None and (not isinstance(end, int) or end < 1):
                raise ValueError(f"{name}.curriculum[{i}].until_step={end!r} is invalid: expected an int >= 1")
        known = [e for e in ends if e is not None]
        if known != sorted(set(known)):
            raise ValueError(f"{name}.curriculum: until_step values {known} are invalid: expected increasing steps")
        if "until_step" in self.stages[-1] or "gate" in self.stages[-1]:
            raise ValueError(f"{name}.curriculum[{len(self.stages) - 1}] is invalid: the last stage has no end")

    # --- curriculum ---------------------------------------------------------------------------
    def stage_at(self, step: int) -> int:
        """Curriculum stage of optimizer step `step` (from the stage ends and the gates passed so far)."""
        stage = 0
        for i, st in enumerate(self.stages[:-1]):
            ends = [st["until_step"]] if "until_step" in st else []
            if i in self.gate_passed:
                ends.append(self.gate_passed[i] + 2)
            if not ends or step < min(ends):
                break
            stage = i + 1
        return stage

    def window_stage(self, window: int) -> int:
        accum = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        return self.stage_at(window * self.n_segments // accum)

    def gate_due(self, step: int) -> dict[str, Any] | None:
        """The gate to evaluate at the start of optimizer step `step`, if any."""
        stage = self.stage_at(step)
        gate = self.stages[stage].get("gate")
        if gate is None or stage in self.gate_passed or step == 0 or step % gate["every"]:
            return None
        return gate

    def gate_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """Whole val episodes of the current stage for its gate (fixed per stage, not per step)."""
        stage = self.stage_at(step)
        st, n = self.stages[stage], self.stages[stage]["gate"]["episodes"]
        rng = batch_rng(self.seed + 2_000_003, stage, 0)
        specs = self.episode_specs(rng, st, n)
        return [
            self._episode_batch(specs[i : i + self.batch_size], self.val_split) for i in range(0, n, self.batch_size)
        ]

    def pass_gate(self, step: int) -> None:
        self.gate_passed[self.stage_at(step)] = step

    def state_dict(self) -> dict[str, Any]:
        return {"gate_passed": {str(k): v for k, v in self.gate_passed.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gate_passed = {int(k): int(v) for k, v in state.get("gate_passed", {}).items()}

    # --- batches ------------------------------------------------------------------------------
    def episode_specs(self, rng: np.random.Generator, stage: dict[str, Any], n: int) -> list[tuple[str, int, int]]:
        """(env, n_steps, episode seed) of `n` rows, drawn from the batch's generator."""
        specs = []
        envs, lo, hi = stage["envs"], stage["min_steps"], stage["max_steps"]
        for _ in range(n):
            env = envs[int(rng.integers(len(envs)))]
            n_steps = int(rng.integers(lo, hi + 1))
            specs.append((env, n_steps, int(rng.integers(2**31 - 1))))
        return specs

    def _rows(self, specs: list[tuple[str, int, int]], split: str, seq_len: int | None):
        """Rows (x, y, answer, weight) [seq_len] of the episodes `specs`, and their probe keys
        ("ENV/kind", one per probe, in the order of the rows' answer numbers)."""
        rows, keys = [], []
        eps = [env_lib.generate_episode(env, n, seed, split) for env, n, seed in specs]
        length = seq_len or max(len(ep.tokens) - 1 for ep in eps)
        for (env, _, _), ep in zip(specs, eps):
            x, y = window_sample(np.asarray(ep.tokens, dtype=np.int64), length, self.pad_id, None)
            ans = answer_ids(ep, length)
            ans = np.where(ans >= 0, ans + len(keys), -1)
            keys += [f"{env}/{p.kind}" for p in ep.probes]
            rows.append((x, y, ans, loss_weights(ans, y, self.loss, self.other_weight)))
        return rows, keys

    def _episode_batch(self, specs: list[tuple[str, int, int]], split: str, seq_len: int | None = None) -> dict:
        rows, keys = self._rows(specs, split, seq_len)
        batch = _stack(rows, ("input_ids", "labels", "answer", "loss_weight"))
        if seq_len is None:
            batch["probe_keys"] = keys
        return batch

    def window_batch(self, index: int, rank: int) -> dict[str, torch.Tensor]:
        rng = batch_rng(self.seed, index, rank)
        stage = self.stages[self.window_stage(index)]
        return self._episode_batch(self.episode_specs(rng, stage, stage["batch_size"]), self.split, stage["seq_len"])

    def val_envs(self) -> list[str]:
        return list(dict.fromkeys(e for st in self.stages for e in st["envs"]))

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        # a fixed set (same on every rank and every run), seeded apart from the training stream
        last = self.stages[-1]
        out = []
        for j, env in enumerate(self.val_envs()):
            for i in range(self.val_batches_n):
                rng = batch_rng(self.seed + 1_000_003, i, j)
                out.append(
                    self._episode_batch(
                        self.episode_specs(rng, {**last, "envs": [env]}, self.batch_size), self.val_split
                    )
                )
        return out

    def trained_lags(self, n_windows: int = 64) -> dict[str, int]:
        """Probes with a nonzero loss weight per lag bucket over the first `n_windows` training
        windows of each stage: the lags that training actually covers."""
        counts: dict[str, int] = {}
        for stage in self.stages:
            for index in range(n_windows):
                specs = self.episode_specs(batch_rng(self.seed, index, 0), stage, stage["batch_size"])
                for env, n, seed in specs:
                    ep = env_lib.generate_episode(env, n, seed, self.split)
                    for p in ep.probes:
                        if p.span[0] - 1 < stage["seq_len"]:
                            counts[lag_bucket(p.lag)] = counts.get(lag_bucket(p.lag), 0) + 1
        return counts


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
        try:
            self.meta = json.loads(meta_file.read_text())
            self.eos_id, self.vocab_size = int(self.meta["eos_id"]), int(self.meta["vocab_size"])
            self.dtype = np.dtype(self.meta["dtype"])
        except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(
                f"TokenShards.data_dir: {meta_file} is not a prepare-data meta.json ({type(e).__name__}: {e})"
            ) from None
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
                if f.stat().st_size < self.dtype.itemsize:
                    raise ValueError(f"TokenShards.data_dir: {f} is empty (no {split} documents); re-run prepare-data")
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
