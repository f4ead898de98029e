"""The import rules of docs/architecture.md, checked module by module.

1. No import cycle anywhere in `afmrl_jax` (module-level imports and imports inside functions alike).
2. Layers, top to bottom: main -> stages -> eval -> train -> config -> libraries -> leaves. A module
   never imports a module of a higher layer.
3. Inside the library layer, each package imports only the packages its row of `ALLOWED` names.
4. Inside `stages/`, a stage never imports another stage, except the pairs in `STAGE_EXCEPTIONS`, each
   of which docs/architecture.md explains; the dispatch table (`registry`) imports them all, and the
   shared stage modules (`generator`, `validate`) import no stage entry.
5. configs/*.py import only `afmrl_jax.config`.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Layer of each top-level package or module of afmrl_jax; higher numbers sit higher.
LAYER = {
    "fields": 0, "vectors": 0, "errors": 0, "parallel": 0,
    "attributes": 1, "losses": 1, "retrieval": 1, "data": 1, "models": 1, "generate": 1, "rl": 1,
    "config": 2,
    "train": 3,
    "eval": 4,
    "stages": 5,
    "main": 6,
}
# Inside the library layer: package -> the packages below it may import (besides itself and the leaves
# the row names).
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
    "rl": {"data", "generate", "models", "retrieval", "losses", "attributes", "fields", "vectors", "parallel"},
}
# The stage entries (one per config.stage) and the shared modules of stages/.
STAGES = {"stage1", "sft", "stage2", "generate", "cit"}
STAGE_SHARED = {"generator", "validate"}
STAGE_DISPATCH = "registry"
# (importing stage, imported stage): why, in one line; docs/architecture.md gives the same reason.
STAGE_EXCEPTIONS = {
    ("stage2", "stage1"): "the RAR environment is a finished stage-1 workdir; stage1.data rebuilds its data",
}


def _module_name(root, path):
  rel = os.path.relpath(path, root)[:-3].split(os.sep)
  if rel[-1] == "__init__":
    rel = rel[:-1]
  return ".".join(rel)


def modules(root=ROOT):
  """{dotted module name: file path} for every .py file under afmrl_jax/."""
  out = {}
  for folder, dirs, files in os.walk(os.path.join(root, "afmrl_jax")):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        out[_module_name(root, path)] = path
  return out


def imports_of(path, known):
  """The afmrl_jax modules the file imports, anywhere in it (module level and inside functions).

  `from a.b import c` counts as importing `a.b.c` when that is a module, else `a.b`."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
               for a in node.names]
    else:
      continue
    found.update(n for n in names if n == "afmrl_jax" or n.startswith("afmrl_jax."))
  return found


def import_graph(root=ROOT):
  known = modules(root)
  return {name: imports_of(path, known) for name, path in known.items()}


def cycles(graph):
  """The strongly connected components of more than one module (or a module importing itself), each
  as a sorted list: Tarjan's algorithm, iterative."""
  index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(graph.get(start, ()))))]
    index[start] = low[start] = counter[0]; counter[0] += 1
    stack.append(start); on_stack.add(start)
    while work:
      node, children = work[-1]
      for child in children:
        if child not in index:
          index[child] = low[child] = counter[0]; counter[0] += 1
          stack.append(child); on_stack.add(child)
          work.append((child, iter(sorted(graph.get(child, ())))))
          break
        if child in on_stack:
          low[node] = min(low[node], index[child])
      else:
        work.pop()
        if work:
          low[work[-1][0]] = min(low[work[-1][0]], low[node])
        if low[node] == index[node]:
          component = []
          while True:
            member = stack.pop(); on_stack.discard(member); component.append(member)
            if member == node:
              break
          if len(component) > 1 or node in graph.get(node, ()):
            out.append(sorted(component))
  return out


def _parts(module):
  return module.split(".")[1:]  # without the leading "afmrl_jax"


def _stage_of(module):
  """(stage entry or shared module name) of a module under afmrl_jax.stages, else None."""
  parts = _parts(module)
  return parts[1] if len(parts) > 1 and parts[0] == "stages" else None


def edge_problems(importer, imported):
  """The rule an import `importer -> imported` breaks, or None."""
  src, dst = _parts(importer), _parts(imported)
  if not src or not dst:
    return None  # the package itself (afmrl_jax/__init__.py) or an import of it
  sp, dp = src[0], dst[0]
  if sp not in LAYER:
    return f"{importer}: package {sp!r} is not in the layer table (docs/architecture.md)"
  if dp not in LAYER:
    return f"{importer} imports {imported}: package {dp!r} is not in the layer table (docs/architecture.md)"
  if LAYER[dp] > LAYER[sp]:
    return f"{importer} imports {imported}, a higher layer ({dp} is above {sp})"
  if LAYER[sp] <= 1 and sp != dp and dp not in ALLOWED[sp]:
    return f"{importer} imports {imported}, above or beside its layer"
  if sp == dp == "stages":
    a, b = _stage_of(importer), _stage_of(imported)
    if a == b or a == STAGE_DISPATCH or b is None:
      return None
    if b in STAGES and (a in STAGE_SHARED or (a in STAGES and (a, b) not in STAGE_EXCEPTIONS)):
      return f"{importer} imports {imported}: a stage imports another stage (docs/architecture.md)"
    if b == STAGE_DISPATCH:
      return f"{importer} imports {imported}: only main imports the dispatch table"
  return None


