"""The quantization policy: which bit widths each layer gets, as plain JSON-able data.

Resolution order for a layer (later wins): ``default`` < each matching entry of ``rules``
in order < ``qx.annotate(...)`` in the model definition < ``layers[name]``.

A rule matches by ``type`` (the class name of the layer or of any base class: ``"Conv"``
covers every convolution, ``"Conv2D"`` covers Conv2D and Conv2DTranspose but not
DepthwiseConv2D, which derives from ``DepthwiseConv``) and/or ``match`` (a regex that must match the
whole ``layer.name``).

Example:
    >>> import keras_qx as qx
    >>> p = qx.Policy.from_dict({"default": {"weight_bits": 8},
    ...                          "rules": [{"type": "Dense", "weight_bits": 4}],
    ...                          "layers": {"logits": {"weight_bits": 8}}})
    >>> qx.Policy.from_json(p.to_json()) == p
    True
"""
from __future__ import annotations

import copy
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from keras_qx.quant.quantizers import ACTIVATION_BITS, WEIGHT_BITS, check_bits

__all__ = ["Policy", "LayerSpec", "PolicyError", "rule_matches", "layer_type_names", "known_type_names"]

_FIELDS = ("weight_bits", "activation_bits", "quantize", "pack")
_RULE_KEYS = ("type", "match") + _FIELDS
_TOP_KEYS = ("default", "rules", "layers", "meta")


class PolicyError(ValueError):
    """A policy that is malformed or does not fit the model."""


@dataclass(frozen=True)
class LayerSpec:
    """The resolved bits of one layer and where they came from (``source``)."""

    weight_bits: int = 8
    activation_bits: int = 8
    quantize: bool = True
    source: str = "default"
    pack: bool = True  # sub-byte kernels packed (INT4/INT2); False: on an int8 carrier, for speed

    def updated(self, fields: Mapping[str, Any], source: str) -> "LayerSpec":
        values = {k: fields[k] for k in _FIELDS if k in fields}
        return LayerSpec(**{**self.__dict__, **values, "source": source})


def _check_fields(entry: Mapping[str, Any], where: str, allowed: Iterable[str]) -> dict:
    if not isinstance(entry, Mapping):
        raise PolicyError(f"{where} must be a dict like {{'weight_bits': 4}}, got {entry!r}.")
    allowed = tuple(allowed)
    unknown = [k for k in entry if k not in allowed]
    if unknown:
        raise PolicyError(f"{where} has unknown key(s) {unknown}; allowed keys: {list(allowed)}.")
    out = dict(entry)
    try:
        if "weight_bits" in out:
            out["weight_bits"] = check_bits(out["weight_bits"], f"{where}: weight_bits", WEIGHT_BITS)
        if "activation_bits" in out:
            out["activation_bits"] = check_bits(
                out["activation_bits"], f"{where}: activation_bits", ACTIVATION_BITS
            )
    except (TypeError, ValueError) as err:
        raise PolicyError(str(err)) from None
    if "quantize" in out and not isinstance(out["quantize"], bool):
        raise PolicyError(f"{where}: quantize must be true or false, got {out['quantize']!r}.")
    if "pack" in out and not isinstance(out["pack"], bool):
        raise PolicyError(f"{where}: pack must be true (sub-byte kernels packed as INT4/INT2) or false (stored "
                          f"as int8, for speed), got {out['pack']!r}.")
    return out


def _looks_like_path(text: str) -> bool:
    """A string that names a JSON file rather than holding JSON."""
    text = text.strip()
    return not text.startswith("{") and (text.endswith(".json") or os.path.isfile(text))


def layer_type_names(layer) -> list[str]:
    """Class names a rule's ``type`` matches: the class, its bases, and the type a rewritten
    layer stands for (``policy_aliases``: a Dense on sequences runs as an EinsumDense)."""
    return [cls.__name__ for cls in type(layer).__mro__] + list(getattr(type(layer), "policy_aliases", ()))


