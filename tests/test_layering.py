"""The layering rules of tests/layering.py hold for the real tree, and the check itself can fail."""

from __future__ import annotations

from pathlib import Path

from tests.layering import cross_package, cycles, read_imports, violations

REPO = Path(__file__).resolve().parents[1]


def test_packages_import_only_the_core():
    imports = read_imports(REPO)
    assert [f"{imp.path}:{imp.line} imports {imp.target}" for imp in violations(imports)] == []
    assert cycles(imports) == []
    arrows = set(cross_package(imports))
    assert ("training", "dino") in arrows and ("service", "dino") in arrows
    assert not {("training", "service"), ("service", "training"), ("dino", "training"), ("dino", "service")} & arrows


def test_the_check_finds_a_forbidden_arrow_and_a_cycle(tmp_path: Path):
    for package in ("dino", "service", "training", "benchmarks"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "training" / "a.py").write_text("def f():\n    from service.app import create_app\n")
    (tmp_path / "service" / "app.py").write_text("import torch\n\ndef create_app():\n    pass\n")
    (tmp_path / "dino" / "x.py").write_text("from . import y\n")
    (tmp_path / "dino" / "y.py").write_text("from dino.x import something\n")
    imports = read_imports(tmp_path)
    found = {(imp.path, imp.target.split(".")[0]) for imp in violations(imports)}
    assert found == {("training/a.py", "service"), ("service/app.py", "torch")}
    assert cycles(imports) == [["dino.x", "dino.y"]]
