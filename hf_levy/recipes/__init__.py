"""The recipe tooling behind the ``hf-levy`` command, apart from the library it drives.

    recipe.py   a recipe file (YAML that picks values): parse, check, resolve one arm's LevyConfig
    tasks.py    the tasks and small models that recipes name
    runner.py   train one arm, all arms (resumably), or measure the tail index
    report.py   the markdown report of a compare run and its verdict
    plots.py    the report's figures and the tail-index plot
    cli.py      the ``hf-levy`` command

Its dependencies (YAML, plotting, datasets) are the ``recipes`` extra, so that a plain
``pip install hf_levy`` brings none of them: ``pip install "hf_levy[recipes]"``.
"""

import importlib.util

# The modules of the extra that the tooling imports, by the distribution that ships them.
_EXTRA_MODULES = {"yaml": "pyyaml", "matplotlib": "matplotlib", "datasets": "datasets"}

_missing = [dist for module, dist in _EXTRA_MODULES.items() if importlib.util.find_spec(module) is None]
if _missing:
    raise ImportError(
        f"the hf_levy recipe tooling (the hf-levy command, hf_levy.recipes) needs {', '.join(_missing)}, "
        'which a plain `pip install hf_levy` does not bring: pip install "hf_levy[recipes]"'
    )
