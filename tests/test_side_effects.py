"""No global side effects: importing keras_qx leaves the environment and the umask alone,
``write_atomic`` never changes the umask, and the export-trace flag is scoped to the export."""
from __future__ import annotations

import json
import os
import pathlib
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest

ROOT = str(pathlib.Path(__file__).resolve().parents[1])

_CHILD = r"""
import json, os, pkgutil, importlib, sys

def umask():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1], 8) for l in fh if l.startswith("Umask:"))

os.umask(0o027)
if sys.argv[1] == "tensorflow-first":
    import tensorflow
before = dict(os.environ)
import keras_qx
for mod in pkgutil.walk_packages(keras_qx.__path__, "keras_qx."):
    importlib.import_module(mod.name)
print(json.dumps({"before": before, "after": dict(os.environ), "umask": umask()}))
"""


def _child(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_USE_LEGACY_KERAS", "TF_CPP_MIN_LOG_LEVEL")}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask from /proc")
def test_importing_keras_qx_changes_no_environment_variable_and_not_the_umask():
    # A user who imported TensorFlow already: importing keras_qx (every module) changes nothing.
    first = _child("tensorflow-first")
    assert first["after"] == first["before"]
    assert first["umask"] == 0o027
    # A fresh process: the environment ends as `import tensorflow` alone leaves it (TensorFlow
    # sets a few variables of its own), without the two keras_qx sets while TensorFlow imports.
    fresh = _child("keras_qx-first")
    assert fresh["after"] == first["before"]
    assert "TF_USE_LEGACY_KERAS" not in fresh["after"] and "TF_CPP_MIN_LOG_LEVEL" not in fresh["after"]
    assert fresh["umask"] == 0o027


def test_import_environ_puts_back_set_and_unset_variables(monkeypatch):
    from keras_qx._compat import _import_environ

    monkeypatch.setenv("KERAS_QX_TEST_SET", "mine")
    monkeypatch.delenv("KERAS_QX_TEST_UNSET", raising=False)
    with pytest.raises(RuntimeError):
        with _import_environ(KERAS_QX_TEST_SET="theirs", KERAS_QX_TEST_UNSET="1"):
            assert os.environ["KERAS_QX_TEST_SET"] == "mine"  # the user's value wins
            assert os.environ["KERAS_QX_TEST_UNSET"] == "1"
            os.environ["KERAS_QX_TEST_SET"] = "changed by an import"
            raise RuntimeError
    assert os.environ["KERAS_QX_TEST_SET"] == "mine"
    assert "KERAS_QX_TEST_UNSET" not in os.environ


@pytest.fixture
def odd_umask():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
def test_write_atomic_reads_the_umask_without_changing_it(tmp_path, monkeypatch, odd_umask):
    from keras_qx import _io

    if os.path.exists("/proc/self/status"):  # where the OS tells the umask, it is never set
        def no_umask(_):
            raise AssertionError("write_atomic called os.umask")

        monkeypatch.setattr(_io.os, "umask", no_umask)
    _io.write_atomic(tmp_path / "a.bin", b"data")
    monkeypatch.undo()
    assert _mode(tmp_path / "a.bin") == 0o640
    assert os.umask(odd_umask) == odd_umask


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
def test_write_atomic_without_proc_puts_the_umask_back(tmp_path, monkeypatch, odd_umask):
    from keras_qx import _io

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(_io, "open", no_proc, raising=False)
    _io.write_atomic(tmp_path / "b.bin", b"data")
    assert _mode(tmp_path / "b.bin") == 0o640
    assert os.umask(odd_umask) == odd_umask


def test_export_trace_is_scoped_to_its_thread_and_block():
    from keras_qx.quant.quantizers import export_trace, exporting

    inside, release, seen = threading.Event(), threading.Event(), {}

    def export():
        with export_trace():
            seen["worker inside"] = exporting()
            inside.set()
            release.wait(10)
        seen["worker after"] = exporting()

    worker = threading.Thread(target=export)
    worker.start()
    assert inside.wait(10)
    seen["main while the worker exports"] = exporting()  # a model trained meanwhile: no export mode
    with export_trace():  # a second export interleaved with the first
        seen["main inside"] = exporting()
        release.set()
        worker.join(10)
        seen["main inside, the worker done"] = exporting()
    seen["main after"] = exporting()
    assert seen == {"worker inside": True, "main while the worker exports": False, "main inside": True,
                    "worker after": False, "main inside, the worker done": True, "main after": False}


def test_an_export_that_raises_leaves_no_export_mode_behind():
    from keras_qx._compat import keras
    from keras_qx.lite.convert import converter_for
    from keras_qx.quant.quantizers import export_trace, exporting

    with pytest.raises(ZeroDivisionError):
        with export_trace():
            with export_trace():
                1 / 0
    assert exporting() is False

    traced = []

    def fails_in_the_trace(x):
        traced.append(exporting())
        if exporting():
            raise ValueError("a layer failing while the exporter traces")
        return x

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Lambda(fails_in_the_trace)(keras.layers.Dense(2)(inputs)))
    with pytest.raises(ValueError, match="exporter traces"):
        converter_for(model)
    assert traced[-1] is True and not any(traced[:-1])
    assert exporting() is False
    assert model.predict(np.ones((1, 3), np.float32), verbose=0).shape == (1, 2)
