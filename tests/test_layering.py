"""The package's layering, read from its source: train and eval never import each other, lm_eval is
imported only by the lm-eval adapter, and training neither loads nestlm.eval nor lm_eval."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nestlm"


def imported_modules(path: Path, package: str | None = None) -> set[str]:
    """Every module an `import` / `from ... import` anywhere in the file names (functions included),
    relative imports resolved against `package` (default: the file's package under nestlm/)."""
    if package is None:
        package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def modules_under(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


def _names(mods: set[str], prefix: str) -> list[str]:
    return sorted(m for m in mods if m == prefix or m.startswith(prefix + "."))


def test_imported_modules_sees_every_kind_of_import(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text(
        "import a.b\nfrom c import d\ndef f():\n    from nestlm.eval import scoring\n    from ..eval import x\n"
    )
    found = imported_modules(f, package="nestlm.train")
    assert {"a.b", "c", "c.d", "nestlm.eval", "nestlm.eval.scoring", "nestlm.eval.x"} <= found


@pytest.mark.parametrize("importer,forbidden", [("train", "nestlm.eval"), ("eval", "nestlm.train")])
def test_train_and_eval_do_not_import_each_other(importer, forbidden):
    files = modules_under(importer)
    assert files, f"no modules under nestlm/{importer}"
    bad = {str(f.relative_to(PACKAGE.parent)): _names(imported_modules(f), forbidden) for f in files}
    assert not {f: m for f, m in bad.items() if m}, f"nestlm/{importer} imports {forbidden}"


def test_lm_eval_is_imported_only_by_the_adapter():
    users = sorted(
        str(f.relative_to(PACKAGE.parent)) for f in PACKAGE.rglob("*.py") if _names(imported_modules(f), "lm_eval")
    )
    assert users == ["nestlm/eval/lm_eval_adapter.py"]


def test_training_and_its_data_load_neither_eval_nor_lm_eval():
    code = textwrap.dedent(
        """
        import sys
        import nestlm.train.cli, nestlm.train.data
        from nestlm.train.data import SyntheticTrajectories
        dm = SyntheticTrajectories(batch_size=2, seq_len=32, val_batches_n=1)
        batch = dm.train_batch(0)
        assert batch["input_ids"].shape == (2, 32), batch["input_ids"].shape
        loaded = sorted(m for m in sys.modules if m == "lm_eval" or m.startswith(("lm_eval.", "nestlm.eval")))
        print(loaded)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
