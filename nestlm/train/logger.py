"""W&B logging for a run directory: offline unless credentials exist, one fixed run id per run.

The run id is stored in `<save_dir>/wandb_run_id`, so a resumed or requeued job (same run
directory) continues the same W&B run; run files go to `<save_dir>/wandb/`.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from nestlm.credentials import has_wandb_credentials

RUN_ID_FILE = "wandb_run_id"


def run_id(save_dir: str | os.PathLike) -> str:
    """The run directory's W&B id: read from its id file, or created (by rank 0) and stored there."""
    f = Path(save_dir) / RUN_ID_FILE
    if f.is_file():
        rid = f.read_text().strip()
        if rid:
            return rid
    rid = os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:12]
    if rank_zero_only.rank == 0:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.name}.tmp-{os.getpid()}")
        tmp.write_text(rid + "\n")
        os.replace(tmp, f)
    return rid


class WandbRun(WandbLogger):
    """WandbLogger bound to a run directory.

    Args:
        save_dir: the run directory (the CLI fills in trainer.default_root_dir when unset).
        offline: None = offline exactly when no W&B credentials are found (WANDB_MODE still wins).
        id: W&B run id; None = the run directory's stored id (created on first use).
        name: display name; None = the run directory's name.
    """

    def __init__(
        self,
        save_dir: str | None = None,
        project: str = "nestlm",
        name: str | None = None,
        offline: bool | None = None,
        id: str | None = None,
        log_model: bool = False,
        **kwargs: Any,
    ) -> None:
        save_dir = save_dir or os.path.join("runs", "default")
        if offline is None:
            offline = not has_wandb_credentials()
        if id is None:
            id = run_id(save_dir)
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(
            name=name or Path(save_dir).name,
            save_dir=save_dir,
            project=project,
            offline=offline,
            id=id,
            log_model=log_model,
            **kwargs,
        )

    @property
    def run_path(self) -> str | None:
        """Local folder of the W&B run (None before the run starts)."""
        if self._experiment is None:
            return None
        return str(Path(self._experiment.dir).parent)
