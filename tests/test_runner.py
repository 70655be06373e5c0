"""compare keeps an arm only when its resolved config is unchanged, resumes an interrupted arm from its last
checkpoint, survives files cut short, lists the command-line overrides, and runs no code a recipe asks for."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import yaml

import hf_levy.recipes.runner as runner
from hf_levy.recipes.cli import main
from hf_levy.recipes.recipe import RecipeError, code_keys, load_recipe
from hf_levy.recipes.report import build_report

# 24 training pairs of a + b mod 7, batch 8: three steps an epoch, a few seconds an arm.
TINY = {
    "task": {"name": "modular_addition", "modulus": 7, "train_fraction": 0.5},
    "model": {"hidden_size": 16, "intermediate_size": 32},
    "target": {"metric": "eval_accuracy", "value": 1.01, "stop": False},  # never reached: every arm runs out
    "args": {
        "max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 1.0e-3, "logging_steps": 1,
        "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "no", "report_to": "none",
        "disable_tqdm": True, "use_cpu": True,
    },
    "arms": {
        "stock": {"trainer": "stock"},
        "levy": {"trainer": "levy", "num_eigenpairs": 2, "lanczos_num_iters": 4, "sketch_every_n_steps": 2,
                 "sketch_batch_size": 8},
    },
}  # fmt: skip


def tiny_recipe(tmp_path: pathlib.Path, **args) -> pathlib.Path:
    data = json.loads(json.dumps(TINY))
    data["args"].update(args)
    path = tmp_path / "tiny.yaml"
    path.write_text("# purpose: a test\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def run_compare(recipe_path, run_dir, **kw) -> list[str]:
    said: list[str] = []
    runner.compare(load_recipe(recipe_path), run_dir, progress=said.append, **kw)
    return said


def summary(run_dir, arm="stock") -> dict:
    return json.loads((run_dir / arm / "seed0" / "summary.json").read_text())


def test_an_arm_whose_resolved_config_changed_is_trained_again_and_the_report_lists_the_flags(tmp_path):
    recipe, run = tiny_recipe(tmp_path), tmp_path / "run"
    run_compare(recipe, run, arms=["stock"], overrides={"max_steps": "2"})
    assert summary(run)["steps"] == 2
    kept = run_compare(recipe, run, arms=["stock"], overrides={"max_steps": "2"})
    assert "kept" in kept[0]
    said = run_compare(recipe, run, arms=["stock"], overrides={"max_steps": "3", "learning_rate": "2e-3"})
    assert "max_steps: 2 -> 3" in said[0] and "learning_rate: 0.001 -> 0.002" in said[0], said
    assert summary(run)["steps"] == 3
    report = build_report(run).read_text()
    assert "## Command-line overrides" in report
    assert "Every arm and seed: `--max_steps 3 --learning_rate 2e-3`." in report


def test_an_edited_recipe_retrains_only_the_arms_it_changes(tmp_path):
    recipe, run = tiny_recipe(tmp_path, max_steps=2), tmp_path / "run"
    run_compare(recipe, run)
    data = yaml.safe_load(recipe.read_text())
    data["arms"]["levy"]["levy_alpha"] = 1.2
    recipe.write_text("# purpose: a test\n" + yaml.safe_dump(data, sort_keys=False))
    said = "\n".join(run_compare(recipe, run))
    assert "stock seed 0: already done" in said
    assert "levy seed 0: the resolved config changed (levy_alpha: 1.5 -> 1.2)" in said, said
    assert summary(run, "levy")["levy_alpha"] == 1.2


class Interrupted(Exception):
    pass


def test_an_interrupted_arm_resumes_from_its_last_checkpoint_and_ends_as_the_uninterrupted_one(
    tmp_path, monkeypatch
):
    recipe = tiny_recipe(tmp_path, save_strategy="steps", save_steps=2)
    run_compare(recipe, tmp_path / "whole")

    def interrupt(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise Interrupted

    monkeypatch.setattr(runner.TargetTracker, "on_step_end", interrupt, raising=False)
    run = tmp_path / "cut"
    for arm in ("stock", "levy"):
        with pytest.raises(Interrupted):
            run_compare(recipe, run, arms=[arm])
        assert (run / arm / "seed0" / "checkpoint-2").is_dir()
        assert not (run / arm / "seed0" / "summary.json").exists()
    monkeypatch.undo()

    said = "\n".join(run_compare(recipe, run))
    for arm in ("stock", "levy"):
        assert f"{arm} seed 0: unfinished (summary.json not written): resuming from checkpoint-2" in said, (
            said
        )
    for arm in ("stock", "levy"):
        resumed, whole = summary(run, arm), summary(tmp_path / "whole", arm)
        assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4, arm
        assert resumed["final_train_loss"] == whole["final_train_loss"], arm
        assert resumed["final_metric"] == whole["final_metric"], arm
    history = json.loads((run / "stock" / "seed0" / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]  # the logs before the cut are kept


def test_a_summary_cut_short_is_an_unfinished_arm_for_compare_and_report(tmp_path):
    recipe, run = tiny_recipe(tmp_path, max_steps=2), tmp_path / "run"
    run_compare(recipe, run)
    path = run / "levy" / "seed0" / "summary.json"
    path.write_text(path.read_text()[:40])
    with pytest.warns(UserWarning, match=f"{path}.*not valid JSON"):
        report = build_report(run).read_text()
    assert "| stock |" in report and "| levy |" not in report
    said = "\n".join(run_compare(recipe, run))
    assert "levy seed 0: unfinished (summary.json not valid JSON) and no checkpoint" in said, said
    assert summary(run, "levy")["steps"] == 2


def test_a_json_write_cut_short_leaves_the_previous_file(tmp_path):
    """A file-size limit makes the write fail half-way, as a full disk or a kill would."""
    path = tmp_path / "summary.json"
    path.write_text('{"steps": 2}')
    code = (
        "import pathlib, resource, signal, sys\n"
        "from hf_levy.recipes.arm_files import write_json\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "write_json(pathlib.Path(sys.argv[1]), {'steps': list(range(10_000))})\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0 and "File too large" in result.stderr, result.stderr[-2000:]
    assert json.loads(path.read_text()) == {"steps": 2}
    assert os.listdir(tmp_path) == ["summary.json"]  # no temporary file left behind


def evil_model_folder(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A model folder whose config names its own Python file, which leaves a marker when it runs."""
    folder, marker = tmp_path / "evil_model", tmp_path / "code_ran"
    folder.mkdir()
    auto_map = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto_map}))
    (folder / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nraise SystemExit('evil code ran')\n"
    )
    return folder, marker


