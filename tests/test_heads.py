import numpy as np
import pytest
import keras

from contrastive_tf.method.heads import ProjectionHead

EPS = 1e-5


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_matches_numpy_at_initialisation(num_layers):
    # Fresh BN in inference mode is x / sqrt(1 + eps) (gamma 1, beta 0,
    # moving mean 0, moving variance 1), so the head is a plain MLP.
    head = ProjectionHead(num_layers=num_layers, output_dim=6, ft_layer=0)
    h = np.random.RandomState(0).normal(size=(4, 10)).astype("float32")
    z = head(h, training=False).numpy()
    x = h.astype(np.float64)
    for index, dense in enumerate(head._dense):
        x = x @ dense.kernel.numpy() / np.sqrt(1 + EPS)
        if index < num_layers - 1:
            x = np.maximum(x, 0)
    np.testing.assert_allclose(z, x, rtol=1e-4, atol=1e-5)


def test_layout_follows_the_spec():
    head = ProjectionHead(num_layers=3, output_dim=128)
    head.build((None, 512))
    assert [d.units for d in head._dense] == [512, 512, 128]
    assert not any(d.use_bias for d in head._dense)
    assert [n.center for n in head._norms] == [True, True, False]
    assert all(n.momentum == 0.9 and n.epsilon == 1e-5 for n in head._norms)


@pytest.mark.parametrize("ft_layer, width", [(0, 12), (1, 12), (2, 12)])
def test_finetune_features_come_from_the_chosen_layer(ft_layer, width):
    head = ProjectionHead(num_layers=3, output_dim=5, ft_layer=ft_layer)
    h = np.random.RandomState(1).normal(size=(3, width)).astype("float32")
    outputs = head.hidden_outputs(h, training=False)
    assert len(outputs) == 4
    np.testing.assert_allclose(head.finetune_features(h, training=False),
                               outputs[ft_layer], atol=1e-6)


def test_hidden_dim_overrides_width():
    head = ProjectionHead(num_layers=2, output_dim=8, hidden_dim=32)
    assert head(np.zeros((2, 16), "float32")).shape == (2, 8)
    assert head._dense[0].units == 32


def test_serialisation_round_trip():
    head = ProjectionHead(num_layers=2, output_dim=7, ft_layer=1, hidden_dim=9)
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(head))
    assert restored.get_config() == head.get_config()


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_layers=0), "num_layers"),
    (dict(output_dim=0), "output_dim"),
    (dict(num_layers=2, ft_layer=2), "ft_layer"),
])
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProjectionHead(**kwargs)
