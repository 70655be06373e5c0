"""Recipes: YAML files that pick values for a comparison of training arms. Data only, no code.

A recipe has these top-level keys (anything else is an error)::

    task:    {name: modular_addition, <arguments of that task builder>}
    model:   {architecture: LlamaForCausalLM, <config fields>}
    target:  {metric: eval_accuracy, value: 0.95, stop: true}   # "steps to target"; stop the arm there
    args:    {<LevyConfig / TrainingArguments fields shared by every arm>}
    arms:    {<name>: {trainer: stock | levy, <fields that differ in this arm>}}
    seeds:   [0]                                                  # optional, default [0]

Configs are layered: LevyConfig defaults < ``args`` < the arm's fields < command-line flags, and
every key must be a LevyConfig field (typos are errors that suggest the closest field). Values are
checked against the field's type before anything runs: YAML numbers, booleans, lists and mappings must
match it, and strings are converted as on a command line (``1e-3`` is a float, ``true`` a bool), so a
wrong value is one line naming the key, the value and the type. A batch size of ``full`` means the whole
train set in one step (per device). The comment block at the top of the file is the recipe's header
(purpose, command, hardware, runtime, expected outcome) and is kept for the report.

Recipes are shared files, so a key that makes the model's loading run code from outside this package
(``trust_remote_code``, hub kernels, unpickled weights: :data:`CODE_KEYS`) is refused unless the caller
opts in (``hf-levy ... --trust_remote_code``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import pathlib
import typing
from argparse import ArgumentTypeError
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers.hf_argparser import string_to_bool

from hf_levy.config import LevyArguments, LevyConfig, describe_type, fits_type
from hf_levy.recipes import catalog
from hf_levy.recipes.recipe_checks import check_model, check_task

TOP_LEVEL_KEYS = {"task", "model", "target", "args", "arms", "seeds"}
TRAINERS = ("stock", "levy")
FULL_BATCH = "full"
LEVY_FIELDS = {f.name for f in dataclasses.fields(LevyArguments)}
CONFIG_FIELDS = {f.name for f in dataclasses.fields(LevyConfig) if f.init}
CONFIG_CHOICES = {
    f.name: f.metadata["choices"] for f in dataclasses.fields(LevyConfig) if "choices" in f.metadata
}
# ``model`` keys that make ``from_pretrained`` run code that is not in an installed package, each with what
# it does; refused unless the command line says --trust_remote_code.
CODE_KEYS = {
    "trust_remote_code": "imports and runs the Python files of the model's folder or hub repository",
    "use_kernels": "downloads and runs compiled kernels from the hub",
    "kernel_config": "downloads and runs compiled kernels from the hub",
    "allow_all_kernels": "runs kernels from any hub repository",
    "weights_only": "false unpickles the weights file, and unpickling can run any code",
    "attn_implementation": "a hub repository (a name with '/') is a kernel downloaded and run",
}


class RecipeError(ValueError):
    """A recipe file or a command-line override that cannot be used; the message says how to fix it."""


@dataclass
class Target:
    """The recipe's ``target``: the eval metric and the value an arm must reach ("steps to target")."""

    metric: str = "eval_accuracy"
    value: float = 0.95
    stop: bool = True  # stop an arm once it reaches the target (its steps-to-target are then known)
    greater_is_better: bool = True


@dataclass
class Arm:
    """One arm of a recipe: its name, its trainer (``stock`` or ``levy``) and the typed fields it sets."""

    name: str
    trainer: str
    fields: dict[str, Any]


@dataclass
class Recipe:
    """A loaded and checked recipe (:func:`load_recipe`); ``header`` is its top comment block, unprefixed."""

    path: pathlib.Path
    header: str
    task: dict[str, Any]
    model: dict[str, Any]
    target: Target
    args: dict[str, Any]
    arms: dict[str, Arm]
    seeds: list[int] = field(default_factory=lambda: [0])

    @property
    def name(self) -> str:
        """The recipe's name: its file name without ``.yaml``."""
        return self.path.stem


