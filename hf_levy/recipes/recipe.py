"""Recipes: YAML files that pick values for a comparison of training arms. Data only, no code.

A recipe has these top-level keys (anything else is an error)::

    task:    {name: modular_addition, <arguments of that task builder>}
    model:   {architecture: LlamaForCausalLM, <config fields>}
    target:  {metric: eval_accuracy, value: 0.95, stop: true}   # "steps to target"; stop the arm there
    args:    {<LevyConfig / TrainingArguments fields shared by every arm>}
    arms:    {<name>: {trainer: stock | levy, <fields that differ in this arm>}}
    seeds:   [0]                                                  # optional, default [0]

Configs are layered: LevyConfig defaults < ``args`` < the arm's fields < command-line flags, and
every key must be a LevyConfig field (typos are errors that suggest the closest field). A batch size
of ``full`` means the whole train set in one step (per device). The comment block at the top of the
file is the recipe's header (command, hardware, runtime, expected outcome) and is kept for the report.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers import HfArgumentParser

from hf_levy.config import LevyArguments, LevyConfig

TOP_LEVEL_KEYS = {"task", "model", "target", "args", "arms", "seeds"}
TRAINERS = ("stock", "levy")
FULL_BATCH = "full"
LEVY_FIELDS = {f.name for f in dataclasses.fields(LevyArguments)}
CONFIG_FIELDS = {f.name for f in dataclasses.fields(LevyConfig) if f.init}


class RecipeError(ValueError):
    """A recipe file or a command-line override that cannot be used; the message says how to fix it."""


@dataclass
class Target:
    metric: str = "eval_accuracy"
    value: float = 0.95
    stop: bool = True  # stop an arm once it reaches the target (its steps-to-target are then known)
    greater_is_better: bool = True


@dataclass
class Arm:
    name: str
    trainer: str
    fields: dict[str, Any]


@dataclass
class Recipe:
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
        return self.path.stem


def load_recipe(path: str | pathlib.Path) -> Recipe:
    """Parse and check a recipe file. Raises RecipeError naming the file, the key and the fix."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} not found; the recipes shipped are in recipes/*.yaml")
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
    args = dict(raw.get("args") or {})
    _check_fields(args, f"{path}: args")
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
        _check_fields(spec, f"{path}: arm '{name}'")
        arms[name] = Arm(name, trainer, spec)
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
        raise RecipeError(f"{path}: seeds must be a list of integers, got {seeds!r}")
    header = "\n".join(line[1:].strip() for line in text.splitlines() if line.startswith("#"))
    return Recipe(path, header, dict(raw["task"]), dict(raw["model"]), Target(**target), args, arms, seeds)


def _check_fields(fields: dict[str, Any], where: str) -> None:
    for key in fields:
        if key not in CONFIG_FIELDS:
            close = difflib.get_close_matches(key, CONFIG_FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see `hf-levy train --help` for the fields"
            raise RecipeError(f"{where}: unknown field {key!r}{hint}")


def parse_overrides(flags: Sequence[str]) -> dict[str, str]:
    """``["--field", "value", "--flag=value"]`` → {field: value}; every field must exist."""
    overrides: dict[str, str] = {}
    items = list(flags)
    while items:
        token = items.pop(0)
        if not token.startswith("--"):
            raise RecipeError(f"expected --field value, got {token!r}")
        key, _, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not value:
            if not items or items[0].startswith("--"):
                raise RecipeError(f"--{key} needs a value")
            value = items.pop(0)
        overrides[key] = value
    _check_fields(overrides, "command line")
    return overrides


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

    ``full`` batch sizes become ``train_size``. String overrides are converted by argparse, as on a
    command line, so they get the same types and choices checks as ``HfArgumentParser``.
    """
    if arm not in recipe.arms:
        raise RecipeError(f"{recipe.path}: no arm {arm!r}; arms: {sorted(recipe.arms)}")
    values = {**recipe.args, **recipe.arms[arm].fields, "output_dir": output_dir, "seed": seed}
    for key, value in values.items():
        if value == FULL_BATCH:
            values[key] = train_size
    parser = HfArgumentParser(LevyConfig)
    parser.set_defaults(**values)
    argv = [item for key, value in (overrides or {}).items() for item in (f"--{key}", str(value))]
    try:
        (config,) = parser.parse_args_into_dataclasses(args=argv)
    except SystemExit as err:  # argparse already printed which value was bad
        raise RecipeError(f"bad command-line value in {argv}") from err
    return config
