"""The one loader of saved HybridLMs, and the one validation step every loaded model and state passes.

    model, info = load_model(path)     # a Lightning .ckpt, an FSDP-sharded checkpoint folder or an
                                       # export folder -> HybridLM (eval mode) + info
    ckpt = read_checkpoint(path)       # a training checkpoint as a dict, validated (resume, export)
    weights = model_state_dict(ckpt)   # its HybridLM weights

Sources. A .ckpt is read with `torch.load(weights_only=True)`. A sharded folder (Lightning's FSDP
layout: torch.distributed.checkpoint files of {"model": ..., "optimizer_<i>": ...} plus meta.pt) is
read without running any pickle it holds: the DCP metadata goes through an unpickler that builds only
torch.distributed.checkpoint metadata types, and its byte entries through `weights_only=True`. An
export folder is config.json + model.safetensors (`HybridLM.save_pretrained`).

Validation (export, eval, the lm-eval adapter, resume, `HybridLM.from_pretrained`, `State.load`):
the config is a mapping of HybridConfig fields, typed and ranged by HybridConfig itself; the weights
are exactly the names and shapes that config builds, and finite; a carried training state is a valid
State (`State.from_dict`). A defect is a CheckpointError (a ValueError) of one line that names the
file and what is wrong.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nestlm.models.config import HybridConfig

if TYPE_CHECKING:
    from nestlm.models.hybrid import HybridLM

META_FILE = "meta.pt"  # Lightning's metadata file inside an FSDP-sharded checkpoint folder
DCP_METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's pickled metadata
CARRY_KEY = "nestlm_carry_state"  # the recurrent state carried between training segments (State.to_dict)
_WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


class CheckpointError(ValueError):
    """A checkpoint, export folder or state that cannot be used; the message is one line naming the file."""


def root_error(e: BaseException) -> BaseException:
    """`e`, or for torch.distributed.checkpoint's CheckpointException the error of its first failing rank."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return e


def one_line(e: BaseException) -> str:
    """`Type: message` of an exception (root_error) on one line."""
    e = root_error(e)
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --- validation ------------------------------------------------------------------------------------
def config_from(d: Any, source: str) -> HybridConfig:
    """HybridConfig from the mapping `d` read from `source`."""
    if not isinstance(d, Mapping):
        raise CheckpointError(
            f"{source}: the model config is a {type(d).__name__}; expected a mapping of HybridConfig fields"
        )
    try:
        return HybridConfig.from_dict(dict(d))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def check_finite(tensors: Mapping[str, torch.Tensor], source: str, what: str = "weight") -> None:
    """Every floating-point tensor finite, or a CheckpointError naming the first that is not."""
    for name, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise CheckpointError(
                    f"{source}: {what} {name} holds {bad} non-finite value(s) (NaN or inf) of {t.numel()}; refusing it"
                )


