"""Agent Continuation Bench: environments (envs/), scoring and reports, `nestlm eval`, lm-eval adapter.

Importing this package registers the lm-evaluation-harness model name `nestlm` when lm-eval is
installed (`pip install nestlm[eval]`); without it everything else works unchanged.
"""

try:
    import lm_eval  # noqa: F401
except ImportError:  # optional dependency
    pass
else:
    from nestlm.eval import lm_eval_adapter  # noqa: F401  (registers the model name `nestlm`)
