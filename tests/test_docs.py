"""The documentation site: it builds with warnings as errors, its API pages document the public
names, and its guides' code runs.

Each guide's ```python blocks after a ``<!-- runnable -->`` marker run in order, in one namespace,
in a scratch directory (one test per page), with keras_qx's own DeprecationWarnings turned into
errors so that the docs never teach an old name; then ``PAGE_CHECKS`` asserts what the page
promises (a file written, an accuracy floor, a policy's bits). Every other ```python block is
compiled, so a block that cannot run here (a distributed search, a big model) still parses."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUNNABLE = re.compile(r"<!-- runnable -->\s*```python\n(.*?)```", flags=re.S)
PYTHON = re.compile(r"```python\n(.*?)```", flags=re.S)


def pages() -> list[pathlib.Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "reference" not in p.parts and "benchmarks" not in p.parts)


def runnable_blocks(page: pathlib.Path) -> list[str]:
    return RUNNABLE.findall(page.read_text())


def page_id(page: pathlib.Path) -> str:
    return page.relative_to(DOCS).as_posix()


# ---- what each page's runnable code must have done --------------------------------------------

def _getting_started(ns, tmp):
    assert (tmp / "model.tflite").stat().st_size > 0
    assert ns["tflite"].report.info.fully_integer
    assert ns["qx"].evaluate_tflite(ns["tflite"], ns["x_test"], ns["y_test"])["accuracy"] > 0.5
    bits = {n: f["bits"] for n, f in ns["policy"].meta["auto_policy"]["layers"].items()}
    assert min(bits.values()) < 8, bits                     # 0.6x of int8 cannot be all 8-bit


def _policies(ns, tmp):
    assert (tmp / "model.tflite").stat().st_size > 0
    assert (tmp / "qat.keras").stat().st_size > 0
    assert ns["tfl"].report.info.fully_integer
    assert ns["evaluation"]["accuracy"] > 0.5
    spec = lambda name: ns["policy"].spec_for(ns["model"].get_layer(name))  # noqa: E731
    assert spec("fc").weight_bits == 4 and spec("logits").weight_bits == 8
    assert len(ns["tfl"].report.info.int4_tensors) >= 1          # 4-bit kernels packed INT4
    assert ns["calibrated"].report.info.fully_integer
    assert ns["rounded"].report.info.fully_integer and len(ns["rounded"].report.info.int4_tensors) >= 2


def _choosing_bits(ns, tmp):
    assert ns["report"].method == "loss"
    assert (tmp / "sensitivity.png").stat().st_size > 0
    chosen = ns["policy"].meta["auto_policy"]
    assert chosen["predicted_kernel_bytes"] <= chosen["budget_bytes"]
    assert ns["gzip_policy"].meta["auto_policy"]["size"] == "gzip"
    assert ns["qx"].Policy.from_file("policy.json").to_dict() == ns["policy"].to_dict()
    fast = ns["fast"].meta["auto_policy"]
    assert fast["predicted_latency_us"] <= fast["latency_budget_us"] == 290.0
    assert fast["predicted_kernel_bytes"] <= fast["budget_bytes"]
    assert ns["by_size"].meta["auto_policy"]["predicted_latency_us"] > 290.0   # the size budget alone misses it


def _search(ns, tmp):
    tuner = ns["tuner"]
    assert ns["best"].meta["search"]["predicted_kernel_bytes"] <= tuner.budget_bytes
    assert [r for r in tuner.results() if r["warm_start"]], "the first trial is auto_policy's"
    assert (tmp / "search").is_dir()


def _pruning_clustering(ns, tmp):
    sparsity = [s.sparsity for s in ns["tfl"].report.info.kernel_stats().values()]
    assert max(sparsity) >= 0.79, sparsity                              # the pruned zeros, in the file
    distinct = [s.distinct for s in ns["clustered_tfl"].report.info.kernel_stats().values()]
    assert min(distinct) <= 8, distinct                                 # fc1: 8 clusters, per tensor


def _post_training(ns, tmp):
    table = ns["comparison"].table()
    for name in ns["roads"]:
        assert name in table
    assert len(ns["comparison"].to_dict()["rows"]) == len(ns["roads"])
    assert (tmp / "roads.png").stat().st_size > 0
    assert ns["roads"]["int8 ptq"].report.info.fully_integer


def _keras3(ns, tmp):
    assert any(hasattr(layer, "quantize_config") for layer in ns["qat"].layers)
    assert ns["tfl"].report.info.fully_integer
    assert type(ns["qat"]).__module__.startswith("tf_keras")


def _custom_layers(ns, tmp):
    names = [l.name for l in ns["qat"].layers]
    assert any(n.endswith("block/dense") for n in names), names        # the custom layer, inlined
    assert ns["tfl"].report.info.fully_integer


def _verify_debug(ns, tmp):
    assert (tmp / "digits.tflite").stat().st_size > 0
    assert ns["info"].fully_integer and len(ns["info"].int4_tensors) >= 1
    assert ns["debug"].first_divergent is None or isinstance(ns["debug"].first_divergent, str)
    assert ns["evaluation"]["accuracy"] > 0.5
    assert [op["op"] for op in ns["prof"].ops] == ns["info"].ops and "conv1" in ns["prof"].by_layer()
    assert (tmp / "profile.png").stat().st_size > 0


def _latency(ns, tmp):
    assert (tmp / "latency.json").stat().st_size > 0
    assert set(ns["table"].layers) == {"conv1", "conv2", "out"}
    assert ns["int4"].total_us > ns["int8"].total_us      # INT4 convolutions are slower here


def _troubleshooting(ns, tmp):
    assert "never seen data" in ns["not_calibrated"]
    assert "smallest possible" in ns["too_small"]


def _cli(ns, tmp):
    assert (tmp / "out" / "model.tflite").stat().st_size > 0


PAGE_CHECKS = {
    "getting-started.md": _getting_started,
    "guides/policies.md": _policies,
    "guides/choosing-bits.md": _choosing_bits,
    "guides/search.md": _search,
    "guides/pruning-clustering.md": _pruning_clustering,
    "guides/post-training.md": _post_training,
    "guides/keras3.md": _keras3,
    "guides/custom-layers.md": _custom_layers,
    "guides/verify-debug.md": _verify_debug,
    "guides/latency.md": _latency,
    "guides/troubleshooting.md": _troubleshooting,
    "guides/cli.md": _cli,
}
RUNNABLE_PAGES = [p for p in pages() if runnable_blocks(p)]


def test_every_page_with_runnable_code_has_its_check():
    assert {page_id(p) for p in RUNNABLE_PAGES} == set(PAGE_CHECKS)


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=page_id)
def test_guide_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "docs"}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="keras_qx", category=DeprecationWarning)
        for i, block in enumerate(runnable_blocks(page)):
            exec(compile(block, f"{page_id(page)} block {i + 1}", "exec"), namespace)
    PAGE_CHECKS[page_id(page)](namespace, tmp_path)


@pytest.mark.parametrize("page", pages(), ids=page_id)
def test_every_python_block_compiles(page):
    for i, block in enumerate(PYTHON.findall(page.read_text())):
        compile(block, f"{page_id(page)} block {i + 1}", "exec")


# ---- the site --------------------------------------------------------------------------------

API_PAGES = {
    "policy": ["Policy", "LayerSpec", "annotate", "register_layer"],
    "choosing-bits": ["sensitivity", "SensitivityReport", "auto_policy", "BitWidthTuner", "pareto", "ParetoResult",
                      "latency_table", "LatencyTable", "predict_latency", "LatencyPrediction", "export_latency_files"],
    "qat": ["quantize", "calibrate", "uncalibrated_ranges", "summary", "predict_gzip_bytes", "GzipPrediction",
            "quantize_scope", "load_model"],
    "compression": ["prune", "pruning_callbacks", "strip_pruning", "cluster", "strip_clustering"],
    "file": ["export_tflite", "ptq", "TFLiteModel", "ExportReport", "inspect_tflite", "TFLiteInfo",
             "evaluate_tflite", "Evaluation", "compare", "Comparison", "debug_tflite", "LayerComparison", "LayerError",
             "profile_tflite", "Profile"],
    "errors": ["PolicyError", "InfeasibleBudget", "ExportError", "LengthError", "RuntimeCrash", "Keras3Error"],
}


def test_the_api_pages_cover_the_public_api():
    import keras_qx

    modules_and_deprecated = {"configs", "cost", "quantizers", "registry", "compare_layers"}
    documented = {name for names in API_PAGES.values() for name in names}
    assert documented == set(keras_qx.__all__) - modules_and_deprecated
    for page, names in API_PAGES.items():
        text = (DOCS / "reference" / f"{page}.md").read_text()
        assert [n for n in names if f"::: keras_qx.{n}\n" not in text] == [], page


@pytest.mark.slow
def test_the_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                             "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for page, names in API_PAGES.items():
        html = (site / "reference" / page / "index.html").read_text()
        for name in names:   # a rendered heading with the docstring's first words, not just the name
            assert f'id="keras_qx.{name}"' in html, (page, name)
    text = (site / "reference" / "choosing-bits" / "index.html").read_text()
    assert "auto_policy" in text and "budget" in text
    assert "export_tflite" in (site / "reference" / "file" / "index.html").read_text()
    gallery = (site / "benchmarks" / "gallery" / "index.html").read_text()
    assert "24/24" in gallery and "--8&lt;--" not in gallery and "--8<--" not in gallery   # the snippet was included


def test_every_benchmark_result_is_on_a_page():
    included = " ".join(p.read_text() for p in (DOCS / "benchmarks").glob("*.md"))
    for result in sorted((ROOT / "bench" / "results").glob("*.md")):
        assert f'--8<-- "bench/results/{result.name}"' in included, result.name


def test_the_troubleshooting_messages_are_keras_qx_s_own():
    """Each heading quotes a message keras_qx raises or warns, so a reworded message fails here."""
    source = "\n".join(p.read_text() for p in (ROOT / "keras_qx").rglob("*.py"))
    headings = re.findall(r"^### `(.+?)`", (DOCS / "guides" / "troubleshooting.md").read_text(), flags=re.M)
    assert len(headings) >= 20
    assert [h for h in headings if h not in source] == []


def test_the_per_channel_claim_matches_the_kind_table():
    """The per-channel / per-tensor lists of the verify guide say what keras_qx.quant.kinds does."""
    from keras_qx._compat import keras
    from keras_qx.quant import kinds
    from keras_qx.quant.kinds import kernel_kind

    text = " ".join((DOCS / "guides" / "verify-debug.md").read_text().split())
    per_channel = re.search(r"- Per output channel: (.*?) \(and", text).group(1).split(", ")
    per_tensor = re.search(r"Per tensor: (.*?) \(the converter", text).group(1).split(", ")
    assert len(per_channel) >= 2 and len(per_tensor) >= 8
    for names, expected in ((per_channel, True), (per_tensor, False)):
        for name in names:
            assert kernel_kind(getattr(keras.layers, name)).per_channel is expected, name
    listed = set(per_channel) | set(per_tensor) | {"SeparableConv2D"}  # split into per-channel halves
    assert {k.layer_type.__name__ for k in kinds._KERNEL_KINDS} == listed