def load_recipe(config: str | pathlib.Path, *, trust_remote_code: bool = False) -> Recipe:
    """Parse and check a recipe: a file, or the name of a shipped one (:func:`catalog.resolve`).

    Every section is checked here (``task`` and ``model`` by :mod:`hf_levy.recipes.recipe_checks`), and
    ``model`` keys that would run code (:func:`code_keys`) are refused unless ``trust_remote_code``.

    Raises:
        FileNotFoundError: no such file and no shipped recipe of that name.
        RecipeError: the file's problem, naming the file, the key and the fix.
    """
    path = catalog.resolve(config)
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with keys {sorted(TOP_LEVEL_KEYS)}")
    unknown = set(raw) - TOP_LEVEL_KEYS
    if unknown:
        raise RecipeError(
            f"{path}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(TOP_LEVEL_KEYS)}"
        )
    for key in ("task", "model", "arms"):
        if not isinstance(raw.get(key), dict) or not raw[key]:
            raise RecipeError(f"{path}: '{key}' is missing or empty")
    if "name" not in raw["task"]:
        raise RecipeError(f"{path}: task needs a 'name'")
    refuse_code(path, raw["model"], trust_remote_code)
    from hf_levy.recipes.runner import TASKS  # runner imports this module: the task names come at call time

    check_task(path, raw["task"], TASKS)
    check_model(path, raw["model"])
    if not isinstance(raw.get("args") or {}, dict):
        raise RecipeError(f"{path}: 'args' is a mapping of LevyConfig fields")
    args = _typed_fields(dict(raw.get("args") or {}), f"{path}: args")
    target = raw.get("target") or {}
    target_fields = {f.name for f in dataclasses.fields(Target)}
    if set(target) - target_fields:
        raise RecipeError(
            f"{path}: unknown target keys {sorted(set(target) - target_fields)}; allowed {sorted(target_fields)}"
        )
    arms = {}
    for name, spec in raw["arms"].items():
        spec = dict(spec or {})
        trainer = spec.pop("trainer", None)
        if trainer not in TRAINERS:
            raise RecipeError(f"{path}: arm '{name}' needs trainer: stock or levy, got {trainer!r}")
        arms[name] = Arm(name, trainer, _typed_fields(spec, f"{path}: arm '{name}'"))
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
        raise RecipeError(f"{path}: seeds must be a list of integers, got {seeds!r}")
    header = "\n".join(line[1:].strip() for line in text.splitlines() if line.startswith("#"))
    return Recipe(path, header, dict(raw["task"]), dict(raw["model"]), Target(**target), args, arms, seeds)


