"""The example script and DeepSpeed config that docs/distributed.md launches: the config printed in the doc is
the shipped file, every file its commands name is one `hf-levy cp` fetches (and the doc says so), and the script
trains (one process, no DeepSpeed)."""

from __future__ import annotations

import math
import pathlib
import re
import runpy
import sys

import hf_levy
from hf_levy.recipes import catalog

ROOT = pathlib.Path(__file__).parents[1]
DOC = (ROOT / "docs" / "distributed.md").read_text()
SECTION = DOC[DOC.index("## DeepSpeed ZeRO") : DOC.index("## Multi-node")]


def test_the_zero_config_in_the_doc_is_the_shipped_file():
    (block,) = re.findall(r"```json\n(.*?)```", SECTION, flags=re.S)
    assert block == catalog.examples()["ds_zero2.json"].read_text()


def test_every_file_the_deepspeed_commands_name_is_fetched_by_hf_levy_cp_first():
    # A pip user has no clone: the commands name the files in the current folder, and the doc copies them there.
    commands = re.findall(r"```(?:bash|python)\n(.*?)```", SECTION, flags=re.S)
    files = {name for command in commands for name in re.findall(r"[\w./-]+\.(?:json|py)\b", command)}
    assert files == {"ds_zero2.json", "train_tiny_llama.py"}
    assert files <= set(catalog.examples())
    assert all(f"hf-levy cp {name} ." in SECTION for name in files)
    assert ".venv/" not in SECTION and "examples/" not in "".join(commands)


def test_the_example_script_trains_with_levy_trainer(tmp_path, monkeypatch):
    flags = ["--use_cpu", "--output_dir", str(tmp_path), "--max_steps", "2", "--logging_steps", "1"]
    flags += ["--num_eigenpairs", "2", "--lanczos_num_iters", "4", "--sketch_batch_size", "8"]
    flags += ["--disable_tqdm", "true"]
    monkeypatch.setattr(sys, "argv", ["train_tiny_llama.py", *flags])
    trained = []

    class Recording(hf_levy.LevyTrainer):  # keeps the log history the script does not return
        def train(self, *args, **kwargs):
            output = super().train(*args, **kwargs)
            trained.append(self.state.log_history)
            return output

    monkeypatch.setattr(hf_levy, "LevyTrainer", Recording)
    runpy.run_path(str(catalog.examples()["train_tiny_llama.py"]), run_name="__main__")
    (history,) = trained
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 2 and all(map(math.isfinite, losses)), history
    assert any("levy/noise_norm" in h for h in history), "the example's LevyTrainer added no noise"
