"""The import rules of docs/architecture.md: every package imports only the layers below it."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Package (or top-level module) -> the afmrl_jax packages it may import besides itself.
LEAVES = {"fields", "vectors", "errors"}
ALLOWED = {
    "fields": set(),
    "vectors": set(),
    "errors": set(),
    "parallel": set(),
    "attributes": set(),
    "losses": {"fields", "vectors"},
    "retrieval": {"vectors"},
    "data": {"attributes", "fields", "errors"},
    "models": {"fields", "vectors", "parallel"},
    "generate": {"models", "parallel"},
    "rl": {"generate", "models", "retrieval", "losses", "attributes", "fields", "vectors", "parallel"},
    "train": {"data", "attributes", "models", "generate", "losses", "retrieval", "rl", "fields", "vectors",
              "parallel", "errors"},
    "main": {"train", "parallel", "errors"},
}


def _imported_packages(path):
  """The afmrl_jax packages a file imports (module level and inside functions)."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  found = set()
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "afmrl_jax" else [])
    for name in names:
      parts = name.split(".")
      if parts[0] == "afmrl_jax" and len(parts) > 1:
        found.add(parts[1])
  return found


def _package_of(rel):
  parts = rel.split(os.sep)
  return parts[1][:-3] if len(parts) == 2 else parts[1]


def violations(root=ROOT):
  bad = []
  for folder, _, files in os.walk(os.path.join(root, "afmrl_jax")):
    for name in files:
      if not name.endswith(".py") or name == "__init__.py" and folder.endswith("afmrl_jax"):
        continue
      path = os.path.join(folder, name)
      rel = os.path.relpath(path, root)
      package = _package_of(rel)
      allowed = ALLOWED.get(package)
      if allowed is None:
        bad.append(f"{rel}: package {package!r} is not in the layer table (docs/architecture.md)")
        continue
      for used in _imported_packages(path) - {package}:
        if used not in allowed:
          bad.append(f"{rel} imports afmrl_jax.{used}, above or beside its layer")
  for name in os.listdir(os.path.join(root, "configs")):
    if name.endswith(".py"):
      used = _imported_packages(os.path.join(root, "configs", name))
      for pkg in used - {"train"}:
        bad.append(f"configs/{name} imports afmrl_jax.{pkg}; configs import only afmrl_jax.config.schema")
  return bad


def test_import_rules_hold():
  assert violations() == []


def test_an_upward_import_is_caught(tmp_path):
  """The checker itself: a loss module that imports the trainer fails it."""
  pkg = tmp_path / "afmrl_jax" / "losses"
  pkg.mkdir(parents=True)
  (tmp_path / "configs").mkdir()
  (pkg / "bad.py").write_text("from afmrl_jax.train import loop\n")
  (pkg / "ok.py").write_text("import jax\nfrom afmrl_jax.vectors import l2_normalize\n")
  (tmp_path / "configs" / "x.py").write_text("from afmrl_jax.train import schema\n")
  assert violations(str(tmp_path)) == [
      "afmrl_jax/losses/bad.py imports afmrl_jax.train, above or beside its layer"]