def expected_shapes(config: HybridConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight a HybridLM of `config` holds (built on the meta device: no memory)."""
    from nestlm.models.hybrid import HybridLM

    with torch.device("meta"):
        model = HybridLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_weights(
    expected: Mapping[str, tuple[int, ...]],
    weights: Mapping[str, Any],
    config: HybridConfig,
    source: str,
    strict: bool = True,
) -> None:
    """`weights` hold the names (`strict`) and shapes of `expected`, all finite; else one CheckpointError line.

    Names of an earlier layer version are checked as the names they load as (hybrid.upgrade_weights).
    """
    from nestlm.models.hybrid import upgrade_weights

    weights = upgrade_weights(config, weights)
    tied = {"embed.weight", "lm_head.weight"} if config.tie_embeddings else set()
    not_tensors = sorted(k for k, v in weights.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{source}: weight entries that are not tensors: {not_tensors[:4]}")
    # a tied head is one tensor under two names; a file may hold either
    missing = sorted(k for k in expected if k not in weights and not (k in tied and tied & set(weights)))
    unexpected = sorted(k for k in weights if k not in expected)
    shaped = [
        (k, tuple(weights[k].shape), s) for k, s in expected.items() if k in weights and tuple(weights[k].shape) != s
    ]
    problems = []
    if shaped:
        k, got, want = shaped[0]
        more = f" and {len(shaped) - 1} more" if len(shaped) > 1 else ""
        problems.append(f"{k} has shape {got} in the file but {want} in the config{more}")
    if strict and missing:
        problems.append(f"missing {missing[:4]}" + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
    if strict and unexpected:
        problems.append(
            f"unexpected {unexpected[:4]}" + (f" and {len(unexpected) - 4} more" if len(unexpected) > 4 else "")
        )
    if problems:
        raise CheckpointError(f"{source}: the weights do not match the model config: {'; '.join(problems)}")
    check_finite(weights, source)


def load_weights(model: HybridLM, weights: Mapping[str, torch.Tensor], source: str, strict: bool = True) -> HybridLM:
    """Validate `weights` against `model` (check_weights), then load them into it."""
    from nestlm.models.hybrid import upgrade_weights

    weights = upgrade_weights(model.config, weights)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_weights(expected, weights, model.config, source, strict)
    model.load_state_dict(dict(weights), strict=False)  # names were checked above (a tied alias may be absent)
    return model


# --- training checkpoints (.ckpt file or sharded folder) ---------------------------------------------
def checkpoint_config(ckpt: Mapping[str, Any], source: str) -> HybridConfig:
    """The model config a training checkpoint records: `nestlm_config`, else the module's hyperparameters."""
    if "nestlm_config" in ckpt:
        return config_from(ckpt["nestlm_config"], f"{source}: nestlm_config")
    hp = ckpt.get("hyper_parameters")
    if isinstance(hp, Mapping) and hp.get("config") is not None:
        return config_from(hp["config"], f"{source}: hyper_parameters.config")
    if isinstance(hp, Mapping) and isinstance(hp.get("preset"), str):
        try:
            return HybridConfig.preset(hp["preset"], hp.get("size", "tiny"), **dict(hp.get("overrides") or {}))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{source}: hyper_parameters: {e}") from None
    raise CheckpointError(
        f"{source} holds no model config (no nestlm_config or hyper_parameters): not written by nestlm"
    )


def model_state_dict(ckpt: Mapping[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The HybridLM weights inside a LitHybridLM checkpoint (prefix `model.` dropped, wrapper names removed)."""
    sd = ckpt.get("state_dict")
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{source}: state_dict is a {type(sd).__name__}; expected a mapping of tensors")
    out = {}
    for k, v in sd.items():
        k = str(k)
        for w in _WRAPPERS:
            k = k.replace(w, "")
        if k.startswith("model."):
            out[k[len("model.") :]] = v
    if not out:
        raise CheckpointError(f"{source} holds no `model.*` weights (not a nestlm training checkpoint)")
    return out


def read_checkpoint(path: str | os.PathLike, model_only: bool = False) -> dict[str, Any]:
    """The Lightning checkpoint at `path` (a .ckpt file or a sharded folder), validated.

    Checked: a readable checkpoint dict with a state_dict, its model config (checkpoint_config), its
    HybridLM weights against that config (names, shapes, finite), and the carried training state.
    model_only: of a sharded folder read only the model entries (not the optimizer states).
    FileNotFoundError: nothing at `path`; CheckpointError: anything else, in one line naming `path`.
    """
    p = Path(path)
    source = f"checkpoint {p}"
    if p.is_dir():
        ckpt = _read_sharded(p, source, keys=["model"] if model_only else None)
    elif not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    else:
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 — torch raises many types for truncated / foreign / pickled files
            raise CheckpointError(f"{source} is truncated or not a torch checkpoint ({one_line(e)})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{source} is not a Lightning checkpoint (no state_dict)")
    config = checkpoint_config(ckpt, source)
    check_weights(expected_shapes(config), model_state_dict(ckpt, source), config, source)
    if ckpt.get(CARRY_KEY) is not None:
        from nestlm.models.state import State

        State.from_dict(ckpt[CARRY_KEY], source=f"{source}: {CARRY_KEY}")
    return ckpt


class _MetadataUnpickler(pickle.Unpickler):
    """Builds torch.distributed.checkpoint metadata and nothing else: any other global is refused, so a
    crafted `.metadata` cannot call a function or construct an arbitrary object."""

    ALLOWED = {
        *(
            ("torch.distributed.checkpoint.metadata", n)
            for n in (
                "Metadata",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "TensorProperties",
                "StorageMeta",
                "MetadataIndex",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a torch.distributed.checkpoint metadata type")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of torch.distributed.checkpoint metadata")


def read_dcp_metadata(folder: Path) -> Any:
    """The torch.distributed.checkpoint Metadata of `folder`, unpickled with _MetadataUnpickler; its
    storage entries must point at files inside `folder`."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(folder / DCP_METADATA_FILE, "rb") as f:
        md = _MetadataUnpickler(f).load()
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise pickle.UnpicklingError(f"{DCP_METADATA_FILE} holds a {type(md).__name__}, not DCP Metadata")
    for info in (md.storage_data or {}).values():
        rel = Path(str(getattr(info, "relative_path", "")))
        if rel.is_absolute() or ".." in rel.parts:
            raise pickle.UnpicklingError(f"{DCP_METADATA_FILE} points at {rel}, outside the checkpoint folder")
    return md


def _read_sharded(path: Path, source: str, keys: list[str] | None) -> dict[str, Any]:
    """Consolidate Lightning's FSDP sharded layout in memory: meta.pt + DCP files {"model": state_dict, ...}."""
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"{source} is a directory but not a sharded Lightning checkpoint (no {META_FILE})")
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            # read (and refused) before DCP runs, so its fallback paths never see a bad file
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    class Planner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            # byte entries (optimizer hyperparameters, ...) are loaded weights-only; DCP itself would
            # unpickle them with weights_only=False, so they are re-encoded from the safe result
            safe = io.BytesIO()
            torch.save(torch.load(value, map_location="cpu", weights_only=True), safe)
            safe.seek(0)
            super().load_bytes(read_item, safe)

    sd: dict[str, Any] = {}
    try:
        meta = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
        md = read_dcp_metadata(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is not initialised": reading in one process is meant
            _load_state_dict(sd, storage_reader=Reader(path), planner=Planner(keys=keys), no_dist=True)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise CheckpointError(f"{source}: cannot read the sharded checkpoint ({one_line(e)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: {META_FILE} holds a {type(meta).__name__}, not a checkpoint dict")
    if "model" not in sd:
        raise CheckpointError(f"{source}: the sharded checkpoint has no 'model' entry")
    meta["state_dict"] = sd["model"]
    return meta


# --- export folders ------------------------------------------------------------------------------------
def load_export(path: str | os.PathLike, device: str | torch.device = "cpu", strict: bool = True) -> HybridLM:
    """A HybridLM from an export folder (config.json + model.safetensors), validated."""
    from safetensors.torch import load_file

    from nestlm.models.hybrid import HybridLM

    p = Path(path)
    cfg_file, weights_file = p / "config.json", p / "model.safetensors"
    if not p.is_dir():
        raise FileNotFoundError(
            f"{p} is not a directory (expected an export folder with config.json and model.safetensors)"
        )
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"export folder {p}: missing {f.name}")
    try:
        d = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e})") from None
    if isinstance(d, dict) and isinstance(d.get("config"), dict):  # huggingface_hub's {"config": {...}} layout
        d = d["config"]
    config = config_from(d, str(cfg_file))
    try:
        weights = load_file(str(weights_file), device="cpu")
    except Exception as e:  # noqa: BLE001 — safetensors raises several types for damaged files
        raise CheckpointError(f"cannot read {weights_file}: not a safetensors file ({one_line(e)})") from None
    model = HybridLM(config)
    return load_weights(model, weights, str(weights_file), strict).to(device)


