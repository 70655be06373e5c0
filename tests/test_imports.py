"""What importing hf_levy costs: no module beyond what ``from transformers import Trainer`` loads, and the
recipe tooling stays behind its ``recipes`` extra. Each import runs in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each case starts Python and imports transformers


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )


def loaded_modules(statement: str) -> set[str]:
    result = run_python(f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))")
    assert result.returncode == 0, f"{statement!r} failed:\n{result.stderr[-2000:]}"
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_import_hf_levy_loads_no_module_beyond_the_transformers_trainer():
    trainer = loaded_modules("from transformers import Trainer")
    ours = loaded_modules(
        "import hf_levy\nfrom hf_levy import LevyArguments, LevyCallback, LevyConfig, LevyTrainer"
    )
    foreign = sorted(m for m in ours - trainer if m.partition(".")[0] != "hf_levy")
    assert not foreign, f"import hf_levy loads modules that the Trainer does not: {foreign}"
    # transformers itself imports yaml, so the set difference covers it; matplotlib is never loaded.
    assert "matplotlib" not in ours
    recipe_modules = sorted(m for m in ours if m.startswith("hf_levy.recipes"))
    assert not recipe_modules, f"import hf_levy loads the recipe tooling: {recipe_modules}"


def test_recipe_tooling_without_its_extra_fails_naming_the_install_command():
    # A module set to None in sys.modules reads as not installed.
    result = run_python(
        "import sys\nsys.modules['matplotlib'] = None\n"
        "from hf_levy import LevyTrainer\n"  # the library needs none of the extra
        "import hf_levy.recipes.cli"
    )
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError:") and "matplotlib" in message, message
    assert 'pip install "hf_levy[recipes]"' in message, message
