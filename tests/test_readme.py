"""The README's runnable examples run as written (each ```python block after a
``<!-- runnable -->`` marker, in order, in one namespace, in a scratch directory)."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def runnable_blocks() -> list[str]:
    return re.findall(r"<!-- runnable -->\s*```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_runnable_examples():
    assert len(runnable_blocks()) >= 2


@pytest.mark.slow
def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    for i, block in enumerate(runnable_blocks()):
        exec(compile(block, f"README block {i + 1}", "exec"), namespace)
    assert (tmp_path / "model.tflite").stat().st_size > 0
    assert namespace["tfl"].report.info.fully_integer
    assert namespace["report"].method == "loss"
    search = namespace["tuner"]
    assert namespace["policy"].meta["search"]["predicted_kernel_bytes"] <= search.budget_bytes
    assert [r for r in search.results() if r["warm_start"]], "the first trial is auto_policy's"
