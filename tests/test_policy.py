"""Policy (data, validation, precedence) and qx.annotate."""
import json

import pytest

from keras_qx import LayerSpec, Policy, PolicyError, annotate
from keras_qx._compat import keras, quantize_annotate
from keras_qx.qat.annotate import annotation_fields
from keras_qx.quant.configs import ActivationQuantizeConfig, KernelQuantizeConfig, NoOpQuantizeConfig, OutputQuantizeConfig

L = keras.layers

FULL = {
    "default": {"weight_bits": 8, "activation_bits": 8},
    "rules": [
        {"type": "Conv2D", "weight_bits": 4},
        {"match": "head_.*", "activation_bits": 16, "quantize": True},
        {"type": "Dense", "match": "dense_[0-9]+", "weight_bits": 2},
    ],
    "layers": {"logits": {"weight_bits": 8, "activation_bits": 8}, "stem": {"quantize": False}},
    "meta": {"note": "hand written", "scores": [1.5, 2.0]},
}


# ---- construction and round trips -----------------------------------------------------------
def test_uniform():
    p = Policy.uniform(4, 16)
    assert p.default == {"weight_bits": 4, "activation_bits": 16}
    assert p.rules == [] and p.layers == {}
    spec = p.spec_for(L.Dense(2, name="d"))
    assert spec == LayerSpec(weight_bits=4, activation_bits=16, quantize=True, source="default")
    assert Policy.uniform() == Policy()
    assert Policy.uniform(4) != Policy.uniform(8)


def test_dict_and_json_round_trips():
    p = Policy.from_dict(FULL)
    assert p.to_dict() == FULL
    assert Policy.from_dict(p.to_dict()) == p
    text = p.to_json()
    assert json.loads(text) == FULL
    assert Policy.from_json(text) == p
    assert Policy.from_json(p.to_json(indent=None)) == p
    assert Policy.coerce(text) == p and Policy.coerce(FULL) == p and Policy.coerce(p) is p
    assert Policy.coerce(None) == Policy.uniform()


def test_from_dict_fills_default_and_does_not_alias_input():
    data = {"default": {"weight_bits": 4}, "rules": [{"type": "Dense", "weight_bits": 2}]}
    p = Policy.from_dict(data)
    assert p.default == {"weight_bits": 4, "activation_bits": 8}
    assert p.to_dict() == {"default": {"weight_bits": 4, "activation_bits": 8},
                           "rules": [{"type": "Dense", "weight_bits": 2}], "layers": {}}
    p.rules[0]["weight_bits"] = 3
    assert data["rules"][0]["weight_bits"] == 2  # deep-copied
    assert "meta" not in Policy.uniform().to_dict()


def test_equality_sees_every_part():
    p = Policy.from_dict(FULL)
    for key, value in [("default", {"weight_bits": 4}), ("rules", []), ("layers", {}), ("meta", {})]:
        assert Policy.from_dict({**FULL, key: value}) != p
    assert p != FULL  # a dict is not a Policy


# ---- resolution -----------------------------------------------------------------------
def _built(layer, shape):
    layer.build(shape)
    return layer


