"""Deep compression on the digits CNN: prune, cluster, quantize (mixed precision), export, and
compare every road in the TFLite runtime (after Han et al.: pruning + trained quantization +
entropy coding, here gzip).

Run: python examples/deep_compression.py   (about 2 minutes on 2 cores)
"""
import tf_keras as keras

import keras_qx as qx
from keras_qx.data import digits_cnn, load_digits
from keras_qx.lite.convert import convert, converter_for

(x_train, y_train), (x_test, y_test) = load_digits()
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def compiled(model, lr):
    model.compile(keras.optimizers.Adam(lr), loss, metrics=["accuracy"])
    return model


# 1. The float model.
model = compiled(digits_cnn(), 1e-3)
model.fit(x_train, y_train, epochs=20, batch_size=64, verbose=0)

# 2. Prune: 90% of each kernel (95% of fc1, the big one; 50% of conv1, which sees the input).
steps = len(x_train) // 64 + 1
pruned = compiled(qx.prune(model, 0.9, layers={"fc1": {"sparsity": 0.95}, "conv1": {"sparsity": 0.5}},
                           schedule="polynomial", end_step=6 * steps, frequency=steps // 4), 1e-3)
pruned.fit(x_train, y_train, epochs=8, batch_size=64, verbose=0, callbacks=qx.pruning_callbacks())
sparse = qx.strip_pruning(pruned)

# 3. Cluster what is left: 16 distinct values per kernel, the zeros kept.
clustered = compiled(qx.cluster(sparse, 16, preserve_sparsity=True), 1e-4)
clustered.fit(x_train, y_train, epochs=4, batch_size=64, verbose=0)
shared = qx.strip_clustering(clustered)

# 4. Mixed-precision QAT that keeps both the zeros and the clusters.
policy = qx.auto_policy(shared, x_train, y_train, budget="0.6x", verbose=False)
qat = compiled(qx.quantize(shared, policy, preserve_sparsity=True, preserve_clusters=True), 1e-4)
qat.fit(x_train, y_train, epochs=4, batch_size=64, verbose=0)
qx.summary(qat)  # bits, sparsity and distinct values per layer
deep = qx.export_tflite(qat, x_train[:300], "digits_deep.tflite", verbose=1)

# 5. Every road side by side, measured in the runtime.
roads = {
    "float32": convert(converter_for(model))[0],
    "ptq dynamic": qx.ptq(model, "dynamic", x_train[:300]),
    "ptq int8": qx.ptq(model, "int8", x_train[:300]),
    "ptq float16": qx.ptq(model, "float16", x_train[:300]),
    "pruned + clustered + mixed QAT": deep,
}
comparison = qx.compare(roads, x_test, y_test, reference="float32", latency_runs=100)
print(comparison.table())
comparison.plot("deep_compression.png")
