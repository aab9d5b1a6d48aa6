"""The README, a front page: short, its example runs as written (each ```python block after a
``<!-- runnable -->`` marker, in order, in one namespace, in a scratch directory), its links reach
the docs, and its test command is where .ci/run reads it. The long examples moved to the docs
site, whose blocks tests/test_docs.py runs."""
import pathlib
import re
import subprocess
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def runnable_blocks() -> list[str]:
    return re.findall(r"<!-- runnable -->\s*```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) < 200
    first_code = next(i for i, line in enumerate(lines) if line.startswith("```python"))
    assert first_code < 80, "the 10-line example comes before line 80"
    assert len(runnable_blocks()) >= 1
    assert len(runnable_blocks()[0].strip().splitlines()) <= 20


def test_the_readme_links_reach_the_docs():
    links = re.findall(r"\]\(([^)#]+?\.md)(?:#[^)]*)?\)", README.read_text())
    assert len([link for link in links if link.startswith("docs/")]) >= 15
    assert [link for link in links if not (ROOT / link).is_file()] == []


def test_ci_reads_the_test_command():
    """.ci/run's own pipeline over the README gives a pytest command."""
    cmd = subprocess.run(["bash", "-c", "grep -A4 -- '<!-- test-command' README.md | grep -m1 'pytest' "
                          "| sed 's/^.*activate && //'"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert cmd.startswith('pip install -e ".[test]" && python -m pytest'), cmd


@pytest.mark.slow
def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="keras_qx", category=DeprecationWarning)
        for i, block in enumerate(runnable_blocks()):
            exec(compile(block, f"README block {i + 1}", "exec"), namespace)
    assert (tmp_path / "model.tflite").stat().st_size > 0
    tflite = namespace["tflite"]
    assert tflite.report.info.fully_integer
    chosen = namespace["policy"].meta["auto_policy"]
    assert chosen["predicted_kernel_bytes"] <= chosen["budget_bytes"]
    assert min(layer["bits"] for layer in chosen["layers"].values()) < 8   # 0.6x of int8 is not all 8-bit
    qx = namespace["qx"]
    assert qx.evaluate_tflite(tflite, namespace["x_test"], namespace["y_test"])["accuracy"] > 0.5
