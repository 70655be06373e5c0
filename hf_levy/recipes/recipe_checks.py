"""The checks of a recipe's ``task`` and ``model`` sections, run when the recipe loads, before anything trains.

``task`` keys are checked against the task builder's signature (names, required arguments, annotated types),
``model`` keys against what the architecture takes: its config class's fields when the model is built from a
config (``LlamaConfig`` for ``LlamaForCausalLM``), plus ``from_pretrained``'s own arguments with
``pretrained:`` (when the config class can be known without a download: a named architecture, or a local
folder's ``config.json``). Each problem is one :class:`RecipeError` line naming the file, the section, the key
and the closest valid key. Value ranges are the builders' own checks, which run when the task is built.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import re
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from hf_levy.config import describe_type, fits_type

# Keys of a recipe's model section that hf_levy reads itself, not the model or its config.
RECIPE_MODEL_KEYS = {"architecture", "pretrained", "lora"}
DEFAULT_ARCHITECTURE = "LlamaForCausalLM"


def _error(message: str) -> Exception:
    from hf_levy.recipes.recipe import RecipeError  # recipe.py imports this module

    return RecipeError(message)


def _closest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _fits(value: Any, hint: Any) -> bool:
    # YAML has lists, not tuples: a list fits a tuple-typed argument.
    return fits_type(value, hint) or (isinstance(value, list) and fits_type(tuple(value), hint))


def _check_keys(where: str, spec: Mapping[str, Any], known: set[str], owner: str) -> None:
    for key in spec:
        if key not in known:
            raise _error(f"{where}: unknown key {key!r} for {owner}{_closest(key, known)}")


def _check_types(where: str, spec: Mapping[str, Any], hints: Mapping[str, Any]) -> None:
    for key, value in spec.items():
        if key in hints and not _fits(value, hints[key]):
            raise _error(f"{where}: {key}: expected {describe_type(hints[key])}, got {value!r}")


def check_task(path: Any, task: Mapping[str, Any], builders: Mapping[str, Callable[..., Any]]) -> None:
    """Check ``task``: its name is a builder of ``builders``, its other keys are that builder's arguments.

    They are of their annotated types, with every required one given.
    """
    spec = {key: value for key, value in task.items() if key != "name"}
    name = task["name"]
    if name not in builders:
        raise _error(
            f"{path}: task: name: unknown task {name!r}{_closest(str(name), builders)} (tasks: {', '.join(builders)})"
        )
    parameters = inspect.signature(builders[name]).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        _check_keys(f"{path}: task", spec, set(parameters), f"the task {name}")
    missing = [k for k, p in parameters.items() if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    missing = [k for k in missing if k not in spec]
    if missing:
        raise _error(f"{path}: task: {name} needs {', '.join(repr(k) for k in missing)}")
    try:
        hints = typing.get_type_hints(builders[name])
    except Exception:  # an annotation that does not resolve: the builder checks its own arguments
        hints = {}
    _check_types(f"{path}: task", spec, hints)


def check_model(path: Any, model: Mapping[str, Any]) -> None:
    """Check ``model``: its architecture is a transformers model class or one of ``LOCAL_MODELS``.

    Its keys are what that architecture takes, of their annotated types (see the module docstring).
    """
    import transformers

    where = f"{path}: model"
    architecture = model.get("architecture", DEFAULT_ARCHITECTURE)
    spec = {key: value for key, value in model.items() if key not in RECIPE_MODEL_KEYS}
    from hf_levy.recipes.models import LOCAL_MODELS

    if architecture in LOCAL_MODELS:
        local = LOCAL_MODELS[architecture]
        _check_keys(where, spec, set(inspect.signature(local).parameters), architecture)
        _check_types(where, spec, typing.get_type_hints(local.__init__))
        return
    model_class = getattr(transformers, architecture, None) if isinstance(architecture, str) else None
    if not inspect.isclass(model_class) or not hasattr(model_class, "from_pretrained"):
        models = [*LOCAL_MODELS, *(n for n in dir(transformers) if "For" in n or n.endswith("Model"))]
        raise _error(
            f"{where}: architecture: {architecture!r} is not a transformers model class"
            f"{_closest(str(architecture), models)}"
        )
    pretrained = model.get("pretrained")
    config_class = _config_class(model_class, pretrained)
    if config_class is None:  # a hub model under an Auto class: its config is known after the download only
        return
    known = config_keys(config_class)
    if pretrained is not None:
        known = known | loading_keys()
    _check_keys(where, spec, known, config_class.__name__)
    _check_types(where, spec, _init_hints(config_class))
    lora = model.get("lora")
    if lora is not None:
        _check_lora(where, lora)


def _config_class(model_class: type, pretrained: Any) -> type | None:
    config_class = getattr(model_class, "config_class", None)
    if config_class is not None and hasattr(config_class, "model_type"):
        return config_class
    if not isinstance(pretrained, str):
        return None
    import pathlib

    from transformers import CONFIG_MAPPING

    from hf_levy.recipes.models import resolve_pretrained

    try:
        config_file = pathlib.Path(resolve_pretrained(pretrained)) / "config.json"
        model_type = json.loads(config_file.read_text()).get("model_type")
        return CONFIG_MAPPING[model_type]
    except (ValueError, OSError, KeyError, json.JSONDecodeError):
        return None  # not a local folder (a hub id), or not one transformers knows: from_pretrained will say


@functools.cache
def config_keys(config_class: type) -> frozenset[str]:
    """What a config class takes.

    Its ``__init__`` arguments, the attributes of its default instance, its aliases (``attribute_map``) and
    properties (``num_labels``), and ``attn_implementation``.
    """
    keys = {"attn_implementation", "num_labels"}
    for cls in config_class.__mro__:
        if "__init__" in vars(cls):
            keys |= {n for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}
        keys |= {n for n, v in vars(cls).items() if isinstance(v, property)}
    keys |= set(getattr(config_class, "attribute_map", {}))
    try:
        keys |= set(config_class().to_dict())
    except Exception:  # a composite config with required arguments: its signature is what is known
        pass
    return frozenset(k for k in keys if not k.startswith("_") and k not in ("args", "kwargs"))


@functools.cache
def loading_keys() -> frozenset[str]:
    """The keyword arguments of ``PreTrainedModel.from_pretrained``.

    Its parameters and the keys it reads from ``**kwargs`` (``device_map``, ``dtype``, ``subfolder``...),
    read from its source.
    """
    from transformers import PreTrainedModel

    function = PreTrainedModel.from_pretrained.__func__
    keys = set(inspect.signature(function).parameters) - {"cls", "model_args", "kwargs"}
    try:
        keys |= set(re.findall(r"kwargs\.(?:pop|get)\(\s*[\"'](\w+)[\"']", inspect.getsource(function)))
    except OSError:  # no source shipped: the parameters alone
        pass
    return frozenset(keys)


def _init_hints(config_class: type) -> dict[str, Any]:
    """The annotated types of the config's ``__init__`` arguments that resolve; the others are not checked.

    transformers writes them as strings naming ``torch`` and typing names its modules do not all import.
    """
    import torch

    hints: dict[str, Any] = {}
    for cls in reversed(config_class.__mro__):
        if "__init__" not in vars(cls):
            continue
        namespace = {**vars(typing), "torch": torch, **vars(sys.modules[cls.__module__])}
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            annotation = parameter.annotation
            if annotation is parameter.empty:
                continue
            try:
                hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation
            except Exception:
                hints.pop(name, None)
    return hints


def _check_lora(where: str, lora: Any) -> None:
    if not isinstance(lora, dict):
        raise _error(f"{where}: lora: expected a mapping of peft.LoraConfig fields, got {lora!r}")
    try:
        import dataclasses

        from peft import LoraConfig
    except ImportError:  # checked where peft is installed, which training with lora needs
        return
    _check_keys(f"{where}: lora", lora, {f.name for f in dataclasses.fields(LoraConfig)}, "peft.LoraConfig")
