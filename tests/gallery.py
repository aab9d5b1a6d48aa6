"""A gallery corpus: model definitions written fresh in the style of the public Keras examples
(keras.io/examples), the way users write them -- custom ``layers.Layer`` subclasses whose ``call``
composes standard layers and TF ops, subclassed ``keras.Model``s, token-id inputs with a ``None``
time axis, several inputs and outputs -- each on a small synthetic or embedded task that its
float model learns in a few epochs.

``GALLERY = {name: builder}``; ``builder()`` returns a :class:`Task` (the float model built but not
trained, the data, the loss and the metric kind). ``run_keras_qx`` / ``run_tfmot`` take a task
whose float model is trained (``train_float``) through each library's road to a TFLite file and
score the file on the test set; tests/test_gallery.py and bench/gallery.py share them.

Sizes are kept tiny (widths 8-32, inputs of 8x8 / 16x16 / 16-40 steps, a few hundred samples):
the corpus is about what the libraries accept and how faithful the file is, not about accuracy.
One departure from the gallery everywhere: ``BatchNormalization(momentum=0.9)``, since at the
default 0.99 the moving statistics lag a few epochs of training (measured: ConvMixer 94% in
training mode, 19% at inference).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from keras_qx._compat import keras, tf

layers = keras.layers

__all__ = ["GALLERY", "Task", "train_float", "predict", "score", "baseline", "run_keras_qx", "run_tfmot",
           "take"]


@dataclasses.dataclass
class Task:
    model: Any  # the float keras model, built (untrained)
    x_train: Any  # array, or dict keyed by input name
    y_train: Any  # array, or list (one per output)
    x_test: Any
    y_test: Any
    loss: Any  # what model.compile takes
    metric: Any  # "accuracy" (argmax of the last axis), "binary_accuracy" (one sigmoid unit), "mse"; list per output
    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-3
    note: str = ""

    @property
    def metrics(self) -> list:
        return list(self.metric) if isinstance(self.metric, (list, tuple)) else [self.metric]

    @property
    def targets_test(self) -> list:
        return list(self.y_test) if isinstance(self.metric, (list, tuple)) else [self.y_test]


# ---------------------------------------------------------------------------------------------
# data


def take(x, n):
    """The first ``n`` samples of an array or of each array of a dict/list."""
    if isinstance(x, dict):
        return {k: v[:n] for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [v[:n] for v in x]
    return x[:n]


def _digits(n_train=None, n_test=256):
    from keras_qx.data import load_digits

    (x, y), (xt, yt) = load_digits()
    return x[:n_train], y[:n_train], xt[:n_test], yt[:n_test]


def _text(n, rng, maxlen=16, vocab=40):
    """Token ids (n, maxlen) in 1..vocab-1 (0 is padding): neutral words 11..vocab-1, and a few
    'sentiment' words, positive 1..5 or negative 6..10; the label is the majority sentiment."""
    x = rng.integers(11, vocab, size=(n, maxlen))
    y = rng.integers(0, 2, n)
    for i in range(n):
        major, minor = (np.arange(1, 6), np.arange(6, 11)) if y[i] else (np.arange(6, 11), np.arange(1, 6))
        k = int(rng.integers(2, 5))
        pos = rng.choice(maxlen, k + 1, replace=False)
        x[i, pos[:k]] = rng.choice(major, k)
        if rng.random() < 0.5:
            x[i, pos[k]] = rng.choice(minor)
    return x.astype("int32"), y.astype("int64")


def _sines(n, rng, length=32, classes=3, channels=1):
    """Noisy sine waves; the class is the frequency (1, 2 or 4 cycles over the window), random
    phase and amplitude. With several channels the class is which channel carries the sine."""
    t = np.arange(length) / length
    y = rng.integers(0, classes, n)
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    amp = rng.uniform(0.5, 1.5, (n, 1))
    if channels == 1:
        freq = np.array([1, 2, 4])[y][:, None]
        x = amp * np.sin(2 * np.pi * freq * t[None] + phase) + 0.3 * rng.normal(size=(n, length))
        return x[..., None].astype("float32"), y.astype("int64")
    x = 0.4 * rng.normal(size=(n, length, channels))
    x[np.arange(n), :, y] += (amp * np.sin(2 * np.pi * 3 * t[None] + phase))
    return x.astype("float32"), y.astype("int64")


def _spectrograms(n, rng, size=16, classes=4):
    """'Keyword' spectrograms (time x frequency): each word is a band pattern -- a low tone, a high
    tone, a rising chirp, a falling chirp -- at a random time offset, in noise."""
    x = 0.3 * rng.random((n, size, size)).astype("float32")
    y = rng.integers(0, classes, n)
    for i in range(n):
        start = int(rng.integers(0, size // 2))
        length = size // 2
        for k in range(length):
            t = start + k
            f = {0: 3, 1: 12, 2: 2 + k * 10 // length, 3: 13 - k * 10 // length}[int(y[i])]
            x[i, t, f] += 1.0
            x[i, t, min(f + 1, size - 1)] += 0.5
    return x[..., None], y.astype("int64")


def _rectangles(n, rng, size=16):
    """Images with one bright rectangle in noise; the mask marks the rectangle's pixels."""
    x = 0.4 * rng.random((n, size, size, 1)).astype("float32")
    mask = np.zeros((n, size, size), "int64")
    for i in range(n):
        h, w = rng.integers(4, 10, 2)
        r, c = rng.integers(0, size - h), rng.integers(0, size - w)
        mask[i, r:r + h, c:c + w] = 1
        x[i, r:r + h, c:c + w, 0] += 0.6
    return x, mask