def test_precedence_default_rules_annotation_layers():
    layer = _built(L.Dense(3, name="dense_1"), (None, 4))
    p = Policy.from_dict({"default": {"weight_bits": 8, "activation_bits": 8}})
    assert p.spec_for(layer) == LayerSpec(8, 8, True, "default")

    rules = [{"type": "Dense", "weight_bits": 4}, {"match": "dense_1", "weight_bits": 3, "activation_bits": 16}]
    p = Policy.from_dict({"rules": rules[:1]})
    assert p.spec_for(layer) == LayerSpec(4, 8, True, "rule 0")
    p = Policy.from_dict({"rules": rules})
    assert p.spec_for(layer) == LayerSpec(3, 16, True, "rule 1")  # later rules win
    p = Policy.from_dict({"rules": rules[::-1]})
    assert p.spec_for(layer) == LayerSpec(4, 16, True, "rule 1")  # ...field by field

    assert p.spec_for(layer, {"weight_bits": 6}) == LayerSpec(6, 16, True, "annotation")
    p = Policy.from_dict({"rules": rules, "layers": {"dense_1": {"activation_bits": 12}}})
    # layers wins over the annotation for the fields it sets; the rest keep their source values.
    assert p.spec_for(layer, {"weight_bits": 6}) == LayerSpec(6, 12, True, "layers")
    p = Policy.from_dict({"rules": rules, "layers": {"dense_1": {"weight_bits": 2}}})
    assert p.spec_for(layer, {"weight_bits": 6}) == LayerSpec(2, 16, True, "layers")
    # quantize=False from an annotation, and re-enabled by layers.
    assert p.spec_for(layer, {"quantize": False}).quantize is False
    p = Policy.from_dict({"layers": {"dense_1": {"quantize": True}}})
    assert p.spec_for(layer, {"quantize": False}) == LayerSpec(8, 8, True, "layers")
    # A rule that does not match leaves the default.
    other = _built(L.Dense(3, name="other"), (None, 4))
    p = Policy.from_dict({"rules": [rules[1]], "layers": {"dense_1": {"weight_bits": 2}}})
    assert p.spec_for(other) == LayerSpec(8, 8, True, "default")


def test_rule_type_matches_subclasses():
    transpose = _built(L.Conv2DTranspose(2, 3, name="up"), (None, 4, 4, 3))
    conv = _built(L.Conv2D(2, 3, name="c"), (None, 6, 6, 3))
    dense = _built(L.Dense(2, name="d"), (None, 3))
    p = Policy.from_dict({"rules": [{"type": "Conv2D", "weight_bits": 4}]})
    assert p.spec_for(conv).source == "rule 0"
    assert p.spec_for(transpose) == LayerSpec(4, 8, True, "rule 0")  # a Conv2D subclass
    assert p.spec_for(dense).source == "default"
    # Base classes further up count too.
    p = Policy.from_dict({"rules": [{"type": "Layer", "activation_bits": 16}, {"type": "Conv", "weight_bits": 2}]})
    depthwise = _built(L.DepthwiseConv2D(3, name="dw"), (None, 6, 6, 3))
    assert p.spec_for(depthwise) == LayerSpec(2, 16, True, "rule 1")
    assert p.spec_for(dense) == LayerSpec(8, 16, True, "rule 0")


def test_type_rules_follow_the_class_hierarchy_as_documented():
    """policy.py: "Conv" covers every convolution; "Conv2D" does not cover DepthwiseConv2D
    (tf_keras derives it from DepthwiseConv -> Conv)."""
    depthwise = _built(L.DepthwiseConv2D(3, name="dw"), (None, 6, 6, 3))
    conv2d_rule = Policy.from_dict({"rules": [{"type": "Conv2D", "weight_bits": 4}]})
    assert conv2d_rule.spec_for(depthwise).source == "default"
    conv_rule = Policy.from_dict({"rules": [{"type": "Conv", "weight_bits": 4}]})
    assert conv_rule.spec_for(depthwise) == LayerSpec(4, 8, True, "rule 0")


def test_match_is_a_full_match():
    p = Policy.from_dict({"rules": [{"match": "dense_[0-9]+", "weight_bits": 4}]})
    hit = _built(L.Dense(2, name="dense_1"), (None, 3))
    assert p.spec_for(hit).source == "rule 0"
    for name in ("my_dense_1x", "my_dense_1", "dense_1x", "dense_"):
        layer = _built(L.Dense(2, name=name), (None, 3))
        assert p.spec_for(layer).source == "default", name


def test_type_and_match_must_both_hold():
    p = Policy.from_dict({"rules": [{"type": "Dense", "match": "head.*", "weight_bits": 4}]})
    assert p.spec_for(_built(L.Dense(2, name="head_a"), (None, 3))).source == "rule 0"
    assert p.spec_for(_built(L.Dense(2, name="body"), (None, 3))).source == "default"
    assert p.spec_for(_built(L.Conv2D(2, 1, name="head_c"), (None, 3, 3, 1))).source == "default"


def test_check_against_accepts_a_fitting_policy():
    layers = [_built(L.Dense(2, name="logits"), (None, 3)), _built(L.Conv2D(2, 1, name="stem"), (None, 3, 3, 1))]
    Policy.from_dict(FULL).check_against(layers)
    Policy.from_dict({"rules": [{"type": "BatchNormalization", "weight_bits": 4}]}).check_against(layers)


