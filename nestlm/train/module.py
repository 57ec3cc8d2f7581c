"""LightningModule around a HybridLM: loss, AdamW groups, warmup + cosine, state carrying.

The model is built from primitive hyperparameters (a preset name and size, overrides, or a full
config dict) so a .ckpt holds only primitives and tensors and loads with `weights_only=True`.

Batches are dicts:
    input_ids  LongTensor [B, T]
    labels     LongTensor [B, T]   next-token targets, -100 where no loss is taken
    reset      BoolTensor [B]      optional: True where a row starts a new document. When present,
                                   the recurrent state is carried from the previous batch for the
                                   other rows (truncated BPTT over consecutive segments).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from torch.utils.checkpoint import checkpoint

from nestlm.models import HybridConfig, HybridLM, next_token_loss
from nestlm.models.loading import CARRY_KEY, CheckpointError, load_model
from nestlm.models.state import State
from nestlm.train.callbacks import check_finite_loss


def read_config_file(path: str) -> dict[str, Any]:
    """A HybridConfig dict from a YAML / JSON file (configs/model/<preset>-<size>.yaml)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"LitHybridLM.config: no model config file at {p}")
    try:
        d = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"LitHybridLM.config: {p} is not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(d, dict):
        raise ValueError(f"LitHybridLM.config: {p} does not hold a mapping of HybridConfig fields")
    return d


def build_config(
    preset: str | None, size: str, overrides: dict[str, Any] | None, config: dict[str, Any] | str | None
) -> HybridConfig:
    """A full `config` (dict or file) wins, with `overrides` applied; otherwise `preset` at `size`."""
    if config is not None:
        d = read_config_file(config) if isinstance(config, str) else dict(config)
        d.update(overrides or {})
        return HybridConfig.from_dict(d)
    if preset is None:
        raise ValueError("LitHybridLM: give either model.preset (with size/overrides) or model.config")
    return HybridConfig.preset(preset, size, **(overrides or {}))


def no_decay(name: str, p: torch.nn.Parameter, norm_params: set[int]) -> bool:
    """Norm weights, biases, 1-D params (SSM A/D/dt bias...) and params flagged `_no_weight_decay`."""
    return p.dim() < 2 or name.endswith("bias") or id(p) in norm_params or getattr(p, "_no_weight_decay", False)


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    norm_params = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if no_decay(name, p, norm_params) else decay).append(p)
    # names show up in LearningRateMonitor's keys (lr-AdamW/decay, lr-AdamW/no_decay)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": keep, "weight_decay": 0.0, "name": "no_decay"},
    ]


@torch.no_grad()
def answer_scores(logits: torch.Tensor, batch: dict) -> dict[str, tuple[float, float, int]]:
    """Per probe key ("ENV/kind"): (exact-answer accuracy, mean answer-token loss, probes).

    logits [B, T, V]; batch["answer"] [B, T] numbers the probe each target token answers (-1
    elsewhere), batch["probe_keys"][i] is probe i's key. An answer counts when every one of its
    tokens is the argmax, as in `nestlm eval`.
    """
    ans, labels = batch["answer"], batch["labels"]
    sel = ans >= 0
    if not bool(sel.any()):
        return {}
    ids = ans[sel]
    n = len(batch["probe_keys"])
    hit = (logits.argmax(-1) == labels)[sel].float()
    ce = F.cross_entropy(logits[sel].float(), labels[sel], reduction="none")
    tokens = torch.zeros(n, device=ids.device).index_add_(0, ids, torch.ones_like(hit))
    wrong = torch.zeros(n, device=ids.device).index_add_(0, ids, 1.0 - hit)
    loss = torch.zeros(n, device=ids.device).index_add_(0, ids, ce) / tokens.clamp(min=1)
    correct, present = (wrong == 0) & (tokens > 0), tokens > 0
    out: dict[str, list[list[float]]] = {}
    for i in torch.nonzero(present).flatten().tolist():
        out.setdefault(batch["probe_keys"][i], []).append([float(correct[i]), float(loss[i])])
    return {k: (sum(c for c, _ in v) / len(v), sum(x for _, x in v) / len(v), len(v)) for k, v in out.items()}


