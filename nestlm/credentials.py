"""Whether W&B credentials exist on this machine: the one check `nestlm fit` (train/logger.py) and
`nestlm eval --wandb` (eval/cli.py) use to choose online or offline logging. Plain Python, below
both train and eval (it imports neither wandb nor lightning)."""

from __future__ import annotations

import netrc
import os


def has_wandb_credentials() -> bool:
    """WANDB_API_KEY in the environment or an entry for the W&B host in ~/.netrc (or $NETRC)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or None)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    return rc.authenticators(host) is not None
