"""The policy's ``"pack": false`` (issue 20, storage for speed): a sub-byte kernel stored on an
int8 carrier. The file holds the same trained integers at the same step as the packed INT4 one
(so both compute the same outputs on the same kernels), costs int8 bytes, and runs where int8
runs (XNNPACK takes an int8 convolution; it does not take an INT4 one)."""
import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras
from keras_qx._runtime import interpreter
from keras_qx.qat.summary import layer_costs
from keras_qx.quant.quantizers import WeightQuantizer

L = keras.layers


def conv_model():
    inputs = keras.Input((8, 8, 4), name="image")
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="conv")(inputs)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(5, name="out")(x), name="packing")


def builtin_outputs(data, x):
    it = interpreter(data, xnnpack=False)
    di, do = it.get_input_details()[0], it.get_output_details()[0]
    s, z = di["quantization"]
    out = []
    for sample in x:
        it.set_tensor(di["index"], np.clip(np.round(sample[None] / s) + z, -128, 127).astype(np.int8))
        it.invoke()
        out.append(it.get_tensor(do["index"]).copy())
    return np.concatenate(out)


def test_policy_pack_field_is_checked():
    with pytest.raises(qx.PolicyError, match="pack must be true .* or false"):
        qx.Policy.from_dict({"layers": {"conv": {"weight_bits": 4, "pack": "no"}}})
    policy = qx.Policy.from_dict({"rules": [{"type": "Conv2D", "weight_bits": 4, "pack": False}]})
    assert qx.Policy.from_json(policy.to_json()) == policy
    q = WeightQuantizer(4, pack=False)
    assert WeightQuantizer.from_config(q.get_config()).pack is False
    assert "pack" not in WeightQuantizer(4).get_config()  # configs of packed kernels are as before
    with pytest.raises(TypeError, match=r"pack=\.\.\.\) must be True or False"):
        WeightQuantizer(4, pack=1)


@pytest.mark.slow
def test_unpacked_kernel_is_the_packed_one_on_an_int8_carrier(rng):
    model = conv_model()
    x = rng.normal(size=(64, 8, 8, 4)).astype("float32")
    files, qats = {}, {}
    for pack in (True, False):
        keras.utils.set_random_seed(0)
        qat = qx.calibrate(qx.quantize(model, {"layers": {"conv": {"weight_bits": 4, "pack": pack}}}), x)
        qats[pack] = qat
        files[pack] = qx.export_tflite(qat, x[:32])
        assert files[pack].report.max_error_steps <= 2, files[pack].report.verification
    packed, carried = (qx.inspect_tflite(files[p]) for p in (True, False))
    assert len(packed.int4_tensors) == 1 and not carried.int4_tensors
    kernel = next(w for w in carried.weights if len(w[2]) == 4)  # the conv's (16, 3, 3, 4) kernel
    assert kernel[1] == "INT8" and kernel[3] == 16 * 3 * 3 * 4
    assert packed.kernel_bytes + 16 * 3 * 3 * 4 // 2 == carried.kernel_bytes
    # the trained integers at the same step: same outputs on the same (built-in) kernels
    np.testing.assert_array_equal(builtin_outputs(bytes(files[True]), x[:16]),
                                  builtin_outputs(bytes(files[False]), x[:16]))
    # the cost model counts what the file stores
    costs = {c.name: c for c, _ in layer_costs(qats[False])}
    assert costs["conv"].weight_bits == 4 and costs["conv"].storage_bits == 8
    assert costs["conv"].kernel_bytes == 16 * 3 * 3 * 4
    assert sum(c.kernel_bytes for c, _ in layer_costs(qats[False])) == carried.kernel_bytes
    # and XNNPACK takes the carried convolution, not the packed one
    kernels = {}
    for pack in (True, False):
        rows = qx.profile_tflite(files[pack], x[:1], runs=5, warmup=1).ops
        kernels[pack] = [r["model_kernel"] for r in rows if r["op"] == "CONV_2D"]
    assert kernels == {True: ["builtin"], False: ["xnnpack"]}, kernels
