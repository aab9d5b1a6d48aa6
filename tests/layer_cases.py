"""A tiny model for every public layer class of ``tf_keras.layers`` (tests/test_every_layer.py and
bench/layers.py): the classes are listed from the module at run time, aliases once.

``layer_classes()`` -> ``{canonical name: class}``; ``CASES[name]`` builds the tiny model of a
constructible class: ``(model, samples)``. A class with no case is reported as unknown.
"""
from __future__ import annotations

import inspect

import numpy as np

from keras_qx._compat import keras, tf

L = keras.layers


def layer_classes() -> dict:
    """Every public Layer class of ``tf_keras.layers`` by its class name (aliases such as
    ``AvgPool2D`` resolve to the same class and count once)."""
    found = {}
    for name in sorted(dir(L)):
        obj = getattr(L, name)
        if not name.startswith("_") and inspect.isclass(obj) and issubclass(obj, L.Layer):
            found.setdefault(obj.__name__, obj)
    return found


def _model(shape, layer, dtype="float32", head=False):
    """Input -> layer [-> Flatten -> Dense head]: a model whose only non-trivial layer is
    ``layer`` (``head``: a quantized layer after it, for layers kept float)."""
    inputs = keras.Input(shape, dtype=dtype, name="x")
    x = layer(inputs)
    if head:
        x = L.Dense(2, name="head")(L.Flatten()(x))
    return keras.Model(inputs, x, name="tiny")


def _rand(shape, n=16, dtype="float32", seed=0, low=-1.0, high=1.0):
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, size=(n, *shape)).astype(dtype)


IMG, SEQ, VOL, VEC = (6, 6, 3), (6, 4), (4, 4, 4, 2), (8,)


def _case(shape, make, dtype="float32", head=False, data=None):
    def build():
        return _model(shape, make(), dtype, head), (data() if data else _rand(shape))
    return build


def _two(shape, make):
    """A merging layer on two inputs."""
    def build():
        a, b = keras.Input(shape, name="a"), keras.Input(shape, name="b")
        return keras.Model([a, b], make()([a, b]), name="tiny"), [_rand(shape, seed=1), _rand(shape, seed=2)]
    return build


def _strings(shape, make, values):
    def build():
        data = np.array(values, dtype=object).reshape(-1, *shape)
        return _model(shape, make(), "string"), data
    return build


def _ints(shape, make, high=5):
    return _case(shape, make, "int64", data=lambda: np.random.default_rng(0).integers(0, high, (16, *shape)))


def _dense_features():
    def build():
        column = tf.feature_column.numeric_column("f", shape=(3,))
        inputs = {"f": keras.Input((3,), name="f")}
        return keras.Model(inputs, L.DenseFeatures([column])(inputs), name="tiny"), {"f": _rand((3,))}
    return build


def _hashed_crossing():
    def build():
        a, b = keras.Input((), dtype="int64", name="a"), keras.Input((), dtype="int64", name="b")
        ints = np.random.default_rng(0).integers(0, 5, (16,))
        return keras.Model([a, b], L.HashedCrossing(8)((a, b)), name="tiny"), [ints, ints]
    return build


_WORDS = ["a b", "b c", "c a", "a a"] * 4