def test_check_against_missing_layer_lists_close_names():
    layers = [_built(L.Dense(2, name=n), (None, 3)) for n in ("dense_1", "dense_2", "logits")]
    p = Policy.from_dict({"layers": {"dense_3": {"weight_bits": 4}}})
    with pytest.raises(PolicyError) as info:
        p.check_against(layers)
    msg = str(info.value)
    assert "dense_3" in msg and "dense_1" in msg and "dense_2" in msg


def test_check_against_unknown_type():
    layers = [_built(L.Dense(2, name="d"), (None, 3))]
    p = Policy.from_dict({"rules": [{"type": "Dense2D", "weight_bits": 4}]})
    with pytest.raises(PolicyError) as info:
        p.check_against(layers)
    assert "Dense2D" in str(info.value) and "rule 0" in str(info.value)


# ---- validation errors ------------------------------------------------------------------
@pytest.mark.parametrize(
    "data,text",
    [
        ({"defaults": {}}, "defaults"),
        ({"rules": [{"type": "Dense", "bits": 4}]}, "bits"),
        ({"rules": [{"weight_bits": 4}]}, "rule 0"),
        ({"rules": [{"match": "dense_[0-9"}]}, "dense_[0-9"),
        ({"rules": [{"match": 5, "weight_bits": 4}]}, "5"),
        ({"rules": [{"type": 3, "weight_bits": 4}]}, "type"),
        ({"rules": "Dense"}, "str"),
        ({"rules": ["Dense"]}, "'Dense'"),
        ({"layers": ["d"]}, "list"),
        ({"layers": {"d": 4}}, "'d'"),
        ({"layers": {"d": {"bits": 4}}}, "bits"),
        ({"meta": 3}, "meta"),
        ({"default": {"weight_bits": 1}}, "1"),
        ({"default": {"weight_bits": 9}}, "9"),
        ({"default": {"weight_bits": "4"}}, "'4'"),
        ({"default": {"weight_bits": 4.5}}, "4.5"),
        ({"default": {"weight_bits": True}}, "True"),
        ({"rules": [{"type": "Dense", "weight_bits": 9}]}, "9"),
        ({"layers": {"d": {"weight_bits": 1}}}, "1"),
        ({"default": {"activation_bits": 17}}, "17"),
        ({"layers": {"d": {"activation_bits": 17}}}, "17"),
        ({"default": {"quantize": "yes"}}, "'yes'"),
        ({"rules": [{"type": "Dense", "quantize": 1}]}, "1"),
    ],
)
def test_policy_errors_name_the_offender(data, text):
    with pytest.raises(PolicyError) as info:
        Policy.from_dict(data)
    assert text in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("data,where", [({"rules": [{"type": "Dense", "weight_bits": 9}]}, "rule 0"),
                                        ({"layers": {"fc": {"weight_bits": 9}}}, "fc"),
                                        ({"default": {"weight_bits": 9}}, "default")])
def test_policy_errors_say_where(data, where):
    with pytest.raises(PolicyError, match=where):
        Policy.from_dict(data)


@pytest.mark.parametrize("value", [[1, 2], "text", 3, None])
def test_non_dict_policy(value):
    with pytest.raises(PolicyError) as info:
        Policy.from_dict(value)
    assert type(value).__name__ in str(info.value)


def test_coerce_rejects_other_types():
    with pytest.raises(PolicyError, match="int"):
        Policy.coerce(3)


@pytest.mark.parametrize("text", ["{bad json", "", '{"default": }'])
def test_invalid_json(text):
    with pytest.raises(PolicyError, match="JSON"):
        Policy.from_json(text)


def test_json_of_a_list_is_not_a_policy():
    with pytest.raises(PolicyError, match="list"):
        Policy.from_json("[1, 2]")


def test_non_dict_default_is_a_policy_error():
    # from_dict merges "default" with ``{**...}`` before validating it, so a non-dict default
    # currently escapes as a bare TypeError ("'list' object is not a mapping").
    with pytest.raises(PolicyError, match=r"\[4\]"):
        Policy.from_dict({"default": [4]})


