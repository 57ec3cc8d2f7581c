"""HOPE's self-referential Titans recurrences (Nested Learning, Behrouz et al. 2025, sections 8.1-8.3).

dgd_scan, dgd_scan_ref          the paper's update: Delta Gradient Descent (or GD), linear or
                                residual-MLP memories, self-generated targets, optional momentum
                                (chunk.py: UT transform; ref.py: token loop; common.py: shared)
selfmod_scan, selfmod_scan_ref  nestlm's first HOPE recurrence (GD with momentum and decay
                                towards the initial memories, linear memories), kept so that
                                models trained with it load and run unchanged (selfmod.py)
"""

from nestlm.ops.hope.chunk import dgd_scan
from nestlm.ops.hope.common import l2norm
from nestlm.ops.hope.ref import dgd_scan_ref
from nestlm.ops.hope.selfmod import selfmod_scan, selfmod_scan_ref

__all__ = ["dgd_scan", "dgd_scan_ref", "l2norm", "selfmod_scan", "selfmod_scan_ref"]