CASES = {
    # kernels
    "Dense": _case(VEC, lambda: L.Dense(4)),
    "EinsumDense": _case(SEQ, lambda: L.EinsumDense("abc,cd->abd", output_shape=(6, 3), bias_axes="d")),
    "Embedding": _ints((5,), lambda: L.Embedding(10, 4), high=10),
    "Conv1D": _case(SEQ, lambda: L.Conv1D(3, 3)),
    "Conv2D": _case(IMG, lambda: L.Conv2D(3, 3)),
    "Conv3D": _case(VOL, lambda: L.Conv3D(3, 3)),
    "Conv1DTranspose": _case(SEQ, lambda: L.Conv1DTranspose(3, 3)),
    "Conv2DTranspose": _case(IMG, lambda: L.Conv2DTranspose(3, 3)),
    "Conv3DTranspose": _case(VOL, lambda: L.Conv3DTranspose(3, 3)),
    "DepthwiseConv1D": _case(SEQ, lambda: L.DepthwiseConv1D(3)),
    "DepthwiseConv2D": _case(IMG, lambda: L.DepthwiseConv2D(3)),
    "SeparableConv1D": _case(SEQ, lambda: L.SeparableConv1D(3, 3)),
    "SeparableConv2D": _case(IMG, lambda: L.SeparableConv2D(3, 3)),
    "LocallyConnected1D": _case(SEQ, lambda: L.LocallyConnected1D(3, 3)),
    "LocallyConnected2D": _case(IMG, lambda: L.LocallyConnected2D(3, 3)),
    "MultiHeadAttention": lambda: (_mha(), _rand(SEQ)),
    "SpectralNormalization": _case(VEC, lambda: L.SpectralNormalization(L.Dense(4)), head=True),
    # arithmetic
    "Activation": _case(VEC, lambda: L.Activation("tanh")),
    "ReLU": _case(VEC, lambda: L.ReLU()),
    "LeakyReLU": _case(VEC, lambda: L.LeakyReLU(0.2)),
    "PReLU": _case(VEC, lambda: L.PReLU(alpha_initializer=keras.initializers.Constant(0.25))),
    "ELU": _case(VEC, lambda: L.ELU(), head=True),
    "ThresholdedReLU": _case(VEC, lambda: L.ThresholdedReLU(0.1)),
    "Softmax": _case(VEC, lambda: L.Softmax()),
    "BatchNormalization": _case(IMG, lambda: L.BatchNormalization()),
    "LayerNormalization": _case(SEQ, lambda: L.LayerNormalization()),
    "GroupNormalization": _case(IMG, lambda: L.GroupNormalization(groups=3)),
    "UnitNormalization": _case(VEC, lambda: L.UnitNormalization()),
    "Normalization": _case(VEC, lambda: L.Normalization(mean=0.1, variance=0.5)),
    "Rescaling": _case(VEC, lambda: L.Rescaling(0.5, offset=0.1)),
    "Add": _two(VEC, L.Add),
    "Subtract": _two(VEC, L.Subtract),
    "Multiply": _two(VEC, L.Multiply),
    "Average": _two(VEC, L.Average),
    "Maximum": _two(VEC, L.Maximum),
    "Minimum": _two(VEC, L.Minimum),
    "Concatenate": _two(VEC, L.Concatenate),
    "Dot": _two(VEC, lambda: L.Dot(axes=1)),
    "Attention": _two(SEQ, L.Attention),
    "AdditiveAttention": _two(SEQ, L.AdditiveAttention),
    "AveragePooling1D": _case(SEQ, lambda: L.AveragePooling1D(2)),
    "AveragePooling2D": _case(IMG, lambda: L.AveragePooling2D(2)),
    "AveragePooling3D": _case(VOL, lambda: L.AveragePooling3D(2)),
    "GlobalAveragePooling1D": _case(SEQ, L.GlobalAveragePooling1D),
    "GlobalAveragePooling2D": _case(IMG, L.GlobalAveragePooling2D),
    "GlobalAveragePooling3D": _case(VOL, L.GlobalAveragePooling3D),
    # value-preserving
    "MaxPooling1D": _case(SEQ, lambda: L.MaxPooling1D(2)),
    "MaxPooling2D": _case(IMG, lambda: L.MaxPooling2D(2)),
    "MaxPooling3D": _case(VOL, lambda: L.MaxPooling3D(2)),
    "GlobalMaxPooling1D": _case(SEQ, L.GlobalMaxPooling1D),
    "GlobalMaxPooling2D": _case(IMG, L.GlobalMaxPooling2D),
    "GlobalMaxPooling3D": _case(VOL, L.GlobalMaxPooling3D),
    "Flatten": _case(IMG, L.Flatten),
    "Reshape": _case(IMG, lambda: L.Reshape((18, 6))),
    "Permute": _case(SEQ, lambda: L.Permute((2, 1))),
    "RepeatVector": _case(VEC, lambda: L.RepeatVector(3)),
    "Cropping1D": _case(SEQ, lambda: L.Cropping1D(1)),
    "Cropping2D": _case(IMG, lambda: L.Cropping2D(1)),
    "Cropping3D": _case(VOL, lambda: L.Cropping3D(1)),
    "ZeroPadding1D": _case(SEQ, lambda: L.ZeroPadding1D(1)),
    "ZeroPadding2D": _case(IMG, lambda: L.ZeroPadding2D(1)),
    "ZeroPadding3D": _case(VOL, lambda: L.ZeroPadding3D(1)),
    "UpSampling1D": _case(SEQ, lambda: L.UpSampling1D(2)),
    "UpSampling2D": _case(IMG, lambda: L.UpSampling2D(2)),
    "UpSampling3D": _case(VOL, lambda: L.UpSampling3D(2)),
    "Resizing": _case(IMG, lambda: L.Resizing(4, 4)),
    "CenterCrop": _case(IMG, lambda: L.CenterCrop(4, 4)),
    "Masking": _case(SEQ, lambda: L.Masking(0.0)),
    # identity at inference
    "Identity": _case(VEC, L.Identity),
    "Dropout": _case(VEC, lambda: L.Dropout(0.5)),
    "AlphaDropout": _case(VEC, lambda: L.AlphaDropout(0.5)),
    "GaussianDropout": _case(VEC, lambda: L.GaussianDropout(0.5)),
    "GaussianNoise": _case(VEC, lambda: L.GaussianNoise(0.1)),
    "SpatialDropout1D": _case(SEQ, lambda: L.SpatialDropout1D(0.5)),
    "SpatialDropout2D": _case(IMG, lambda: L.SpatialDropout2D(0.5)),
    "SpatialDropout3D": _case(VOL, lambda: L.SpatialDropout3D(0.5)),
    "ActivityRegularization": _case(VEC, lambda: L.ActivityRegularization(l1=0.01)),
    "RandomBrightness": _case(IMG, lambda: L.RandomBrightness(0.1, value_range=(-1, 1))),
    "RandomContrast": _case(IMG, lambda: L.RandomContrast(0.1)),
    "RandomCrop": _case(IMG, lambda: L.RandomCrop(4, 4)),
    "RandomFlip": _case(IMG, L.RandomFlip),
    "RandomHeight": _case(IMG, lambda: L.RandomHeight(0.1)),
    "RandomWidth": _case(IMG, lambda: L.RandomWidth(0.1)),
    "RandomRotation": _case(IMG, lambda: L.RandomRotation(0.1)),
    "RandomTranslation": _case(IMG, lambda: L.RandomTranslation(0.1, 0.1)),
    "RandomZoom": _case(IMG, lambda: L.RandomZoom(0.1)),
    # recurrent and wrappers
    "SimpleRNN": _case(SEQ, lambda: L.SimpleRNN(3), head=True),
    "GRU": _case(SEQ, lambda: L.GRU(3), head=True),
    "LSTM": _case(SEQ, lambda: L.LSTM(3), head=True),
    "RNN": _case(SEQ, lambda: L.RNN(L.SimpleRNNCell(3)), head=True),
    # Bidirectional(LSTM) is split into two integer LSTMs (tests/test_text_models.py); the class stays float
    "Bidirectional": _case(SEQ, lambda: L.Bidirectional(L.GRU(3)), head=True),
    "TimeDistributed": _case(SEQ, lambda: L.TimeDistributed(L.Dense(3)), head=True),
    "ConvLSTM1D": _case((3, 6, 2), lambda: L.ConvLSTM1D(2, 3), head=True),
    "ConvLSTM2D": _case((3, 6, 6, 2), lambda: L.ConvLSTM2D(2, 3), head=True),
    "ConvLSTM3D": _case((2, 4, 4, 4, 2), lambda: L.ConvLSTM3D(2, 3), head=True),
    "Lambda": _case(VEC, lambda: L.Lambda(lambda t: t * 2.0)),
    # categorical / string preprocessing
    "StringLookup": _strings((3,), lambda: L.StringLookup(vocabulary=["a", "b", "c"]), list("abcabc") * 8),
    "TextVectorization": _strings((), lambda: L.TextVectorization(vocabulary=["a", "b", "c"],
                                                                    output_sequence_length=2), _WORDS),
    "Hashing": _ints((3,), lambda: L.Hashing(8)),
    "IntegerLookup": _ints((3,), lambda: L.IntegerLookup(vocabulary=[0, 1, 2, 3])),
    "CategoryEncoding": _ints((3,), lambda: L.CategoryEncoding(5, output_mode="multi_hot")),
    "Discretization": _case(VEC, lambda: L.Discretization(bin_boundaries=[-0.5, 0.0, 0.5])),
    "HashedCrossing": _hashed_crossing(),
    "DenseFeatures": _dense_features(),
}


