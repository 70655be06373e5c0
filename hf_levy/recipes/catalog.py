"""The recipes shipped inside the package (``hf_levy/recipes/configs/*.yaml``), addressed by name.

``--config VALUE`` is resolved in this order: a VALUE that names an existing file is that file (a path
wins), else it is the name of a shipped recipe (its file name without ``.yaml``). A clone also sees the
shipped files as ``recipes/<name>.yaml`` (a link to the same folder). The example training script and its
DeepSpeed config (``hf_levy/recipes/examples``, ``examples/`` in a clone) ship beside them, addressed by file
name (``hf-levy cp ds_zero2.json .``).

This module reads files only (no YAML parser, no transformers), so ``hf-levy ls`` answers at once.
"""

from __future__ import annotations

import difflib
import os
import pathlib
import re

CONFIGS = pathlib.Path(__file__).with_name("configs")
EXAMPLES = pathlib.Path(__file__).with_name("examples")
EXAMPLE_SUFFIXES = (".py", ".json")
# The header's key lines: "# runtime:  about 4 minutes ...", continued by comment lines indented further.
HEADER_KEY = re.compile(r"#\s*(purpose|command|hardware|runtime|outcome):\s*(.*)")


def shipped() -> dict[str, pathlib.Path]:
    """Every shipped recipe, name -> file, in name order."""
    return {path.stem: path for path in sorted(CONFIGS.glob("*.yaml"))}


def examples() -> dict[str, pathlib.Path]:
    """Every shipped example file, file name -> file, in name order.

    The examples are the script docs/distributed.md launches and its DeepSpeed configs.
    """
    return {p.name: p for p in sorted(EXAMPLES.glob("*")) if p.is_file() and p.suffix in EXAMPLE_SUFFIXES}


def resolve(config: str | os.PathLike[str]) -> pathlib.Path:
    """The recipe file that ``--config`` names: an existing file, else a shipped recipe's name.

    Raises:
        FileNotFoundError: neither; the message lists the shipped names and the closest one.
    """
    path = pathlib.Path(config)
    if path.is_file():
        return path
    recipes = shipped()
    text = os.fspath(config)
    if text in recipes:
        return recipes[text]
    listed = ", ".join(recipes)
    if path.suffix in (".yaml", ".yml") or os.sep in text:
        known = f"; the shipped recipe of that name is --config {path.stem}" if path.stem in recipes else ""
        raise FileNotFoundError(f"recipe file {text!r} not found{known} (shipped recipes: {listed})")
    close = difflib.get_close_matches(text, recipes, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise FileNotFoundError(
        f"unknown recipe {text!r}: no such file and no shipped recipe of that name; {hint}"
        f"shipped recipes: {listed} (`hf-levy ls` describes them)"
    )


def header_fields(path: pathlib.Path) -> dict[str, str]:
    """The header's ``purpose``, ``command``, ``hardware``, ``runtime`` and ``outcome`` lines, key -> text.

    Continuation lines (comment lines indented further) are joined to their key's text; keys the header
    lacks are absent.
    """
    fields: dict[str, str] = {}
    key = None
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        match = HEADER_KEY.match(line)
        if match:
            key = match.group(1)
            fields[key] = match.group(2).strip()
        elif key is not None and line[1:].startswith("  "):
            fields[key] += " " + line[1:].strip()
        else:
            key = None
    return fields


def listing() -> str:
    """``hf-levy ls``: each shipped recipe's name and purpose, then its expected runtime.

    The runtime is cut at its first parenthesis, where the headers keep how it was measured.
    """
    rows = [(name, header_fields(path)) for name, path in shipped().items()]
    if not rows:
        return f"no recipes in {CONFIGS}: this hf_levy was installed without its package data"
    width = max(len(name) for name, _ in rows)
    lines = []
    for name, fields in rows:
        runtime = fields.get("runtime", "not stated").split(" (")[0]
        lines += [
            f"{name:<{width}}  {fields.get('purpose', '(no purpose line)')}",
            f"{'':<{width}}  runtime: {runtime}",
        ]
    lines.append("\nRun one: hf-levy compare --config NAME. Edit a copy: hf-levy cp NAME my_recipe.yaml.")
    if examples():
        lines.append(f"Examples to copy (hf-levy cp FILE .): {', '.join(examples())}.")
    return "\n".join(lines)
