"""HybridConfig: the one description of a nestlm model, with presets.

A config is a plain dataclass of primitives so it round-trips through JSON / YAML and Lightning
checkpoints (weights_only loading). Every field is validated in `__post_init__`, one `_check_*`
helper per group of fields; a bad value raises a one-line ValueError naming the field, the value
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from nestlm.layers.hope import SETTINGS
from nestlm.ops.hope.common import DECAY_TO, MEMORIES, TARGETS, UPDATES

MIXERS = ("attn", "swa", "mamba", "mamba2", "memory", "hope")
CHANNEL_MIXERS = ("mlp", "cms")

# Compact pattern letters: "A" attn, "W" swa, "M" mamba, "S" mamba2 (SSD), "T" memory (Titans),
# "H" hope. "AMSS" == ["attn", "mamba", "mamba2", "mamba2"]; "(MS)*3" repeats a group.
PATTERN_LETTERS = {"A": "attn", "W": "swa", "M": "mamba", "S": "mamba2", "T": "memory", "H": "hope"}


# The HOPE layer's switches as HybridConfig fields, by named setting: "paper" (the Nested Learning
# paper's HOPE; the hope presets use it with v normalised, nestlm.models.presets.HOPE_PRESET) and "v1"
# (nestlm's first HOPE layer, the fields' defaults, so a config saved before the fields existed
# describes the same model).
HOPE_SETTINGS = {name: {f"hope_{k}": v for k, v in s.items()} for name, s in SETTINGS.items()}


def _err(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"HybridConfig.{name}={value!r} is invalid: expected {allowed}")


def parse_layers(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Expand a layer spec into a list of mixer names.

    Accepts a list of names, a comma-separated string ("attn,mamba2"), or a compact pattern
    ("AMSS", "(SSA)*4", "W S S H" with spaces ignored).
    """
    if isinstance(spec, (list, tuple)):
        names = [str(s) for s in spec]
    elif isinstance(spec, str):
        s = spec.strip()
        if "," in s or s in MIXERS:
            names = [p.strip() for p in s.split(",") if p.strip()]
        else:
            s = s.replace(" ", "")
            # expand groups "(XY)*n" and single letters "X*n"
            prev = None
            while prev != s:
                prev = s
                s = re.sub(r"\(([A-Z]+)\)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), s)
                s = re.sub(r"([A-Z])\*(\d+)", lambda m: m.group(1) * int(m.group(2)), s)
            bad = [c for c in s if c not in PATTERN_LETTERS]
            if bad or not s:
                raise _err("layers", spec, f"a list of {MIXERS} or a pattern of letters {''.join(PATTERN_LETTERS)}")
            names = [PATTERN_LETTERS[c] for c in s]
    else:
        raise _err("layers", spec, "a list of layer names or a pattern string")
    for n in names:
        if n not in MIXERS:
            raise _err("layers", spec, f"entries in {MIXERS}")
    if not names:
        raise _err("layers", spec, "at least one layer")
    return names


# Finite numbers checked by HybridConfig._check_numbers: name -> (test, what is allowed)
_NUMBER_FIELDS = {
    "mlp_ratio": (lambda v: v > 0, "a positive finite number"),
    "norm_eps": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "init_std": (lambda v: v > 0, "a positive finite number"),
    "rope_theta": (lambda v: v > 0, "a positive finite number"),
    "mem_max_lr": (lambda v: v > 0, "a positive finite number"),
    "cms_lr": (lambda v: 0 < v <= 1, "a number in (0, 1] (normalised inner step of the CMS levels)"),
}
_BOOL_FIELDS = ("tie_embeddings", "mem_first_order", "hope_momentum", "hope_normalize_v")
_HOPE_CHOICES = {"hope_update": UPDATES, "hope_memory": MEMORIES, "hope_target": TARGETS, "hope_decay_to": DECAY_TO}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class HybridConfig:
    """Configuration of a HybridLM.

    Blocks are `x = x + mixer(norm(x)); x = x + channel_mixer(norm(x))`; `layers[i]` names the mixer
    of block i and `channel_mixers[i]` (or the single `channel_mixer`) its channel mixer.
    """

    vocab_size: int = 512
    d_model: int = 128
    layers: Any = field(default_factory=lambda: ["attn", "mamba2"])
    channel_mixer: str = "mlp"
    channel_mixers: list[str] | None = None  # per block; overrides channel_mixer when given
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = round_up(mlp_ratio * d_model, 64)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # attention / swa
    n_heads: int = 4
    n_kv_heads: int | None = None
    window: int = 256  # sliding window of `swa` layers, in tokens
    rope_theta: float = 10000.0
    # mamba (Mamba-1)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    # mamba2 (SSD)
    ssm_d_state: int = 64
    ssm_headdim: int = 64
    ssm_ngroups: int = 1
    ssm_chunk_size: int = 64
    # memory (Titans) / hope: see nestlm.layers.memory / hope
    mem_heads: int = 4
    mem_head_dim: int = 32
    mem_depth: int = 2
    mem_chunk_size: int = 16
    mem_max_lr: float = 0.1
    mem_first_order: bool = False
    hope_chunk_size: int = 16  # chunk of the memories that produce k, v, lr, decay
    # hope update rule and memories (nestlm.layers.hope); defaults: HOPE_SETTINGS["v1"]
    hope_update: str = "gd"  # "dgd" (Delta Gradient Descent) | "gd"
    hope_memory: str = "linear"  # "mlp" (residual 2-layer MLPs) | "linear"
    hope_momentum: bool = True
    hope_target: str = "value"  # main memory's target: "self" (its own value of v) | "value" (v)
    hope_decay_to: str = "init"  # "zero" | "init" (the learned initial memories)
    hope_normalize_v: bool = True
    # cms: update periods in tokens, one per level; None = an ordinary MLP level
    cms_periods: list[int | None] = field(default_factory=lambda: [None, 16, 64])
    cms_lr: float = 0.01  # maximal normalised inner step of a CMS level, in (0, 1]
    # SwiGLU width of each CMS level as a multiple of d_model; None = mlp_ratio / number of levels, so a
    # CMS spends the width of the MLP it replaces, split across its levels
    cms_hidden_ratio: float | None = None
    # reset policy {name pattern: "episode" | "persistent"}; patterns and defaults: nestlm.models.state
    reset_policy: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = parse_layers(self.layers)
        self._check_sizes()
        self._check_attention()
        self._check_mamba2()
        self._check_numbers()
        self._check_hope()
        self._check_channel_mixers()
        self._check_cms()
        self._check_reset_policy()

    def _check_sizes(self) -> None:
        """Every count and width is an int in range."""
        self._check_int("vocab_size", 2)
        self._check_int("d_model", 8)
        for name in ("n_heads", "window", "d_state", "d_conv", "expand", "ssm_d_state", "ssm_headdim"):
            self._check_int(name, 1)
        for name in ("ssm_ngroups", "ssm_chunk_size", "mem_heads", "mem_head_dim", "mem_chunk_size", "hope_chunk_size"):
            self._check_int(name, 1)
        if not (isinstance(self.mem_depth, int) and not isinstance(self.mem_depth, bool) and self.mem_depth in (1, 2)):
            raise _err("mem_depth", self.mem_depth, "1 (linear memory) or 2 (2-layer MLP memory)")

    def _check_attention(self) -> None:
        """Heads divide the width into even (RoPE) head dims; KV heads divide the heads."""
        if self.n_kv_heads is not None:
            self._check_int("n_kv_heads", 1)
            if self.n_heads % self.n_kv_heads:
                raise _err("n_kv_heads", self.n_kv_heads, f"a divisor of n_heads={self.n_heads}")
        if self.d_model % self.n_heads:
            raise _err("n_heads", self.n_heads, f"a divisor of d_model={self.d_model}")
        if (self.d_model // self.n_heads) % 2:
            raise _err("n_heads", self.n_heads, "a head dim d_model/n_heads that is even (RoPE)")

    def _check_mamba2(self) -> None:
        """SSD heads tile expand * d_model and split into whole groups (only when a mamba2 layer exists)."""
        if "mamba2" not in self.layers:
            return
        d_inner = self.expand * self.d_model
        if d_inner % self.ssm_headdim:
            raise _err("ssm_headdim", self.ssm_headdim, f"a divisor of expand*d_model={d_inner}")
        if (d_inner // self.ssm_headdim) % self.ssm_ngroups:
            raise _err("ssm_ngroups", self.ssm_ngroups, "a divisor of the number of SSD heads")

    def _check_numbers(self) -> None:
        """Ratios, epsilons, scales and step sizes are finite numbers in their ranges; flags are bools."""
        for name, (ok, allowed) in _NUMBER_FIELDS.items():
            v = getattr(self, name)
            if not (_is_number(v) and ok(v)):
                raise _err(name, v, allowed)
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise _err(name, getattr(self, name), "true or false")

    def _check_hope(self) -> None:
        """The HOPE switches (flags: _check_numbers); DGD's step needs mem_max_lr < 1."""
        for name, allowed in _HOPE_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise _err(name, getattr(self, name), f"one of {allowed}")
        if "hope" in self.layers and self.hope_update == "dgd" and not self.mem_max_lr < 1:
            raise _err("mem_max_lr", self.mem_max_lr, "a number below 1 with hope_update='dgd' (the DGD step)")

    def _check_channel_mixers(self) -> None:
        """One known channel mixer, or one per layer."""
        if self.channel_mixer not in CHANNEL_MIXERS:
            raise _err("channel_mixer", self.channel_mixer, f"one of {CHANNEL_MIXERS}")
        if self.channel_mixers is None:
            return
        if not isinstance(self.channel_mixers, (list, tuple)):
            raise _err("channel_mixers", self.channel_mixers, "a list with one channel mixer per layer, or None")
        self.channel_mixers = list(self.channel_mixers)
        if len(self.channel_mixers) != len(self.layers):
            raise _err("channel_mixers", self.channel_mixers, f"{len(self.layers)} entries, one per layer")
        for c in self.channel_mixers:
            if c not in CHANNEL_MIXERS:
                raise _err("channel_mixers", self.channel_mixers, f"entries in {CHANNEL_MIXERS}")

    def _check_cms(self) -> None:
        """CMS levels: periods (positive ints or None) and the width ratio (cms_lr: _check_numbers)."""
        if not isinstance(self.cms_periods, (list, tuple)) or not self.cms_periods:
            raise _err("cms_periods", self.cms_periods, "a non-empty list of update periods (positive ints or None)")
        self.cms_periods = list(self.cms_periods)
        for p in self.cms_periods:
            if p is not None and (not isinstance(p, int) or isinstance(p, bool) or p < 1):
                raise _err("cms_periods", self.cms_periods, "entries that are positive ints or None")
        r = self.cms_hidden_ratio
        if r is not None and not (_is_number(r) and r > 0):
            raise _err("cms_hidden_ratio", r, "a positive number or None")

    def _check_reset_policy(self) -> None:
        """{name pattern: "episode" | "persistent"} (patterns: nestlm.models.state)."""
        if not isinstance(self.reset_policy, dict):
            raise _err("reset_policy", self.reset_policy, "a dict {name pattern: 'episode' | 'persistent'}")
        for k, v in self.reset_policy.items():
            if not isinstance(k, str) or not k:
                raise _err("reset_policy", {k: v}, "keys that are non-empty name patterns (see nestlm.models.state)")
            if v not in ("episode", "persistent"):
                raise _err("reset_policy", {k: v}, "values 'episode' or 'persistent'")

    def _check_int(self, name: str, lo: int) -> None:
        v = getattr(self, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise _err(name, v, f"an int >= {lo}")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def channel_mixer_of(self, i: int) -> str:
        return self.channel_mixers[i] if self.channel_mixers is not None else self.channel_mixer

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HybridConfig:
        """A config from a mapping of its fields; unknown or mistyped fields are a one-line ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"HybridConfig: expected a mapping of config fields, got a {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            hints = [
                f"{k!r} (did you mean {m[0]!r}?)" for k in unknown if (m := difflib.get_close_matches(k, known, 1))
            ]
            raise ValueError(
                f"HybridConfig: unknown field(s) {unknown}"
                + (f"; {', '.join(hints)}" if hints else "")
                + f"; allowed: {sorted(known)}"
            )
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def config_hash(self) -> str:
        """Short stable hash of the architecture (state compatibility, eval reports).

        Fields added after the first release enter the hash only when they differ from their
        defaults (which describe the model as it was before), so earlier configs keep their hash.
        """
        d = self.to_dict()
        for name, value in HOPE_SETTINGS["v1"].items():
            if d[name] == value:
                del d[name]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # --- presets ----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, size: str = "tiny", **overrides: Any) -> HybridConfig:
        from nestlm.models.presets import preset_dict

        d = preset_dict(name, size)
        d.update(overrides)
        return cls.from_dict(d)
