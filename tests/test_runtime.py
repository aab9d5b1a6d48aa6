"""The TFLite runtime runs in a child process: same outputs as in-process, and a native abort
becomes an exception instead of ending the caller."""
import pathlib

import numpy as np
import pytest

import keras_qx as qx
from keras_qx._runtime import Runner, RuntimeCrash, run
from tests.conftest import tiny_model, train_and_export

# An untrained transformer block (Dense, MultiHeadAttention, Add + LayerNormalization, a gelu
# feed-forward) exported without verification: LiteRT 2.3 aborts the process (SIGABRT) on invoke.
ABORTS = pathlib.Path(__file__).parent / "data" / "aborts_litert.tflite"


@pytest.mark.slow
def test_child_process_gives_the_in_process_outputs(rng):
    qat, tfl, x = train_and_export(tiny_model(), rng)
    result = run(tfl, x[:20], latency_runs=5)
    inproc = Runner(bytes(tfl))
    assert np.array_equal(result.output, inproc.predict(x[:20]))
    assert result.output_steps == [inproc.output_step] and inproc.output_step > 0
    assert len(result.times) == 5 and all(t > 0 for t in result.times)


def test_a_runtime_abort_is_an_exception_not_the_end_of_the_caller():
    x = np.random.default_rng(0).random((2, 16, 8)).astype("float32")
    with pytest.raises(RuntimeCrash, match="SIGABRT"):
        run(ABORTS.read_bytes(), x)


def test_evaluate_survives_an_aborting_file():
    x = np.random.default_rng(0).random((2, 16, 8)).astype("float32")
    with pytest.raises(RuntimeCrash, match="killed by SIGABRT"):
        qx.evaluate_tflite(ABORTS, x, np.zeros(2, int), latency_runs=1)


def test_verification_turns_an_abort_into_an_export_error():
    from keras_qx.lite.verify import verify

    x = np.random.default_rng(0).random((2, 16, 8)).astype("float32")
    with pytest.raises(qx.ExportError, match="SIGABRT.*Nothing was written.*calibrate"):
        verify(None, ABORTS.read_bytes(), x)


def test_a_file_the_runtime_refuses_is_named():
    with pytest.raises(RuntimeCrash, match="refused"):
        run(b"TFL3" * 8, np.zeros((1, 4), "float32"))


@pytest.mark.slow
def test_each_sample_starts_from_a_fresh_state():
    """A float LSTM converts to UNIDIRECTIONAL_SEQUENCE_LSTM, whose state persists between
    invocations; every sample must see the zero state Keras gives it."""
    from keras_qx._compat import keras
    from keras_qx.lite.convert import convert, converter_for

    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 3))
    model = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.LSTM(8)(inputs)))
    data = convert(converter_for(model))[0]
    assert "UNIDIRECTIONAL_SEQUENCE_LSTM" in qx.inspect_tflite(data).ops
    x = np.random.default_rng(0).normal(size=(6, 12, 3)).astype("float32")
    np.testing.assert_allclose(run(data, x).output, model.predict(x, verbose=0), atol=1e-5)
