"""Per-channel scale-and-shift layers that export as one integer op, as the QAT model simulates them.

A BatchNormalization that follows a Conv2D/DepthwiseConv2D/Dense is folded into that layer's
kernel by the converter. A standalone one (ResNetV2's and DenseNet's pre-activation BNs, after
an Add, a pooling or a Concatenate) is not: the converter lowers ``x * m + b`` to MUL then ADD,
quantizes the multiplier ``m`` per tensor (one scale for all channels, so channels with a small
gain lose most of their bits), rounds the product to int8 on a range of its own, and quantizes
the offset ``b`` to int8 as well. None of those three roundings is in the QAT simulation, which
fake-quantizes only the BN output (measured with ``keras_qx.lite.fidelity.compare_layers`` on the
small ResNetV2 of tests/families.py: the first preact BN is the first divergent layer, 128
steps max).

:class:`ScaleShiftBatchNormalization` trains exactly as ``BatchNormalization`` (batch
statistics, moving averages); at inference it computes the same ``x * m + b`` as a 1x1
depthwise convolution. The converter turns that into a DEPTHWISE_CONV_2D with per-channel int8
weights (one weight per channel: ``m`` is stored exactly, as +-127 times its own scale) and an
int32 bias, so the file rounds once, at the output, where the simulation does.

:class:`ScaleShiftNormalization` does the same for ``keras.layers.Normalization`` (the input
normalization of ResNetRS and other applications), which the converter lowers to SUB then MUL
with an int8 rounding of the difference in between (0.39 steps mean error at its output on
the small ResNetRS, which the stem convolutions then amplify).
"""
from __future__ import annotations

from keras_qx._compat import PACKAGE, keras, smart_cond, tf

__all__ = ["ScaleShiftBatchNormalization", "ScaleShiftNormalization", "scale_shift", "exports_as_scale_shift"]

@keras.utils.register_keras_serializable(package=PACKAGE)
class ScaleShiftBatchNormalization(keras.layers.BatchNormalization):
    """``BatchNormalization`` whose inference is a per-channel 1x1 depthwise convolution.

    Same config and weights as ``BatchNormalization``; only plain BNs (channels last, no renorm,
    no virtual batches, no adjustment) take the depthwise path, the others run as the base class.
    """

    def _plain(self) -> bool:
        axis = self.axis if isinstance(self.axis, (list, tuple)) else [self.axis]
        rank = self.input_spec.ndim if self.input_spec is not None and self.input_spec.ndim else None
        last = rank is not None and list(axis) == [rank - 1] or list(axis) == [-1]
        return bool(last and not self.renorm and not self.virtual_batch_size and self.adjustment is None)

    def call(self, inputs, training=None, mask=None):
        if not self._plain():
            return super().call(inputs, training=training, mask=mask)
        if training is None:
            training = keras.backend.learning_phase()
        if isinstance(training, int):
            training = bool(training)
        if training is False:
            return self._scale_shift(inputs)
        train = super().call
        if training is True:
            return train(inputs, training=True, mask=mask)
        return smart_cond(training, lambda: train(inputs, training=True, mask=mask),
                                            lambda: self._scale_shift(inputs))

    def _scale_shift(self, x):
        dtype = x.dtype
        m = tf.math.rsqrt(tf.cast(self.moving_variance, dtype) + tf.cast(self.epsilon, dtype))
        if self.scale:
            m = m * tf.cast(self.gamma, dtype)
        b = -tf.cast(self.moving_mean, dtype) * m
        if self.center:
            b = b + tf.cast(self.beta, dtype)
        return scale_shift(x, m, b)


@keras.utils.register_keras_serializable(package=PACKAGE)
class ScaleShiftNormalization(keras.layers.Normalization):
    """``Normalization`` computed as a per-channel 1x1 depthwise convolution (channels-last
    statistics only; others run as the base class)."""

    def call(self, inputs):
        shape = list(getattr(self, "_broadcast_shape", None) or [])
        if not shape or any(d != 1 for d in shape[:-1]) or inputs.shape.rank != len(shape):
            return super().call(inputs)
        x = tf.cast(inputs, self.compute_dtype)
        channels = int(shape[-1])
        mean = tf.reshape(self.mean, (channels,))
        std = tf.maximum(tf.sqrt(tf.reshape(self.variance, (channels,))), keras.backend.epsilon())
        if self.invert:
            return scale_shift(x, std, mean)
        return scale_shift(x, 1.0 / std, -mean / std)


def scale_shift(x, m, b):
    """``x * m + b`` per channel (last axis), as a 1x1 depthwise convolution plus bias: the
    converter makes it one DEPTHWISE_CONV_2D with per-channel int8 weights and an int32 bias.
    Ranks other than 4 go through a reshape to (batch, 1, -1, channels) and back."""
    channels = int(x.shape[-1])
    rank = x.shape.rank
    x4 = x if rank == 4 else tf.reshape(x, tf.stack([tf.shape(x)[0], 1, -1, channels]))
    y = tf.nn.depthwise_conv2d(x4, tf.reshape(m, (1, 1, channels, 1)), (1, 1, 1, 1), "VALID")
    y = tf.nn.bias_add(y, b)
    return y if rank == 4 else tf.reshape(y, tf.shape(x))


def exports_as_scale_shift(config: dict) -> bool:
    """Can a BatchNormalization or Normalization with this config take the depthwise path (one
    channel axis, no renorm, no virtual batches)? The axis is checked again when the layer runs."""
    bn_config = config
    axis = bn_config.get("axis", -1)
    axis = axis if isinstance(axis, (list, tuple)) else [axis]
    return len(axis) == 1 and not bn_config.get("renorm") and not bn_config.get("virtual_batch_size")
