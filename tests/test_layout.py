"""The package's layering, read from its source (ast; no TensorFlow needed).

Tiers, bottom to top: the helpers (``_compat``, ``_io``, ``_plot``, ``_graph``, ``_seed``) < ``quant`` < ``rewrite`` <
``qat`` (and ``compress``, pruning, beside it) < ``lite`` < ``engine`` < the top (``__init__``, ``cli``, ``demo``, ``data``). A module
may import its own tier and those below; only ``_compat`` imports TensorFlow, tf_keras, tfmot,
keras_tuner or Keras 3, and only ``_runtime`` the LiteRT runtime (it also runs as a child process).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_qx"
TIERS = {"_compat": 0, "_deprecation": 0, "_runtime": 0, "_io": 0, "_plot": 0, "_graph": 0, "_seed": 0, "quant": 1, "rewrite": 2, "qat": 3, "lite": 4, "engine": 5,
         "__init__": 6, "cli": 6, "demo": 6, "data": 6, "compress": 3}
# The LiteRT runtime is imported by _runtime.py, which also runs alone as a child process.
RUNTIME_OK = {"ai_edge_litert": ("keras_qx._runtime",)}
FOREIGN = ("tensorflow", "tf_keras", "tensorflow_model_optimization", "keras_tuner", "keras", "ai_edge_litert")


def modules(root=PACKAGE) -> dict[str, pathlib.Path]:
    """``{dotted name: path}`` of every module of the package under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts)] = path
    return out


def tier(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # keras_qx itself
        return TIERS["__init__"]
    return TIERS[parts[1]]


def imports(path: pathlib.Path, module: str) -> list[tuple[int, str]]:
    """``[(line, imported module)]`` of a source file, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "keras_qx":  # from keras_qx import quant -> keras_qx.quant
                out += [(node.lineno, f"keras_qx.{alias.name}") for alias in node.names]
            else:
                out.append((node.lineno, base))
    return out


def violations(root=PACKAGE) -> list[str]:
    found = []
    for module, path in modules(root).items():
        own = tier(module)
        for line, name in imports(path, module):
            where = f"{path.relative_to(root.parent)}:{line}"
            if name.split(".")[0] in FOREIGN and module not in RUNTIME_OK.get(name.split(".")[0], ("keras_qx._compat",)):
                found.append(f"{where} imports {name}: only keras_qx/_compat.py may")
            if name.startswith("keras_qx.") and tier(name) > own:
                found.append(f"{where} imports {name} (tier {tier(name)}) from tier {own}: an upward import")
    return found


def test_every_module_has_a_tier():
    for module in modules():
        tier(module)  # KeyError names a new folder the table lacks


def test_no_upward_or_foreign_imports():
    assert violations() == []


def test_a_planted_upward_import_is_caught(tmp_path):
    import shutil

    copy = tmp_path / "keras_qx"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    cost = copy / "quant" / "cost.py"
    cost.write_text(cost.read_text() + "\nfrom keras_qx.engine.allocate import auto_policy  # planted\n")
    (copy / "lite" / "ptq.py").write_text((copy / "lite" / "ptq.py").read_text() + "\nimport tensorflow\n")
    found = violations(copy)
    assert any("quant/cost.py" in v and "upward" in v for v in found), found
    assert any("lite/ptq.py" in v and "only keras_qx/_compat.py" in v for v in found), found
    assert len(found) == 2, found


def test_subpackages_say_what_they_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "May import" in doc, init


def test_no_public_name_shadows_a_module():
    import keras_qx as qx

    for name in qx.__all__:
        spec = importlib.util.find_spec(f"keras_qx.{name}")
        if spec is not None:  # a module of that path exists: the attribute must be it
            assert getattr(qx, name) is importlib.import_module(f"keras_qx.{name}"), name


@pytest.mark.parametrize("name", ["quantize", "sensitivity", "annotate", "summary", "ptq", "export_tflite"])
def test_public_functions_are_functions(name):
    import keras_qx as qx

    assert callable(getattr(qx, name)) and not isinstance(getattr(qx, name), type(qx))


# The public API of ../shared/DESIGN.md that exists so far (calibrate, compare, prune and cluster
# come with their issues); outside code calls these names.
DESIGN_API = ["Policy", "annotate", "quantize", "export_tflite", "summary", "quantize_scope", "load_model",
              "sensitivity", "auto_policy", "BitWidthTuner", "evaluate_tflite", "ptq"]


def test_design_api_names_exist():
    import keras_qx as qx

    missing = [n for n in DESIGN_API if n not in qx.__all__ or not callable(getattr(qx, n, None))]
    assert missing == []
    for method in ("uniform", "from_dict", "to_dict", "to_json", "from_json"):
        assert callable(getattr(qx.Policy, method))
    for method in ("search", "best_policy", "best_model", "results"):
        assert callable(getattr(qx.BitWidthTuner, method))


def test_compat_keeps_only_compatibility():
    """``_compat`` keeps only compatibility; the graph walks live in ``_graph``, seeding in ``_seed``."""
    from keras_qx import _compat, _graph, _seed

    for name in ("check_model", "inbound_layers", "graph_nodes", "seeded"):
        assert not hasattr(_compat, name), name
    assert callable(_graph.check_model) and callable(_seed.seeded)

