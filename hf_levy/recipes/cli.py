"""The ``hf-levy`` command: train one arm of a recipe, compare all its arms, rebuild a report.

hf-levy train   --config recipes/X.yaml [--arm NAME] [--seed N] [--output_dir DIR] [--<field> VALUE ...]
hf-levy compare --config recipes/X.yaml [--seeds 0,1,2] [--arms a,b] [--output_dir DIR] [--<field> VALUE ...]
hf-levy report  RUN_DIR
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from hf_levy import __version__

FIELDS_HELP = (
    "Any LevyConfig / TrainingArguments field can follow as --<field> VALUE (e.g. --learning_rate 3e-4 "
    "--levy_alpha 1.2); it overrides the recipe for every arm run. Layering: defaults < recipe YAML < flags. "
    'Unknown fields are errors. The fields and their help: python -c "from transformers import '
    'HfArgumentParser; from hf_levy import LevyConfig; HfArgumentParser(LevyConfig).print_help()"'
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-levy",
        description=(
            "hf_levy: fine-tune Hugging Face models with large batches plus Hessian-shaped α-stable gradient "
            "noise, and compare against the stock Trainer on recipes (recipes/*.yaml)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"hf-levy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train one arm of a recipe",
        description="Train one arm of a recipe and write its logs, config and summary.",
        epilog=FIELDS_HELP,
    )
    train.add_argument("--config", required=True, help="recipe YAML, e.g. recipes/modular_addition.yaml")
    train.add_argument("--arm", help="arm to train (default: the recipe's first LevyTrainer arm)")
    train.add_argument(
        "--seed", type=int, default=None, help="training seed (default: the recipe's first seed)"
    )
    train.add_argument("--output_dir", help="run directory (default: runs/<recipe name>)")

    compare = commands.add_parser(
        "compare",
        help="train every arm of a recipe and write the comparison report",
        description=(
            "Train every arm of a recipe (for every seed), skipping arms already finished in the run "
            "directory, then write report.md and plots/ there."
        ),
        epilog=FIELDS_HELP,
    )
    compare.add_argument("--config", required=True, help="recipe YAML, e.g. recipes/modular_addition.yaml")
    compare.add_argument("--seeds", help="comma-separated seeds (default: the recipe's seeds), e.g. 0,1,2")
    compare.add_argument("--arms", help="comma-separated arms to run (default: all)")
    compare.add_argument("--output_dir", help="run directory (default: runs/<recipe name>)")

    tail = commands.add_parser(
        "tail-index",
        help="measure the tail index of the gradient noise against batch size",
        description=(
            "Sample many mini-batch gradients at each batch size, take the noise g_b - g_ref (g_ref: the full "
            "train set), and estimate its tail index α and scale, pooled over coordinates (as Şimşekli et al. "
            "2019) and along the top Hessian eigenvectors (where hf_levy injects noise), with bootstrap 95%% "
            "intervals. Writes tail_index.md (table) and tail_index.png (α̂ against batch size)."
        ),
    )
    tail.add_argument("--config", required=True, help="recipe YAML whose task and model are measured")
    tail.add_argument(
        "--batch-sizes", default="1,4,16,64,256", help="comma-separated batch sizes (default 1,4,16,64,256)"
    )
    tail.add_argument(
        "--num-batches", type=int, default=256, help="mini-batch gradients per batch size (default 256)"
    )
    tail.add_argument(
        "--num-eigenpairs", type=int, default=4, help="Hessian eigen-directions to measure along (default 4)"
    )
    tail.add_argument(
        "--checkpoint", help="a checkpoint directory to measure instead of the model at initialization"
    )
    tail.add_argument("--seed", type=int, default=0, help="seed of the model init and of the sampled batches")
    tail.add_argument("--output_dir", help="where to write (default: runs/<recipe name>/tail_index)")

    report = commands.add_parser(
        "report",
        help="rebuild the report of a compare run from its saved logs",
        description="Rebuild report.md and plots/ of a `hf-levy compare` run directory (trains nothing).",
    )
    report.add_argument("run_dir", help="directory written by hf-levy compare")
    return parser


def _int_list(text: str | None, name: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"hf-levy: --{name} must be comma-separated integers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command in ("report", "tail-index") and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # Heavy imports only once a command runs, so --help answers at once.
    from hf_levy.recipes.recipe import RecipeError, load_recipe, parse_overrides

    try:
        if args.command == "report":
            from hf_levy.recipes.report import build_report

            print(build_report(args.run_dir))
            return 0
        recipe = load_recipe(args.config)
        if args.command == "tail-index":
            from hf_levy.recipes.runner import tail_index_report

            output_dir = args.output_dir or pathlib.Path("runs") / recipe.name / "tail_index"
            table, plot = tail_index_report(
                recipe,
                _int_list(args.batch_sizes, "batch-sizes"),
                output_dir,
                checkpoint=args.checkpoint,
                num_batches=args.num_batches,
                num_eigenpairs=args.num_eigenpairs,
                seed=args.seed,
            )
            print(table.read_text())
            print(f"table: {table}\nplot: {plot}")
            return 0
        overrides = parse_overrides(extra)
        run_dir = pathlib.Path(args.output_dir or pathlib.Path("runs") / recipe.name)
        from hf_levy.recipes.runner import compare, train_arm

        if args.command == "train":
            arm = args.arm or next(
                (a for a, spec in recipe.arms.items() if spec.trainer == "levy"), next(iter(recipe.arms))
            )
            seed = args.seed if args.seed is not None else recipe.seeds[0]
            summary = train_arm(recipe, arm, run_dir, seed, overrides)
            print(f"{arm} seed {seed}: {summary}")
            return 0
        from hf_levy.recipes.report import build_report

        compare(
            recipe,
            run_dir,
            seeds=_int_list(args.seeds, "seeds"),
            arms=args.arms.split(",") if args.arms else None,
            overrides=overrides,
        )
        print(f"report: {build_report(run_dir)}")
        return 0
    except (RecipeError, FileNotFoundError) as err:
        print(f"hf-levy: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
