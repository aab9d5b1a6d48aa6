"""``qx.profile_tflite`` and ``keras-qx profile``: the time of each op of a file, per layer.

Tiny models (a few µs a file): each test's profile takes about 0.3 s, the exports a few
seconds for the module."""
import json

import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras
from tests.conftest import tiny_model

L = keras.layers


def _export(model, policy, x):
    qat = qx.quantize(model, policy)
    qx.calibrate(qat, x)
    return qat, qx.export_tflite(qat, x)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``{kind: (qat, path, x)}``: an int8 conv-dense file, the same with a 4-bit conv, and a
    Conv1D file with a dynamic time axis."""
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    out, folder = {}, tmp_path_factory.mktemp("profile")
    x = rng.random((32, 8, 8, 1)).astype("float32")
    for kind, policy in (("int8", None), ("int4", {"rules": [{"type": "Conv2D", "weight_bits": 4}]})):
        qat, tfl = _export(tiny_model(f"net_{kind}"), policy, x)
        (folder / f"{kind}.tflite").write_bytes(tfl)
        out[kind] = (qat, folder / f"{kind}.tflite", x)
    inputs = keras.Input((None, 3), name="series")
    h = L.Conv1D(4, 3, name="c1")(inputs)
    h = L.GlobalAveragePooling1D(name="gap")(h)
    xs = rng.random((16, 10, 3)).astype("float32")
    qat, tfl = _export(keras.Model(inputs, L.Dense(2, name="d")(h)), None, xs)
    (folder / "dynamic.tflite").write_bytes(tfl)
    out["dynamic"] = (qat, folder / "dynamic.tflite", xs)
    return out


def test_one_row_per_op_named_by_layer(files):
    qat, path, x = files["int8"]
    prof = qx.profile_tflite(path, x, model=qat)
    assert [op["op"] for op in prof.ops] == qx.inspect_tflite(path).ops
    assert [op["index"] for op in prof.ops] == list(range(len(prof.ops)))
    layers = {op["op"]: [] for op in prof.ops}
    for op in prof.ops:
        layers[op["op"]].append(op["layer"])
    assert layers["CONV_2D"] == ["conv"] and layers["FULLY_CONNECTED"] == ["fc", "out"]
    assert all(op["us"] >= 0 and op["kernel"] in ("xnnpack", "builtin") for op in prof.ops)
    assert abs(sum(op["share"] for op in prof.ops) - 1) < 1e-9
    assert list(prof.by_layer()) == ["conv", "flat", "fc", "out"]              # graph order
    assert abs(sum(prof.by_layer().values()) - prof.total_us) < 1e-9
    # without the model, the names read from the file's tensors (tfmot's quant_ prefix stripped) agree
    alone = qx.profile_tflite(bytes(path.read_bytes()), runs=5, warmup=1)
    assert [op["layer"] for op in alone.ops] == [op["layer"] for op in prof.ops]
    assert (prof.num_threads, prof.runs, prof.warmup, prof.delegate) == (1, 50, 10, "xnnpack")
    assert prof.runtime.startswith("ai-edge-litert ")


@pytest.mark.parametrize("xnnpack", [True, False])
def test_the_ops_add_up_to_the_whole_file(files, xnnpack):
    """Measured (2-core VM under load, 5 runs each): sum of the ops / (whole file - invoke
    overhead) 0.85..1.64 with XNNPACK (each op alone pays XNNPACK's own call: the sum runs over
    on µs-sized ops, e.g. 3.5 vs 2.2 µs here), 0.83..1.08 on the built-in kernels (the digits
    CNN 35 vs 42 µs under the heaviest load); the overhead measured 0.3-0.5 µs. Bound: half
    the whole file plus 2 µs."""
    for kind in ("int8", "int4"):
        _, path, x = files[kind]
        prof = qx.profile_tflite(path, x, xnnpack=xnnpack)
        whole = prof.whole_us - prof.overhead_us
        assert 0 < prof.overhead_us < prof.whole_us
        assert abs(prof.total_us - whole) <= 0.5 * whole + 2.0, prof.table()
        assert prof.delegate == ("xnnpack" if xnnpack else "builtin")
        if not xnnpack:
            assert {op["kernel"] for op in prof.ops} == {"builtin"}


def test_an_int4_conv_runs_builtin_the_int8_ops_xnnpack(files):
    prof = qx.profile_tflite(files["int4"][1], runs=20)
    kernels = {op["layer"]: (op["kernel"], op["model_kernel"]) for op in prof.ops}
    assert kernels["conv"] == ("builtin", "builtin")            # XNNPACK does not take INT4 CONV_2D
    assert kernels["fc"] == kernels["out"] == ("xnnpack", "xnnpack")
    assert qx.inspect_tflite(files["int4"][1]).int4_tensors
    int8 = qx.profile_tflite(files["int8"][1], runs=20)
    assert {op["kernel"] for op in int8.ops} == {"xnnpack"}


def test_a_dynamic_axis_profiles_given_x(files):
    qat, path, xs = files["dynamic"]
    with pytest.raises(ValueError, match=r"input 'series' of the file has a dynamic dimension \(None, 3\).*pass x="):
        qx.profile_tflite(path)
    prof = qx.profile_tflite(path, xs[:, :7], model=qat, runs=10)
    assert [op["op"] for op in prof.ops] == qx.inspect_tflite(path).ops
    assert {op["layer"] for op in prof.ops if op["op"] == "CONV_2D"} == {"c1"}
    assert {op["layer"] for op in prof.ops if op["op"] == "FULLY_CONNECTED"} == {"d"}
    with pytest.raises(ValueError, match="do not fit the file's input"):
        qx.profile_tflite(path, np.zeros((1, 7, 4), "float32"))


def test_table_dict_and_plot(files, tmp_path, capsys):
    prof = qx.profile_tflite(files["int8"][1], runs=5, warmup=2, verbose=1)
    table = prof.table()
    assert capsys.readouterr().out.strip() == table.strip()     # verbose=1 prints the table, as it is
    head = table.splitlines()[0]
    for said in ("ai-edge-litert", "XNNPACK", "1 thread(s)", "5 runs after 2 warm-up", "Whole file", "sum of the ops"):
        assert said in head, head
    assert "| # | op | layer | kernel | µs | share |" in table and "| CONV_2D | conv | xnnpack |" in table
    again = json.loads(json.dumps(prof.to_dict()))
    assert again == prof.to_dict() and again["ops"][0]["op"] == "CONV_2D" and again["by_layer"] == prof.by_layer()
    out = prof.plot(tmp_path / "profile.png")
    assert (tmp_path / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out is not None


def test_layer_names_from_tensor_names():
    """The converter's names: a weight op's path first in a folded kernel (PTQ MobileNetV2's
    depthwise, with its batch norm, activation and padding), the first path of an output."""
    from keras_qx.lite.profile import OTHER, _layer

    kernel = ("m/block_1_depthwise_relu/Relu6;m/block_1_depthwise_BN/FusedBatchNormV3;m/block_1_depthwise/depthwise;"
              ";m/block_1_pad/Pad")
    assert _layer([kernel], ["m/block_1_depthwise_relu/Relu6;m/x/y"], None) == "block_1_depthwise"
    assert _layer([], ["m/quant_flat/Reshape;m/quant_relu/MovingAvgQuantize/FakeQuantWithMinMaxVars"], None) == "flat"
    assert _layer([], ["m/quant_relu/Relu;m/quant_conv/Conv2D"], {"conv": "conv", "quant_conv": "conv"}) == "conv"
    assert _layer(["arith.constant3"], ["StatefulPartitionedCall:0"], None) == OTHER


@pytest.mark.parametrize("kwargs, error, message", [
    ({"runs": 0}, ValueError, "runs must be at least 1, got 0"),
    ({"warmup": 1.5}, TypeError, "warmup must be an int >= 1, got 1.5"),
    ({"num_threads": 0}, ValueError, "num_threads must be at least 1"),
    ({"xnnpack": "yes"}, TypeError, "xnnpack must be True"),
    ({"verbose": 3}, ValueError, "verbose must be 0"),
    ({"model": "net"}, TypeError, "model must be the Keras or QAT model"),
])
def test_bad_arguments(files, kwargs, error, message):
    with pytest.raises(error, match=message):
        qx.profile_tflite(files["int8"][1], **kwargs)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TFLite file"):
        qx.profile_tflite(tmp_path / "missing.tflite")
    with pytest.raises(ValueError, match="TFL3"):
        qx.profile_tflite(b"not a flatbuffer at all")


def test_cli_prints_the_table(files, tmp_path, capsys):
    from keras_qx.cli import main

    _, path, x = files["dynamic"]
    np.savez(tmp_path / "d.npz", x=x)
    assert main(["profile", str(path), "--data", str(tmp_path / "d.npz"), "--runs", "5", "--json",
                 str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "| # | op | layer | kernel | µs | share |" in out and "| CONV_2D | c1 |" in out
    assert json.loads((tmp_path / "p.json").read_text())["runs"] == 5
    assert (tmp_path / "p.png").stat().st_size > 0
    assert main(["profile", str(files["int8"][1]), "--no-xnnpack", "--runs", "3"]) == 0
    assert "built-in kernels, 1 thread(s)" in capsys.readouterr().out
    assert main(["profile", str(path)]) == 2                 # dynamic, no --data: the fix is named
    assert "pass x=samples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["profile", str(path), "--runs", "0"])
    assert "--runs must be at least 1" in capsys.readouterr().err
