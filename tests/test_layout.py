"""The code's layout keeps its rules (read from the source, nothing imported):

- imports between `pretrain`'s sub-packages run downward only: commands -> evaluation ->
  training / inference -> diffusion / runtime / checkpoint -> `parallel` / `data_pipeline`, with
  no import between packages of one level (training and inference never import each other);
- no command imports another command, and `parallel` / `data_pipeline` never import `pretrain`;
- no `pretrain` import inside a function body, except the commented lazy one of `recipe_entry`
  (the rank supervisor starts before torch loads);
- package `__init__` files import nothing, and no library file exceeds 500 lines.

A control checks that the rule finder reports a planted violation of each kind.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"train", "generate", "chat", "evaluate", "export_hf", "import_hf", "profile",
            "lm_eval_adapter", "plot", "recipe_entry"}
LEVEL = {"commands": 5, "evaluation": 4, "training": 3, "inference": 3, "diffusion": 2, "runtime": 2,
         "checkpoint": 2, "parallel": 1, "data_pipeline": 1}
LAZY_IMPORTS_ALLOWED = {("pretrain/recipe_entry.py", "pretrain.training.entry")}
MAX_LINES = 500


def unit_of(module: str) -> str | None:
    """The layering unit a dotted module name belongs to (None: outside the project)."""
    parts = module.split(".")
    if parts[0] in ("parallel", "data_pipeline"):
        return parts[0]
    if parts[0] != "pretrain":
        return None
    if len(parts) == 1 or parts[1] in COMMANDS:
        return "commands"
    return parts[1]


def unit_of_file(relative: str) -> str:
    parts = Path(relative).with_suffix("").parts
    return unit_of(".".join(parts))


def imported_modules(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        if node.module == "pretrain":  # `from pretrain import generate`
            return [f"pretrain.{alias.name}" for alias in node.names]
        return [node.module]
    return []


def violations(relative: str, source: str) -> list[str]:
    """Every broken rule of one file (`relative` to the repository root)."""
    tree = ast.parse(source)
    here = unit_of_file(relative)
    own_command = Path(relative).stem if here == "commands" else None
    out = []
    for node in ast.walk(tree):
        for module in imported_modules(node):
            there = unit_of(module)
            if there is None or there == here and here != "commands":
                continue
            if here == "commands" and there == "commands":
                if module.split(".")[1:2] != [own_command] and module != "pretrain":
                    out.append(f"{relative}: command imports command {module}")
            elif LEVEL[there] >= LEVEL[here]:
                out.append(f"{relative}: {here} imports {module} ({there} is not below it)")
    for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for node in ast.walk(function):
            for module in imported_modules(node):
                if module.startswith("pretrain") and (relative, module) not in LAZY_IMPORTS_ALLOWED:
                    out.append(f"{relative}:{node.lineno}: imports {module} inside {function.name}()")
    if Path(relative).name == "__init__.py" and any(imported_modules(n) for n in ast.walk(tree)):
        out.append(f"{relative}: a package __init__ imports something")
    if len(source.splitlines()) > MAX_LINES and not relative.startswith("pretrain/checkpoint/hf_modeling/"):
        out.append(f"{relative}: {len(source.splitlines())} lines (more than {MAX_LINES})")
    return out


def project_files() -> list[Path]:
    return sorted(p for package in ("pretrain", "parallel", "data_pipeline") for p in (REPO / package).rglob("*.py"))


def test_the_code_keeps_its_layout_rules():
    found = [v for path in project_files()
             for v in violations(str(path.relative_to(REPO)), path.read_text())]
    assert found == []


def test_every_package_opens_with_a_docstring():
    for init in (p for p in project_files() if p.name == "__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init.relative_to(REPO)} has no docstring"


def test_control_each_planted_violation_is_reported():
    planted = {
        ("pretrain/chat.py", "from pretrain.generate import main\n"): "command imports command",
        ("pretrain/chat.py", "from pretrain import generate\n"): "command imports command",
        ("pretrain/training/loop.py", "from pretrain.inference.loading import load_model\n"): "not below",
        ("pretrain/inference/loading.py", "import pretrain.training.config\n"): "not below",
        ("pretrain/diffusion/sampling.py", "from pretrain.runtime.metrics import MetricsLogger\n"): "not below",
        ("parallel/model.py", "from pretrain.diffusion.objectives import draw_t\n"): "not below",
        ("pretrain/runtime/metrics.py", "def f():\n    from pretrain.runtime import flops\n"): "inside f()",
        ("pretrain/runtime/__init__.py", "import os\n"): "__init__ imports",
        ("pretrain/diffusion/likelihood.py", "x = 1\n" * (MAX_LINES + 1)): "lines",
    }
    for (relative, source), expected in planted.items():
        assert any(expected in v for v in violations(relative, source)), (relative, source)
    # and what the rules allow is not reported
    assert violations("pretrain/evaluate.py", "from pretrain.evaluation.scoring import run_task\n") == []
    assert violations("pretrain/training/loop.py", "from pretrain.training.trainer import Trainer\n") == []
    assert violations("pretrain/recipe_entry.py", "def run():\n    from pretrain.training.entry import main\n") == []
