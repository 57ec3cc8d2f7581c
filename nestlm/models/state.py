"""State: the recurrent state of a HybridLM, a first-class, versioned object.

A state is one dict of tensors per block and part ("mixer", "channel"), e.g.
`state.blocks[3]["mixer"]["W"]`. Every tensor that belongs to a sequence has the batch as its first
dimension. Alongside the tensors a state carries metadata:

    config_hash   architecture it belongs to (loading into another config is an error)
    tokens_seen   tokens consumed since the state was fresh
    created       UTC time the state was produced
    id            snapshot id, given when the state is saved (None before)
    parent        id of the last saved or loaded snapshot this state continues from

`save` / `load` use safetensors (tensors + JSON metadata in the header); a loaded snapshot
reproduces behaviour exactly. `diff` reports, per block / part / tensor, the norm of the change, so a
deployment can audit what its memory learned and roll it back.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

STATE_FORMAT_VERSION = 1
PARTS = ("mixer", "channel")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class State:
    """Recurrent state of every block, plus lineage metadata (see module docstring)."""

    blocks: list[dict[str, dict[str, torch.Tensor]]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.meta.setdefault("config_hash", None)
        self.meta.setdefault("tokens_seen", 0)
        self.meta.setdefault("created", _now())
        self.meta.setdefault("id", None)
        self.meta.setdefault("parent", None)

    # --- access -------------------------------------------------------------------------------
    @property
    def tokens_seen(self) -> int:
        return int(self.meta["tokens_seen"])

    @property
    def config_hash(self) -> str | None:
        return self.meta["config_hash"]

    def flat(self) -> dict[str, torch.Tensor]:
        """All tensors, keyed `blocks.<i>.<part>.<name>`."""
        return {k: v for k, v in self._items()}

    def _items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for i, blk in enumerate(self.blocks):
            for part in PARTS:
                for name, t in (blk.get(part) or {}).items():
                    yield f"blocks.{i}.{part}.{name}", t

    def map(self, fn) -> State:
        """A new State whose tensors are fn(tensor); metadata is copied."""
        blocks = [{p: {n: fn(t) for n, t in (b.get(p) or {}).items()} for p in PARTS} for b in self.blocks]
        return State(blocks, dict(self.meta))

    def detach(self) -> State:
        """Cut the autograd graph (truncated backpropagation through time)."""
        return self.map(lambda t: t.detach())

    def clone(self) -> State:
        return self.map(lambda t: t.clone())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> State:
        """Move tensors to `device`; cast floating-point tensors to `dtype` (counters stay int64)."""
        return self.map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def continued(self, tokens: int, config_hash: str | None) -> dict[str, Any]:
        """Metadata for the state that follows this one after `tokens` more tokens."""
        return {"config_hash": config_hash, "tokens_seen": self.tokens_seen + tokens, "created": _now(),
                "id": None, "parent": self.meta["id"] or self.meta["parent"]}

    # --- audit --------------------------------------------------------------------------------
    def diff(self, other: State) -> dict[str, float]:
        """Per block / part / tensor: Frobenius norm of (other - self), computed in fp64.

        Keys are `blocks.<i>.<part>.<name>`; a tensor present in only one state is an error.
        """
        a, b = self.flat(), other.flat()
        if a.keys() != b.keys():
            only = sorted(set(a) ^ set(b))[:4]
            raise ValueError(f"State.diff: the states hold different tensors (e.g. {only}); same config expected")
        out = {}
        for k in a:
            if a[k].shape != b[k].shape:
                out[k] = float("inf")
                continue
            out[k] = float((b[k].double() - a[k].double()).norm())
        return out

    # --- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> str:
        """Write a snapshot to `path` (a .safetensors file) atomically; returns the snapshot id."""
        path = Path(path)
        if self.meta["id"] is None:
            self.meta["id"] = uuid.uuid4().hex
        tensors = {k: v.detach().contiguous().cpu() for k, v in self._items()}
        layout = [{p: sorted((b.get(p) or {}).keys()) for p in PARTS} for b in self.blocks]
        header = {"nestlm_state": json.dumps({"format": STATE_FORMAT_VERSION, "meta": self.meta, "layout": layout})}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated snapshot at `path`
        return self.meta["id"]

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> State:
        """Read a snapshot written by `save`. The result's `parent`-to-be is this snapshot's id."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"State.load: no state file at {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                header = (f.metadata() or {}).get("nestlm_state")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for truncated / foreign files
            raise ValueError(f"State.load: {path} is not a readable safetensors state file ({e})") from None
        if header is None:
            raise ValueError(f"State.load: {path} has no nestlm state metadata (not written by State.save)")
        info = json.loads(header)
        blocks = []
        for i, parts in enumerate(info["layout"]):
            blocks.append({p: {n: tensors[f"blocks.{i}.{p}.{n}"] for n in parts.get(p, [])} for p in PARTS})
        return cls(blocks, dict(info["meta"]))

    def check_compatible(self, config_hash: str, n_blocks: int) -> None:
        if self.config_hash is not None and self.config_hash != config_hash:
            raise ValueError(f"State: built for config {self.config_hash}, but the model's config is "
                             f"{config_hash}; a state only loads into the architecture that made it")
        if len(self.blocks) != n_blocks:
            raise ValueError(f"State: has {len(self.blocks)} blocks, the model has {n_blocks}")
