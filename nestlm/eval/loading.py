"""Load a model for evaluation from a Lightning .ckpt or an export folder.

A .ckpt written by `nestlm fit` holds the model config (`nestlm_config`, or the module's primitive
hyperparameters) and the weights under `model.`; an export folder holds config.json +
model.safetensors (`HybridLM.from_pretrained`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from nestlm.models import HybridConfig, HybridLM

DEFAULT_CONTEXT = 2048  # assumed training context when a checkpoint does not record one
_WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _config_from_ckpt(ckpt: dict[str, Any], path: Path) -> HybridConfig:
    if isinstance(ckpt.get("nestlm_config"), dict):
        return HybridConfig.from_dict(dict(ckpt["nestlm_config"]))
    hp = ckpt.get("hyper_parameters") or {}
    if isinstance(hp.get("config"), dict):
        return HybridConfig.from_dict(dict(hp["config"]))
    if hp.get("preset"):
        return HybridConfig.preset(hp["preset"], hp.get("size", "tiny"), **(hp.get("overrides") or {}))
    raise ValueError(f"checkpoint {path} holds no model config (nestlm_config or hyper_parameters)")


def _trained_context(ckpt: dict[str, Any]) -> int | None:
    for key in ("datamodule_hyper_parameters", "hyper_parameters"):
        hp = ckpt.get(key) or {}
        for name in ("seq_len", "context_len", "max_seq_len"):
            v = hp.get(name)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _run_dir(path: Path) -> Path | None:
    """The training run directory (holding `wandb_run_id` or `config.yaml`) above a checkpoint, if any."""
    for d in [path if path.is_dir() else path.parent, *path.resolve().parents][:4]:
        if (d / "wandb_run_id").is_file() or (d / "config.yaml").is_file():
            return d
    return None


def _context_from_run_config(run_dir: Path) -> int | None:
    """`data.init_args.seq_len` of the run's resolved config.yaml (what `nestlm fit` writes)."""
    f = run_dir / "config.yaml"
    if not f.is_file():
        return None
    import yaml

    try:
        cfg = yaml.safe_load(f.read_text()) or {}
        v = ((cfg.get("data") or {}).get("init_args") or {}).get("seq_len")
    except (yaml.YAMLError, AttributeError):
        return None
    return v if isinstance(v, int) and v > 0 else None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[HybridLM, dict[str, Any]]:
    """(model in eval mode, info) for a .ckpt file or an export folder.

    info: kind ("ckpt" | "export"), trained_context (tokens, or None if unknown), run_dir, wandb_run_id.
    """
    p = Path(path)
    info: dict[str, Any] = {"trained_context": None, "run_dir": None, "wandb_run_id": None}
    if p.is_dir() and (p / "config.json").is_file():
        model = HybridLM.from_pretrained(str(p))
        info["kind"] = "export"
    elif p.is_file():
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 — any unreadable file is a one-line error
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"--ckpt {p} is not a readable torch checkpoint ({first[:160]})") from None
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ValueError(f"--ckpt {p} is not a Lightning checkpoint (no state_dict)")
        cfg = _config_from_ckpt(ckpt, p)
        model = HybridLM(cfg)
        weights = {}
        for k, v in ckpt["state_dict"].items():
            for w in _WRAPPERS:
                k = k.replace(w, "")
            if k.startswith("model."):
                weights[k[len("model.") :]] = v
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(
                f"--ckpt {p} does not match its config: missing {sorted(missing)[:4]}, "
                f"unexpected {sorted(unexpected)[:4]}"
            )
        info["kind"] = "ckpt"
        info["trained_context"] = _trained_context(ckpt)
    elif p.is_dir():
        raise FileNotFoundError(f"--ckpt {p} is a folder without config.json (expected an export folder)")
    else:
        raise FileNotFoundError(f"--ckpt {p} does not exist")
    run_dir = _run_dir(p)
    if run_dir is not None:
        info["run_dir"] = str(run_dir)
        rid = run_dir / "wandb_run_id"
        info["wandb_run_id"] = (rid.read_text().strip() or None) if rid.is_file() else None
        info["trained_context"] = info["trained_context"] or _context_from_run_config(run_dir)
    return model.to(device).eval(), info
