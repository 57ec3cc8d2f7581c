"""HybridLM: a stack of blocks, each `x + mixer(norm(x))` then `x + channel_mixer(norm(x))`.

    cfg = HybridConfig.preset("hope-hybrid", size="tiny")
    model = HybridLM(cfg)
    out = model(input_ids)                       # input_ids [B, T] -> out.logits [B, T, V], out.state
    out2 = model(next_ids, state=out.state)      # streaming continuation == one long call
    for out in model.stream(ids, chunk_size=2048):   # the same, one chunk per call (bounded memory)
        ...
    new, state = model.generate(prompt_ids, max_new_tokens=16)   # greedy decoding with the state

Mixers: attn, swa, mamba, mamba2, memory (Titans), hope; channel mixers: mlp (SwiGLU), cms.
The recurrent state of every block travels in a nestlm.models.State.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from nestlm.layers.attention import Attention
from nestlm.layers.mlp import MLP, swiglu_hidden
from nestlm.layers.norm import RMSNorm
from nestlm.models.config import HybridConfig
from nestlm.models.state import State


def build_mixer(cfg: HybridConfig, name: str, out_std: float) -> nn.Module:
    """The sequence mixer called `name` with the sizes of `cfg`."""
    d = cfg.d_model
    if name in ("attn", "swa"):
        return Attention(
            d,
            cfg.n_heads,
            cfg.n_kv_heads,
            window=cfg.window if name == "swa" else None,
            rope_theta=cfg.rope_theta,
            init_std=cfg.init_std,
            out_std=out_std,
        )
    if name == "mamba":
        from nestlm.layers.mamba import Mamba

        return Mamba(d, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand)
    if name == "mamba2":
        from nestlm.layers.mamba2 import Mamba2

        return Mamba2(
            d,
            d_state=cfg.ssm_d_state,
            d_conv=cfg.d_conv,
            expand=cfg.expand,
            headdim=cfg.ssm_headdim,
            ngroups=cfg.ssm_ngroups,
            chunk_size=cfg.ssm_chunk_size,
        )
    if name == "memory":
        from nestlm.layers.memory import NeuralMemory

        return NeuralMemory(
            d,
            cfg.mem_heads,
            cfg.mem_head_dim,
            depth=cfg.mem_depth,
            chunk_size=cfg.mem_chunk_size,
            max_lr=cfg.mem_max_lr,
            first_order=cfg.mem_first_order,
        )
    if name == "hope":
        from nestlm.layers.hope import HOPE

        return HOPE(
            d,
            cfg.mem_heads,
            cfg.mem_head_dim,
            chunk_size=cfg.mem_chunk_size,
            aux_chunk_size=cfg.hope_chunk_size,
            max_lr=cfg.mem_max_lr,
            d_conv=cfg.d_conv,
            update=cfg.hope_update,
            memory=cfg.hope_memory,
            momentum=cfg.hope_momentum,
            target=cfg.hope_target,
            decay_to=cfg.hope_decay_to,
            normalize_v=cfg.hope_normalize_v,
            norm_eps=cfg.norm_eps,
            init_std=cfg.init_std,
            out_std=out_std,
        )
    raise ValueError(f"unknown mixer {name!r}")


def upgrade_weights(cfg: HybridConfig, weights: dict) -> dict:
    """A copy of a HybridLM state dict of `cfg` with parameters saved under an earlier layer
    version's names renamed (the first HOPE layer's: nestlm.layers.hope.upgrade_state_dict)."""
    from nestlm.layers.hope import upgrade_state_dict

    out = dict(weights)
    for i, kind in enumerate(cfg.layers):
        if kind == "hope":
            upgrade_state_dict(out, f"blocks.{i}.mixer.")
    return out


def build_channel_mixer(cfg: HybridConfig, name: str, out_std: float) -> nn.Module:
    hidden = swiglu_hidden(cfg.d_model, cfg.mlp_ratio)
    if name == "mlp":
        return MLP(cfg.d_model, hidden, init_std=cfg.init_std, out_std=out_std)
    if name == "cms":
        from nestlm.layers.cms import CMS

        ratio = cfg.cms_hidden_ratio or cfg.mlp_ratio / len(cfg.cms_periods)
        return CMS(
            cfg.d_model,
            periods=tuple(cfg.cms_periods),
            hidden=swiglu_hidden(cfg.d_model, ratio),
            lr=cfg.cms_lr,
            norm_eps=cfg.norm_eps,
            init_std=cfg.init_std,
            out_std=out_std,
        )
    raise ValueError(f"unknown channel mixer {name!r}")


def next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross entropy (in fp32) of logits [B, T, V] against labels [B, T], averaged over the
    labelled positions (labels != ignore_index), or weighted by `weight` [B, T] when given (e.g.
    answer tokens only); and the total weight. 0 when nothing is labelled."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index, reduction="none")
    w = (labels != ignore_index).flatten().to(ce.dtype) if weight is None else weight.flatten().to(ce.dtype)
    n = w.sum()
    return (ce * w).sum() / n.clamp(min=1e-8), n


class Block(nn.Module):
    """Pre-norm residual block. x: [b, t, d] -> [b, t, d]; state: {"mixer": {...}, "channel": {...}}."""

    def __init__(self, cfg: HybridConfig, i: int):
        super().__init__()
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # GPT-2: residual writes scaled by depth
        self.kind = cfg.layers[i]
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(cfg, cfg.layers[i], out_std)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.channel = build_channel_mixer(cfg, cfg.channel_mixer_of(i), out_std)

    def forward(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        h, mixer_state = self.mixer(self.norm1(x), state.get("mixer"))
        x = x + h
        h, channel_state = self.channel(self.norm2(x), state.get("channel"))
        return x + h, {"mixer": mixer_state, "channel": channel_state}

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        return {
            "mixer": self.mixer.init_state(batch_size, device, dtype),
            "channel": self.channel.init_state(batch_size, device, dtype),
        }


@dataclass
class LMOutput:
    logits: torch.Tensor  # [B, T, vocab_size]
    state: State  # recurrent state after the last token


class HybridLM(nn.Module, PyTorchModelHubMixin, library_name="nestlm", tags=["nestlm"]):
    """Embedding -> blocks -> final RMSNorm -> (tied) LM head."""

    def __init__(self, config: HybridConfig | dict):
        super().__init__()
        if isinstance(config, dict):
            config = HybridConfig.from_dict(config)
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=config.init_std)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=config.init_std)
        self._config_hash = config.config_hash()

    # --- state --------------------------------------------------------------------------------
    def init_state(self, batch_size: int = 1, device=None, dtype=None) -> State:
        """A fresh state (what `state=None` means)."""
        p = self.embed.weight
        device = device if device is not None else p.device
        dtype = dtype if dtype is not None else p.dtype
        return State(
            [blk.init_state(batch_size, device, dtype) for blk in self.blocks],
            {"config_hash": self._config_hash, "tokens_seen": 0},
        )

    def block_kinds(self) -> list[tuple[str, str]]:
        """(mixer, channel mixer) type of every block: the aliases of reset-policy patterns."""
        return [(self.config.layers[i], self.config.channel_mixer_of(i)) for i in range(len(self.blocks))]

    def reset_episode(self, state: State, policy: dict[str, str] | None = None) -> State:
        """Start a new episode: `episode` components of `state` become fresh, `persistent` ones carry on.

        policy defaults to config.reset_policy (see nestlm.models.state for patterns and defaults).
        """
        state.check_compatible(self._config_hash, len(self.blocks))
        tensors = list(state.flat().values())
        batch = tensors[0].shape[0] if tensors else 1
        fresh = self.init_state(batch, device=tensors[0].device if tensors else None)
        return state.reset(fresh, self.block_kinds(), self.config.reset_policy if policy is None else policy)

    # --- forward ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, state: State | None = None) -> LMOutput:
        """input_ids: LongTensor [B, T] -> LMOutput(logits [B, T, V], state). T = 0 returns the state unchanged."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            what = (
                f"shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            )
            raise ValueError(f"HybridLM: input_ids must be an integer tensor [batch, time], got {what}")
        b, t = input_ids.shape
        if b == 0:
            raise ValueError("HybridLM: input_ids has no rows; expected a batch of at least one sequence")
        state = self.init_state(b) if state is None else self.check_state(state, b)
        if t == 0:  # an empty piece of a stream: nothing to read, the state carries on as it is
            logits = self.lm_head.weight.new_zeros(b, 0, self.config.vocab_size)
            same = State(state.blocks, state.continued(0, self._config_hash))
            same.checked_for = state.checked_for
            return LMOutput(logits, same)
        try:
            x = self.embed(input_ids)
        except IndexError:  # an id outside [0, vocab_size); checked here so the happy path costs nothing
            lo, hi = int(input_ids.min()), int(input_ids.max())
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"HybridLM: input_ids holds token id {bad}, outside the vocabulary [0, {self.config.vocab_size})"
            ) from None
        new_blocks = []
        for blk, s in zip(self.blocks, state.blocks):
            x, s = blk(x, s)
            new_blocks.append(s)
        logits = self.lm_head(self.norm_f(x))
        out = State(new_blocks, state.continued(t, self._config_hash))
        out.checked_for = (self._config_hash, b)
        return LMOutput(logits, out)

    def check_state(self, state: State, batch_size: int) -> State:
        """`state` if it fits this model and a batch of `batch_size` rows; else a one-line ValueError.

        Checked once per state object (states this model returns are marked as fitting): the config
        hash, the blocks, every tensor's name, kind (float / int) and shape; a dimension that is 0 in a
        fresh state (a growing attention cache) may have any length.
        """
        if not isinstance(state, State):
            raise ValueError(f"HybridLM: state must be a nestlm.models.State or None, got {type(state).__name__}")
        state.check_compatible(self._config_hash, len(self.blocks))
        if state.checked_for == (self._config_hash, batch_size):
            return state
        fresh = self.init_state(1)
        for i, (blk, ref) in enumerate(zip(state.blocks, fresh.blocks)):
            for part, want in ref.items():
                got = blk.get(part) or {}
                if sorted(got) != sorted(want):
                    raise ValueError(
                        f"State: blocks.{i}.{part} holds {sorted(got)}, the model expects {sorted(want)}; "
                        "a state only loads into the architecture that made it"
                    )
                for name, t in got.items():
                    w, key = want[name], f"blocks.{i}.{part}.{name}"
                    if (
                        not isinstance(t, torch.Tensor)
                        or t.dim() != w.dim()
                        or t.is_floating_point() != w.is_floating_point()
                    ):
                        raise ValueError(
                            f"State: {key} is not a {w.dim()}-d {'float' if w.is_floating_point() else 'int'} "
                            "tensor as the model expects"
                        )
                    if t.shape[0] != batch_size:
                        raise ValueError(
                            f"State: {key} holds a batch of {t.shape[0]} rows but input_ids has {batch_size}; "
                            "a state continues the batch that made it"
                        )
                    if any(g != e and e != 0 for g, e in zip(t.shape[1:], w.shape[1:])):
                        raise ValueError(
                            f"State: {key} has shape {tuple(t.shape)}, the model expects "
                            f"{(batch_size, *(d if d else '*' for d in w.shape[1:]))}"
                        )
        state.checked_for = (self._config_hash, batch_size)
        return state

    @torch.no_grad()
    def stream(
        self, input_ids: torch.Tensor, chunk_size: int | None = 2048, state: State | None = None
    ) -> Iterator[LMOutput]:
        """Feed input_ids [B, T] in consecutive chunks of `chunk_size` tokens (None: one call), the
        state carried; yield each chunk's LMOutput (logits [B, c, V], state after the chunk).

        By the streaming contract the chunks' logits equal one call's; only one chunk's logits are
        held at a time, so memory stays bounded at any T. No gradients (evaluation and decoding).
        """
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"HybridLM.stream: chunk_size={chunk_size!r} is invalid: expected an int >= 1 or None")
        step = input_ids.shape[1] if chunk_size is None else chunk_size
        for s in range(0, input_ids.shape[1], max(step, 1)):
            out = self(input_ids[:, s : s + step], state=state)
            state = out.state
            yield out

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        state: State | None = None,
        generator: torch.Generator | None = None,
        stop: Callable[[torch.Tensor], bool] | None = None,
        chunk_size: int | None = None,
    ) -> tuple[torch.Tensor, State]:
        """Decode with the recurrent state: prefill `input_ids` [B, T] (through `stream`, in chunks of
        `chunk_size`), then one token per step.

        temperature 0 is greedy. stop(new) is asked after every step with the tokens so far
        [B, n]; decoding ends when it returns True (or after max_new_tokens). Returns (new tokens
        [B, n], state after the last token fed): the last new token is not fed, so a caller
        continuing the stream feeds it first.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"HybridLM.generate: input_ids has shape {tuple(input_ids.shape)}: expected [batch, T >= 1]"
            )
        for out in self.stream(input_ids, chunk_size, state):
            logits, state = out.logits[:, -1], out.state
        new = []
        for _ in range(max_new_tokens):
            if temperature <= 0:
                nxt = logits.argmax(-1)
            else:
                scaled = logits.float() / temperature
                if top_k is not None:
                    kth = torch.topk(scaled, min(top_k, scaled.shape[-1])).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                nxt = torch.multinomial(scaled.softmax(-1), 1, generator=generator)[:, 0]
            new.append(nxt)
            if len(new) == max_new_tokens or (stop is not None and stop(torch.stack(new, 1))):
                break
            out = self(nxt[:, None], state)
            logits, state = out.logits[:, -1], out.state
        return torch.stack(new, 1) if new else input_ids.new_zeros(input_ids.shape[0], 0), state

    # --- evaluation-time attention window ------------------------------------------------------------
    def full_attention_layers(self) -> list[Attention]:
        """The mixers of the `attn` blocks: full attention, whose KV state grows with the stream."""
        return [blk.mixer for blk in self.blocks if blk.kind == "attn"]

    @contextlib.contextmanager
    def attention_window(self, window: int | None) -> Iterator[HybridLM]:
        """Inside the block, every full-attention layer sees only its last `window` tokens (a
        sliding window, so its state stays bounded on streams longer than training); None leaves
        the model as it is. The layers are full again on exit.
        """
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise ValueError(
                f"HybridLM.attention_window: window={window!r} is invalid: expected a positive int or None"
            )
        layers = self.full_attention_layers() if window is not None else []
        for m in layers:
            m.window = window
        try:
            yield self
        finally:
            for m in layers:
                m.window = None

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n

    # --- persistence (huggingface_hub mixin: config.json + model.safetensors) ------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        super()._save_pretrained(save_directory)
        # the mixin writes config.json from the init kwargs; write the validated dataclass ourselves
        (Path(save_directory) / "config.json").write_text(self.config.to_json())

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", strict: bool = True, **kwargs):
        from nestlm.models.loading import load_export

        return load_export(model_id, device=map_location, strict=strict)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> HybridLM:
        """Load an export folder (config.json + model.safetensors), validated by nestlm.models.loading:
        a typed and ranged config, weights of exactly its names and shapes, all finite."""
        if os.path.isdir(pretrained_model_name_or_path):
            return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
