"""The ``hf-levy`` command: list and copy the shipped recipes, train or compare a recipe's arms, report.

Train one arm of a recipe, compare all its arms, rebuild a report:

hf-levy ls
hf-levy cp      NAME DEST.yaml | FILE DEST    (a shipped recipe, or an example file such as ds_zero2.json)
hf-levy train   --config NAME|FILE [--arm NAME] [--seed N] [--output_dir DIR] [--<field> VALUE ...]
hf-levy compare --config NAME|FILE [--seeds 0,1,2] [--arms a,b] [--output_dir DIR] [--<field> VALUE ...]
hf-levy report  RUN_DIR
hf-levy noise-scale --config NAME|FILE [--arm NAME] [--checkpoint DIR] [--small_batch_size b] [--big_batch_size B]
                    [--num_draws N] [--seed S]

``--config`` takes a file or a shipped recipe's name; a file wins (:mod:`hf_levy.recipes.catalog`).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
from collections.abc import Sequence

from hf_levy import __version__

FIELDS_HELP = (
    "Any LevyConfig / TrainingArguments field can follow as --<field> VALUE (e.g. --learning_rate 3e-4 "
    "--levy_alpha 1.2); it overrides the recipe for every arm run. Layering: defaults < recipe YAML < flags. "
    "A bare --<bool field> means true (--bf16). Unknown fields and values of the wrong type are errors. "
    'The fields and their help: python -c "from transformers import '
    'HfArgumentParser; from hf_levy import LevyConfig; HfArgumentParser(LevyConfig).print_help()"'
)
CONFIG_HELP = (
    "a shipped recipe's name (hf-levy ls lists them) or a recipe YAML file; a file of that name wins"
)
TRUST_HELP = (
    "let the recipe's model run code from outside the installed packages (trust_remote_code, use_kernels, "
    "a hub kernel as attn_implementation, weights_only: false), which recipes are refused otherwise"
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``hf-levy`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="hf-levy",
        description=(
            "hf_levy: fine-tune Hugging Face models with large batches plus Hessian-shaped α-stable gradient "
            "noise, and compare against the stock Trainer on recipes (hf-levy ls lists the shipped ones)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"hf-levy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    commands.add_parser(
        "ls",
        help="list the shipped recipes with their purpose and expected runtime",
        description="List the recipes shipped with hf_levy: name, expected runtime and purpose (their headers).",
    )
    copy = commands.add_parser(
        "cp",
        help="copy a shipped recipe or example file to edit it",
        description=(
            "Copy a shipped recipe (by name) or example file (by file name: the training script and DeepSpeed "
            "config that docs/distributed.md launches) to DEST, a file or a folder to put it in; never overwrites."
        ),
    )
    copy.add_argument(
        "name", help="a shipped recipe's name or an example file's name (hf-levy ls lists both)"
    )
    copy.add_argument("dest", help="the new file, e.g. my_recipe.yaml")

    train = commands.add_parser(
        "train",
        help="train one arm of a recipe",
        description="Train one arm of a recipe and write its logs, config and summary.",
        epilog=FIELDS_HELP,
    )
    train.add_argument("--config", required=True, help=CONFIG_HELP)
    train.add_argument("--trust_remote_code", action="store_true", help=TRUST_HELP)
    train.add_argument("--arm", help="arm to train (default: the recipe's first LevyTrainer arm)")
    train.add_argument(
        "--seed", type=int, default=None, help="training seed (default: the recipe's first seed)"
    )
    train.add_argument("--output_dir", help="run directory (default: runs/<recipe name>)")

    compare = commands.add_parser(
        "compare",
        help="train every arm of a recipe and write the comparison report",
        description=(
            "Train every arm of a recipe (for every seed), then write report.md and plots/ in the run directory. "
            "An arm finished there with the same resolved config is kept; one left unfinished resumes from its "
            "last checkpoint (if it saves any); one whose config changed trains again from step 0."
        ),
        epilog=FIELDS_HELP,
    )
    compare.add_argument("--config", required=True, help=CONFIG_HELP)
    compare.add_argument("--trust_remote_code", action="store_true", help=TRUST_HELP)
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
    tail.add_argument(
        "--config", required=True, help=f"the recipe whose task and model are measured: {CONFIG_HELP}"
    )
    tail.add_argument("--trust_remote_code", action="store_true", help=TRUST_HELP)
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

    noise = commands.add_parser(
        "noise-scale",
        help="measure the gradient noise scale B_simple of a recipe's model",
        description=(
            "The gradient noise scale B_simple = tr(Sigma)/|G|^2 in examples (McCandlish et al. 2018) of the "
            "recipe's model at initialization or of a checkpoint, over its training set: unbiased estimates "
            "from pairs of a small batch b and a big batch B drawn with replacement, their ratio, and a "
            "percentile bootstrap interval over the draws. Prints it with the batch sizes used and the arm's "
            "batch per step relative to it."
        ),
    )
    noise.add_argument(
        "--config", required=True, help=f"the recipe whose task and model are measured: {CONFIG_HELP}"
    )
    noise.add_argument("--trust_remote_code", action="store_true", help=TRUST_HELP)
    noise.add_argument(
        "--arm", help="the arm whose batch sizes are the defaults (default: the first LevyTrainer arm)"
    )
    noise.add_argument(
        "--checkpoint", help="a checkpoint directory to measure instead of the model at initialization"
    )
    noise.add_argument(
        "--small_batch_size",
        type=int,
        help="b (default: the arm's levy_noise_batch_size, else an eighth of B)",
    )
    noise.add_argument(
        "--big_batch_size", type=int, help="B (default: the arm's examples per optimizer step)"
    )
    noise.add_argument("--num_draws", type=int, default=100, help="pairs of batches averaged (default 100)")
    noise.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the model init and the draws (default: the recipe's first)",
    )

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
    """Run ``hf-levy`` with ``argv`` (default: the command line); returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command not in ("train", "compare") and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("ls", "cp"):
        return _catalog_command(args)
    # Heavy imports only once a command runs, so --help answers at once.
    from hf_levy.recipes.recipe import RecipeError, load_recipe, parse_overrides
    from hf_levy.recipes.run_folder import is_main_process

    try:
        if args.command == "report":
            from hf_levy.recipes.report import build_report

            print(build_report(args.run_dir))
            return 0
        if args.command in ("train", "compare") and os.environ.get("LOCAL_RANK", "0") == "0":
            # DeepSpeed's op loads wait forever on a build lock a killed run left: one process per machine
            # clears those before any rank can reach the op.
            from hf_levy._extension_locks import clear_stale_build_locks

            clear_stale_build_locks()
        recipe = load_recipe(args.config, trust_remote_code=args.trust_remote_code)
        if args.command == "tail-index":
            from hf_levy.recipes.tail_index import tail_index_report

            output_dir = args.output_dir or pathlib.Path("runs") / recipe.name / "tail_index"
            table, plot = tail_index_report(
                recipe,
                _int_list(args.batch_sizes, "batch-sizes"),
                output_dir,
                checkpoint=args.checkpoint,
                num_batches=args.num_batches,
                num_eigenpairs=args.num_eigenpairs,
                seed=args.seed,
                trust_remote_code=args.trust_remote_code,
            )
            print(table.read_text())
            print(f"table: {table}\nplot: {plot}")
            return 0
        if args.command == "noise-scale":
            from hf_levy.recipes.noise_scale import launched_process_group, noise_scale_report

            with launched_process_group() as rank:
                text, _ = noise_scale_report(
                    recipe,
                    args.arm,
                    checkpoint=args.checkpoint,
                    small_batch_size=args.small_batch_size,
                    big_batch_size=args.big_batch_size,
                    num_draws=args.num_draws,
                    seed=args.seed,
                    trust_remote_code=args.trust_remote_code,
                )
            if rank == 0:
                print(text)
            return 0
        overrides = parse_overrides(extra)
        run_dir = pathlib.Path(args.output_dir or pathlib.Path("runs") / recipe.name)
        from hf_levy.recipes.runner import compare, train_arm

        if args.command == "train":
            arm = args.arm or next(
                (a for a, spec in recipe.arms.items() if spec.trainer == "levy"), next(iter(recipe.arms))
            )
            seed = args.seed if args.seed is not None else recipe.seeds[0]
            summary = train_arm(
                recipe, arm, run_dir, seed, overrides, trust_remote_code=args.trust_remote_code
            )
            if is_main_process():
                print(f"{arm} seed {seed}: {summary}")
            return 0
        compare(
            recipe,
            run_dir,
            seeds=_int_list(args.seeds, "seeds"),
            arms=args.arms.split(",") if args.arms else None,
            overrides=overrides,
            trust_remote_code=args.trust_remote_code,
            report=True,
        )
        return 0
    except (RecipeError, FileNotFoundError) as err:
        # Every rank of a launch meets the same recipe error (or the main one's, shared): one says it.
        if is_main_process():
            print(f"hf-levy: error: {err}", file=sys.stderr)
        return 2


