"""LevyCallback as HF users write it: ``Trainer(callbacks=[LevyCallback(...)])`` or ``add_callback``."""

from __future__ import annotations

import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from trainer_utils import COMMON, OVERRIDDEN, SKETCH, flat_params, model, token_dataset
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from hf_levy import LevyArguments, LevyCallback
from hf_levy._callback_wiring import checkpoint_folder

NOISE = dict(levy_scale=0.5, levy_seed=0)


def levy_callback(every: int = 3) -> LevyCallback:
    return LevyCallback(LevyArguments(**{**SKETCH, "sketch_every_n_steps": every}, **NOISE))


def plain_trainer(folder, callbacks=(), max_steps=6, levy=None, **overrides):
    """The stock Trainer with a LevyCallback in its callback list (not attached)."""
    args = TrainingArguments(output_dir=str(folder), max_steps=max_steps, **{**COMMON, **overrides})
    levy = levy if levy is not None else levy_callback()
    trainer = Trainer(
        model=model(),
        args=args,
        train_dataset=token_dataset(),
        data_collator=default_data_collator,
        callbacks=[*callbacks, levy],
    )
    return trainer, levy


class Recorder(TrainerCallback):
    """Stands in for a reporting callback (TensorBoard, W&B): keeps a copy of each log it receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_a_logging_callback_listed_before_it_receives_the_metrics(tmp_path):
    recorder = Recorder()
    trainer, levy = plain_trainer(tmp_path / "listed", callbacks=[recorder])
    trainer.train()
    assert trainer.callback_handler.callbacks[0] is levy
    steps = [log for log in recorder.logs if "loss" in log]
    assert "curvature/eigenvalue_0" in steps[0] and "levy/noise_norm" in steps[0]
    assert levy.noise_draws == 6


def test_a_callback_added_after_construction_also_reaches_every_logger(tmp_path):
    recorder = Recorder()
    trainer, levy = plain_trainer(tmp_path / "added", callbacks=[recorder], max_steps=4)
    trainer.callback_handler.remove_callback(levy)  # as if never passed: add_callback appends it last
    trainer.add_callback(levy)
    assert trainer.callback_handler.callbacks[-1] is levy
    trainer.train()
    first = next(log for log in recorder.logs if "loss" in log)
    assert "curvature/eigenvalue_0" in first and "levy/noise_to_grad_ratio" in first


def test_the_checkpoint_holds_the_sketch_and_resume_true_restores_it_bitwise(tmp_path):
    full, _ = plain_trainer(tmp_path / "full", save_strategy="steps", save_steps=3)
    full.train()
    assert (tmp_path / "full" / "checkpoint-3" / "levy_state.safetensors").is_file()
    # resume_from_checkpoint=True takes output_dir's last checkpoint: a folder the callback can find.
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed, levy = plain_trainer(tmp_path / "resumed", save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=True)
    assert torch.equal(flat_params(resumed), flat_params(full))
    assert levy.run.sketch.step == 3 and levy.run.schedule.total_seconds > 0


def test_resume_from_the_arguments_resume_from_checkpoint_restores_the_sketch(tmp_path, caplog):
    # Sketches at 0 and 4 only: a sketch recomputed at the resume step 3 would change the result.
    settings = dict(save_strategy="steps", save_steps=3)
    full, _ = plain_trainer(tmp_path / "full", levy=levy_callback(every=4), **settings)
    full.train()
    checkpoint = str(tmp_path / "full" / "checkpoint-3")
    resumed, callback = plain_trainer(
        tmp_path / "resumed", levy=levy_callback(every=4), resume_from_checkpoint=checkpoint, **settings
    )
    with caplog.at_level(logging.WARNING, logger="hf_levy.callback"):
        resumed.train(resume_from_checkpoint=checkpoint)
    assert not [r for r in caplog.records if "cannot see the checkpoint" in r.getMessage()]
    assert torch.equal(flat_params(resumed), flat_params(full))
    assert callback.run.sketch.step == 4  # the saved step-0 sketch held until its period ended


def test_a_resume_the_callback_cannot_locate_warns_and_names_attach(tmp_path, caplog):
    full, _ = plain_trainer(
        tmp_path / "full", levy=levy_callback(every=4), save_strategy="steps", save_steps=3
    )
    full.train()
    resumed, levy = plain_trainer(tmp_path / "elsewhere", levy=levy_callback(every=4))
    with caplog.at_level(logging.WARNING, logger="hf_levy.callback"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    warned = [r.getMessage() for r in caplog.records if "cannot see the checkpoint" in r.getMessage()]
    assert len(warned) == 1
    assert "attach(trainer)" in warned[0] and "LevyTrainer" in warned[0]
    assert levy.run.sketch.step == 3  # recomputed at the resume step (the saved one would hold until 4)


def test_a_checkpoint_of_another_run_with_the_same_step_is_not_taken(tmp_path, caplog):
    # output_dir holds a checkpoint-3 of a different run (another seed): its sketch must not be used.
    settings = dict(save_strategy="steps", save_steps=3)
    plain_trainer(tmp_path / "shared", levy=levy_callback(every=4), seed=1, **settings)[0].train()
    plain_trainer(tmp_path / "full", levy=levy_callback(every=4), **settings)[0].train()
    resumed, levy = plain_trainer(tmp_path / "shared", levy=levy_callback(every=4))
    with caplog.at_level(logging.WARNING, logger="hf_levy.callback"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert any("cannot see the checkpoint" in r.getMessage() for r in caplog.records)
    assert levy.run.sketch.step == 3


def test_calibration_under_clipping_without_attach_is_refused_naming_attach(tmp_path):
    calibrated = LevyCallback(
        LevyArguments(**SKETCH, levy_virtual_batch_size=2, calibration_num_microbatches=32)
    )
    trainer, _ = plain_trainer(tmp_path / "calibrated", levy=calibrated)
    with pytest.raises(ValueError, match=r"max_grad_norm.*attach\(trainer\).*max_grad_norm=0"):
        trainer.train()


def test_a_callback_both_listed_and_attached_runs_its_events_once(tmp_path):
    trainer, levy = plain_trainer(tmp_path / "both", max_steps=3)
    levy.attach(trainer)
    assert [c for c in trainer.callback_handler.callbacks if c is levy] == [levy]
    trainer.train()
    assert levy.noise_draws == 3


def test_on_save_finds_the_checkpoint_only_where_the_trainer_wrote_it(tmp_path):
    # A hyperparameter-search trial writes its checkpoints into a folder of its own: the callback must not create
    # output_dir/checkpoint-<step> for the sketch file then (it warns instead).
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=5)
    assert checkpoint_folder(args, state) is None
    (tmp_path / "checkpoint-5").mkdir()
    assert checkpoint_folder(args, state) == str(tmp_path / "checkpoint-5")


def test_attach_writes_the_sketch_into_a_trial_checkpoint_next_to_the_trainers_files(tmp_path):
    # A hyperparameter-search trial saves into a folder of its own (Trainer._get_output_dir(trial)): the sketch
    # file must land in that checkpoint, beside the Trainer's files, not in output_dir.
    trainer, levy = plain_trainer(tmp_path / "out", max_steps=3, save_strategy="steps", save_steps=3)
    levy.attach(trainer)
    trial_dir = tmp_path / "trial-7"
    trainer._get_output_dir = lambda trial: str(trial_dir)
    trainer.train()
    checkpoint = trial_dir / "checkpoint-3"
    assert (checkpoint / "trainer_state.json").is_file()
    assert (checkpoint / "levy_state.safetensors").is_file()
    assert not (tmp_path / "out" / "checkpoint-3").exists()


def test_a_second_train_call_starts_afresh_without_the_resumed_sketch(tmp_path):
    full, _ = plain_trainer(
        tmp_path / "full", levy=levy_callback(every=4), save_strategy="steps", save_steps=3
    )
    full.train()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed, levy = plain_trainer(tmp_path / "resumed", levy=levy_callback(every=4))
    resumed.train(resume_from_checkpoint=True)
    assert levy.run.sketch.step == 4  # the saved step-0 sketch held until its period ended
    resumed.train()  # a new run from step 0: nothing of the resumed one carries over
    first = next(h for h in resumed.state.log_history if "loss" in h)
    assert first["step"] == 2 and "curvature/eigenvalue_0" in first  # its own sketch of step 0


def test_a_trial_checkpoint_the_callback_cannot_see_is_warned_about_once(tmp_path, caplog):
    # Not attached: on_save cannot find a hyperparameter trial's checkpoints; two saves, one warning.
    trainer, _ = plain_trainer(tmp_path / "out", max_steps=4, save_strategy="steps", save_steps=2)
    trainer._get_output_dir = lambda trial: str(tmp_path / "trial-3")
    with caplog.at_level(logging.WARNING, logger="hf_levy.callback"):
        trainer.train()
    assert (tmp_path / "trial-3" / "checkpoint-4").is_dir()
    warned = [r.getMessage() for r in caplog.records if "cannot save the sketch" in r.getMessage()]
    assert len(warned) == 1 and "checkpoint of step 2" in warned[0]


def test_attach_overrides_by_subclassing_and_patches_no_method_on_the_instance(tmp_path):
    trainer, levy = plain_trainer(tmp_path / "attached", max_steps=2)
    levy.attach(trainer)
    assert isinstance(trainer, Trainer) and type(trainer).__name__ == "TrainerWithLevy"
    patched = OVERRIDDEN
    assert not patched & vars(trainer).keys()
    trainer.train()
    sketch = next(h for h in trainer.state.log_history if "curvature/eigenvalue_0" in h)
    assert sketch["step"] == 0 and "loss" not in sketch  # the refresh's own entry, through the override


def test_a_second_levy_callback_is_refused_by_an_attached_trainer(tmp_path):
    trainer, levy = plain_trainer(tmp_path / "twice", max_steps=2)
    levy.attach(trainer)
    with pytest.raises(ValueError, match="already has a LevyCallback"):
        levy_callback().attach(trainer)
