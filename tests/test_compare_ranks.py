"""``hf-levy compare`` under ``torchrun --nproc_per_node 2`` (gloo, CPU): the main process alone owns the run
folder and the console, a rerun after a config change retrains cleanly, and the report's batch is what each
optimizer step consumed, counted independently by the Trainer's own token counter."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).parents[1]
pytestmark = pytest.mark.slow
TOKENS_PER_EXAMPLE = 4  # modular addition: [a, b, EQ, c]
# 24 training pairs of a + b mod 7; on 2 ranks a full batch is the whole set, split between them, and 3 per
# device x 2 micro-batches x 2 ranks divides the set, so every step consumes the same number of examples.
RECIPE = {
    "task": {"name": "modular_addition", "modulus": 7, "train_fraction": 0.5},
    "model": {"hidden_size": 16, "intermediate_size": 32},
    "target": {"metric": "eval_accuracy", "value": 1.01, "stop": False},
    "args": {
        "max_steps": 2, "learning_rate": 1.0e-3, "logging_steps": 1, "eval_strategy": "steps", "eval_steps": 2,
        "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "use_cpu": True,
        "include_num_input_tokens_seen": "all",
    },
    "arms": {
        "stock_full": {"trainer": "stock", "per_device_train_batch_size": "full"},
        "levy_accumulated": {"trainer": "levy", "per_device_train_batch_size": 3, "gradient_accumulation_steps": 2,
                             "num_eigenpairs": 2, "lanczos_num_iters": 4, "sketch_batch_size": 8},
    },
}  # fmt: skip


def launch(recipe: pathlib.Path, run: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "hf_levy.recipes.cli", "compare", "--config", str(recipe), "--output_dir", str(run)]
    result = subprocess.run([*command, *flags], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranks")
    recipe, run = folder / "tiny.yaml", folder / "run"
    recipe.write_text("# purpose: a test\n" + yaml.safe_dump(RECIPE, sort_keys=False))
    first = launch(recipe, run)
    second = launch(recipe, run, "--max_steps", "3")  # every arm's config changed: both retrain
    return run, first.stdout, second.stdout


def test_only_the_main_process_prints_the_status_lines_and_the_report(launches):
    run, first, second = launches
    for out in (first, second):
        lines = out.splitlines()
        assert sum(line.startswith("report: ") for line in lines) == 1, out
        assert sum(line.startswith("[1/2] stock_full seed 0: ") for line in lines) == 2, out  # decision, done
        assert sum(line.startswith("[2/2] levy_accumulated seed 0: ") for line in lines) == 2, out
    assert second.count("max_steps: 2 -> 3") == 2, second  # one line per arm, once


def test_a_rerun_after_a_config_change_retrains_every_arm_in_a_clean_folder(launches):
    run, _, _ = launches
    for arm in ("stock_full", "levy_accumulated"):
        folder = run / arm / "seed0"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["steps"] == 3
        assert json.loads((folder / "config.json").read_text())["max_steps"] == 3
        assert sorted(p.name for p in folder.iterdir()) == [
            "config.json", "log_history.json", "summary.json", "timeline.json",
        ]  # fmt: skip
    assert (run / "report.md").is_file()


def test_the_reported_batch_is_the_examples_each_optimizer_step_consumed(launches):
    run, _, _ = launches

    def batch(arm: str) -> int:
        return json.loads((run / arm / "seed0" / "summary.json").read_text())["global_batch_size"]

    # Micro-batches of 3 on each rank, 2 per step: the Trainer's token counter (summed over the ranks) says
    # how many examples each step took.
    history = json.loads((run / "levy_accumulated" / "seed0" / "log_history.json").read_text())
    tokens = [h["num_input_tokens_seen"] for h in history if "loss" in h]
    per_step = {b - a for a, b in zip([0, *tokens[:-1]], tokens, strict=True)}
    assert per_step == {3 * 2 * 2 * TOKENS_PER_EXAMPLE}, tokens
    assert batch("levy_accumulated") == 3 * 2 * 2
    # A full batch is the 24 training pairs once. (Accelerate's even batches hand each rank all 24 of them, so
    # the token counter reads 48 examples a step there: the same 24 on both ranks.)
    assert batch("stock_full") == round(0.5 * 7 * 7) == 24


@pytest.fixture(scope="module")
def deepspeed_launches(tmp_path_factory):
    pytest.importorskip("deepspeed")
    from hf_levy._extension_locks import clear_stale_build_locks

    clear_stale_build_locks()  # a run killed while loading DeepSpeed's op would make this launch wait forever
    folder = tmp_path_factory.mktemp("deepspeed_ranks")
    recipe, run = folder / "tiny.yaml", folder / "run"
    recipe.write_text("# purpose: a test\n" + yaml.safe_dump(RECIPE, sort_keys=False))
    config = ROOT / "hf_levy" / "recipes" / "examples" / "ds_zero2.json"
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        first = launch(recipe, run, "--deepspeed", str(config))
        second = launch(recipe, run, "--deepspeed", str(config), "--max_steps", "3")
    finally:
        del os.environ["DS_ACCELERATOR"]
    return run, first.stdout, second.stdout


def test_every_arm_of_a_deepspeed_run_builds_its_own_accelerator_and_a_rerun_retrains(deepspeed_launches):
    # Accelerate refuses a second Accelerator bringing its own DeepSpeed plugin: the second arm used to fail.
    run, first, second = deepspeed_launches
    for out in (first, second):
        assert "[1/2] stock_full seed 0: done in" in out, out
        assert "[2/2] levy_accumulated seed 0: done in" in out, out
    for arm in ("stock_full", "levy_accumulated"):  # the rerun's files
        assert json.loads((run / arm / "seed0" / "summary.json").read_text())["steps"] == 3
