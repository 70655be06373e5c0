"""hf_levy._compat: every private attribute of transformers, Accelerate and DeepSpeed exists in the installed
versions, is used nowhere else, and a missing one fails with a message naming it and the version."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pathlib
import re

import pytest

import hf_levy
from hf_levy import _compat


def resolve(dotted: str):
    """The module, class or function at ``dotted`` (module path, then attributes)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("private", _compat.EVERY_PRIVATE, ids=lambda p: f"{p.library}:{p.name}")
def test_each_private_attribute_exists_in_the_installed_version(private):
    if private.library == "deepspeed":
        pytest.importorskip("deepspeed")
    where = resolve(private.defined_in)
    # A method is an attribute of its class; an instance attribute is set in the source of its owner.
    found = hasattr(where, private.name) or re.search(
        rf"\.{re.escape(private.name)}\s*=", inspect.getsource(where)
    )
    version = importlib.metadata.version(private.library)
    assert found, f"{private.name} not defined or set in {private.defined_in} ({private.library} {version})"


def test_levy_trainer_overrides_exactly_the_declared_trainer_methods():
    from hf_levy.trainer import LevyTrainerMixin

    overridden = {
        name for name in vars(LevyTrainerMixin) if name.startswith("_") and not name.startswith("__")
    }
    overridden -= {"_install_levy_callback", "_log_levy_sketch"}  # its own, not the Trainer's
    assert overridden == {p.name for p in _compat.TRAINER_OVERRIDES}


def test_no_other_module_names_a_private_attribute():
    package = pathlib.Path(hf_levy.__file__).parent
    outside = [p for p in _compat.EVERY_PRIVATE if p not in _compat.TRAINER_OVERRIDES]
    for path in package.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        text = path.read_text()
        for private in outside:
            name = re.escape(private.name)
            reached = rf"\.{name}\b|[\"']{name}[\"']"  # an attribute access or a string
            assert not re.search(reached, text), f"{path} reaches {private.name} outside hf_levy._compat"


class Stub:
    """An object of a release that renamed everything."""


def test_a_missing_attribute_is_named_with_the_installed_version():
    version = importlib.metadata.version("transformers")
    with pytest.raises(_compat.PrivateAPIError, match=rf"Trainer\._get_output_dir.*transformers {version}"):
        _compat.trainer_output_dir(Stub(), trial=None)


def test_a_missing_deepspeed_attribute_is_refused_when_read_or_written():
    pytest.importorskip("deepspeed")
    version = re.escape(importlib.metadata.version("deepspeed"))
    stub = Stub()
    with pytest.raises(_compat.PrivateAPIError, match=rf"_global_grad_norm.*deepspeed {version}"):
        _compat.get(stub, _compat.DS_GLOBAL_GRAD_NORM)
    with pytest.raises(_compat.PrivateAPIError, match=rf"_global_grad_norm.*deepspeed {version}"):
        _compat.set_existing(stub, _compat.DS_GLOBAL_GRAD_NORM, 1.0)
    assert not hasattr(stub, "_global_grad_norm")  # nothing written that no one reads
    assert _compat.get(stub, _compat.DS_OVERFLOW, False) is False  # where absence is allowed: the default


def test_a_trainer_class_without_an_overridden_method_is_refused():
    class OldTrainer:
        def _save_checkpoint(self, model, trial): ...

        def _load_optimizer_and_scheduler(self, checkpoint): ...

    with pytest.raises(_compat.PrivateAPIError, match=r"Trainer\._clip_grad_norm.*transformers \d"):
        _compat.check_overrides(OldTrainer)


def test_the_original_forward_is_read_from_the_instance_only():
    class Model:
        _original_forward = "a class attribute, not Accelerate's"

    model = Model()
    assert _compat.accelerate_original_forward(model) is None
    model._original_forward = print
    assert _compat.accelerate_original_forward(model) is print