def _mha():
    inputs = keras.Input(SEQ, name="x")
    return keras.Model(inputs, L.MultiHeadAttention(2, 2)(inputs, inputs), name="tiny")


# Classes that are not model layers on their own: bases, cells (they run inside an RNN) and the
# input placeholder. Listed, not constructed.
NOT_A_MODEL_LAYER = {
    "Layer": "the base class",
    "Wrapper": "an abstract base of layer wrappers",
    "AbstractRNNCell": "an abstract RNN cell",
    "SimpleRNNCell": "a cell: runs inside an RNN layer",
    "GRUCell": "a cell: runs inside an RNN layer",
    "LSTMCell": "a cell: runs inside an RNN layer",
    "StackedRNNCells": "a cell: runs inside an RNN layer",
    "InputLayer": "the model's input placeholder (keras.Input)",
}


# A Lambda of TF ops is inlined into those ops (keras_qx.rewrite.inline) and quantized as they are;
# one that does not trace stays refused (tests/test_custom_layers.py).
INLINED = {"Lambda"}


def label(name: str) -> str:
    """The treatment keras_qx's table gives class ``name``: quantized, pass-through, identity,
    kept float (also a quantized layer whose op the file runs in float), refused, not a model
    layer, or unknown."""
    from keras_qx.quant.kinds import FLOAT, QUANTIZED, treatment

    if name in NOT_A_MODEL_LAYER:
        return "not a model layer"
    if name in INLINED:
        return "quantized"
    known = treatment(layer_classes()[name])
    if known is None:
        return "unknown"
    if known.kind == FLOAT or (known.kind == QUANTIZED and known.float_op):
        return "kept float"
    return known.kind


