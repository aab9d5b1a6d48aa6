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


def test_the_per_channel_claim_matches_the_kind_table():
    """The README's per-channel / per-tensor lists say what keras_qx.quant.kinds does."""
    from keras_qx._compat import keras
    from keras_qx.quant.kinds import kernel_kind

    text = " ".join(README.read_text().split())
    per_channel = re.search(r"- Per output channel: (.*?) \(and", text).group(1).split(", ")
    per_tensor = re.search(r"Per tensor: (.*?) \(the converter", text).group(1).split(", ")
    assert len(per_channel) >= 2 and len(per_tensor) >= 8
    for names, expected in ((per_channel, True), (per_tensor, False)):
        for name in names:
            assert kernel_kind(getattr(keras.layers, name)).per_channel is expected, name
    listed = set(per_channel) | set(per_tensor) | {"SeparableConv2D"}  # split into per-channel halves
    from keras_qx.quant import kinds

    assert {k.layer_type.__name__ for k in kinds._KERNEL_KINDS} == listed