# ---------------------------------------------------------------------------------------------
# custom layers, as the gallery writes them (no get_config: most gallery examples have none)


class TransformerBlock(layers.Layer):
    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1, **kwargs):
        super().__init__(**kwargs)
        self.att = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential([layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim)])
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs, training=False):
        attn_output = self.att(inputs, inputs)
        attn_output = self.dropout1(attn_output, training=training)
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.ffn(out1)
        ffn_output = self.dropout2(ffn_output, training=training)
        return self.layernorm2(out1 + ffn_output)


class TokenAndPositionEmbedding(layers.Layer):
    def __init__(self, maxlen, vocab_size, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        maxlen = tf.shape(x)[-1]
        positions = tf.range(start=0, limit=maxlen, delta=1)
        positions = self.pos_emb(positions)
        x = self.token_emb(x)
        return x + positions


class Sampling(layers.Layer):
    """Uses (z_mean, z_log_var) to sample z, the vector encoding a digit (random when training;
    the mean at inference, so a file can reproduce it)."""

    def call(self, inputs, training=None):
        z_mean, z_log_var = inputs
        if not training:
            return z_mean
        batch = tf.shape(z_mean)[0]
        dim = tf.shape(z_mean)[1]
        epsilon = tf.random.normal(shape=(batch, dim))
        return z_mean + tf.exp(0.5 * z_log_var) * epsilon


class Patches(layers.Layer):
    def __init__(self, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size

    def call(self, images):
        batch_size = tf.shape(images)[0]
        patches = tf.image.extract_patches(
            images=images,
            sizes=[1, self.patch_size, self.patch_size, 1],
            strides=[1, self.patch_size, self.patch_size, 1],
            rates=[1, 1, 1, 1],
            padding="VALID",
        )
        patch_dims = patches.shape[-1]
        return tf.reshape(patches, [batch_size, -1, patch_dims])


class PatchEncoder(layers.Layer):
    def __init__(self, num_patches, projection_dim, **kwargs):
        super().__init__(**kwargs)
        self.num_patches = num_patches
        self.projection = layers.Dense(units=projection_dim)
        self.position_embedding = layers.Embedding(input_dim=num_patches, output_dim=projection_dim)

    def call(self, patch):
        positions = tf.range(start=0, limit=self.num_patches, delta=1)
        return self.projection(patch) + self.position_embedding(positions)


class MLPMixerLayer(layers.Layer):
    def __init__(self, num_patches, hidden_units, dropout_rate, **kwargs):
        super().__init__(**kwargs)
        self.mlp1 = keras.Sequential([
            layers.Dense(units=num_patches, activation="gelu"),
            layers.Dense(units=num_patches),
            layers.Dropout(rate=dropout_rate),
        ])
        self.mlp2 = keras.Sequential([
            layers.Dense(units=num_patches, activation="gelu"),
            layers.Dense(units=hidden_units),
            layers.Dropout(rate=dropout_rate),
        ])
        self.normalize = layers.LayerNormalization(epsilon=1e-6)

    def call(self, inputs):
        x = self.normalize(inputs)
        x_channels = tf.linalg.matrix_transpose(x)  # [batch, channels, patches]
        mlp1_outputs = self.mlp1(x_channels)
        mlp1_outputs = tf.linalg.matrix_transpose(mlp1_outputs)
        x = mlp1_outputs + inputs  # skip connection
        x_patches = self.normalize(x)
        mlp2_outputs = self.mlp2(x_patches)
        return x + mlp2_outputs


class DigitsNet(keras.Model):
    """A subclassed model: layers made in ``__init__``, composed in ``call``."""

    def __init__(self, num_classes=10, **kwargs):
        super().__init__(**kwargs)
        self.conv1 = layers.Conv2D(16, 3, padding="same", activation="relu")
        self.conv2 = layers.Conv2D(16, 3, padding="same", activation="relu")
        self.pool = layers.MaxPooling2D()
        self.flatten = layers.Flatten()
        self.dropout = layers.Dropout(0.2)
        self.classifier = layers.Dense(num_classes)

    def call(self, inputs, training=False):
        x = self.conv1(inputs)
        x = self.pool(self.conv2(x))
        x = self.dropout(self.flatten(x), training=training)
        return self.classifier(x)


# ---------------------------------------------------------------------------------------------
# the corpus


def text_transformer():
    """keras.io 'Text classification with Transformer': custom TransformerBlock and
    TokenAndPositionEmbedding layers (token ids as int32; the gallery feeds floats)."""
    rng = np.random.default_rng(1)
    maxlen, vocab, dim = 16, 40, 16
    x, y = _text(768, rng, maxlen, vocab)
    inputs = layers.Input(shape=(maxlen,), dtype="int32")
    embedding_layer = TokenAndPositionEmbedding(maxlen, vocab, dim)
    h = embedding_layer(inputs)
    transformer_block = TransformerBlock(dim, 2, 16)
    h = transformer_block(h)
    h = layers.GlobalAveragePooling1D()(h)
    h = layers.Dropout(0.1)(h)
    h = layers.Dense(16, activation="relu")(h)
    h = layers.Dropout(0.1)(h)
    outputs = layers.Dense(2, activation="softmax")(h)
    model = keras.Model(inputs=inputs, outputs=outputs)
    return Task(model, x[:512], y[:512], x[512:], y[512:], "sparse_categorical_crossentropy", "accuracy")


def bilstm_text():
    """keras.io 'Bidirectional LSTM on IMDB': Input(shape=(None,), dtype='int32') -> Embedding ->
    two Bidirectional LSTMs -> Dense(sigmoid)."""
    rng = np.random.default_rng(2)
    x, y = _text(768, rng)
    inputs = keras.Input(shape=(None,), dtype="int32")
    h = layers.Embedding(40, 16)(inputs)
    h = layers.Bidirectional(layers.LSTM(8, return_sequences=True))(h)
    h = layers.Bidirectional(layers.LSTM(8))(h)
    outputs = layers.Dense(1, activation="sigmoid")(h)
    model = keras.Model(inputs, outputs)
    return Task(model, x[:512], y[:512].astype("float32"), x[512:], y[512:], "binary_crossentropy",
                "binary_accuracy")


def lstm_text():
    """Embedding -> LSTM -> Dense on fixed-length token ids (the issue's broken Embedding->LSTM)."""
    rng = np.random.default_rng(3)
    x, y = _text(768, rng)
    model = keras.Sequential([
        keras.Input(shape=(16,), dtype="int32"),
        layers.Embedding(40, 16),
        layers.LSTM(16),
        layers.Dense(2),
    ])
    return Task(model, x[:512], y[:512], x[512:], y[512:],
                keras.losses.SparseCategoricalCrossentropy(from_logits=True), "accuracy")


def gru_text():
    """Embedding -> GRU -> Dense, token ids with a None time axis."""
    rng = np.random.default_rng(4)
    x, y = _text(768, rng)
    inputs = keras.Input(shape=(None,), dtype="int32", name="tokens")
    h = layers.Embedding(40, 16)(inputs)
    h = layers.GRU(16)(h)
    outputs = layers.Dense(2, activation="softmax")(h)
    model = keras.Model(inputs, outputs)
    return Task(model, x[:512], y[:512], x[512:], y[512:], "sparse_categorical_crossentropy", "accuracy")


def fcn_mnist1d():
    """keras.io 'Timeseries classification from scratch' (FCN) on MNIST-1D."""
    from keras_qx.data import load_mnist1d

    (x, y), (xt, yt) = load_mnist1d()

    def make_model(input_shape, num_classes):
        input_layer = keras.layers.Input(input_shape)
        conv1 = keras.layers.Conv1D(filters=16, kernel_size=3, padding="same")(input_layer)
        conv1 = keras.layers.BatchNormalization(momentum=0.9)(conv1)
        conv1 = keras.layers.ReLU()(conv1)
        conv2 = keras.layers.Conv1D(filters=16, kernel_size=3, padding="same")(conv1)
        conv2 = keras.layers.BatchNormalization(momentum=0.9)(conv2)
        conv2 = keras.layers.ReLU()(conv2)
        conv3 = keras.layers.Conv1D(filters=16, kernel_size=3, padding="same")(conv2)
        conv3 = keras.layers.BatchNormalization(momentum=0.9)(conv3)
        conv3 = keras.layers.ReLU()(conv3)
        gap = keras.layers.GlobalAveragePooling1D()(conv3)
        output_layer = keras.layers.Dense(num_classes, activation="softmax")(gap)
        return keras.models.Model(inputs=input_layer, outputs=output_layer)

    return Task(make_model((40, 1), 10), x[:2048], y[:2048], xt[:256], yt[:256],
                "sparse_categorical_crossentropy", "accuracy", epochs=6, batch_size=64, lr=1e-2)


def timeseries_transformer():
    """keras.io 'Timeseries classification with a Transformer model': a functional
    transformer_encoder (LayerNormalization, MultiHeadAttention, Conv1D feed-forward)."""
    rng = np.random.default_rng(5)
    x, y = _sines(768, rng)

    def transformer_encoder(inputs, head_size, num_heads, ff_dim, dropout=0):
        x = layers.LayerNormalization(epsilon=1e-6)(inputs)
        x = layers.MultiHeadAttention(key_dim=head_size, num_heads=num_heads, dropout=dropout)(x, x)
        x = layers.Dropout(dropout)(x)
        res = x + inputs
        x = layers.LayerNormalization(epsilon=1e-6)(res)
        x = layers.Conv1D(filters=ff_dim, kernel_size=1, activation="relu")(x)
        x = layers.Dropout(dropout)(x)
        x = layers.Conv1D(filters=inputs.shape[-1], kernel_size=1)(x)
        return x + res

    inputs = keras.Input(shape=(32, 1))
    h = layers.Conv1D(8, 3, padding="same")(inputs)  # the gallery's single channel widened a little
    h = transformer_encoder(h, head_size=8, num_heads=2, ff_dim=16, dropout=0.1)
    h = layers.GlobalAveragePooling1D(data_format="channels_first")(h)
    h = layers.Dense(16, activation="relu")(h)
    outputs = layers.Dense(3, activation="softmax")(h)
    model = keras.Model(inputs, outputs)
    return Task(model, x[:512], y[:512], x[512:], y[512:], "sparse_categorical_crossentropy", "accuracy",
                epochs=4)


def stacked_lstm():
    """Stacked LSTMs (return_sequences=True then the last state) on a timeseries."""
    rng = np.random.default_rng(6)
    x, y = _sines(768, rng, length=24)
    model = keras.Sequential([
        keras.Input((24, 1)),
        layers.LSTM(16, return_sequences=True),
        layers.LSTM(16),
        layers.Dense(3),
    ])
    return Task(model, x[:512], y[:512], x[512:], y[512:],
                keras.losses.SparseCategoricalCrossentropy(from_logits=True), "accuracy", epochs=4)


def conv1d_variable_length():
    """Input((None, 3)) -> Conv1D -> GlobalAveragePooling1D -> Dense: a variable-length sequence."""
    rng = np.random.default_rng(7)
    x, y = _sines(768, rng, channels=3)
    inputs = keras.Input((None, 3))
    h = layers.Conv1D(16, 5, activation="relu")(inputs)
    h = layers.Conv1D(16, 3, activation="relu")(h)
    h = layers.GlobalAveragePooling1D()(h)
    outputs = layers.Dense(3)(h)
    model = keras.Model(inputs, outputs)
    return Task(model, x[:512], y[:512], x[512:], y[512:],
                keras.losses.SparseCategoricalCrossentropy(from_logits=True), "accuracy")


def mnist_convnet():
    """keras.io 'Simple MNIST convnet' (Sequential) on the 8x8 digits."""
    x, y, xt, yt = _digits()
    model = keras.Sequential([
        keras.Input(shape=(8, 8, 1)),
        layers.Conv2D(16, kernel_size=(3, 3), activation="relu", padding="same"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Conv2D(32, kernel_size=(3, 3), activation="relu", padding="same"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Flatten(),
        layers.Dropout(0.5),
        layers.Dense(10, activation="softmax"),
    ])
    return Task(model, x, y, xt, yt, "sparse_categorical_crossentropy", "accuracy", epochs=6)


def xception_small():
    """keras.io 'Image classification from scratch': Rescaling, an entry block, SeparableConv2D
    blocks with strided 1x1 residual projections added, GlobalAveragePooling2D."""
    x, y, xt, yt = _digits()
    x, xt = x * 16.0, xt * 16.0  # raw 0..16 pixel values; the model rescales
    inputs = keras.Input(shape=(8, 8, 1))
    h = layers.Rescaling(1.0 / 16)(inputs)
    h = layers.Conv2D(16, 3, padding="same")(h)
    h = layers.BatchNormalization(momentum=0.9)(h)
    h = layers.Activation("relu")(h)
    previous_block_activation = h
    for size in [16, 32]:
        h = layers.Activation("relu")(h)
        h = layers.SeparableConv2D(size, 3, padding="same")(h)
        h = layers.BatchNormalization(momentum=0.9)(h)
        h = layers.Activation("relu")(h)
        h = layers.SeparableConv2D(size, 3, padding="same")(h)
        h = layers.BatchNormalization(momentum=0.9)(h)
        h = layers.MaxPooling2D(3, strides=2, padding="same")(h)
        residual = layers.Conv2D(size, 1, strides=2, padding="same")(previous_block_activation)
        h = layers.add([h, residual])
        previous_block_activation = h
    h = layers.SeparableConv2D(32, 3, padding="same")(h)
    h = layers.BatchNormalization(momentum=0.9)(h)
    h = layers.Activation("relu")(h)
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.Dropout(0.25)(h)
    outputs = layers.Dense(10, activation=None)(h)
    model = keras.Model(inputs, outputs)
    return Task(model, x, y, xt, yt, keras.losses.SparseCategoricalCrossentropy(from_logits=True), "accuracy",
                epochs=6)


def kws_cnn():
    """A keyword-spotting CNN (TF 'simple audio recognition'): Normalization adapted on the
    spectrograms, two convolutions, pooling, Dropout, Dense."""
    rng = np.random.default_rng(8)
    x, y = _spectrograms(768, rng)
    norm_layer = layers.Normalization()
    norm_layer.adapt(x[:512])
    model = keras.Sequential([
        layers.Input(shape=(16, 16, 1)),
        norm_layer,
        layers.Conv2D(16, 3, activation="relu"),
        layers.Conv2D(16, 3, activation="relu"),
        layers.MaxPooling2D(),
        layers.Dropout(0.25),
        layers.Flatten(),
        layers.Dense(32, activation="relu"),
        layers.Dropout(0.5),
        layers.Dense(4),
    ])
    return Task(model, x[:512], y[:512], x[512:], y[512:],
                keras.losses.SparseCategoricalCrossentropy(from_logits=True), "accuracy")


def conv_autoencoder():
    """keras.io 'Convolutional autoencoder for image denoising': strided Conv2D encoder,
    Conv2DTranspose decoder, sigmoid output; reconstruction mse."""
    x, _, xt, _ = _digits()
    inputs = layers.Input(shape=(8, 8, 1))
    h = layers.Conv2D(16, (3, 3), activation="relu", padding="same")(inputs)
    h = layers.MaxPooling2D((2, 2), padding="same")(h)
    h = layers.Conv2D(16, (3, 3), activation="relu", padding="same")(h)
    h = layers.Conv2DTranspose(16, (3, 3), strides=2, activation="relu", padding="same")(h)
    h = layers.Conv2D(1, (3, 3), activation="sigmoid", padding="same")(h)
    model = keras.Model(inputs, h)
    return Task(model, x, x, xt, xt, "binary_crossentropy", "mse", epochs=6)


def unet_small():
    """keras.io 'Image segmentation with a U-Net-like architecture', two levels: strided
    SeparableConv2D down, Conv2DTranspose + UpSampling2D up, residual projections, per-pixel
    softmax over 2 classes."""
    rng = np.random.default_rng(9)
    x, mask = _rectangles(640, rng)
    inputs = keras.Input(shape=(16, 16, 1))
    h = layers.Conv2D(8, 3, strides=2, padding="same")(inputs)
    h = layers.BatchNormalization(momentum=0.9)(h)
    h = layers.Activation("relu")(h)
    previous_block_activation = h
    for filters in [16]:
        h = layers.Activation("relu")(h)
        h = layers.SeparableConv2D(filters, 3, padding="same")(h)
        h = layers.BatchNormalization(momentum=0.9)(h)
        h = layers.MaxPooling2D(3, strides=2, padding="same")(h)
        residual = layers.Conv2D(filters, 1, strides=2, padding="same")(previous_block_activation)
        h = layers.add([h, residual])
        previous_block_activation = h
    for filters in [16, 8]:
        h = layers.Activation("relu")(h)
        h = layers.Conv2DTranspose(filters, 3, padding="same")(h)
        h = layers.BatchNormalization(momentum=0.9)(h)
        h = layers.UpSampling2D(2)(h)
        residual = layers.UpSampling2D(2)(previous_block_activation)
        residual = layers.Conv2D(filters, 1, padding="same")(residual)
        h = layers.add([h, residual])
        previous_block_activation = h
    outputs = layers.Conv2D(2, 3, activation="softmax", padding="same")(h)
    model = keras.Model(inputs, outputs)
    return Task(model, x[:384], mask[:384], x[384:], mask[384:], "sparse_categorical_crossentropy", "accuracy",
                epochs=6)


def siamese():
    """keras.io 'Image similarity estimation using a Siamese Network with a contrastive loss',
    two digit images through one shared embedding network (a nested Model), a Lambda euclidean
    distance, BatchNormalization, Dense(sigmoid): same digit or not."""
    x, y, xt, yt = _digits(n_train=1024, n_test=512)

    def pairs(x, y, n, seed):
        rng = np.random.default_rng(seed)
        a = rng.integers(0, len(x), n)
        same = rng.random(n) < 0.5
        b = np.empty(n, int)
        for i in range(n):
            pool = np.flatnonzero((y == y[a[i]]) == same[i])
            b[i] = rng.choice(pool)
        return {"left": x[a], "right": x[b]}, same.astype("float32")

    def euclidean_distance(vects):
        x, y = vects
        sum_square = tf.math.reduce_sum(tf.math.square(x - y), axis=1, keepdims=True)
        return tf.math.sqrt(tf.math.maximum(sum_square, keras.backend.epsilon()))

    inp = layers.Input((8, 8, 1))
    h = layers.Conv2D(8, (3, 3), activation="tanh", padding="same")(inp)
    h = layers.AveragePooling2D(pool_size=(2, 2))(h)
    h = layers.Conv2D(16, (3, 3), activation="tanh", padding="same")(h)
    h = layers.Flatten()(h)
    h = layers.Dense(16, activation="tanh")(h)
    embedding_network = keras.Model(inp, h)
    input_1 = layers.Input((8, 8, 1), name="left")
    input_2 = layers.Input((8, 8, 1), name="right")
    tower_1 = embedding_network(input_1)
    tower_2 = embedding_network(input_2)
    merge_layer = layers.Lambda(euclidean_distance, output_shape=(1,))([tower_1, tower_2])
    normal_layer = layers.BatchNormalization(momentum=0.9)(merge_layer)
    output_layer = layers.Dense(1, activation="sigmoid")(normal_layer)
    model = keras.Model(inputs=[input_1, input_2], outputs=output_layer)
    xp, yp = pairs(x, y, 1024, 0)
    xpt, ypt = pairs(xt, yt, 256, 1)
    return Task(model, xp, yp, xpt, ypt, "binary_crossentropy", "binary_accuracy", epochs=6)


def vae_encoder():
    """keras.io 'Variational AutoEncoder' encoder (conv, z_mean, z_log_var, the custom Sampling
    layer) with a classifier on z."""
    x, y, xt, yt = _digits()
    latent_dim = 8
    encoder_inputs = keras.Input(shape=(8, 8, 1))
    h = layers.Conv2D(16, 3, activation="relu", strides=2, padding="same")(encoder_inputs)
    h = layers.Conv2D(32, 3, activation="relu", strides=2, padding="same")(h)
    h = layers.Flatten()(h)
    h = layers.Dense(16, activation="relu")(h)
    z_mean = layers.Dense(latent_dim, name="z_mean")(h)
    z_log_var = layers.Dense(latent_dim, name="z_log_var")(h)
    z = Sampling()([z_mean, z_log_var])
    outputs = layers.Dense(10, name="digit")(z)
    model = keras.Model(encoder_inputs, outputs, name="encoder")
    return Task(model, x, y, xt, yt, keras.losses.SparseCategoricalCrossentropy(from_logits=True), "accuracy",
                epochs=8)


def vit_small():
    """keras.io 'Image classification with Vision Transformer': custom Patches
    (tf.image.extract_patches) and PatchEncoder (Dense projection + position Embedding) layers,
    one functional transformer block."""
    x, y, xt, yt = _digits()
    patch_size, num_patches, projection_dim, num_heads = 2, 16, 16, 2
    inputs = keras.Input(shape=(8, 8, 1))
    patches = Patches(patch_size)(inputs)
    encoded_patches = PatchEncoder(num_patches, projection_dim)(patches)
    for _ in range(1):
        x1 = layers.LayerNormalization(epsilon=1e-6)(encoded_patches)
        attention_output = layers.MultiHeadAttention(num_heads=num_heads, key_dim=projection_dim,
                                                     dropout=0.1)(x1, x1)
        x2 = layers.Add()([attention_output, encoded_patches])
        x3 = layers.LayerNormalization(epsilon=1e-6)(x2)
        x3 = layers.Dense(2 * projection_dim, activation=keras.activations.gelu)(x3)
        x3 = layers.Dense(projection_dim, activation=keras.activations.gelu)(x3)
        encoded_patches = layers.Add()([x3, x2])
    representation = layers.LayerNormalization(epsilon=1e-6)(encoded_patches)
    representation = layers.Flatten()(representation)
    representation = layers.Dropout(0.3)(representation)
    features = layers.Dense(32, activation=keras.activations.gelu)(representation)
    logits = layers.Dense(10)(features)
    model = keras.Model(inputs=inputs, outputs=logits)
    return Task(model, x, y, xt, yt, keras.losses.SparseCategoricalCrossentropy(from_logits=True), "accuracy",
                epochs=8)


def mlp_mixer():
    """keras.io 'Image classification with modern MLP models' (MLP-Mixer): a strided-conv patch
    embedding reshaped to (patches, dim), two custom MLPMixerLayer blocks."""
    x, y, xt, yt = _digits()
    inputs = layers.Input(shape=(8, 8, 1))
    h = layers.Conv2D(16, 2, strides=2)(inputs)
    h = layers.Reshape((16, 16))(h)
    h = keras.Sequential([MLPMixerLayer(16, 16, 0.1) for _ in range(2)])(h)
    representation = layers.GlobalAveragePooling1D()(h)
    representation = layers.Dropout(rate=0.1)(representation)
    logits = layers.Dense(10)(representation)
    model = keras.Model(inputs=inputs, outputs=logits)
    return Task(model, x, y, xt, yt, keras.losses.SparseCategoricalCrossentropy(from_logits=True), "accuracy",
                epochs=8)


def convmixer():
    """keras.io 'Image classification with ConvMixer': patch Conv2D, GELU, BN; depthwise conv with
    a residual add, pointwise conv."""
    x, y, xt, yt = _digits()

    def activation_block(x):
        x = layers.Activation("gelu")(x)
        return layers.BatchNormalization(momentum=0.9)(x)

    def conv_stem(x, filters, patch_size):
        x = layers.Conv2D(filters, kernel_size=patch_size, strides=patch_size)(x)
        return activation_block(x)

    def conv_mixer_block(x, filters, kernel_size):
        x0 = x
        x = layers.DepthwiseConv2D(kernel_size=kernel_size, padding="same")(x)
        x = layers.Add()([activation_block(x), x0])
        x = layers.Conv2D(filters, kernel_size=1)(x)
        return activation_block(x)

    inputs = keras.Input((8, 8, 1))
    h = conv_stem(inputs, 16, 2)
    for _ in range(2):
        h = conv_mixer_block(h, 16, 3)
    h = layers.GlobalAvgPool2D()(h)
    outputs = layers.Dense(10, activation="softmax")(h)
    model = keras.Model(inputs, outputs)
    return Task(model, x, y, xt, yt, "sparse_categorical_crossentropy", "accuracy", epochs=8)


def tabular():
    """keras.io 'Structured data classification': one Input per feature, numeric features
    Normalization-adapted, a categorical feature (integer ids) embedded, concatenated, Dense,
    sigmoid."""
    rng = np.random.default_rng(10)
    n = 1024
    age = rng.uniform(20, 70, (n, 1)).astype("float32")
    income = rng.lognormal(3, 0.5, (n, 1)).astype("float32")
    city = rng.integers(0, 6, (n, 1)).astype("int32")
    effect = np.array([-1.5, -0.5, 0.0, 0.5, 1.0, 1.5])
    logit = (age[:, 0] - 45) / 10 - (np.log(income[:, 0]) - 3) * 2 + effect[city[:, 0]]
    y = (logit + 0.3 * rng.normal(size=n) > 0).astype("float32")
    x = {"age": age, "income": income, "city": city}

    def encode_numerical_feature(feature, data):
        normalizer = layers.Normalization()
        normalizer.adapt(data)
        return normalizer(feature)

    age_in = keras.Input(shape=(1,), name="age")
    income_in = keras.Input(shape=(1,), name="income")
    city_in = keras.Input(shape=(1,), name="city", dtype="int32")
    city_encoded = layers.Flatten()(layers.Embedding(6, 4)(city_in))
    all_features = layers.concatenate([
        encode_numerical_feature(age_in, age[:768]),
        encode_numerical_feature(income_in, income[:768]),
        city_encoded,
    ])
    h = layers.Dense(16, activation="relu")(all_features)
    h = layers.Dropout(0.2)(h)
    output = layers.Dense(1, activation="sigmoid")(h)
    model = keras.Model([age_in, income_in, city_in], output)
    return Task(model, take_dict(x, 0, 768), y[:768], take_dict(x, 768, n), y[768:], "binary_crossentropy",
                "binary_accuracy", epochs=6)


def take_dict(x, start, stop):
    return {k: v[start:stop] for k, v in x.items()}


def recommender():
    """keras.io 'Collaborative filtering for movie recommendations', functional: user and item
    Embeddings, a Dot product plus per-user and per-item bias Embeddings, sigmoid rating."""
    rng = np.random.default_rng(11)
    n_users, n_items, factors, n = 32, 48, 3, 1280
    u_f, i_f = rng.normal(size=(n_users, factors)), rng.normal(size=(n_items, factors))
    users = rng.integers(0, n_users, (n, 1)).astype("int32")
    items = rng.integers(0, n_items, (n, 1)).astype("int32")
    rating = 1 / (1 + np.exp(-(np.sum(u_f[users[:, 0]] * i_f[items[:, 0]], 1) + 0.2 * rng.normal(size=n))))
    rating = rating.astype("float32")
    x = {"user": users, "item": items}
    user_in = keras.Input((1,), name="user", dtype="int32")
    item_in = keras.Input((1,), name="item", dtype="int32")
    user_vec = layers.Flatten()(layers.Embedding(n_users, 8, embeddings_regularizer=keras.regularizers.l2(1e-5))(user_in))
    item_vec = layers.Flatten()(layers.Embedding(n_items, 8, embeddings_regularizer=keras.regularizers.l2(1e-5))(item_in))
    user_bias = layers.Flatten()(layers.Embedding(n_users, 1)(user_in))
    item_bias = layers.Flatten()(layers.Embedding(n_items, 1)(item_in))
    dot = layers.Dot(axes=1)([user_vec, item_vec])
    h = layers.Add()([dot, user_bias, item_bias])
    output = layers.Activation("sigmoid")(h)
    model = keras.Model([user_in, item_in], output)
    return Task(model, take_dict(x, 0, 1024), rating[:1024], take_dict(x, 1024, n), rating[1024:], "mse", "mse",
                epochs=10, lr=1e-2)


def regression():
    """A regression head: Dense layers on 8 features, one linear unit, mse."""
    rng = np.random.default_rng(12)
    n = 1024
    x = rng.uniform(-1, 1, (n, 8)).astype("float32")
    y = (np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.5 * x[:, 3] + 0.05 * rng.normal(size=n)).astype("float32")
    model = keras.Sequential([
        keras.Input((8,)),
        layers.Dense(32, activation="relu"),
        layers.Dense(16, activation="relu"),
        layers.Dense(1),
    ])
    return Task(model, x[:768], y[:768], x[768:], y[768:], "mse", "mse", epochs=10)


def multi_output():
    """A conv trunk with two heads: the digit (10 logits) and the ink (a regression of the mean
    pixel value), trained with one loss per output."""
    x, y, xt, yt = _digits()
    mean, std = x.mean(axis=(1, 2, 3)).mean(), x.mean(axis=(1, 2, 3)).std()
    ink = lambda a: ((a.mean(axis=(1, 2, 3)) - mean) / std).astype("float32")  # noqa: E731
    inputs = keras.Input((8, 8, 1), name="image")
    h = layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    h = layers.MaxPooling2D()(h)
    h = layers.Conv2D(16, 3, padding="same", activation="relu")(h)
    h = layers.Flatten()(h)
    h = layers.Dense(32, activation="relu")(h)
    digit = layers.Dense(10, name="digit")(h)
    ink_out = layers.Dense(1, name="ink")(h)
    model = keras.Model(inputs, [digit, ink_out])
    return Task(model, x, [y, ink(x)], xt, [yt, ink(xt)],
                [keras.losses.SparseCategoricalCrossentropy(from_logits=True), "mse"], ["accuracy", "mse"], epochs=6)


def subclassed_model():
    """A subclassed keras.Model whose call composes its layers."""
    x, y, xt, yt = _digits()
    model = DigitsNet()
    model(x[:1])
    return Task(model, x, y, xt, yt, keras.losses.SparseCategoricalCrossentropy(from_logits=True), "accuracy",
                epochs=6)


def depthwise_mobile():
    """A MobileNet-style stack: Conv2D, DepthwiseConv2D + BN + ReLU6, pointwise Conv2D, Dropout
    (keras.applications' building blocks at toy width)."""
    x, y, xt, yt = _digits()
    inputs = keras.Input((8, 8, 1))
    h = layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    h = layers.BatchNormalization(momentum=0.9)(h)
    h = layers.ReLU(6.0)(h)
    for filters, stride in [(16, 1), (32, 2)]:
        h = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(h)
        h = layers.BatchNormalization(momentum=0.9)(h)
        h = layers.ReLU(6.0)(h)
        h = layers.Conv2D(filters, 1, use_bias=False)(h)
        h = layers.BatchNormalization(momentum=0.9)(h)
        h = layers.ReLU(6.0)(h)
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.Dropout(0.2)(h)
    outputs = layers.Dense(10)(h)
    model = keras.Model(inputs, outputs)
    return Task(model, x, y, xt, yt, keras.losses.SparseCategoricalCrossentropy(from_logits=True), "accuracy",
                epochs=8)


GALLERY: dict[str, Callable[[], Task]] = {
    "text_transformer": text_transformer,
    "bilstm_text": bilstm_text,
    "lstm_text": lstm_text,
    "gru_text": gru_text,
    "fcn_mnist1d": fcn_mnist1d,
    "timeseries_transformer": timeseries_transformer,
    "stacked_lstm": stacked_lstm,
    "conv1d_variable_length": conv1d_variable_length,
    "mnist_convnet": mnist_convnet,
    "xception_small": xception_small,
    "kws_cnn": kws_cnn,
    "conv_autoencoder": conv_autoencoder,
    "unet_small": unet_small,
    "siamese": siamese,
    "vae_encoder": vae_encoder,
    "vit_small": vit_small,
    "mlp_mixer": mlp_mixer,
    "convmixer": convmixer,
    "tabular": tabular,
    "recommender": recommender,
    "regression": regression,
    "multi_output": multi_output,
    "subclassed_model": subclassed_model,
    "depthwise_mobile": depthwise_mobile,
}


# ---------------------------------------------------------------------------------------------
# the roads to a file


def score(kind: str, y, pred) -> float:
    """``kind`` of ``pred`` against ``y``: higher is better for accuracies, lower for mse."""
    y, pred = np.asarray(y), np.asarray(pred, dtype=np.float64)
    if kind == "accuracy":
        return float((pred.argmax(-1) == y.reshape(pred.shape[:-1])).mean())
    if kind == "binary_accuracy":
        return float(((pred.reshape(y.shape) > 0.5) == (y > 0.5)).mean())
    if kind == "mse":
        return float(((pred.reshape(y.shape) - y) ** 2).mean())
    raise ValueError(kind)


def baseline(kind: str, y_train, y_test) -> float:
    """What a model that learnt nothing scores: the majority class, or the training mean."""
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if kind in ("accuracy", "binary_accuracy"):
        values, counts = np.unique(y_train.round() if kind == "binary_accuracy" else y_train, return_counts=True)
        return float((y_test == values[counts.argmax()]).mean())
    return float(((y_test - y_train.mean()) ** 2).mean())


def higher_is_better(kind: str) -> bool:
    return kind != "mse"


def _compile(model, task: Task, lr: float) -> None:
    model.compile(keras.optimizers.Adam(lr), loss=task.loss)


def train_float(task: Task) -> Task:
    _compile(task.model, task, task.lr)
    task.model.fit(task.x_train, task.y_train, epochs=task.epochs, batch_size=task.batch_size, verbose=0)
    return task


def predict(model, x) -> list:
    out = model.predict(x, batch_size=256, verbose=0)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def scores(task: Task, outputs: list) -> list:
    return [score(kind, y, out) for kind, y, out in zip(task.metrics, task.targets_test, outputs)]


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def run_file(data: bytes, x) -> list:
    from keras_qx._runtime import run

    return run(bytes(data), x).outputs


def run_keras_qx(task: Task, calib: int = 64, qat_epochs: int = 1, result: dict | None = None) -> dict:
    """The float model (trained) -> qx.quantize (default policy) -> calibrate -> QAT -> export
    (verified) -> the file scored on the test set. Raises at the first step that fails;
    ``result`` (filled in place when given) names the step reached in ``"stage"``."""
    import keras_qx as qx

    result = {} if result is None else result
    result["float"] = scores(task, predict(task.model, task.x_test))
    result["stage"] = "quantize"
    qat = qx.quantize(task.model)
    result["stage"] = "calibrate"
    qx.calibrate(qat, take(task.x_train, calib))
    result["stage"] = "QAT fit"
    _compile(qat, task, task.lr * 0.3)
    qat.fit(task.x_train, task.y_train, epochs=qat_epochs, batch_size=task.batch_size, verbose=0)
    result["qat"] = scores(task, predict(qat, task.x_test))
    result["stage"] = "export"
    tfl = qx.export_tflite(qat, take(task.x_train, calib))
    result["report"] = tfl.report
    result["bytes"] = len(bytes(tfl))
    result["mean_steps"] = tfl.report.mean_error_steps
    result["max_steps"] = tfl.report.max_error_steps
    result["stage"] = "run file"
    result["file"] = scores(task, run_file(bytes(tfl), task.x_test))
    result["stage"] = "done"
    return result


def run_tfmot(task: Task, calib: int = 64, qat_epochs: int = 1, result: dict | None = None) -> dict:
    """The same road through tfmot's ``quantize_model`` and the TFLite converter as a tfmot user
    takes it (from_keras_model, Optimize.DEFAULT, a representative dataset; float I/O)."""
    import warnings

    from keras_qx._compat import tfmot

    result = {} if result is None else result
    result["stage"] = "quantize_model"
    qat = tfmot.quantization.keras.quantize_model(task.model)
    result["stage"] = "QAT fit"
    _compile(qat, task, task.lr * 0.3)
    qat.fit(task.x_train, task.y_train, epochs=qat_epochs, batch_size=task.batch_size, verbose=0)
    rep = take(task.x_train, calib)
    names = [t.name.split(":")[0] for t in task.model.inputs]
    arrays = [rep[n] for n in names] if isinstance(rep, dict) else [rep]

    def representative():
        for i in range(len(arrays[0])):
            yield [a[i:i + 1] for a in arrays]

    result["stage"] = "convert"
    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = converter.convert()
    result["bytes"] = len(data)
    result["stage"] = "run file"
    outputs = run_file(data, task.x_test)
    # the converter may list a multi-output model's outputs in another order: match them by shape
    ordered = []
    for shape in [tuple(o.shape[1:]) for o in task.model.outputs]:
        j = next(k for k, o in enumerate(outputs) if tuple(o.shape[1:]) == shape)
        ordered.append(outputs.pop(j))
    result["file"] = scores(task, ordered)
    result["stage"] = "done"
    return result