# ---- annotate ---------------------------------------------------------------------------
def test_annotate_dense_stores_bits_and_pins_fields():
    wrapped = annotate(L.Dense(4, name="fc"), weight_bits=4)
    assert isinstance(wrapped, quantize_annotate.QuantizeAnnotate)
    cfg = wrapped.quantize_config
    assert isinstance(cfg, KernelQuantizeConfig)
    assert (cfg.weight_bits, cfg.activation_bits) == (4, 8)
    assert cfg.pinned == ["weight_bits"]
    assert cfg.weight_attrs == ["kernel"]
    assert annotation_fields(cfg) == {"weight_bits": 4}

    both = annotate(L.Conv2D(2, 3), weight_bits=2, activation_bits=16).quantize_config
    assert sorted(both.pinned) == ["activation_bits", "weight_bits"]
    assert annotation_fields(both) == {"weight_bits": 2, "activation_bits": 16}
    assert both.weight_quantizer.per_channel is True

    none = annotate(L.Dense(2)).quantize_config
    assert none.pinned == [] and annotation_fields(none) == {}


def test_annotate_kernel_layouts():
    dw = annotate(L.DepthwiseConv2D(3), weight_bits=4).quantize_config
    assert dw.weight_attrs == ["depthwise_kernel"]
    tr = annotate(L.Conv2DTranspose(2, 3), weight_bits=4).quantize_config
    assert tr.weight_quantizer.channel_axis == -2


def test_annotate_output_and_activation_layers():
    relu = annotate(L.ReLU(), activation_bits=16).quantize_config
    assert type(relu) is OutputQuantizeConfig and relu.activation_bits == 16
    assert annotation_fields(relu) == {"activation_bits": 16}
    act = annotate(L.Activation("relu")).quantize_config
    assert type(act) is ActivationQuantizeConfig and act.pinned == []
    off = annotate(L.Dense(2), quantize=False).quantize_config
    assert type(off) is NoOpQuantizeConfig
    assert annotation_fields(off) == {"quantize": False}


def test_annotation_fields_drive_policy_resolution():
    layer = _built(L.Dense(3, name="fc"), (None, 2))
    cfg = annotate(L.Dense(3), activation_bits=16).quantize_config
    p = Policy.from_dict({"rules": [{"type": "Dense", "weight_bits": 4, "activation_bits": 4}]})
    assert p.spec_for(layer, annotation_fields(cfg)) == LayerSpec(4, 16, True, "annotation")


def test_annotation_config_round_trips():
    cfg = annotate(L.Dense(2), weight_bits=3).quantize_config
    back = keras.utils.deserialize_keras_object(keras.utils.serialize_keras_object(cfg))
    assert back == cfg and back.pinned == ["weight_bits"] and annotation_fields(back) == {"weight_bits": 3}


@pytest.mark.parametrize("thing", ["dense", object(), None, L], ids=["str", "object", "None", "module"])
def test_annotate_rejects_non_layers(thing):
    with pytest.raises(TypeError, match="tf_keras layer"):
        annotate(thing, weight_bits=4)


def test_annotate_weight_bits_on_layer_without_kernels():
    with pytest.raises(ValueError) as info:
        annotate(L.ReLU(name="act1"), weight_bits=4)
    assert "act1" in str(info.value) and "ReLU" in str(info.value)


def test_annotate_twice():
    once = annotate(L.Dense(2, name="fc"), weight_bits=4)
    with pytest.raises(ValueError, match="already annotated"):
        annotate(once, weight_bits=2)


@pytest.mark.parametrize(
    "kwargs,exc,text",
    [({"weight_bits": 9}, ValueError, "9"), ({"weight_bits": 4.0}, TypeError, "4.0"),
     ({"activation_bits": 17}, ValueError, "17"), ({"weight_bits": True}, TypeError, "True"),
     ({"quantize": "no"}, TypeError, "'no'")],
)
def test_annotate_bad_arguments(kwargs, exc, text):
    with pytest.raises(exc) as info:
        annotate(L.Dense(2, name="fc"), **kwargs)
    assert text in str(info.value)
