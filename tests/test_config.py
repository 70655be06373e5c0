"""LevyConfig validation and loading through HfArgumentParser."""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import HfArgumentParser

from hf_levy import LevyArguments, LevyConfig


def config(tmp_path, **kw):
    return LevyConfig(output_dir=str(tmp_path), report_to="none", **kw)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("levy_alpha", 0.0),
        ("levy_alpha", 2.5),
        ("levy_alpha", -1.0),
        ("levy_alpha", float("nan")),
        ("levy_scale", -0.1),
        ("levy_scale", float("inf")),
        ("levy_scale_mode", "percent"),
        ("levy_clip", 0.0),
        ("levy_max_noise_ratio", -1.0),
        ("num_eigenpairs", 0),
        ("sketch_every_n_steps", 0),
        ("sketch_every_n_steps", -5),
        ("sketch_batch_size", 0),
        ("lanczos_num_iters", 0),
        ("lanczos_tol", 0.0),
        ("hvp_method", "exact"),
        ("levy_virtual_batch_size", 0),
        ("calibration_num_microbatches", 8),
        ("levy_noise_basis", "random"),
        ("sketch_dtype", "float16"),
        ("sketch_offload", True),
        ("sketch_offload", "cpu"),
    ],
)
def test_bad_values_name_the_field_and_the_value(tmp_path, field, value):
    with pytest.raises(ValueError, match=field) as info:
        config(tmp_path, **{field: value})
    assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_more_eigenpairs_than_lanczos_iterations_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="lanczos_num_iters.*num_eigenpairs"):
        config(tmp_path, num_eigenpairs=16, lanczos_num_iters=10)


def test_plain_levy_arguments_validate_too():
    with pytest.raises(ValueError, match="levy_alpha"):
        LevyArguments(levy_alpha=3.0)


def test_defaults_are_valid_and_levy_seed_follows_seed(tmp_path):
    cfg = config(tmp_path, seed=7)
    assert cfg.levy_seed == 7 and 0 < cfg.levy_alpha <= 2 and cfg.lanczos_num_iters >= cfg.num_eigenpairs
    assert config(tmp_path, seed=7, levy_seed=3).levy_seed == 3


def test_output_dir_stays_the_first_positional_field(tmp_path):
    assert LevyConfig(str(tmp_path)).output_dir == str(tmp_path)


def test_levy_fields_round_trip_through_to_dict(tmp_path):
    d = config(tmp_path, levy_alpha=1.2, num_eigenpairs=4).to_dict()
    assert d["levy_alpha"] == 1.2 and d["num_eigenpairs"] == 4 and d["hvp_method"] == "auto"


def test_yaml_and_json_load_through_hf_argument_parser(tmp_path):
    values = {"output_dir": str(tmp_path), "levy_alpha": 1.3, "num_eigenpairs": 4, "learning_rate": 0.01}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    (tmp_path / "c.json").write_text(json.dumps(values))
    parser = HfArgumentParser(LevyConfig)
    (from_yaml,) = parser.parse_yaml_file(str(tmp_path / "c.yaml"))
    (from_json,) = parser.parse_json_file(str(tmp_path / "c.json"))
    for cfg in (from_yaml, from_json):
        assert isinstance(cfg, LevyConfig)
        assert (cfg.levy_alpha, cfg.num_eigenpairs, cfg.learning_rate) == (1.3, 4, 0.01)


def test_unknown_keys_are_errors(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"output_dir": str(tmp_path), "levy_alpah": 1.3}))
    with pytest.raises(ValueError, match="levy_alpah"):
        HfArgumentParser(LevyConfig).parse_yaml_file(str(tmp_path / "c.yaml"))


def test_bad_value_in_yaml_is_reported_by_field(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"output_dir": str(tmp_path), "levy_alpha": 2.5}))
    with pytest.raises(ValueError, match="levy_alpha"):
        HfArgumentParser(LevyConfig).parse_yaml_file(str(tmp_path / "c.yaml"))


def test_command_line_flags_parse_with_choices(tmp_path):
    parser = HfArgumentParser(LevyConfig)
    (cfg,) = parser.parse_args_into_dataclasses(
        [
            *("--output_dir", str(tmp_path), "--levy_alpha", "1.1", "--hvp_method", "finite_difference"),
            *("--sketch_offload", "basis"),
        ]
    )
    assert cfg.levy_alpha == 1.1 and cfg.hvp_method == "finite_difference" and cfg.sketch_offload == "basis"
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--hvp_method", "exact"])


def test_the_edges_of_every_range_are_accepted():
    edges = LevyArguments(
        levy_alpha=2.0,  # Gaussian
        levy_scale=0.0,  # noise off
        levy_clip=1e-9,
        levy_max_noise_ratio=1e-9,
        num_eigenpairs=1,
        lanczos_num_iters=1,  # = num_eigenpairs
        sketch_every_n_steps=1,
        sketch_batch_size=1,
        lanczos_tol=1e-12,
        sketch_max_overhead=1e-9,
        levy_virtual_batch_size=1,
        calibration_num_microbatches=32,
    )
    assert (edges.levy_alpha, edges.levy_scale, edges.calibration_num_microbatches) == (2.0, 0.0, 32)
    assert LevyArguments(levy_scale=1, levy_alpha=1).levy_scale == 1  # an int is a float here


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("levy_max_noise_ratio", 0.0),
        ("sketch_max_overhead", 0.0),
        ("sketch_max_overhead", float("nan")),
        ("lanczos_tol", float("inf")),
        ("levy_virtual_batch_size", -3),
        ("sketch_batch_size", -1),
        ("num_eigenpairs", False),
    ],
)
def test_just_outside_a_range_is_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        LevyArguments(**{field: value})
