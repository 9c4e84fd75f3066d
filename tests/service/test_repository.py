"""The model repository: config files (TOML, YAML), --model lists, the single-model settings, clear errors."""

from __future__ import annotations

import pytest

from service.repository import ConfigError, entries_from_settings
from service.settings import Settings

TOML = """
[[models]]
name = "fast"
architecture = "edaformer-t"
checkpoint = "weights/t.pth"
levels = ["2222-222", "1111-111"]
scales = [0.5, 1.0]

[[models]]
architecture = "seaformer-t"
"""

YAML = """
models:
  - architecture: edaformer-t
    quality_table: t.json
  - name: b
    architecture: edaformer-b
    dataset: ade20k
"""


def test_a_toml_config_lists_models_with_paths_relative_to_the_file(tmp_path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(TOML)
    first, second = entries_from_settings(Settings(config=str(path), scales="1,0.75"))
    assert (first.name, first.architecture) == ("fast", "edaformer-t")
    assert first.checkpoint == str(tmp_path / "weights/t.pth")
    assert first.levels == ("2222-222", "1111-111") and first.scales == (1.0, 0.5)  # best scale first
    assert (second.name, second.scales, second.checkpoint) == ("seaformer-t", (1.0, 0.75), None)


def test_a_yaml_config_works_the_same(tmp_path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(YAML)
    first, second = entries_from_settings(Settings(config=str(path)))
    assert first.quality_table == str(tmp_path / "t.json")
    assert (second.name, second.dataset) == ("b", "ade20k")


def test_repeated_model_options_and_the_default() -> None:
    entries = entries_from_settings(Settings(models="edaformer-t:/w/t.pth,seaformer-t"))
    assert [(e.name, e.checkpoint) for e in entries] == [("edaformer-t", "/w/t.pth"), ("seaformer-t", None)]
    (default,) = entries_from_settings(Settings())
    assert (default.name, default.architecture, default.scales) == ("edaformer-t", "edaformer-t", (1.0, 0.75, 0.5))
    (single,) = entries_from_settings(Settings(model="edaformer-b", levels="1111-111, 2222-222", checkpoint="c.pth"))
    assert (single.levels, single.checkpoint) == (("1111-111", "2222-222"), "c.pth")


@pytest.mark.parametrize(("text", "message"), [
    ("models = 3", "has no `models` list"),
    ("[[models]]\nname = 'x y'\narchitecture = 'edaformer-t'", "must be letters"),
    ("[[models]]\narchitecture = 'edaformer-t'\ncolour = 'red'", "unknown setting(s) colour"),
    ("[[models]]\narchitecture = 'edaformer-t'\nscales = [0]", "scales"),
    ("[[models]]\narchitecture = 'edaformer-t'\n[[models]]\narchitecture = 'edaformer-t'", "configured twice"),
    ("[[models]\n", "cannot be parsed"),
    ("[[models]]\ndataset = 'ade20k'", "needs an architecture"),
])
def test_bad_configs_fail_with_one_clear_line(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        entries_from_settings(Settings(config=str(path)))


def test_a_missing_config_file_is_named() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        entries_from_settings(Settings(config="/nonexistent/models.toml"))