def rule_matches(rule: Mapping[str, Any], layer) -> bool:
    """Whether ``rule`` selects ``layer``: ``type`` is one of :func:`layer_type_names`, ``match``
    a regex matching the whole layer name; a rule with both needs both. The one matcher of the
    policy's rules, ``qx.prune``/``qx.cluster``'s rules and the search's groups.

    Example:
        >>> from keras_qx._compat import keras
        >>> rule_matches({"type": "Conv", "match": "conv.*"}, keras.layers.Conv2D(4, 3, name="conv1"))
        True
    """
    if "type" in rule and rule["type"] not in layer_type_names(layer):
        return False
    return "match" not in rule or re.fullmatch(rule["match"], layer.name) is not None


def known_type_names(layers: Iterable) -> set[str]:
    """Every ``type`` a rule may name for a model of ``layers``: theirs (see
    :func:`layer_type_names`) and every Keras layer class."""
    from keras_qx._compat import keras  # local: policy.py stays importable as plain data

    return {n for layer in layers for n in layer_type_names(layer)} | {n for n in dir(keras.layers) if n[:1].isupper()}


@dataclass
class Policy:
    """Per-layer bit widths as data. See the module docstring for the schema.

    Args:
        default: fields for every layer (``weight_bits``, ``activation_bits``, ``quantize``, ``pack``:
            false stores a sub-byte kernel as int8, for speed where the packed kernel is slow).
        rules: list of ``{"type": ..., "match": ..., <fields>}``; later rules win.
        layers: ``{layer_name: <fields>}``; wins over everything.
        meta: free-form JSON-able notes (``auto_policy`` puts its reasoning here).
    """

    default: dict = field(default_factory=lambda: {"weight_bits": 8, "activation_bits": 8})
    rules: list = field(default_factory=list)
    layers: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.default = _check_fields(self.default or {}, "policy default", _FIELDS)
        if not isinstance(self.rules, (list, tuple)):
            raise PolicyError(f"policy rules must be a list of dicts, got {type(self.rules).__name__}.")
        rules = []
        for i, rule in enumerate(self.rules):
            rule = _check_fields(rule, f"policy rule {i}", _RULE_KEYS)
            if "type" not in rule and "match" not in rule:
                raise PolicyError(f"policy rule {i} ({rule}) needs a 'type' or a 'match' key.")
            if "type" in rule and not isinstance(rule["type"], str):
                raise PolicyError(f"policy rule {i}: 'type' must be a class name string like 'Dense'.")
            if "match" in rule:
                try:
                    re.compile(rule["match"])
                except (re.error, TypeError) as err:
                    raise PolicyError(
                        f"policy rule {i}: 'match' {rule['match']!r} is not a valid regex ({err})."
                    ) from None
            rules.append(rule)
        self.rules = rules
        if not isinstance(self.layers, Mapping):
            raise PolicyError(f"policy layers must be a dict name -> fields, got {type(self.layers).__name__}.")
        self.layers = {
            str(name): _check_fields(fields, f"policy layers[{name!r}]", _FIELDS)
            for name, fields in self.layers.items()
        }
        if not isinstance(self.meta, Mapping):
            raise PolicyError("policy meta must be a dict.")
        self.meta = dict(self.meta)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def uniform(cls, weight_bits: int = 8, activation_bits: int = 8) -> "Policy":
        """Every layer at the same bits."""
        return cls(default={"weight_bits": weight_bits, "activation_bits": activation_bits})

    @classmethod
    def from_bits(cls, bits: Mapping[str, int | None], meta: Mapping | None = None) -> "Policy":
        """8-bit default, and per layer the weight bits of ``bits`` (None: keep it float): the
        form of an allocation or a search trial."""
        layers = {n: {"quantize": False} if b is None else {"weight_bits": int(b)} for n, b in bits.items()}
        return cls(layers=layers, meta=dict(meta or {}))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Policy":
        """Build from the plain-data form (see module docstring)."""
        if not isinstance(data, Mapping):
            raise PolicyError(f"a policy must be a dict, got {type(data).__name__}.")
        unknown = [k for k in data if k not in _TOP_KEYS]
        if unknown:
            raise PolicyError(f"unknown policy key(s) {unknown}; allowed: {list(_TOP_KEYS)}.")
        data = copy.deepcopy(dict(data))
        default = _check_fields(data.get("default") or {}, "policy default", _FIELDS)
        default = {"weight_bits": 8, "activation_bits": 8, **default}
        return cls(default=default, rules=data.get("rules", []), layers=data.get("layers", {}),
                   meta=data.get("meta", {}))

    @classmethod
    def from_json(cls, text: str, source: str = "policy JSON") -> "Policy":
        if not isinstance(text, (str, bytes, bytearray)):
            raise PolicyError(f"{source} must be JSON text, got {type(text).__name__}.")
        if isinstance(text, str) and _looks_like_path(text):
            raise PolicyError(f"policy {text!r} is a file path, not JSON text; load the file with "
                              f"qx.Policy.from_file({text!r}).")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PolicyError(f"{source} does not parse at line {err.lineno} column {err.colno}: {err.msg}. "
                              "Write it as JSON, e.g. {\"default\": {\"weight_bits\": 8}} (double quotes, "
                              "no trailing commas).") from None
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path) -> "Policy":
        """Read a policy JSON file (as ``policy.to_json()`` writes it); errors name the file."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no policy file at {path!r}; write one with "
                                    "open(path, 'w').write(policy.to_json()).")
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        try:
            return cls.from_json(text, f"policy file {path!r}")
        except PolicyError as err:
            message = str(err)
            raise PolicyError(message if path in message else f"policy file {path!r}: {message}") from None

    @classmethod
    def coerce(cls, policy: Any) -> "Policy":
        """Accept None (uniform 8-bit), a Policy, a dict, a JSON string or a JSON file's path."""
        if policy is None:
            return cls.uniform()
        if isinstance(policy, Policy):
            return policy
        if isinstance(policy, Mapping):
            return cls.from_dict(policy)
        if isinstance(policy, os.PathLike) or (isinstance(policy, str) and _looks_like_path(policy)):
            return cls.from_file(policy)
        if isinstance(policy, str):
            return cls.from_json(policy)
        raise PolicyError(f"policy must be a Policy, dict, JSON string or path of a JSON file, got "
                          f"{type(policy).__name__}.")

    def to_dict(self) -> dict:
        out = {"default": dict(self.default), "rules": [dict(r) for r in self.rules],
               "layers": {k: dict(v) for k, v in self.layers.items()}}
        if self.meta:
            out["meta"] = copy.deepcopy(self.meta)
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    # ---- resolution ---------------------------------------------------------------------
    def spec_for(self, layer, annotation: Mapping[str, Any] | None = None) -> LayerSpec:
        """The :class:`LayerSpec` of one layer (``annotation``: fields pinned by qx.annotate)."""
        spec = LayerSpec().updated(self.default, "default")
        for i, rule in enumerate(self.rules):
            if rule_matches(rule, layer):
                spec = spec.updated(rule, f"rule {i}")
        if annotation:
            spec = spec.updated(annotation, "annotation")
        if layer.name in self.layers:
            spec = spec.updated(self.layers[layer.name], "layers")
        return spec

    def check_against(self, layers: Iterable) -> None:
        """Raise :class:`PolicyError` if ``layers`` names or types the model lacks."""
        layers = list(layers)
        names = [layer.name for layer in layers]
        missing = [n for n in self.layers if n not in names]
        if missing:
            hints = {n: difflib.get_close_matches(n, names, n=3) for n in missing}
            raise PolicyError(
                f"policy names layer(s) the model lacks: {missing}. Closest names: {hints}. "
                f"Model layers: {names}."
            )
        known = known_type_names(layers)
        for i, rule in enumerate(self.rules):
            if "type" in rule and rule["type"] not in known:
                close = difflib.get_close_matches(rule["type"], sorted(known), n=3)
                raise PolicyError(
                    f"policy rule {i}: unknown layer type {rule['type']!r}; did you mean {close}?"
                )

    def __eq__(self, other):
        return isinstance(other, Policy) and other.to_dict() == self.to_dict()
