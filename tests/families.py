"""One small variant of every tf_keras.applications family, built offline (``weights=None``)
by the family's own builder with reduced depth/width, so that the whole set runs in CI.
The named variants (ResNet50, DenseNet121...) are measured by ``bench/coverage.py``."""
from __future__ import annotations

from keras_qx._compat import keras

_apps = keras.applications


def _resnet(v2: bool):
    from tf_keras.src.applications import resnet

    stack = resnet.stack2 if v2 else resnet.stack1

    def stack_fn(x):
        # stack2 needs 2+ blocks (its first and last block would share a name)
        x = stack(x, 8, 2, name="conv2") if v2 else stack(x, 8, 1, stride1=1, name="conv2")
        x = stack(x, 16, 2, name="conv3")
        return stack(x, 32, 2, stride1=1, name="conv4") if v2 else stack(x, 32, 1, name="conv4")

    return resnet.ResNet(stack_fn, v2, True, "resnet_tiny", True, None, None, (32, 32, 3), None, 10)


def _inception_resnet():
    """Stem, one block of each Inception-ResNet kind (35, 17, 8; CustomScaleLayer residuals),
    head: the full model is 780 layers and takes minutes to quantize here."""
    from tf_keras.src.applications import inception_resnet_v2 as irv2
    from tf_keras.src.applications.inception_resnet_v2 import conv2d_bn, inception_resnet_block
    from tf_keras.src.layers import VersionAwareLayers

    if irv2.layers is None:  # the module's layer namespace, set by InceptionResNetV2() itself
        irv2.layers = VersionAwareLayers()
    inputs = keras.Input((32, 32, 3))
    x = conv2d_bn(inputs, 32, 3, strides=2)
    x = inception_resnet_block(x, scale=0.17, block_type="block35", block_idx=1)
    x = keras.layers.MaxPooling2D(2)(x)
    x = inception_resnet_block(x, scale=0.1, block_type="block17", block_idx=1)
    x = keras.layers.MaxPooling2D(2)(x)
    x = inception_resnet_block(x, scale=1.0, activation=None, block_type="block8", block_idx=1)
    x = keras.layers.GlobalAveragePooling2D()(conv2d_bn(x, 64, 1, name="conv_7b"))
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="predictions")(x))


def _builders():
    from tf_keras.src.applications import (convnext, densenet, efficientnet, efficientnet_v2, nasnet, regnet,
                                           resnet_rs)

    small = dict(weights=None, classes=10)
    s32 = dict(input_shape=(32, 32, 3), **small)
    return {
        "ConvNeXt": lambda: convnext.ConvNeXt(depths=[1, 1, 1, 1], projection_dims=[16, 16, 32, 32],
                                              default_size=32, model_name="convnext_tiny_test", **s32),
        "DenseNet": lambda: densenet.DenseNet([1, 2, 1, 1], **s32),
        "EfficientNet": lambda: efficientnet.EfficientNet(0.25, 0.1, 32, model_name="efficientnet_tiny", **s32),
        "EfficientNetV2": lambda: efficientnet_v2.EfficientNetV2(0.25, 0.1, 32, model_name="efficientnetv2-b0",
                                                                 **s32),
        "InceptionResNetV2": _inception_resnet,
        "InceptionV3": lambda: _apps.InceptionV3(input_shape=(75, 75, 3), **small),
        "MobileNet": lambda: _apps.MobileNet(alpha=0.25, **s32),
        "MobileNetV2": lambda: _apps.MobileNetV2(alpha=0.35, **s32),
        "MobileNetV3": lambda: _apps.MobileNetV3Small(alpha=0.75, **s32),
        "NASNet": lambda: nasnet.NASNet(penultimate_filters=96, num_blocks=1, stem_block_filters=8,
                                        default_size=32, **s32),
        "RegNet": lambda: regnet.RegNet([1, 1, 1, 1], [8, 16, 32, 64], 8, "X", 32, model_name="regnet_tiny",
                                        **s32),
        "ResNet": lambda: _resnet(False),
        "ResNetRS": lambda: resnet_rs.ResNetRS(depth=50, block_args=[{"input_filters": 8, "num_repeats": 1},
                                                                     {"input_filters": 16, "num_repeats": 1},
                                                                     {"input_filters": 32, "num_repeats": 1},
                                                                     {"input_filters": 32, "num_repeats": 1}],
                                               model_name="resnet_rs_tiny", **s32),
        "ResNetV2": lambda: _resnet(True),
        "VGG": lambda: _apps.VGG16(**s32),
        "Xception": lambda: _apps.Xception(input_shape=(71, 71, 3), **small),
    }


FAMILIES = sorted(_builders())


def build(family: str):
    return _builders()[family]()


def calibrate(qat, x, steps: int = 3, seed: int = 1):
    """A few SGD steps on random labels: sets activation ranges and BatchNorm statistics.
    A single forward pass is not enough for untrained networks: activation ranges barely move
    from tfmot's start, and zero-variance BatchNorm channels (gain 1/sqrt(eps)) then amplify
    one-step rounding differences by 100x (bench/coverage.py explains)."""
    import numpy as np

    y = np.random.default_rng(seed).integers(0, qat.output_shape[-1], len(x))
    qat.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy())
    qat.fit(x, y, epochs=steps, batch_size=len(x), verbose=0)
