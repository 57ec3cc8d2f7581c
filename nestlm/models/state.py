"""State: the recurrent state of a HybridLM, a first-class, versioned object.

A state is one dict of tensors per block and part ("mixer", "channel"), e.g.
`state.blocks[3]["mixer"]["W"]`. Every tensor that belongs to a sequence has the batch as its first
dimension. Alongside the tensors a state carries metadata:

    config_hash   architecture it belongs to (loading into another config is an error)
    tokens_seen   tokens consumed since the state was fresh
    created       UTC time the state was produced
    id            snapshot id, given when the state is saved (None before)
    parent        id of the last saved or loaded snapshot this state continues from

`save` / `load` use safetensors (tensors + JSON metadata and a sha256 of the tensors in the header);
a loaded snapshot reproduces behaviour exactly. `to_dict` / `from_dict` are the one serialised form,
also carried in training checkpoints; `from_dict` (hence `load`) refuses a snapshot of an unknown
format, a layout that does not match its tensors, a checksum mismatch or a non-finite tensor.
`diff` reports, per block / part / tensor, the norm of the change, so a deployment can audit what its
memory learned and roll it back.

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
import hashlib
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

STATE_FORMAT_VERSION = 2  # 2 records a checksum of the tensors; 1 (no checksum) still loads
STATE_FORMATS = (1, 2)
PARTS = ("mixer", "channel")
_META_TYPES = {
    "config_hash": (str, type(None)),
    "tokens_seen": int,
    "id": (str, type(None)),
    "parent": (str, type(None)),
}


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


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `tensors` (CPU, contiguous), in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class State:
    """Recurrent state of every block, plus lineage metadata (see module docstring)."""

    blocks: list[dict[str, dict[str, torch.Tensor]]]
    meta: dict[str, Any] = field(default_factory=dict)
    # (config hash, batch size) this state was last found to fit (HybridLM.check_state); None: not yet checked
    checked_for: tuple[str, int] | None = field(default=None, init=False, repr=False, compare=False)

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

    def _same_shapes(self, fn) -> State:
        out = self.map(fn)
        out.checked_for = self.checked_for  # fn keeps every shape, so what fitted still fits
        return out

    def detach(self) -> State:
        """Cut the autograd graph (truncated backpropagation through time)."""
        return self._same_shapes(lambda t: t.detach())

    def clone(self) -> State:
        return self._same_shapes(lambda t: t.clone())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> State:
        """Move tensors to `device`; cast floating-point tensors to `dtype` (counters stay int64)."""
        return self._same_shapes(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

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
    def to_dict(self) -> dict[str, Any]:
        """The state as JSON primitives and CPU tensors: what `save` writes and training checkpoints carry.

        {"format", "meta", "layout": [{part: [names]} per block], "checksum", "tensors": {flat name: tensor}};
        metadata values that are not JSON primitives are left out.
        """
        tensors = {k: v.detach().contiguous().cpu() for k, v in self._items()}
        return {
            "format": STATE_FORMAT_VERSION,
            "meta": {k: v for k, v in self.meta.items() if isinstance(v, (str, int, float, bool, type(None)))},
            "layout": [{p: sorted((b.get(p) or {}).keys()) for p in PARTS} for b in self.blocks],
            "checksum": tensors_checksum(tensors),
            "tensors": tensors,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "State", device: str | torch.device | None = None) -> State:
        """The state of `to_dict`'s output, validated; any defect is a one-line ValueError naming `source`.

        Checked: a known format, a layout of names per block and part, exactly the tensors the layout
        names, metadata types, the checksum (format 2) and that every floating-point tensor is finite.
        A dict without "format" is a training checkpoint's state from before the format was recorded (1).
        """
        from nestlm.models.loading import check_finite

        def bad(what: str) -> ValueError:
            return ValueError(f"{source}: {what}")

        if not isinstance(d, dict):
            raise bad(f"expected a state mapping, got a {type(d).__name__}")
        fmt = d.get("format", 1)
        if fmt not in STATE_FORMATS:
            raise bad(f"unknown state format {fmt!r} (this nestlm reads formats {list(STATE_FORMATS)})")
        layout, meta, tensors = d.get("layout"), d.get("meta"), d.get("tensors")
        if not isinstance(layout, list) or not all(
            isinstance(b, dict)
            and set(b) <= set(PARTS)
            and all(isinstance(n, list) and all(isinstance(x, str) for x in n) for n in b.values())
            for b in layout
        ):
            raise bad(f"the layout must be a list of {{part: [tensor names]}} per block with parts in {PARTS}")
        if not isinstance(meta, dict):
            raise bad("the metadata must be a mapping")
        for key, types in _META_TYPES.items():
            if key in meta and (isinstance(meta[key], bool) or not isinstance(meta[key], types)):
                raise bad(f"metadata {key}={meta[key]!r} has the wrong type")
        if meta.get("tokens_seen", 0) < 0:
            raise bad(f"metadata tokens_seen={meta['tokens_seen']!r} is negative")
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise bad("the tensors must be a mapping of names to tensors")
        names = [f"blocks.{i}.{p}.{n}" for i, b in enumerate(layout) for p in PARTS for n in b.get(p, [])]
        missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
        if missing or extra:
            raise bad(f"the tensors do not match the layout: missing {missing[:4]}, unexpected {extra[:4]}")
        if "checksum" in d and d["checksum"] != tensors_checksum(tensors):
            raise bad("the tensors do not match the recorded checksum (the file is corrupted or was edited)")
        check_finite(tensors, source, "state tensor")
        dev = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        blocks = [
            {p: {n: dev(tensors[f"blocks.{i}.{p}.{n}"]) for n in b.get(p, [])} for p in PARTS}
            for i, b in enumerate(layout)
        ]
        return cls(blocks, dict(meta))

    def save(self, path: str | os.PathLike) -> str:
        """Write a snapshot to `path` (a .safetensors file) atomically; returns the snapshot id."""
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"State.save: {path} is a directory; expected a file path (e.g. state.safetensors)")
        if self.meta["id"] is None:
            self.meta["id"] = uuid.uuid4().hex
        d = self.to_dict()
        tensors = d.pop("tensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata={"nestlm_state": json.dumps(d)})
            os.replace(tmp, path)  # a crash mid-write never leaves a truncated snapshot at `path`
        finally:
            tmp.unlink(missing_ok=True)
        return self.meta["id"]

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> State:
        """Read a snapshot written by `save`, validated (see `from_dict`). Its id becomes the parent of what follows."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"State.load: no state file at {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = (f.metadata() or {}).get("nestlm_state")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for truncated / foreign files
            raise ValueError(f"State.load: {path} is not a readable safetensors state file ({e})") from None
        if header is None:
            raise ValueError(f"State.load: {path} has no nestlm state metadata (not written by State.save)")
        try:
            d = json.loads(header)
        except json.JSONDecodeError as e:
            raise ValueError(f"State.load: {path} has a damaged state header ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"State.load: {path} has a damaged state header (not a mapping)")
        if "format" not in d:
            raise ValueError(f"State.load: {path} has a damaged state header (no format version)")
        return cls.from_dict({**d, "tensors": tensors}, source=f"State.load: {path}", device=device)

    def check_compatible(self, config_hash: str, n_blocks: int) -> None:
        if self.config_hash is not None and self.config_hash != config_hash:
            raise ValueError(
                f"State: built for config {self.config_hash}, but the model's config is "
                f"{config_hash}; a state only loads into the architecture that made it"
            )
        if len(self.blocks) != n_blocks:
            raise ValueError(f"State: has {len(self.blocks)} blocks, the model has {n_blocks}")
