"""The sketch schedule under a time budget (sketch_max_overhead), on a fake clock so the steps are exact."""

from __future__ import annotations

import math
import types

import pytest
from safetensors.torch import load_file
from trainer_utils import run_levy
from transformers import TrainerCallback

import hf_levy._schedule
from hf_levy import LevyCallback, LevyConfig
from hf_levy._schedule import STATE_KEYS, RefreshSchedule

REFRESH_SECONDS = 20.0


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class StepCost(TrainerCallback):
    """Each optimizer step takes `seconds` on the fake clock (the last one from `after` on, if given)."""

    def __init__(self, clock, seconds, after=None):
        self.clock, self.seconds, self.after = clock, seconds, after

    def on_step_end(self, args, state, control, **kwargs):
        late = self.after is not None and state.global_step > self.after[0]
        self.clock.now += self.after[1] if late else self.seconds


@pytest.fixture
def clock(monkeypatch):
    """Fake wall clock of the callback; every sketch refresh costs REFRESH_SECONDS on it. Yields
    (clock, steps of the refreshes)."""
    fake = FakeClock()
    monkeypatch.setattr(hf_levy._schedule, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    refreshed = []
    real = LevyCallback.refresh_sketch

    def refresh_sketch(self, step):
        refreshed.append(step)
        fake.now += REFRESH_SECONDS
        return real(self, step)

    monkeypatch.setattr(LevyCallback, "refresh_sketch", refresh_sketch)
    return fake, refreshed


def test_without_a_budget_the_sketch_refreshes_every_n_steps(tmp_path, clock):
    fake, refreshed = clock
    run_levy(tmp_path, max_steps=12, levy_scale=0.5, callbacks=[StepCost(fake, 1.0)])
    assert refreshed == [0, 3, 6, 9]


def test_budget_defers_the_refresh_until_the_steps_paid_for_it(tmp_path, clock):
    # 20 s per refresh, 1 s per step, budget 0.5: the next refresh waits ceil(20 / (0.5 x 1)) = 40 steps.
    fake, refreshed = clock
    trainer = run_levy(
        tmp_path,
        max_steps=85,
        levy_scale=0.5,
        sketch_max_overhead=0.5,
        logging_steps=5,
        callbacks=[StepCost(fake, 1.0)],
    )
    assert refreshed == [0, 40, 80]
    logged = [h for h in trainer.state.log_history if "curvature/sketch_period" in h]
    assert [h["curvature/sketch_period"] for h in logged] == [40.0, 40.0]
    summary = trainer.state.log_history[-1]
    assert "train_runtime" in summary
    assert summary["curvature/sketch_seconds_total"] == pytest.approx(3 * REFRESH_SECONDS)


def test_budget_takes_the_median_step_so_evaluations_do_not_shorten_the_wait(tmp_path, clock):
    # Steps of 1 s, and steps 1, 4, 7, ... an extra 30 s (an evaluation). When step 3 makes the refresh due the
    # timed steps are 31, 1, 1 s: the median (1 s) waits 40 steps, the mean (11 s) would wait only 4.
    fake, refreshed = clock

    class Evaluation(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            fake.now += 30.0 if state.global_step % 3 == 1 else 0.0

    run_levy(
        tmp_path,
        max_steps=45,
        levy_scale=0.5,
        sketch_max_overhead=0.5,
        callbacks=[StepCost(fake, 1.0), Evaluation()],
    )
    assert refreshed == [0, 40]


def test_resume_restores_the_deferred_refresh_and_the_total(tmp_path, clock):
    # The checkpoint at step 20 holds "next refresh at 40" (decided at step 3 from 1 s steps). The resumed
    # run's steps take 4 s: recomputing instead of restoring would refresh at ceil(20 / (0.5 x 4)) = 10 -> 21.
    fake, refreshed = clock
    settings = dict(levy_scale=0.5, sketch_max_overhead=0.5, save_strategy="steps", save_steps=20)
    run_levy(tmp_path, max_steps=20, name="first", callbacks=[StepCost(fake, 1.0)], **settings)
    saved = load_file(str(tmp_path / "first" / "checkpoint-20" / "levy_state.safetensors"))
    assert int(saved["schedule_deferred_to"]) == 40
    refreshed.clear()
    resumed = run_levy(
        tmp_path,
        max_steps=45,
        name="resumed",
        resume=str(tmp_path / "first" / "checkpoint-20"),
        callbacks=[StepCost(fake, 4.0)],
        **settings,
    )
    assert refreshed == [40]
    assert resumed.state.log_history[-1]["curvature/sketch_seconds_total"] == pytest.approx(
        2 * REFRESH_SECONDS
    )


@pytest.mark.parametrize("bad", [0.0, -0.1, math.nan])
def test_sketch_max_overhead_must_be_positive(tmp_path, bad):
    with pytest.raises(ValueError, match="sketch_max_overhead"):
        LevyConfig(output_dir=str(tmp_path), sketch_max_overhead=bad)


def test_total_sketch_seconds_counts_refreshes_between_logs(tmp_path, clock):
    # Refreshes at 0, 3, 6, 9 (20 s each), logs at 5 and 10: the total still counts all four.
    fake, refreshed = clock
    trainer = run_levy(
        tmp_path, max_steps=12, levy_scale=0.5, logging_steps=5, callbacks=[StepCost(fake, 1.0)]
    )
    assert refreshed == [0, 3, 6, 9]
    history = trainer.state.log_history
    assert history[-1]["curvature/sketch_seconds_total"] == pytest.approx(4 * REFRESH_SECONDS)


def test_a_second_train_call_starts_its_schedule_and_total_afresh(tmp_path, clock):
    fake, refreshed = clock
    trainer = run_levy(tmp_path, max_steps=4, levy_scale=0.5, callbacks=[StepCost(fake, 1.0)])
    assert trainer.state.log_history[-1]["curvature/sketch_seconds_total"] == pytest.approx(
        2 * REFRESH_SECONDS
    )
    refreshed.clear()
    trainer.train()  # a fresh run on the same trainer: sketch at 0 and 3 again, its own total
    assert refreshed == [0, 3]
    assert trainer.state.log_history[-1]["curvature/sketch_seconds_total"] == pytest.approx(
        2 * REFRESH_SECONDS
    )


# ---------------------------------------------------------------- RefreshSchedule alone, without a Trainer
def drive(schedule, clock, steps, step_seconds, refresh_seconds=REFRESH_SECONDS):
    """Run ``steps`` optimizer steps on the fake clock; returns the steps at which a refresh ran."""
    refreshed, last = [], None
    for step in range(steps):
        if schedule.due(step, last):
            with schedule.refreshing():
                clock.now += refresh_seconds
            refreshed.append(step)
            last = step
        clock.now += step_seconds(step) if callable(step_seconds) else step_seconds
    return refreshed


@pytest.fixture
def fake_clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(hf_levy._schedule, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def test_schedule_without_budget_refreshes_every_n_steps(fake_clock):
    schedule = RefreshSchedule(every_n_steps=4)
    assert drive(schedule, fake_clock, 13, 1.0) == [0, 4, 8, 12]
    assert schedule.total_seconds == 4 * REFRESH_SECONDS and schedule.deferred_to is None


def test_schedule_budget_waits_refresh_seconds_over_budget_times_the_median_step(fake_clock):
    # 20 s refresh, 2 s steps, budget 0.25: ceil(20 / (0.25 x 2)) = 40 steps after each refresh.
    schedule = RefreshSchedule(every_n_steps=3, max_overhead=0.25)
    assert drive(schedule, fake_clock, 90, 2.0) == [0, 40, 80]
    # one slow step in three (an evaluation): the median, not the mean (12 s), prices the step
    slow = RefreshSchedule(every_n_steps=3, max_overhead=0.25)
    assert drive(slow, fake_clock, 50, lambda s: 32.0 if s % 3 == 1 else 2.0) == [0, 40]


def test_schedule_deferred_step_is_the_one_every_rank_agrees_on(fake_clock):
    agreed = []
    schedule = RefreshSchedule(every_n_steps=3, max_overhead=0.5, agree=lambda s: agreed.append(s) or s - 33)
    assert drive(schedule, fake_clock, 12, 1.0) == [0, 7]
    assert agreed == [40, 47]  # this rank's own choices (refresh + 40 steps), replaced by the agreed ones


def test_schedule_state_round_trips_through_its_checkpoint_keys(fake_clock):
    schedule = RefreshSchedule(every_n_steps=3, max_overhead=0.5)
    drive(schedule, fake_clock, 5, 1.0)
    state = schedule.state_dict()
    assert set(state) == set(STATE_KEYS)
    assert int(state["schedule_deferred_to"]) == 40 and float(state["schedule_sketch_seconds_total"]) == 20.0
    restored = RefreshSchedule(every_n_steps=3, max_overhead=0.5)
    restored.load_state_dict(state)
    assert (restored.total_seconds, restored.refresh_seconds, restored.deferred_to) == (20.0, 20.0, 40)
    assert not restored.due(39, 0) and restored.due(40, 0)
    fresh = RefreshSchedule(every_n_steps=3)
    fresh.load_state_dict(RefreshSchedule(every_n_steps=3).state_dict())
    assert (fresh.total_seconds, fresh.refresh_seconds, fresh.deferred_to) == (0.0, None, None)


def test_schedule_rounds_the_wait_up_so_the_budget_is_never_exceeded(fake_clock):
    # 20 s refresh, 3 s steps, budget 0.5: 20 / (0.5 x 3) = 13.3 steps, so the refresh waits 14 (13 would spend
    # 20 s against 39 s of training, 51% > 50%).
    schedule = RefreshSchedule(every_n_steps=2, max_overhead=0.5)
    assert drive(schedule, fake_clock, 30, 3.0) == [0, 14, 28]


def test_a_resumed_schedule_times_a_step_before_pricing_the_saved_refresh(fake_clock):
    # The checkpoint holds a 20 s refresh whose deferral was not decided yet. After the resume the first call can
    # time nothing, so it defers; the steps then take 2 s: the wait is ceil(20 / (0.5 x 2)) = 20 steps from the
    # saved refresh (step 10), i.e. step 30. Forgetting the saved 20 s would refresh at once (step 13).
    saved = RefreshSchedule(every_n_steps=3, max_overhead=0.5)
    with saved.refreshing():
        fake_clock.now += REFRESH_SECONDS
    resumed = RefreshSchedule(every_n_steps=3, max_overhead=0.5)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.refresh_seconds == REFRESH_SECONDS and resumed.deferred_to is None
    due = []
    for step in range(13, 35):
        if resumed.due(step, last_refresh=10):
            due.append(step)
            break
        fake_clock.now += 2.0
    assert due == [30]


def test_a_sketch_whose_refresh_was_never_timed_is_refreshed_at_its_period(fake_clock):
    # A budget, a sketch from step 10 (restored) but no refresh cost to price a deferral with (the checkpoint
    # held none): the budget cannot apply, and the period alone decides.
    schedule = RefreshSchedule(every_n_steps=3, max_overhead=0.5)
    schedule.load_state_dict(RefreshSchedule(every_n_steps=3).state_dict())
    due = []
    for step in range(11, 15):
        due.append(schedule.due(step, last_refresh=10))
        fake_clock.now += 2.0
    assert due == [False, False, True, True]


def test_the_refresh_itself_is_not_timed_as_a_training_step(fake_clock):
    # Steps of 1 s around a 20 s refresh: the step after the refresh is timed from the refresh's end, so the wait
    # is ceil(20 / (0.5 x 1)) = 40 steps; counting the refresh into that step (21 s) would wait only 2.
    schedule = RefreshSchedule(every_n_steps=1, max_overhead=0.5)
    assert drive(schedule, fake_clock, 45, 1.0) == [0, 40]
