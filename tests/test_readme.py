"""The README's Python example runs as written."""

from __future__ import annotations

import pathlib
import re


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace("/tmp/hf_levy_quickstart", str(tmp_path / "quickstart"))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "top eigenvalues" in out and "levy/noise_norm" in out
