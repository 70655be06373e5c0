"""The metrics reach a tracker through report_to: TensorBoard's event files hold the curvature/ and levy/ scalars."""

from __future__ import annotations

import pathlib

import pytest
from test_callback_wiring import plain_trainer
from trainer_utils import run_levy

pytest.importorskip("tensorboard")


def scalars(folder: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = folder.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


def logged(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(h["step"], h[key]) for h in history if key in h and "eval_loss" not in h]


@pytest.mark.parametrize("route", ["LevyTrainer", "callbacks=[LevyCallback]"])
def test_curvature_and_levy_scalars_arrive_in_tensorboard(tmp_path, route):
    if route == "LevyTrainer":
        trainer = run_levy(tmp_path, levy_scale=0.5, report_to="tensorboard")
    else:  # transformers places its TensorBoard callback before a user's
        trainer, _ = plain_trainer(tmp_path / "listed", report_to="tensorboard")
        trainer.train()
    found = scalars(pathlib.Path(trainer.args.output_dir))
    history = trainer.state.log_history
    for key in (
        "curvature/eigenvalue_0",
        "curvature/sketch_seconds",
        "levy/noise_norm",
        "levy/noise_to_grad_ratio",
    ):
        want = logged(history, key)
        assert want, key
        got = found.get(f"train/{key}")
        assert got is not None, f"train/{key} not among {sorted(found)}"
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def test_each_sketch_reaches_tensorboard_at_the_step_it_was_computed_at(tmp_path):
    # Refreshes every 3 steps of 8 (at 0, 3 and 6), training logs every 4: two refreshes fall in the first
    # window and the last comes after the last training log, yet each is plotted at its own step.
    trainer = run_levy(tmp_path, max_steps=8, levy_scale=0.5, logging_steps=4, report_to="tensorboard")
    found = scalars(pathlib.Path(trainer.args.output_dir))
    assert [s for s, _ in found["train/curvature/eigenvalue_0"]] == [0, 3, 6]
    assert [s for s, _ in found["train/curvature/sketch_seconds"]] == [0, 3, 6]
    assert [v for _, v in found["train/curvature/sketch_step"]] == [0.0, 3.0, 6.0]
    assert [s for s, _ in found["train/levy/noise_norm"]] == [4, 8]  # the noise stays with the training logs
