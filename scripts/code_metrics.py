"""Size numbers of the engine redesign (issue "One engine"): lines in engine/ + eval/ + config.py + cli.py, all of
src/, and the longest function and class (an ``ast`` walk).

    python scripts/code_metrics.py [REPO_ROOT]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def main(root: Path) -> str:
    src = root / "src" / "maelab"
    core = [
        *sorted((src / "engine").glob("*.py")),
        *sorted((src / "eval").glob("*.py")),
        src / "config.py",
        src / "cli.py",
    ]
    lines = sum(len(f.read_text().splitlines()) for f in core)
    every = sum(len(f.read_text().splitlines()) for f in src.rglob("*.py"))
    longest: dict[type, tuple[int, str]] = {ast.FunctionDef: (0, ""), ast.ClassDef: (0, "")}
    for f in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            kind = type(node)
            if kind in longest and node.end_lineno is not None:  # type: ignore[attr-defined]
                n = node.end_lineno - node.lineno + 1  # type: ignore[attr-defined]
                if n > longest[kind][0]:
                    longest[kind] = (n, f"{f.relative_to(root)}::{node.name}")  # type: ignore[attr-defined]
    fn, cls = longest[ast.FunctionDef], longest[ast.ClassDef]
    return (
        f"engine/ + eval/ + config.py + cli.py: {lines} lines; src/: {every} lines; "
        f"longest function: {fn[1]} ({fn[0]} lines); longest class: {cls[1]} ({cls[0]} lines)"
    )


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]))
