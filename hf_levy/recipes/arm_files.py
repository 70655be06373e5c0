"""What an arm's folder holds (``RUN_DIR/<arm>/seed<k>/``), and the writes that never leave half a file.

``config.json`` records the arm's resolved config before it trains; ``summary.json``, written last, marks
it finished; each checkpoint gets the target tracker's state once the Trainer has saved the rest.
:func:`arm_state` compares the record with the config resolved now and says what ``compare`` does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
import tempfile
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_levy.config import LevyConfig
from hf_levy.recipes.recipe import LEVY_FIELDS, Recipe

SUMMARY = "summary.json"
CONFIG = "config.json"
# In each checkpoint, the target tracker's state: written after the Trainer saved the rest, so it marks the
# checkpoint complete.
TRACKER = "target_tracker.json"
# Keys of config.json that follow the run directory: moving the directory changes no result.
LOCATION_KEYS = ("output_dir",)


def arm_record(recipe: Recipe, arm: str, config: LevyConfig) -> dict[str, Any]:
    """What ``config.json`` holds: the resolved config, the trainer, task, model and target, as JSON values.

    A stock arm's record leaves out the LevyArguments fields: the stock Trainer reads none of them, so a
    change of their defaults must not retrain it.
    """
    values = config.to_dict()
    if recipe.arms[arm].trainer == "stock":
        values = {key: value for key, value in values.items() if key not in LEVY_FIELDS}
    record = {
        **values,
        "trainer": recipe.arms[arm].trainer,
        "task": recipe.task,
        "model": recipe.model,
        "target": dataclasses.asdict(recipe.target),
    }
    return json.loads(json.dumps(record, default=str))


@functools.cache
def _config_defaults() -> dict[str, Any]:
    return json.loads(json.dumps(LevyConfig(output_dir=".").to_dict(), default=str))


def config_changes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Each difference between a recorded and a resolved ``arm_record``, as ``"key: recorded -> now"``.

    ``output_dir`` is left out (it follows the run directory). A key the record lacks counts when it is a
    LevyConfig field whose value now is not its default (the run predates the field, so it ran with the
    default); a key the record has and the config no longer has is gone from the code and counts not.
    """
    changes = []
    for key, value in now.items():
        if key in LOCATION_KEYS:
            continue
        if key not in recorded:
            default = _config_defaults().get(key, value)
            if value != default:
                changes.append(f"{key}: not recorded (default {default!r}) -> {value!r}")
        elif recorded[key] != value:
            changes.append(f"{key}: {recorded[key]!r} -> {value!r}")
    return changes


def read_json(path: pathlib.Path) -> Any | None:
    """The JSON value in ``path``, or None when the file is missing or not valid JSON (a truncated write)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def last_checkpoint(folder: pathlib.Path) -> pathlib.Path | None:
    """The latest complete ``checkpoint-N`` in ``folder``; None when there is none.

    Complete means its tracker state, written once the Trainer has saved everything else, is there and
    readable.
    """
    pattern = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
    complete = [
        (int(match.group(1)), path)
        for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if (match := pattern.fullmatch(path.name)) and read_json(path / TRACKER) is not None
    ]
    return max(complete, key=lambda pair: pair[0])[1] if complete else None


def arm_state(folder: pathlib.Path, record: dict[str, Any]) -> tuple[str, str]:
    """What ``folder`` holds for an arm whose resolved config is ``record``: ``(state, why)``.

    ``"new"``: nothing. ``"finished"``: the same config and a readable summary. ``"interrupted"``: the same
    config, no readable summary (``why`` names the checkpoint it resumes from, if any). ``"stale"``: the files
    of another config, or of one that cannot be read (``why`` lists the changes).
    """
    if not folder.is_dir() or not any(folder.iterdir()):
        return "new", "training"
    recorded = read_json(folder / CONFIG)
    if not isinstance(recorded, dict):
        return "stale", f"{folder / CONFIG} is missing or unreadable: training again from step 0"
    changes = config_changes(recorded, record)
    if changes:
        return "stale", f"the resolved config changed ({'; '.join(changes)}): training again from step 0"
    if isinstance(read_json(folder / SUMMARY), dict):
        return "finished", "already done with this config, kept"
    unfinished = "not valid JSON" if (folder / SUMMARY).exists() else "not written"
    checkpoint = last_checkpoint(folder)
    if checkpoint is None:
        return "interrupted", f"unfinished ({SUMMARY} {unfinished}) and no checkpoint: training from step 0"
    return "interrupted", f"unfinished ({SUMMARY} {unfinished}): resuming from {checkpoint.name}"


def write_json(path: pathlib.Path, data: Any) -> None:
    """Write ``data`` as JSON, whole or not at all (see :func:`write_text`)."""
    write_text(path, json.dumps(data, indent=1, default=str))


def write_text(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A reader (or a run interrupted mid-write) sees the previous file or the new one, never a truncated one.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise
