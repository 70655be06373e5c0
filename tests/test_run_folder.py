"""One run at a time per run folder: a second ``compare`` on a folder in use is refused, naming the run that
holds it, and a folder that cannot be written is one line of error."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
from test_runner import tiny_recipe

from hf_levy.recipes.cli import main

ROOT = pathlib.Path(__file__).parents[1]
# A compare run that pauses inside its first arm's training until told to go on.
PAUSED_COMPARE = """
import pathlib, sys, time
import hf_levy.recipes.tracker as tracker
from hf_levy.recipes.cli import main

ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def pause(self, args, state, control, **kwargs):
    ready.write_text("training")
    while not go.exists():
        time.sleep(0.05)
tracker.TargetTracker.on_train_begin = pause
raise SystemExit(main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_a_second_compare_on_a_folder_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    recipe, run = tiny_recipe(tmp_path, max_steps=2), tmp_path / "run"
    ready, go = tmp_path / "ready", tmp_path / "go"
    flags = ["compare", "--config", str(recipe), "--output_dir", str(run), "--arms", "stock"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [sys.executable, "-c", PAUSED_COMPARE, str(ready), str(go), *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), first.communicate()[1][-3000:]
        code = main([*flags, "--max_steps", "3"])  # another config: it would retrain the arm
        err = capsys.readouterr().err
        assert code == 2
        assert err.count("\n") == 1 and err.startswith(f"hf-levy: error: {run} is in use by another"), err
        assert f"pid {first.pid} on " in err and "compare --config" in err and str(recipe) in err, err
    finally:
        go.touch()
        out, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    summary = json.loads((run / "stock" / "seed0" / "summary.json").read_text())
    assert summary["steps"] == 2  # the first run's arm, not overwritten by the refused one
    assert main(flags) == 0  # once the holder has ended, the folder is free again (the lock is not stale)


@pytest.mark.parametrize("where", ["a_file/run", "read_only/run"])
def test_an_output_folder_that_cannot_be_written_is_one_line_naming_it(tmp_path, capsys, where):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "read_only").mkdir(mode=0o500)
    if where.startswith("read_only") and os.access(tmp_path / "read_only", os.W_OK):
        pytest.skip("this user (root?) writes into read-only folders")
    run = tmp_path / where
    recipe = tiny_recipe(tmp_path)
    code = main(["compare", "--config", str(recipe), "--output_dir", str(run), "--arms", "stock"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"hf-levy: error: cannot write the run folder {run} ("), err
    assert "--output_dir" in err
