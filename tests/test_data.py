"""The embedded tasks: MNIST-1D generated offline, the caller's random state untouched."""
import numpy as np

from keras_qx.data import load_mnist1d, mnist1d_cnn, mnist1d_lstm


def test_mnist1d_is_generated_offline_and_leaves_numpy_alone():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    (x, y), (xt, yt) = load_mnist1d()
    assert np.array_equal(np.random.get_state()[1], before)  # make_dataset reseeds; we put it back
    assert x.shape == (4000, 40, 1) and xt.shape == (1000, 40, 1) and x.dtype == np.float32
    assert set(np.unique(y)) == set(range(10)) and len(yt) == 1000
    (x2, _), _ = load_mnist1d()
    assert np.array_equal(x, x2)  # the same seed, the same data
    (x3, _), _ = load_mnist1d(seed=7)
    assert not np.array_equal(x, x3)


def test_mnist1d_models_take_the_signals():
    for build in (mnist1d_cnn, mnist1d_lstm):
        model = build()
        assert model.input_shape == (None, 40, 1) and model.output_shape == (None, 10)
        assert np.array_equal(build().get_weights()[0], model.get_weights()[0])  # seeded