def _catalog_command(args: argparse.Namespace) -> int:
    """``ls`` and ``cp``: they read the shipped files only, so they answer without loading transformers."""
    from hf_levy.recipes import catalog

    if args.command == "ls":
        print(catalog.listing())
        return 0
    recipes, extras = catalog.shipped(), catalog.examples()
    if args.name in recipes:
        source, name = recipes[args.name], f"{args.name}.yaml"
    elif args.name in extras:
        source, name = extras[args.name], args.name
    else:
        try:
            catalog.resolve(args.name)  # the message with the names and the closest one
        except FileNotFoundError as err:
            print(f"hf-levy: error: {err}; example files: {', '.join(extras)}", file=sys.stderr)
            return 2
        print(f"hf-levy: error: cp copies a shipped recipe by name; {args.name!r} is a file", file=sys.stderr)
        return 2
    dest = pathlib.Path(args.dest)
    if dest.is_dir():
        dest = dest / name
    if dest.exists():
        print(f"hf-levy: error: {dest} exists; cp never overwrites, choose another name", file=sys.stderr)
        return 2
    shutil.copyfile(source, dest)
    if args.name in recipes:
        print(f"{dest}: a copy of the recipe {args.name}; run it with hf-levy compare --config {dest}")
    else:
        print(f"{dest}: a copy of the example {args.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
