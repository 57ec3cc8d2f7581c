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

Reset policy. At an episode boundary (a new task, a new conversation) a deployment decides, per
component, whether its state starts over (`episode`) or carries on (`persistent`). A component is
one block part (`blocks.<i>.<part>`), or, for layers whose state names are dotted
(`<group>.<name>`, e.g. the CMS levels `level1.W`), one group of it (`blocks.<i>.<part>.<group>`).
Each component also has a short alias made of its layer type: `<kind>` or `<kind>.<group>`, e.g.
`hope`, `swa`, `mamba2`, `mlp`, `cms.level2`. A policy is a dict {pattern: "episode" | "persistent"}
(HybridConfig.reset_policy); patterns are shell-style (fnmatch, `*` also spans dots) and are matched
against both names; the first matching pattern wins, then DEFAULT_RESET_POLICY:

    "cms.*"  -> persistent   CMS fast levels: the slow timescales that carry what was learned
    "*"      -> episode      everything else: attention caches, SSM / conv states, Titans and HOPE
                             memories - the working context of one episode

Examples: {"cms.level1": "episode"} resets the fastest CMS level every episode;
{"blocks.5.*": "persistent"} keeps block 5 whole; {"hope": "persistent"} keeps every HOPE memory.
`State.reset(fresh, kinds, policy)` (or `HybridLM.reset_episode(state)`) returns the state with the
`episode` components replaced by fresh values. Reset applies to the whole batch: the chunked memory
paths keep every row at the same position.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

STATE_FORMAT_VERSION = 1
PARTS = ("mixer", "channel")


RESET_POLICIES = ("episode", "persistent")
DEFAULT_RESET_POLICY = {"cms.*": "persistent", "*": "episode"}


def component_names(i: int, part: str, name: str, kind: str) -> tuple[str, str]:
    """(full name, alias) of the component holding tensor `name` of block i's `part` (layer type `kind`)."""
    group = name.split(".", 1)[0] if "." in name else None
    suffix = f".{group}" if group else ""
    return f"blocks.{i}.{part}{suffix}", f"{kind}{suffix}"


def reset_policy_of(full: str, alias: str, policy: dict[str, str] | None = None) -> str:
    """`episode` or `persistent` for a component; user patterns first, then DEFAULT_RESET_POLICY."""
    for pattern, value in [*(policy or {}).items(), *DEFAULT_RESET_POLICY.items()]:
        if fnmatch.fnmatchcase(full, pattern) or fnmatch.fnmatchcase(alias, pattern):
            if value not in RESET_POLICIES:
                raise ValueError(f"reset_policy[{pattern!r}]={value!r} is invalid: expected one of {RESET_POLICIES}")
            return value
    return "episode"  # unreachable: "*" matches everything


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
        return {
            "config_hash": config_hash,
            "tokens_seen": self.tokens_seen + tokens,
            "created": _now(),
            "id": None,
            "parent": self.meta["id"] or self.meta["parent"],
        }

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
            out[k] = float((b[k].detach().double() - a[k].detach().double()).norm())
        return out

    # --- episodes -----------------------------------------------------------------------------
    def reset_policies(self, kinds: Sequence[tuple[str, str]], policy: dict[str, str] | None = None) -> dict[str, str]:
        """Component full name -> `episode` | `persistent`, for blocks whose (mixer, channel) types are `kinds`."""
        self._check_kinds(kinds)
        out = {}
        for i, blk in enumerate(self.blocks):
            for part, kind in zip(PARTS, kinds[i]):
                for name in blk.get(part) or {}:
                    full, alias = component_names(i, part, name, kind)
                    out[full] = reset_policy_of(full, alias, policy)
        return out

    def reset(self, fresh: State, kinds: Sequence[tuple[str, str]], policy: dict[str, str] | None = None) -> State:
        """A new state: components whose policy is `episode` take `fresh`'s tensors, the rest are kept.

        fresh: a fresh state of the same model and batch size (HybridLM.init_state). The metadata
        keeps the lineage (tokens_seen, parent) and records the boundary in `episode_start`.
        """
        self._check_kinds(kinds)
        if len(fresh.blocks) != len(self.blocks):
            raise ValueError(f"State.reset: fresh state has {len(fresh.blocks)} blocks, this state {len(self.blocks)}")
        blocks = []
        for i, blk in enumerate(self.blocks):
            new_blk = {}
            for part, kind in zip(PARTS, kinds[i]):
                cur, new = blk.get(part) or {}, (fresh.blocks[i].get(part) or {})
                if cur.keys() != new.keys():
                    raise ValueError(
                        f"State.reset: block {i} {part} holds {sorted(cur)}, the fresh state "
                        f"{sorted(new)}; same model expected"
                    )
                out = {}
                for name, t in cur.items():
                    full, alias = component_names(i, part, name, kind)
                    out[name] = new[name] if reset_policy_of(full, alias, policy) == "episode" else t
                new_blk[part] = out
            blocks.append(new_blk)
        meta = dict(self.meta)
        meta.update(
            created=_now(), id=None, parent=self.meta["id"] or self.meta["parent"], episode_start=self.tokens_seen
        )
        return State(blocks, meta)

    def _check_kinds(self, kinds: Sequence[tuple[str, str]]) -> None:
        if len(kinds) != len(self.blocks) or any(len(k) != len(PARTS) for k in kinds):
            raise ValueError(
                f"State: kinds must hold one (mixer, channel) pair per block ({len(self.blocks)}), got {list(kinds)!r}"
            )

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
            raise ValueError(
                f"State: built for config {self.config_hash}, but the model's config is "
                f"{config_hash}; a state only loads into the architecture that made it"
            )
        if len(self.blocks) != n_blocks:
            raise ValueError(f"State: has {len(self.blocks)} blocks, the model has {n_blocks}")
