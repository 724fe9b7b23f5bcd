"""The package's size rules (issue 33): no module over 400 lines, no class over 300, no
hand-written `__init__` and no dataclass over 15 parameters, and nothing imported from
benches/ or research/."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "molf"


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _is_dataclass(node: ast.ClassDef) -> bool:
    def name(d):
        d = d.func if isinstance(d, ast.Call) else d
        return d.id if isinstance(d, ast.Name) else d.attr if isinstance(d, ast.Attribute) else None

    return any(name(d) == "dataclass" for d in node.decorator_list)


def test_the_package_keeps_its_size_rules():
    found = []
    for path in _modules():
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(PACKAGE)
        if len(text.splitlines()) > 400:
            found.append(f"{where}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                if node.end_lineno - node.lineno + 1 > 300:
                    found.append(f"{where}: class {node.name} of {node.end_lineno - node.lineno + 1} lines")
                fields = [b for b in node.body if isinstance(b, ast.AnnAssign)]
                fields = [b for b in fields if "ClassVar" not in ast.unparse(b.annotation)]  # (no dataclass fields)
                if _is_dataclass(node) and len(fields) > 15:
                    found.append(f"{where}: dataclass {node.name} with {len(fields)} fields")
            if isinstance(node, ast.FunctionDef) and node.name == "__init__":
                n = len(node.args.posonlyargs) + len(node.args.args) + len(node.args.kwonlyargs) - 1
                if n > 15:
                    found.append(f"{where}:{node.lineno}: __init__ with {n} parameters")
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if any(n.split(".")[0] in ("benches", "research") for n in names):
                    found.append(f"{where}:{node.lineno}: imports {names}")
    assert not found, "\n".join(found)
