"""Agent Continuation Bench: scoring and reports, `nestlm eval`, and the lm-eval adapter.

Importing this package registers the lm-evaluation-harness model name `nestlm` when lm-eval is
installed (`pip install nestlm[eval]`); without it everything else works unchanged. lm_eval itself
is imported only by nestlm.eval.lm_eval_adapter, and nothing in nestlm.train imports this package.
"""

import importlib.util

if importlib.util.find_spec("lm_eval") is not None:  # optional dependency
    from nestlm.eval import lm_eval_adapter  # noqa: F401  (registers the model name `nestlm`)
