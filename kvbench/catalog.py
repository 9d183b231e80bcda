"""What `kvbench list` prints, read from the source of methods/ and tasks/ without importing them.

Importing the method modules imports torch and transformers (~4-8 s on 2 cores); a listing needs none of it.
Each `@register_method("name")` / `@register_task("name")` / `@register_storage("name")` class is found with
`ast`, and its class-level text attributes (`paper`, `family`, `description`) are read from their string
literals, following base classes and `Other.attr` references by name. An attribute that is not a plain literal
(computed at import) is reported as missing, and `kvbench list` then imports the registry for real
(tests/test_sweeps.py checks that the static reading equals the imported classes).
"""
from __future__ import annotations

import ast
from pathlib import Path

ATTRS = ("paper", "family", "description")
_UNKNOWN = object()


class _Class:
    def __init__(self, node: ast.ClassDef, module: str):
        self.name, self.module = node.name, module
        self.bases = [b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else None
                      for b in node.bases]
        self.registered: list[tuple[str, str]] = []  # (kind, name) from @register_<kind>("name")
        for d in node.decorator_list:
            if (isinstance(d, ast.Call) and isinstance(d.func, ast.Name) and d.func.id.startswith("register_")
                    and d.args and isinstance(d.args[0], ast.Constant) and isinstance(d.args[0].value, str)):
                self.registered.append((d.func.id.removeprefix("register_"), d.args[0].value))
        self.values: dict[str, ast.expr] = {}
        for st in node.body:
            if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name):
                self.values[st.targets[0].id] = st.value
            elif isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) and st.value is not None:
                self.values[st.target.id] = st.value


class Catalog:
    def __init__(self, dirs: list[Path]):
        self.classes: dict[str, list[_Class]] = {}
        for d in dirs:
            for f in sorted(Path(d).glob("*.py")):
                try:
                    tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
                except (OSError, SyntaxError, ValueError):
                    continue
                for node in tree.body:
                    if isinstance(node, ast.ClassDef):
                        self.classes.setdefault(node.name, []).append(_Class(node, f.stem))

    def _cls(self, name: str | None, module: str | None = None) -> _Class | None:
        cands = self.classes.get(name or "", [])
        same = [c for c in cands if c.module == module]
        return (same or cands or [None])[0]

    def _eval(self, expr: ast.expr, cls: _Class, depth: int):
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return expr.value
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            a, b = self._eval(expr.left, cls, depth), self._eval(expr.right, cls, depth)
            return a + b if isinstance(a, str) and isinstance(b, str) else _UNKNOWN
        if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
            other = self._cls(expr.value.id, cls.module)
            return self.attr(other, expr.attr, depth + 1) if other else _UNKNOWN
        return _UNKNOWN

    def attr(self, cls: _Class, attr: str, depth: int = 0):
        """The class's text attribute: its own literal, else its bases' (by name); "" at the framework's
        base classes (Method, Task, Storage: defined in kvbench/, not scanned); _UNKNOWN when not a literal."""
        if depth > 20:
            return _UNKNOWN
        if attr in cls.values:
            return self._eval(cls.values[attr], cls, depth)
        for b in cls.bases:
            base = self._cls(b, cls.module)
            if base is not None:
                v = self.attr(base, attr, depth + 1)
                if v is not _UNKNOWN and v != "":
                    return v
                if v is _UNKNOWN:
                    return v
        return ""

    def registered(self, kind: str) -> dict[str, dict[str, str | None]]:
        """{registered name: {attr: text, or None when it cannot be read without importing}}."""
        out = {}
        for group in self.classes.values():
            for c in group:
                for k, name in c.registered:
                    if k == kind:
                        vals = {a: self.attr(c, a) for a in ATTRS}
                        out[name] = {a: (None if v is _UNKNOWN else v) for a, v in vals.items()}
        return out


def package_dir(pkg: str) -> Path:
    """The directory of kvbench.methods / kvbench.tasks without importing the package (its __init__ is light,
    but finding it through importlib's spec keeps editable installs and wheels alike)."""
    import importlib.util
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(pkg)
    return Path(list(spec.submodule_search_locations)[0])


def static_registry() -> dict[str, dict[str, dict[str, str | None]]]:
    """{"method": {...}, "task": {...}, "storage": {...}} read from the sources."""
    cat = Catalog([package_dir("kvbench"), package_dir("kvbench.methods"), package_dir("kvbench.tasks")])
    return {kind: cat.registered(kind) for kind in ("method", "task", "storage")}
