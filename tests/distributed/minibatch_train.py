"""LevyTrainer with a 'minibatch' noise basis on a float64 linear regression small enough to enumerate every
sub-batch: plain SGD, so each step's parameters give back the gradient the optimizer saw, (θ_before − θ_after)/lr.

Imported by tests/test_minibatch_trainer.py (one process) and run there under `torchrun --nproc_per_node 2`
(gloo DDP): ``--out DIR`` writes ``rank{r}.pt`` with the parameters before and after every step and the log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from datasets import Dataset
from transformers import TrainerCallback, default_data_collator

from hf_levy import LevyConfig, LevyTrainer

LEARNING_RATE = 0.1


def regression_data(n: int = 6, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets on a grid of halves, exact in float32 (the collator's dtype) and float64."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (n, dim), generator=generator).double() / 2
    y = torch.randint(-4, 5, (n,), generator=generator).double() / 2
    return x, y


class Regression(torch.nn.Module):
    """Mean squared error of a linear model in float64: ∇L_S = (2/|S|) X_Sᵀ(X_S w − y_S)."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, dim, dtype=torch.float64))

    def forward(self, x, labels):
        return {"loss": ((x.double() @ self.w - labels.double()) ** 2).mean()}


class StepRecorder(TrainerCallback):
    """The weights before and after every optimizer step."""

    def __init__(self):
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before.append(model.w.detach().clone())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after.append(model.w.detach().clone())


def train(
    output_dir: str, *, collator=default_data_collator, resume: str | None = None, **fields
) -> tuple[LevyTrainer, StepRecorder]:
    """Six examples, three per device and micro-batch, SGD at LEARNING_RATE, one log entry per step;
    ``resume``: a checkpoint to resume from."""
    x, y = regression_data()
    settings = dict(
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,
        max_steps=4,
        optim="sgd",
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        levy_noise_basis="minibatch",
        levy_noise_batch_size=2,
        levy_scale=1.0,
        num_eigenpairs=2,
        lanczos_num_iters=4,
        sketch_batch_size=6,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    settings.update(fields)
    recorder = StepRecorder()
    trainer = LevyTrainer(
        model=Regression(),
        args=LevyConfig(output_dir=output_dir, **settings),
        train_dataset=Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()}),
        data_collator=collator,
        callbacks=[recorder],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--fields", default="{}", help="LevyConfig fields as JSON")
    cli = parser.parse_args(argv)
    torch.set_num_threads(1)
    trainer, recorder = train(cli.out, **json.loads(cli.fields))
    result = {"before": recorder.before, "after": recorder.after, "log": trainer.state.log_history}
    torch.save(result, os.path.join(cli.out, f"rank{trainer.args.process_index}.pt"))
    torch.distributed.destroy_process_group()
    os._exit(0)  # leave before interpreter teardown (a gloo rank once aborted there)


if __name__ == "__main__":
    main(sys.argv[1:])
