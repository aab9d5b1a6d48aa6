"""Mixed-precision QAT on the digits data, from model definition to a verified int8/int4 TFLite file.

Run: python examples/mixed_precision_digits.py
"""
import tf_keras as keras

import keras_qx as qx
from keras_qx.data import load_digits

(x_train, y_train), (x_test, y_test) = load_digits()

# 1. Bits can be written where a layer is defined...
inputs = keras.Input((8, 8, 1))
x = keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv1")(inputs)
x = keras.layers.BatchNormalization()(x)
x = keras.layers.ReLU()(x)
x = qx.annotate(keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2"), weight_bits=4)(x)
x = keras.layers.MaxPooling2D(2)(x)
x = keras.layers.Flatten()(x)
x = keras.layers.Dense(128, activation="relu", name="fc1")(x)
model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(x))
model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
model.fit(x_train, y_train, epochs=15, batch_size=64, verbose=0)

# 2. ...or in a policy: plain data, saved as JSON next to the model.
policy = qx.Policy.from_dict({
    "default": {"weight_bits": 8, "activation_bits": 8},
    "rules": [{"type": "Dense", "weight_bits": 4}],
    "layers": {"logits": {"weight_bits": 8}},
})

# 3. Quantization-aware training is a plain fit.
qat = qx.quantize(model, policy)
qat.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"])
qat.fit(x_train, y_train, epochs=3, batch_size=64, verbose=0)
qx.summary(qat)

# 4. Export (int8 I/O, 4-bit kernels packed as INT4), verified against the Keras model.
tflite = qx.export_tflite(qat, x_train[:300], "digits_mixed.tflite", verbose=1)
print(qx.evaluate_tflite(tflite, x_test, y_test))