class LitHybridLM(L.LightningModule):
    """Next-token training of a HybridLM.

    A model is named one of two ways, and `overrides` (HybridConfig fields) apply on top of either:
      - a preset: `preset` at `size` (HybridConfig.preset; configs/model/*.yaml are generated from it);
      - a full config: `config`, the path of a YAML file of HybridConfig fields, or that mapping
        itself. It wins over `preset` when given. A path is replaced by its contents in the saved
        hyperparameters, so a checkpoint never depends on the file (and reloads through the dict).

    Args:
        preset, size, overrides: `HybridConfig.preset(preset, size, **overrides)`.
        config: a full HybridConfig dict or YAML path (see above).
        lr, betas, eps, weight_decay: AdamW (no decay on norms, biases, 1-D and `_no_weight_decay` params).
        warmup_steps: linear warmup from lr * 1e-3 to lr (torch LinearLR), then cosine (CosineAnnealingLR)
            down to lr * min_lr_ratio at `decay_steps` (default: trainer.max_steps); stepped every step.
        compile_blocks: torch.compile each block separately (fast compile, graph breaks stay local).
        activation_checkpointing: recompute each block's activations in the backward pass.
        init_weights: start a fresh fit from the weights of this export folder, .ckpt file or sharded
            checkpoint (fine-tuning, or the second phase of a recipe); the optimizer, schedule and step
            start from zero. Its model config must equal this one. Ignored when resuming (`--ckpt_path`),
            whose checkpoint holds the weights.
    """

    def __init__(
        self,
        preset: str | None = "hope-hybrid",
        size: str = "tiny",
        overrides: dict[str, Any] | None = None,
        config: dict[str, Any] | str | None = None,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        compile_blocks: bool = False,
        activation_checkpointing: bool = False,
        init_weights: str | None = None,
    ) -> None:
        super().__init__()
        if warmup_steps < 0:
            raise ValueError(f"LitHybridLM.warmup_steps={warmup_steps!r} is invalid: expected an int >= 0")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"LitHybridLM.min_lr_ratio={min_lr_ratio!r} is invalid: expected a number in [0, 1]")
        if isinstance(config, str):
            config = read_config_file(config)
        self.save_hyperparameters()
        self.cfg = build_config(preset, size, overrides, config)
        self.model = HybridLM(self.cfg)
        self._carry: State | None = None  # recurrent state carried between training segments
        self._flops_per_token: float | None = None
        self.last_state: State | None = None  # state after the latest training batch (for memory metrics)
        if activation_checkpointing:
            for blk in self.model.blocks:
                blk.forward = functools.partial(checkpoint, blk.forward, use_reentrant=False)
        if compile_blocks:
            for blk in self.model.blocks:
                blk.compile()

    def setup(self, stage: str) -> None:
        # a token id past the embedding would fail deep inside the first forward
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        vocab = getattr(dm, "vocab_size", None)
        if isinstance(vocab, int) and vocab > self.cfg.vocab_size:
            raise ValueError(
                f"{type(dm).__name__}: the data's vocab_size is {vocab} but the model's is {self.cfg.vocab_size}; "
                f"train a model with vocab_size >= {vocab} (e.g. --model.overrides '{{vocab_size: {vocab}}}')"
            )
        resuming = self._trainer is not None and self.trainer.ckpt_path is not None
        if stage == "fit" and self.hparams.init_weights is not None and not resuming:
            self._load_init_weights(self.hparams.init_weights)

    def _load_init_weights(self, path: str) -> None:
        try:
            source, _ = load_model(path)
        except (OSError, CheckpointError) as e:
            raise type(e)(f"LitHybridLM.init_weights: {e}") from None
        if source.config != self.cfg:
            diff = sorted(k for k, v in vars(self.cfg).items() if getattr(source.config, k) != v)
            raise ValueError(
                f"LitHybridLM.init_weights={path!r} holds another model (config fields differ: {', '.join(diff)}); "
                "expected the model this run trains"
            )
        self.model.load_state_dict(source.state_dict())

    # --- forward / loss -------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, state: State | None = None):
        return self.model(input_ids, state=state)

    def _incoming_state(self, batch: dict[str, torch.Tensor]) -> State | None:
        """The state a batch starts from: carried over, except fresh for rows flagged `reset`."""
        reset = batch.get("reset")
        if reset is None or self._carry is None:
            return None
        reset = reset.to(torch.bool)
        if bool(reset.all()):
            return None
        if not bool(reset.any()):
            return self._carry
        fresh = self.model.init_state(batch_size=reset.shape[0])
        keep = ~reset

        def pick(name: str, carried: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            if carried.shape != new.shape:  # e.g. a full-attention KV cache, whose length the rows share
                raise ValueError(
                    f"LitHybridLM: cannot reset some rows of state tensor {name} of shape "
                    f"{tuple(carried.shape)} (a fresh one has {tuple(new.shape)}); reset whole batches"
                )
            m = keep.view(-1, *([1] * (carried.dim() - 1))).to(carried.device)
            return torch.where(m, carried, new.to(device=carried.device, dtype=carried.dtype))

        blocks = [
            {p: {n: pick(f"blocks.{i}.{p}.{n}", c[p][n], f[p][n]) for n in c[p]} for p in c}
            for i, (c, f) in enumerate(zip(self._carry.blocks, fresh.blocks))
        ]
        return State(blocks, dict(self._carry.meta))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch["input_ids"], state=self._incoming_state(batch))
        loss, n = next_token_loss(out.logits, batch["labels"], batch.get("loss_weight"))
        check_finite_loss(loss, self.global_step + 1)
        if "reset" in batch:
            self._carry = out.state.detach()
        self.last_state = out.state
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach().clamp(max=30.0)))
        if "answer" in batch:
            ans = batch["answer"] >= 0
            if bool(ans.any()):
                hit = (out.logits.detach().argmax(-1) == batch["labels"])[ans].float().mean()
                self.log("train/answer_token_acc", hit, batch_size=int(ans.sum()))
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], prefix: str) -> None:
        out = self(batch["input_ids"])
        loss, n = next_token_loss(out.logits, batch["labels"], batch.get("loss_weight"))
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val", batch_size=int(n.clamp(min=1)), sync_dist=True)
        self.log(f"{prefix}/ppl", torch.exp(loss.clamp(max=30.0)), batch_size=int(n.clamp(min=1)), sync_dist=True)
        if "probe_keys" in batch:
            for key, (acc, ans_loss, count) in answer_scores(out.logits, batch).items():
                self.log(f"{prefix}/{key}/acc", acc, batch_size=count, sync_dist=True)
                self.log(f"{prefix}/{key}/answer_loss", ans_loss, batch_size=count, sync_dist=True)

    def _to_device(self, v):
        return v.to(self.device) if isinstance(v, torch.Tensor) else v

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        gate = dm.gate_due(self.global_step) if hasattr(dm, "gate_due") else None
        if gate is not None:
            # decided before this step trains and before its checkpoint, so a resumed run decides the same
            with torch.no_grad():
                batches = [{k: self._to_device(v) for k, v in b.items()} for b in dm.gate_batches(self.global_step)]
                scores = [answer_scores(self(b["input_ids"]).logits, b) for b in batches]
            hits = sum(a * c for s in scores for a, _, c in s.values())
            count = sum(c for s in scores for _, _, c in s.values())
            acc = hits / max(count, 1)
            self.log("curriculum/gate_acc", acc, batch_size=1)
            if acc >= gate["min_accuracy"]:
                dm.pass_gate(self.global_step)
        if hasattr(dm, "stage_at"):
            self.log("curriculum/stage", float(dm.stage_at(self.global_step)), batch_size=1)
        self._log_flops(batch)

    # --- optimisation ---------------------------------------------------------------------
    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of `lr` at optimizer step `step` (the same curve the schedulers produce)."""
        h = self.hparams
        if step < h.warmup_steps:
            return 1e-3 + (1 - 1e-3) * step / h.warmup_steps
        t = min(step - h.warmup_steps, max(total - h.warmup_steps, 1)) / max(total - h.warmup_steps, 1)
        return h.min_lr_ratio + (1 - h.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.AdamW(param_groups(self.model, h.weight_decay), lr=h.lr, betas=tuple(h.betas), eps=h.eps)
        total = h.decay_steps or (self.trainer.max_steps if self.trainer.max_steps > 0 else None)
        if total is None:
            raise ValueError("LitHybridLM.decay_steps is unset and trainer.max_steps is -1: set one of them")
        sch = torch.optim.lr_scheduler
        warm = h.warmup_steps if h.warmup_steps < total else 0
        parts = [sch.LinearLR(opt, start_factor=1e-3, end_factor=1.0, total_iters=warm)] if warm else []
        parts.append(sch.CosineAnnealingLR(opt, T_max=max(total - warm, 1), eta_min=h.lr * h.min_lr_ratio))
        # past `total` the cosine would climb again: hold the floor instead
        parts.append(sch.ConstantLR(opt, factor=h.min_lr_ratio, total_iters=2**62))
        milestones = ([warm] if warm else []) + [total]
        sched = sch.SequentialLR(opt, parts, milestones=milestones)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # --- throughput -------------------------------------------------------------------------
    @property
    def flops_per_batch(self) -> float | None:
        """Training FLOPs of the latest batch (read by ThroughputMonitor for flops/s and MFU)."""
        return getattr(self, "_last_batch_flops", None)

    def _log_flops(self, batch: dict[str, torch.Tensor]) -> None:
        from nestlm.train.flops import flops_per_token

        b, t = batch["input_ids"].shape
        if self._flops_per_token is None or getattr(self, "_flops_seq_len", None) != t:
            self._flops_per_token = flops_per_token(self.model, t)["total"]
            self._flops_seq_len = t
        factor = 4.0 if self.hparams.activation_checkpointing else 3.0
        self._last_batch_flops = factor * b * t * self._flops_per_token

    # --- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nestlm_config"] = self.cfg.to_dict()
        if self._carry is not None:
            checkpoint[CARRY_KEY] = self._carry.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        carry = checkpoint.get(CARRY_KEY)
        self._carry = None if carry is None else State.from_dict(carry, f"checkpoint {CARRY_KEY}", self.device)
