"""A standalone BatchNormalization that exports as one integer op, as the QAT model simulates it.

A BatchNormalization that follows a Conv2D/DepthwiseConv2D/Dense is folded into that layer's
kernel by the converter. A standalone one (ResNetV2's and DenseNet's pre-activation BNs, after
an Add, a pooling or a Concatenate) is not: the converter lowers ``x * m + b`` to MUL then ADD,
quantizes the multiplier ``m`` per tensor (one scale for all channels, so channels with a small
gain lose most of their bits), rounds the product to int8 on a range of its own, and quantizes
the offset ``b`` to int8 as well. None of those three roundings is in the QAT simulation, which
fake-quantizes only the BN output (measured with ``keras_qx.fidelity.compare_layers`` on the
small ResNetV2 of tests/families.py: the first preact BN is the first divergent layer, 128
steps max).

:class:`ScaleShiftBatchNormalization` trains exactly as ``BatchNormalization`` (batch
statistics, moving averages); at inference it computes the same ``x * m + b`` as a 1x1
depthwise convolution. The converter turns that into a DEPTHWISE_CONV_2D with per-channel int8
weights (one weight per channel: ``m`` is stored exactly, as +-127 times its own scale) and an
int32 bias, so the file rounds once, at the output, where the simulation does.
"""
from __future__ import annotations

from keras_qx._compat import PACKAGE, keras, tf

__all__ = ["ScaleShiftBatchNormalization", "exports_as_scale_shift"]

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
        from tf_keras.src.utils import control_flow_util

        return control_flow_util.smart_cond(training, lambda: train(inputs, training=True, mask=mask),
                                            lambda: self._scale_shift(inputs))

    def _scale_shift(self, x):
        channels = int(x.shape[-1])
        dtype = x.dtype
        m = tf.math.rsqrt(tf.cast(self.moving_variance, dtype) + tf.cast(self.epsilon, dtype))
        if self.scale:
            m = m * tf.cast(self.gamma, dtype)
        b = -tf.cast(self.moving_mean, dtype) * m
        if self.center:
            b = b + tf.cast(self.beta, dtype)
        rank = x.shape.rank
        x4 = x if rank == 4 else tf.reshape(x, tf.stack([tf.shape(x)[0], 1, -1, channels]))
        y = tf.nn.depthwise_conv2d(x4, tf.reshape(m, (1, 1, channels, 1)), (1, 1, 1, 1), "VALID")
        y = tf.nn.bias_add(y, b)
        return y if rank == 4 else tf.reshape(y, tf.shape(x))


def exports_as_scale_shift(bn_config: dict) -> bool:
    """Can a BatchNormalization with this config take the depthwise path (one channel axis, no
    renorm, no virtual batches)? The channel axis is checked again when the layer runs."""
    axis = bn_config.get("axis", -1)
    axis = axis if isinstance(axis, (list, tuple)) else [axis]
    return len(axis) == 1 and not bn_config.get("renorm") and not bn_config.get("virtual_batch_size")