def measure(name: str) -> dict:
    """Quantize, calibrate and export the tiny model of ``name``: ``{"error"}`` (a refusal) or
    ``{"ops", "float_ops", "kernels", "mean", "max", "warnings"}`` (kernels: storage types of
    the constants of rank >= 2 other than int32 shapes)."""
    import warnings

    import keras_qx as qx

    keras.backend.clear_session()
    model, x = CASES[name]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            qat = qx.quantize(model)
        except qx.PolicyError as err:
            return {"error": str(err), "warnings": []}
        qx.calibrate(qat, x)
        tfl = qx.export_tflite(qat, x, min_agreement=0.0)
    info = tfl.report.info
    return {"ops": list(info.ops), "float_ops": list(info.float_ops),
            "kernels": [w[1] for w in info.weights if len(w[2]) >= 2 and w[1] != "INT32"],
            "mean": tfl.report.mean_error_steps, "max": tfl.report.max_error_steps,
            "warnings": [str(w.message) for w in caught if "keras_qx" in str(w.message)]}


# ---------------------------------------------------------------------------------------------
# In position: each class between a kernel layer before it and a Dense after it, trained a step.

# Classes whose in-position model is adapted, and how (bench/results/layers.md lists these).
IN_POSITION_ADAPTED = {
    "Embedding": "must be first (it takes token ids): Input -> Embedding -> Conv1D -> Flatten -> Dense",
    "MultiHeadAttention": "self-attention: Conv1D -> MultiHeadAttention(x, x) -> Flatten -> Dense",
    "RandomContrast": ("first (Input -> RandomContrast -> Conv2D -> Flatten -> Dense): TF has no gradient for "
                       "AdjustContrastv2, so a float model with a kernel before it cannot train either"),
    "RandomHeight": "GlobalAveragePooling2D before the Dense (it changes the height while training)",
    "RandomWidth": "GlobalAveragePooling2D before the Dense (it changes the width while training)",
    "ConvLSTM1D": "a Dense on each position before it (no Conv takes its 4D input)",
    "ConvLSTM2D": "a Dense on each position before it (no Conv takes its 5D input)",
    "ConvLSTM3D": ("Reshape -> Conv1D -> Reshape before it (a Dense on a 6D input converts to a BatchMatMul "
                   "TFLite has no kernel for)"),
}
_FIRST = {"Embedding", "RandomContrast"}  # the layer comes first, the kernel layer after it
_POOLED = {"RandomHeight", "RandomWidth"}


