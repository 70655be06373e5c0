"""Build the API reference of hf_levy from its docstrings with pdoc (`make docs` runs it).

It documents the package and every module below it whose dotted name has no part starting with an
underscore: the public surface is what `ls hf_levy` shows without one. Docstrings are read as Google style
(``Args:``, ``Returns:``, ``Raises:`` sections, reStructuredText literals and roles inside).

Any warning pdoc gives (a module that does not import, a name in ``__all__`` that does not resolve, a
docstring it cannot convert) fails the build, with every such warning printed: CI runs this.
"""

from __future__ import annotations

import argparse
import pathlib
import pkgutil
import sys
import warnings

import pdoc
import pdoc.extract
import pdoc.render

import hf_levy


def public_modules() -> list[str]:
    """``hf_levy`` and its submodules without a leading underscore in any part of their name, sorted."""
    found = pkgutil.walk_packages(hf_levy.__path__, prefix="hf_levy.")
    names = [m.name for m in found if not any(part.startswith("_") for part in m.name.split("."))]
    return ["hf_levy", *sorted(names)]


def module_specs(modules: list[str]) -> list[str]:
    """The fewest of ``modules`` that name them all to pdoc, which warns about a module named twice.

    pdoc adds a package's public submodules (those of its ``__all__`` if it has one) to the package.
    """
    specs: list[str] = []
    covered: set[str] = set()
    for name in modules:
        if name not in covered:
            specs.append(name)
            covered.update(pdoc.extract.walk_specs([name]))
    return specs


def resolve_lazy_exports() -> None:
    """Put every name of ``hf_levy.__all__`` into the module's namespace.

    ``hf_levy`` loads its Trainer classes on first access (a module ``__getattr__``, so the numerical core
    imports without transformers); pdoc reads a module's ``__dict__`` and would not find them.
    """
    for name in hf_levy.__all__:
        vars(hf_levy).setdefault(name, getattr(hf_levy, name))


def main(argv: list[str] | None = None) -> int:
    """Write the HTML reference into ``--output``; return 1 if pdoc warned."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("site/api"))
    args = parser.parse_args(argv)

    resolve_lazy_exports()
    modules = public_modules()
    pdoc.render.configure(docformat="google", footer_text=f"hf_levy {hf_levy.__version__}")
    pdoc_dir = pathlib.Path(pdoc.__file__).parent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*module_specs(modules), output_directory=args.output)
    # Warnings of the libraries being imported (deprecations) are theirs; pdoc's own are build errors.
    errors = [w for w in caught if pathlib.Path(w.filename).is_relative_to(pdoc_dir)]
    for w in errors:
        print(f"pdoc: {w.message}", file=sys.stderr)
    print(f"{len(modules)} modules documented in {args.output}/index.html; {len(errors)} pdoc warnings")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