def _typed_fields(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """``fields`` with every key a LevyConfig field and every value of its type (see :func:`typed_value`)."""
    typed = {}
    for key, value in fields.items():
        if key not in CONFIG_FIELDS:
            close = difflib.get_close_matches(key, CONFIG_FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see `hf-levy train --help` for the fields"
            raise RecipeError(f"{where}: unknown field {key!r}{hint}")
        typed[key] = typed_value(key, value, where)
    return typed


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(LevyConfig)


def typed_value(key: str, value: Any, where: str) -> Any:
    """``value`` as the LevyConfig field ``key`` takes it, or RecipeError naming the key, the value and the type.

    A string is converted the way ``HfArgumentParser`` converts a command-line value (``"1e-3"`` to a float,
    ``"true"`` to a bool, one string to a one-item list); any other value must already have the field's
    type. ``full`` stays as it is in an integer field (it becomes the train set's size per arm).
    """
    hint = _field_types()[key]
    if value == FULL_BATCH and fits_type(1, hint):
        return value
    if isinstance(value, str) and not fits_type(value, hint):
        value = _from_text(value, hint)
    if not fits_type(value, hint):
        raise RecipeError(f"{where}: {key}: expected {describe_type(hint)}, got {value!r}")
    choices = CONFIG_CHOICES.get(key)
    if choices is not None and value not in choices:
        raise RecipeError(f"{where}: {key}: expected one of {list(choices)}, got {value!r}")
    return value


def _from_text(text: str, hint: Any) -> Any:
    """``text`` converted to the first of bool, int, float, list that the field takes and that parses.

    ``text`` comes back unchanged when none does (the caller then names the type).
    """
    for sample, convert in ((True, string_to_bool), (1, int), (1.5, float), ([], lambda t: [t])):
        if fits_type(sample, hint):
            try:
                return convert(text)
            except (ValueError, ArgumentTypeError):
                continue
    return text


def parse_overrides(flags: Sequence[str]) -> dict[str, str]:
    """``["--field", "value", "--flag=value", "--bool_field"]`` → {field: value}, checked like recipe values.

    A bare flag of a bool field means true, as with ``HfArgumentParser`` (``--bf16``). The values stay
    the strings typed, for the report; :func:`arm_config` converts them.
    """
    overrides: dict[str, str] = {}
    items = list(flags)
    while items:
        token = items.pop(0)
        if not token.startswith("--"):
            raise RecipeError(f"expected --field value, got {token!r}")
        key, _, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not value:
            if items and not items[0].startswith("--"):
                value = items.pop(0)
            elif key in CONFIG_FIELDS and fits_type(True, _field_types()[key]):
                value = "true"
            else:
                raise RecipeError(f"--{key} needs a value")
        overrides[key] = value
    _typed_fields(overrides, "command line")
    return overrides


def code_keys(model: dict[str, Any]) -> list[str]:
    """The keys of a recipe's ``model`` that would make loading it run code (:data:`CODE_KEYS`).

    Each is given as ``"key: value (what it does)"``; the list is empty when loading runs only installed code.
    """
    found = []
    for key, value in model.items():
        if key == "weights_only":
            runs = value is False
        elif key == "attn_implementation":
            runs = isinstance(value, str) and "/" in value
        else:
            runs = key in CODE_KEYS and bool(value)
        if runs:
            found.append(f"{key}: {value!r} ({CODE_KEYS[key]})")
    return found


def refuse_code(path: Any, model: dict[str, Any], trust_remote_code: bool) -> None:
    """RecipeError when the ``model`` keys would run code (:func:`code_keys`) and the caller did not opt in."""
    risky = code_keys(model)
    if risky and not trust_remote_code:
        raise RecipeError(
            f"{path}: model {'; '.join(risky)}. Recipes are data, so this runs only when the command "
            "line opts in: add --trust_remote_code (after reading the code it will run)"
        )


def arm_config(
    recipe: Recipe,
    arm: str,
    *,
    output_dir: str,
    seed: int,
    train_size: int,
    overrides: dict[str, str] | None = None,
) -> LevyConfig:
    """The resolved LevyConfig of one arm: defaults < recipe args < arm fields < command-line overrides.

    ``full`` batch sizes become ``train_size``. Raises RecipeError naming the recipe, the arm and the field
    when a value is refused (by its type here, or by ``LevyConfig``'s own checks).
    """
    if arm not in recipe.arms:
        raise RecipeError(f"{recipe.path}: no arm {arm!r}; arms: {sorted(recipe.arms)}")
    flags = _typed_fields(overrides or {}, "command line")

    def config(*layers: dict[str, Any]) -> LevyConfig:
        values = {
            key: train_size if value == FULL_BATCH else value
            for layer in layers
            for key, value in layer.items()
        }
        return LevyConfig(**{**values, "output_dir": output_dir, "seed": seed})

    try:
        return config(recipe.args, recipe.arms[arm].fields, flags)
    except (ValueError, TypeError) as err:
        error = err
    try:  # without the flags: if the recipe alone is valid, the command line is what to fix
        config(recipe.args, recipe.arms[arm].fields)
    except (ValueError, TypeError):
        raise RecipeError(f"{recipe.path}: arm {arm!r}: {error}") from error
    typed = " ".join(f"--{key} {value}" for key, value in (overrides or {}).items() if key in str(error))
    raise RecipeError(
        f"command line: {typed or ' '.join(f'--{k} {v}' for k, v in overrides.items())}: {error}"
    )