# --- any source -----------------------------------------------------------------------------------------
def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[HybridLM, dict[str, Any]]:
    """(model in eval mode, info) for a .ckpt file, a sharded checkpoint folder or an export folder.

    info: kind ("ckpt" | "export"), trained_context (tokens, or None if unknown), run_dir, wandb_run_id.
    """
    from nestlm.models.hybrid import HybridLM

    p = Path(path)
    info: dict[str, Any] = {"trained_context": None, "run_dir": None, "wandb_run_id": None}
    if p.is_dir() and (p / "config.json").is_file():
        model = load_export(p)
        info["kind"] = "export"
    elif p.is_file() or (p.is_dir() and (p / META_FILE).is_file()):
        ckpt = read_checkpoint(p, model_only=True)
        config = checkpoint_config(ckpt, f"checkpoint {p}")
        model = load_weights(HybridLM(config), model_state_dict(ckpt), f"checkpoint {p}")
        info["kind"] = "ckpt"
        info["trained_context"] = _trained_context(ckpt)
    elif p.is_dir():
        raise CheckpointError(
            f"{p} is a folder without config.json or {META_FILE} (expected an export folder or a sharded checkpoint)"
        )
    else:
        raise FileNotFoundError(f"{p} does not exist")
    run_dir = _run_dir(p)
    if run_dir is not None:
        info["run_dir"] = str(run_dir)
        rid = run_dir / "wandb_run_id"
        info["wandb_run_id"] = (rid.read_text().strip() or None) if rid.is_file() else None
        info["trained_context"] = info["trained_context"] or _context_from_run_config(run_dir)
    return model.to(device).eval(), info


def _trained_context(ckpt: Mapping[str, Any]) -> int | None:
    for key in ("datamodule_hyper_parameters", "hyper_parameters"):
        hp = ckpt.get(key)
        if not isinstance(hp, Mapping):
            continue
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
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        v = ((cfg.get("data") or {}).get("init_args") or {}).get("seq_len")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
