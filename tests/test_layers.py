"""The package floors docs/design.md draws hold in the code: every `samoe` import points to a
lower floor, and sits at the top of its module."""

import ast
import re
from pathlib import Path

SRC = Path(__file__).parent.parent / "src" / "samoe"
DESIGN = Path(__file__).parent.parent / "docs" / "design.md"


def floors() -> dict[str, int]:
    """{module or package name: floor} from design.md's table (`| 3 | `data/`, `moe/` | ...`)."""
    out = {}
    for line in DESIGN.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| (\d+) \| (.+?) \|", line)
        if m:
            for name in re.findall(r"`([\w/]+?)(?:\.py|/)`", m.group(2)):
                out[name] = int(m.group(1))
    return out


def samoe_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level samoe name imported, line, whether at module level) for every import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("samoe."):
            out.append((node.module.split(".")[1], node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name.split(".")[1], node.lineno, id(node) in top) for a in node.names
                    if a.name.startswith("samoe.")]
    return out


def test_every_import_points_down_and_sits_at_the_top():
    floor = floors()
    assert {"config", "moe", "model", "train", "study", "cli"} <= set(floor)
    wrong = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel.parts[0] in ("hf",) and "remote_code" in rel.parts or path.name in ("__init__.py", "__main__.py"):
            continue
        here = rel.parts[0].removesuffix(".py")
        assert here in floor, f"{rel} is on no floor of docs/design.md"
        for name, line, at_top in samoe_imports(path):
            if name == here:
                continue
            if floor[name] >= floor[here]:
                wrong.append(f"{rel}:{line} imports samoe.{name} (floor {floor[name]}) from floor {floor[here]}")
            if not at_top:
                wrong.append(f"{rel}:{line} imports samoe.{name} inside a function")
    assert not wrong, "\n".join(wrong)