def _before(shape, name):
    """A kernel layer that keeps ``shape``: Conv1D on sequences, Conv2D on images, Conv3D on
    volumes, Dense on vectors (and on the per-position features of higher ranks)."""
    conv = {2: L.Conv1D, 3: L.Conv2D, 4: L.Conv3D}.get(len(shape))
    if conv is None:
        return L.Dense(shape[-1], name=name)
    return conv(shape[-1], 3, padding="same", name=name)


def _before_6d(t, name):
    shape = tuple(t.shape[1:])
    flat = L.Reshape((-1, shape[-1]), name=f"{name}_flat")(t)
    return L.Reshape(shape, name=f"{name}_back")(L.Conv1D(shape[-1], 3, padding="same", name=name)(flat))


def in_position_names() -> list:
    """The classes swept in position: every constructible class but the refused ones (a refusal
    needs no model around it: tests/test_every_layer.py)."""
    return [n for n in sorted(CASES) if label(n) != "refused"]


def in_position(name: str):
    """``(model, x, y)``: class ``name`` between a kernel layer and a Dense head (``head``,
    4 logits), with 16 samples and class labels (IN_POSITION_ADAPTED: where it differs). The
    layer is a fresh copy of its tiny case's layer (same config), on inputs of its shapes."""
    tiny, x = CASES[name]()
    layer = [l for l in tiny.layers if type(l).__name__ == name][0]
    fresh = type(layer).from_config(layer.get_config())
    xs = x if isinstance(x, list) else [x]
    if name in _FIRST:
        inputs = [keras.Input(tiny.inputs[0].shape[1:], dtype=tiny.inputs[0].dtype, name="x")]
        y = fresh(inputs[0])
        y = _before(tuple(y.shape[1:]), "after")(y)
    else:
        inputs = [keras.Input(t.shape[1:], name=t.name.split(":")[0]) for t in tiny.inputs]
        pre = [_before_6d(t, f"before_{i}") if len(t.shape) > 5 else _before(t.shape[1:], f"before_{i}")(t)
               for i, t in enumerate(inputs)]
        if name == "MultiHeadAttention":
            y = fresh(pre[0], pre[0])
        else:
            y = fresh(pre if len(pre) > 1 else pre[0])
    if name in _POOLED:
        y = L.GlobalAveragePooling2D(name="pool")(y)
    if len(y.shape) > 2:
        y = L.Flatten(name="flat")(y)
    out = L.Dense(4, name="head")(y)
    model = keras.Model(inputs if len(inputs) > 1 else inputs[0], out, name="in_position")
    labels = np.random.default_rng(3).integers(0, 4, len(xs[0]))
    return model, (xs if len(xs) > 1 else xs[0]), labels


def measure_in_position(name: str) -> dict:
    """``in_position(name)``: quantize, calibrate, one ``fit`` epoch, calibrate again, export
    (verified against the QAT model): ``{"treatment", "mean", "max", "float_ops", "seconds"}``."""
    import time
    import warnings

    import keras_qx as qx

    start = time.perf_counter()
    keras.backend.clear_session()
    model, x, y = in_position(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = qx.quantize(model)
        qx.calibrate(qat, x)
        qat.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        qat.fit(x, y, epochs=1, batch_size=8, verbose=0)
        tfl = qx.export_tflite(qat, x, min_agreement=0.0)
    report = tfl.report
    return {"treatment": label(name), "mean": report.mean_error_steps, "max": report.max_error_steps,
            "float_ops": sorted(set(report.info.float_ops)), "seconds": time.perf_counter() - start}
