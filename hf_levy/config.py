"""LevyConfig: the TrainingArguments of LevyTrainer, and LevyArguments, its levy fields alone.

``LevyArguments`` carries only the fields this library adds, so that users of another Trainer
subclass (TRL's ``SFTTrainer``) can hand them to :class:`hf_levy.LevyCallback`. ``LevyConfig`` is
``TrainingArguments`` plus those fields, the way TRL's ``SFTConfig`` extends it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from transformers import TrainingArguments

from hf_levy.calibration import MIN_MICROBATCHES


@dataclass
class LevyArguments:
    """The hf_levy fields. See docs/concepts.md for the noise formula and units."""

    # Parameters of the noise
    levy_alpha: float = field(
        default=1.5,
        metadata={
            "help": "Tail index α of the symmetric α-stable noise, in (0, 2]: 2 is Gaussian, smaller is heavier-tailed."
        },
    )
    levy_scale: float = field(
        default=0.3,
        metadata={
            "help": "Noise scale s >= 0; 0 turns the noise off (the sketch still runs and logs). With "
            "levy_scale_mode='relative' the per-direction scales c have ‖c‖ = s·‖g‖ (g the clipped gradient); "
            "with 'absolute', ‖c‖ = s in gradient units. The default 0.3 gives ‖ξ‖ ≈ 0.4-0.6·‖g‖ at α 1.5-2 "
            "(docs/usage.md, 'Choosing the noise')."
        },
    )
    levy_scale_mode: Literal["relative", "absolute"] = field(
        default="relative",
        metadata={
            "help": "'relative': noise scales proportional to the gradient norm; 'absolute': fixed scales."
        },
    )
    levy_clip: float | None = field(
        default=10.0,
        metadata={
            "help": "Per-draw truncation: each α-stable draw z_i is clipped to [-levy_clip, levy_clip]. None: off."
        },
    )
    levy_max_noise_ratio: float | None = field(
        default=3.0,
        metadata={
            "help": "Cap on the noise norm relative to the gradient norm, ‖ξ‖ <= ratio·‖g‖, a bound on rare "
            "long jumps; it should act on few steps (logged as levy/capped_fraction). None: off. The 'minibatch' "
            "bases are not capped (nor clipped by levy_clip): their noise is the real sampling noise."
        },
    )
    levy_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the noise draws and of the sketch batches; default: the Trainer's `seed`."
        },
    )
    levy_noise_basis: Literal["hessian", "isotropic", "minibatch", "minibatch_topk"] = field(
        default="hessian",
        metadata={
            "help": "'hessian': α-stable noise in the top-K Hessian eigenvectors; 'isotropic': an ablation with "
            "i.i.d. α-stable noise over all trainable coordinates, rescaled to the same norm each step; "
            "'minibatch': the real noise of a sub-batch, ξ = κ·(g_b − g) with g_b the gradient of "
            "levy_noise_batch_size examples drawn from the step's own batch (no sketch, one extra backward of b "
            "examples per step); 'minibatch_topk': that noise projected on the sketch's K eigenvectors, "
            "V Vᵀ(g_b − g). κ = levy_scale·√((1/b' − 1/B)/(1/b − 1/B)), b' = levy_virtual_batch_size or b, B "
            "the examples per optimizer step: levy_scale 1 gives the batch-b gradient."
        },
    )
    levy_noise_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "b, the examples of the sub-batch whose noise the 'minibatch' bases inject (a multiple of the "
            "number of processes, smaller than the examples per optimizer step). The other bases use it only for "
            "the small batch of gradient_noise_scale_every_n_steps."
        },
    )
    gradient_noise_scale_every_n_steps: int | None = field(
        default=None,
        metadata={
            "help": "The gradient noise scale B_simple = tr(Σ)/‖G‖² (McCandlish et al. 2018), logged as "
            "levy/gradient_noise_scale (examples) from ‖g_b‖² of levy_noise_batch_size examples of the step's "
            "batch and ‖g‖² of all B, as the ratio of their moving averages over steps. Where the 'minibatch' "
            "bases already compute g_b (levy_scale > 0) it is free and measured every step whenever this is "
            "not 0. Elsewhere (the other bases, levy_scale 0) N >= 1 adds one gradient of levy_noise_batch_size "
            "examples every N steps, about b/(N·B) of a step. None (default): only where free, so no setting "
            "costs more than before; 0: off. Refused under DeepSpeed."
        },
    )
    levy_virtual_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "A batch size b' whose gradient noise the injected noise imitates. 'hessian' and 'isotropic' "
            "calibrate to it: at each sketch, calibration_num_microbatches gradients of b' examples are projected "
            "on the eigenvectors, α_i and the scale c_b,i are fitted per direction, and the noise scale becomes "
            "levy_scale · c_b,i·(1 − (b'/B)^(α_i−1))^(1/α_i) (B the physical batch), so levy_scale=1 brings the "
            "noise to the batch-b' level. The 'minibatch' bases rescale the sub-batch noise to it (κ above). "
            "None: no calibration; the sub-batch's own noise."
        },
    )
    calibration_num_microbatches: int = field(
        default=128,
        metadata={
            "help": "M, the micro-batch gradients per calibration (its cost: M gradients of b examples); >= 32."
        },
    )
    calibration_fit_alpha: bool = field(
        default=True,
        metadata={
            "help": "Fit α per direction in the calibration; False keeps levy_alpha and fits only the scales."
        },
    )
    # Parameters of the Hessian sketch
    num_eigenpairs: int = field(
        default=8, metadata={"help": "K, the number of top Hessian eigenpairs the noise lives in."}
    )
    sketch_every_n_steps: int = field(
        default=50, metadata={"help": "Refresh the Hessian sketch every N optimizer steps (first at step 0)."}
    )
    sketch_max_overhead: float | None = field(
        default=None,
        metadata={
            "help": "Cap on the sketch's share of training time. A refresh that sketch_every_n_steps makes due waits "
            "until the training steps since the last refresh took at least (that refresh's seconds) / "
            "sketch_max_overhead, so 0.1 keeps LevyTrainer within about 1.10x the Trainer's time. Wall-clock "
            "based: the refresh steps then depend on timing (two runs are not bitwise equal; a resume restores the "
            "schedule). None: refresh exactly every sketch_every_n_steps steps."
        },
    )
    sketch_batch_size: int = field(
        default=32,
        metadata={"help": "Examples in the sketch batch, drawn from the train set with the levy seed."},
    )
    lanczos_num_iters: int = field(
        default=48,
        metadata={
            "help": "Maximum Lanczos iterations (Hessian-vector products) per sketch; >= num_eigenpairs."
        },
    )
    lanczos_tol: float = field(
        default=1e-3,
        metadata={"help": "Lanczos stops once every top-K Ritz pair has relative residual <= tol."},
    )
    sketch_dtype: Literal["float32", "bfloat16"] = field(
        default="float32",
        metadata={
            "help": "Storage of the eigenvectors and the Lanczos basis (reductions stay float64). bfloat16 halves "
            "the sketch's memory, 2·P·(K + lanczos_num_iters) bytes, at about 1e-2 relative eigenvalue accuracy."
        },
    )
    sketch_offload: Literal["none", "basis", "all"] = field(
        default="none",
        metadata={
            "help": "Host memory for the sketch: 'basis' keeps the Lanczos basis (lanczos_num_iters x P, the "
            "refresh's peak) in CPU memory and moves V (K x P) to the accelerator once per refresh, so steps "
            "cost the same; 'all' keeps V there too (each step reads K x P host floats for the noise: for "
            "models whose V does not fit); 'none' keeps both on the accelerator."
        },
    )
    hvp_method: Literal["auto", "autograd", "finite_difference"] = field(
        default="auto",
        metadata={
            "help": "Hessian-vector products: 'autograd' (exact double backward), 'finite_difference' (two "
            "gradients, works with fused attention and FSDP), or 'auto' (exact where the model supports it)."
        },
    )

    def validate_levy_arguments(self) -> None:
        """Raise ValueError naming the field, the bad value, the allowed range and the fix.

        Types come first, from the annotations (the ``Literal`` ones are the choices): a value of the wrong
        type (``levy_alpha="1.5"``, ``num_eigenpairs=True``) is named with the type its field needs, before
        a comparison could fail on it or let it through.
        """
        hints = _levy_hints()
        for f in dataclasses.fields(LevyArguments):
            value = getattr(self, f.name)
            if not fits_type(value, hints[f.name]):
                raise ValueError(
                    f"{f.name} must be {describe_type(hints[f.name])}, got {value!r} ({type(value).__name__})"
                )
        _check(0 < self.levy_alpha <= 2, "levy_alpha", self.levy_alpha, "in (0, 2]", "2 is Gaussian; try 1.5")
        _check(self.levy_scale >= 0, "levy_scale", self.levy_scale, ">= 0", "use 0 to turn the noise off")
        for name in ("levy_clip", "levy_max_noise_ratio"):
            value = getattr(self, name)
            _check(
                value is None or value > 0, name, value, "> 0 or None", "use None to turn this truncation off"
            )
        for name in ("num_eigenpairs", "sketch_every_n_steps", "sketch_batch_size", "lanczos_num_iters"):
            value = getattr(self, name)
            _check(value >= 1, name, value, "an integer >= 1")
        _check(
            self.lanczos_num_iters >= self.num_eigenpairs,
            "lanczos_num_iters",
            self.lanczos_num_iters,
            f">= num_eigenpairs ({self.num_eigenpairs})",
            "raise lanczos_num_iters (about 4x num_eigenpairs + 10) or lower num_eigenpairs",
        )
        _check(self.lanczos_tol > 0, "lanczos_tol", self.lanczos_tol, "> 0")
        budget = self.sketch_max_overhead
        _check(
            budget is None or budget > 0,
            "sketch_max_overhead",
            budget,
            "> 0 or None",
            "e.g. 0.1 for at most ~10% of the training time; None refreshes every sketch_every_n_steps",
        )
        for name in ("levy_virtual_batch_size", "levy_noise_batch_size"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, value, "None or an integer >= 1")
        _check(
            self.levy_noise_batch_size is not None or not self.levy_noise_basis.startswith("minibatch"),
            "levy_noise_batch_size",
            self.levy_noise_batch_size,
            f"set with levy_noise_basis={self.levy_noise_basis!r}",
            "the examples of the sub-batch whose noise is injected, e.g. the small batch size to imitate",
        )
        every = self.gradient_noise_scale_every_n_steps
        _check(
            every is None or every >= 0,
            "gradient_noise_scale_every_n_steps",
            every,
            "None or an integer >= 0",
        )
        _check(
            not every or self.levy_noise_batch_size is not None,
            "levy_noise_batch_size",
            self.levy_noise_batch_size,
            f"set with gradient_noise_scale_every_n_steps={every}",
            "the small batch of the noise scale's two (e.g. an eighth of the examples per optimizer step)",
        )
        m = self.calibration_num_microbatches
        _check(
            m >= MIN_MICROBATCHES,
            "calibration_num_microbatches",
            m,
            f"an integer >= {MIN_MICROBATCHES}",
            "fewer micro-batches cannot fit a tail index",
        )

    def __post_init__(self) -> None:
        self.validate_levy_arguments()


@functools.cache
def _levy_hints() -> dict[str, Any]:
    return typing.get_type_hints(LevyArguments)


def _options(hint: Any) -> tuple[Any, ...]:
    """The alternatives of a union (``float | None`` -> float, NoneType); any other hint alone."""
    return typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)


def fits_type(value: object, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` of a config field.

    A bool is not a number here (``num_eigenpairs=True`` is refused); an int is a float; a string fits
    an enum whose values include it; lists and mappings are checked as containers, not element-wise.
    """
    for option in _options(hint):
        origin = typing.get_origin(option) or option
        if option is Any:
            return True
        if option is type(None):
            ok = value is None
        elif origin is Literal:
            ok = any(value == choice and type(value) is type(choice) for choice in typing.get_args(option))
        elif isinstance(origin, type) and issubclass(origin, enum.Enum):
            ok = isinstance(value, origin) or value in {member.value for member in origin}
        elif option is bool:
            ok = isinstance(value, bool)
        elif option is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif option is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(origin, type) and isinstance(value, origin)
        if ok:
            return True
    return False


