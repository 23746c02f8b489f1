"""The house rules that keep the tree easy to change: layer direction, self-contained docs, lazy heavy imports."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = ("memplan.cli", "memplan.commands", "memplan.pipeline", "memplan.__main__")
HEAVY = ("onnx", "onnxruntime", "onnxscript", "matplotlib", "distill.trainer")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every import in the three packages, lazy ones included."""
    found = []
    for pkg in ("memplan", "passes", "distill"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            mod = _module_name(path)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.append((mod, node.module, node.lineno))
                elif isinstance(node, ast.Import):
                    found += [(mod, alias.name, node.lineno) for alias in node.names]
    return found


def _layer(module: str) -> str | None:
    if module.startswith(APP):
        return "app"
    top = module.split(".")[0]
    return {"memplan": "core", "passes": "passes", "distill": "distill"}.get(top)


ALLOWED = {"core": {"core"}, "passes": {"core", "passes"}, "distill": {"core", "passes", "distill"},
           "app": {"core", "passes", "distill", "app"}}


def test_layers_import_one_way():
    """core <- passes <- distill <- application layer; nothing imports the application layer."""
    bad = [f"{src}:{line} imports {dst}" for src, dst, line in _imports()
           if _layer(dst) is not None and _layer(dst) not in ALLOWED[_layer(src)]]
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_layer_check_catches_a_violation():
    assert "passes" not in ALLOWED["core"] and _layer("memplan.commands.train") == "app"
    assert _layer("memplan.measure") == "core" and "app" not in ALLOWED["distill"]


def test_nothing_cites_a_document_outside_the_repo():
    cited = []
    for path in ROOT.rglob("*"):
        if path.suffix in (".py", ".md", ".toml") and ".venv" not in path.parts and path.is_file():
            text = path.read_text(errors="ignore")
            if "DESIGN §" in text or "DESIGN.md" in text or "../shared" in text:
                cited.append(str(path.relative_to(ROOT)))
    cited = [c for c in cited if c != "tests/test_layers.py"]
    assert not cited, f"files citing documents outside the repo: {cited}"


@pytest.mark.parametrize("argv", [["--help"], ["analyze", "zoo:resnet_tiny"]])
def test_help_and_analyze_import_no_heavy_library(argv):
    code = (f"import sys\nfrom memplan.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_memplan_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "memplan", "analyze", "zoo:nope"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 2 and out.stderr.startswith("memplan analyze: error: unknown zoo model 'nope'")