def test_a_recipe_that_would_run_code_is_refused_without_the_flag(tmp_path, capsys):
    folder, marker = evil_model_folder(tmp_path)
    data = {**TINY, "model": {"architecture": "AutoModelForCausalLM", "pretrained": str(folder),
                              "trust_remote_code": True}}  # fmt: skip
    recipe = tmp_path / "evil.yaml"
    recipe.write_text("# purpose: a test\n" + yaml.safe_dump(data))
    code = main(["train", "--config", str(recipe), "--arm", "stock", "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    assert "trust_remote_code: True" in err and "--trust_remote_code" in err, err


def test_the_flag_lets_the_recipe_model_run_its_code(tmp_path, monkeypatch):
    import transformers

    seen = {}

    def fake_from_pretrained(location, **kwargs):
        seen.update(kwargs, location=location)
        raise Interrupted

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    data = {
        **TINY,
        "model": {"architecture": "AutoModelForCausalLM", "pretrained": "x", "trust_remote_code": True},
    }
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    trusted = load_recipe(recipe, trust_remote_code=True)  # refused at load without it (test_recipe_checks)
    with pytest.raises(RecipeError, match="trust_remote_code"):
        runner.build_recipe_model(trusted, None, seed=0)
    with pytest.raises(Interrupted):
        runner.build_recipe_model(trusted, None, seed=0, trust_remote_code=True)
    assert seen == {"location": "x", "trust_remote_code": True}


@pytest.mark.parametrize(
    ("model", "flagged"),
    [
        ({"trust_remote_code": True}, ["trust_remote_code"]),
        ({"trust_remote_code": False, "weights_only": True, "attn_implementation": "eager"}, []),
        ({"weights_only": False}, ["weights_only"]),
        ({"use_kernels": True, "attn_implementation": "kernels-community/flash-attn"}, ["use_kernels", "attn_implementation"]),
    ],
)  # fmt: skip
def test_code_keys_are_the_model_keys_that_load_code(model, flagged):
    assert [text.partition(":")[0] for text in code_keys(model)] == flagged


def test_a_stock_arm_is_not_retrained_when_only_levy_fields_change(tmp_path):
    recipe, run = tiny_recipe(tmp_path, max_steps=2), tmp_path / "run"
    run_compare(recipe, run, arms=["stock"])
    said = run_compare(recipe, run, arms=["stock"], overrides={"levy_scale": "0.7", "num_eigenpairs": "3"})
    assert "kept" in said[0], said  # the stock Trainer reads no levy field