def graph_violations(graph):
  bad = [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
  for importer in sorted(graph):
    for imported in sorted(graph[importer]):
      problem = edge_problems(importer, imported)
      if problem:
        bad.append(problem)
  return bad


def violations(root=ROOT):
  bad = graph_violations(import_graph(root))
  known = modules(root)
  for name in sorted(os.listdir(os.path.join(root, "configs"))):
    if name.endswith(".py"):
      for used in sorted(imports_of(os.path.join(root, "configs", name), known)):
        if not used.startswith("afmrl_jax.config"):
          bad.append(f"configs/{name} imports {used}; configs import only afmrl_jax.config")
  return bad


def test_import_rules_hold():
  assert violations() == []


def test_the_graph_sees_modules_and_function_level_imports():
  graph = import_graph()
  assert "afmrl_jax.stages.stage1.run" in graph
  assert "afmrl_jax.stages.sft.run" in graph["afmrl_jax.stages.registry"]  # imported inside run_stage
  assert len(graph) > 90


def test_stage_exceptions_are_explained_in_the_docs():
  doc = open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8").read()
  for (a, b) in STAGE_EXCEPTIONS:
    assert f"`stages/{a}` imports `stages/{b}`" in doc, (a, b)


def test_a_planted_cycle_is_caught():
  graph = import_graph()
  graph["afmrl_jax.train.loop"] = graph["afmrl_jax.train.loop"] | {"afmrl_jax.train.metrics_log"}
  graph["afmrl_jax.train.metrics_log"] = graph["afmrl_jax.train.metrics_log"] | {"afmrl_jax.train.loop"}
  assert "import cycle: afmrl_jax.train.loop -> afmrl_jax.train.metrics_log" in graph_violations(graph)
  assert cycles({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": {"a.x"}}) == [["a.x", "a.y", "a.z"]]
  assert cycles({"a.x": {"a.x"}}) == [["a.x"]]
  assert cycles({"a.x": {"a.y"}, "a.y": set()}) == []


def test_planted_upward_and_sideways_imports_are_caught():
  up = graph_violations({"afmrl_jax.train.loop": {"afmrl_jax.stages.stage1.run"}})
  assert up == ["afmrl_jax.train.loop imports afmrl_jax.stages.stage1.run, a higher layer (stages is above train)"]
  assert graph_violations({"afmrl_jax.config.schema": {"afmrl_jax.train.loop"}})
  assert graph_violations({"afmrl_jax.eval.report": {"afmrl_jax.stages.cit"}})
  assert graph_violations({"afmrl_jax.stages.sft.run": {"afmrl_jax.stages.stage2.run"}})
  assert graph_violations({"afmrl_jax.stages.generator": {"afmrl_jax.stages.stage2.run"}})
  assert graph_violations({"afmrl_jax.stages.cit": {"afmrl_jax.stages.registry"}})
  assert graph_violations({"afmrl_jax.losses.agcl": {"afmrl_jax.models.layers"}})
  # What the layout allows.
  assert graph_violations({"afmrl_jax.stages.stage2.environment": {"afmrl_jax.stages.stage1.data"},
                           "afmrl_jax.stages.registry": {"afmrl_jax.stages.cit"},
                           "afmrl_jax.stages.sft.run": {"afmrl_jax.stages.generator", "afmrl_jax.train.loop"},
                           "afmrl_jax.eval.retrieval": {"afmrl_jax.train.files", "afmrl_jax.config.sections"}}) == []


def test_an_upward_import_in_a_file_is_caught(tmp_path):
  """The checker on files: a loss module that imports the trainer, and a cycle through two train modules,
  both planted in a copy-like tree."""
  pkg = tmp_path / "afmrl_jax"
  for sub in ("losses", "train", "config"):
    (pkg / sub).mkdir(parents=True)
    (pkg / sub / "__init__.py").write_text("")
  (pkg / "__init__.py").write_text("")
  (pkg / "vectors.py").write_text("")
  (tmp_path / "configs").mkdir()
  (pkg / "losses" / "bad.py").write_text("from afmrl_jax.train import loop\n")
  (pkg / "losses" / "ok.py").write_text("import jax\nfrom afmrl_jax.vectors import l2_normalize\n")
  (pkg / "train" / "loop.py").write_text("def f():\n  from afmrl_jax.train import state\n")
  (pkg / "train" / "state.py").write_text("from afmrl_jax.train.loop import f\n")
  (pkg / "config" / "schema.py").write_text("")
  (tmp_path / "configs" / "x.py").write_text("from afmrl_jax.config import schema\n")
  assert violations(str(tmp_path)) == [
      "import cycle: afmrl_jax.train.loop -> afmrl_jax.train.state",
      "afmrl_jax.losses.bad imports afmrl_jax.train.loop, a higher layer (train is above losses)"]