def describe_type(hint: Any) -> str:
    """``float | None`` -> "a float or None", for messages that say what a field takes."""
    names = {bool: "a bool", int: "an integer", float: "a float", str: "a string"}
    names.update({list: "a list", dict: "a mapping", type(None): "None"})
    words = []
    for option in _options(hint):
        origin = typing.get_origin(option) or option
        if origin is Literal:
            words.append("one of " + ", ".join(repr(c) for c in typing.get_args(option)))
        elif isinstance(origin, type) and issubclass(origin, enum.Enum):
            words.append("one of " + ", ".join(repr(m.value) for m in origin))
        else:
            words.append(names.get(origin, getattr(origin, "__name__", str(origin))))
    return " or ".join(words)


def _check(ok: bool, name: str, value: object, allowed: str, fix: str = "") -> None:
    finite = not isinstance(value, float) or math.isfinite(value)
    if not (ok and finite):
        raise ValueError(f"{name} must be {allowed}, got {value!r}" + (f": {fix}" if fix else ""))


@dataclass
class LevyConfig(LevyArguments, TrainingArguments):
    """``TrainingArguments`` plus the :class:`LevyArguments` fields, validated at construction.

    The bases are in this order so that the dataclass fields keep ``TrainingArguments``' order first
    (``LevyConfig("out")`` sets ``output_dir``, as with ``TrainingArguments``).
    """

    def __post_init__(self) -> None:
        TrainingArguments.__post_init__(self)
        self.validate_levy_arguments()
        if self.levy_seed is None:
            self.levy_seed = self.seed
