"""docs/configuration.md stays in step with the configuration classes.

Convention: each class is documented by a markdown table right after a
``<!-- fields: ClassName -->`` line; a row is
``| `key` | type | default | meaning |``, the default being a TOML value in
backticks, or ``none`` for a key that is unset by default.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, get_args

import pytest
from attrs import Attribute, fields

from dspy_infra import (
    Backoff,
    ConfigError,
    Dependency,
    HandlerConfig,
    InfraSettings,
    MetricsSettings,
    Probe,
    ServerSettings,
    ServiceConfig,
    TaskClass,
    load_config,
)
from dspy_infra.config.converter import converter
from dspy_infra.config.model import Condition, RestartPolicy
from dspy_infra.config.placeholders import KNOWN

DOC_PATH = Path(__file__).parents[2] / "docs" / "configuration.md"
DOC = DOC_PATH.read_text()
CLASSES: list[type[Any]] = [
    InfraSettings,
    ServiceConfig,
    Probe,
    Dependency,
    Backoff,
    TaskClass,
    HandlerConfig,
    MetricsSettings,
    ServerSettings,
]
ROW = re.compile(
    r"^\| `(?P<key>[^`]+)` \| (?P<type>[^|]+?) \| (?P<default>[^|]+?) \| (?P<meaning>.+) \|$"
)


def documented(cls: type[Any]) -> dict[str, tuple[str, str]]:
    """``{key: (type, default cell)}`` from the table after the class's marker."""
    marker = f"<!-- fields: {cls.__name__} -->"
    assert DOC.count(marker) == 1, f"{marker} must appear once in {DOC_PATH}"
    lines = DOC.split(marker, 1)[1].lstrip("\n").splitlines()
    assert lines[0].startswith("| Key | Type | Default | Meaning |"), lines[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        match = ROW.match(line)
        assert match, f"a {cls.__name__} row does not read | `key` | type | default | meaning |"
        key = match["key"]
        assert key not in rows, f"{cls.__name__}: {key} documented twice"
        rows[key] = (match["type"].strip(), match["default"].strip())
    return rows


def public_fields(cls: type[Any]) -> list[Attribute[Any]]:
    return [a for a in fields(cls) if not a.metadata.get("internal")]


def real_default(attribute: Attribute[Any]) -> Any:
    default: Any = attribute.default
    factory = getattr(default, "factory", None)  # an attrs Factory
    if factory is not None:
        default = factory()
    return converter.unstructure(default)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_key_is_documented_and_nothing_else(cls: type[Any]) -> None:
    rows = documented(cls)
    names = [a.name for a in public_fields(cls)]
    assert sorted(set(names) - set(rows)) == [], "undocumented keys"
    assert sorted(set(rows) - set(names)) == [], "documented keys that do not exist"
    assert list(rows) == names, "document the keys in the order of the class"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_documented_defaults_are_the_real_ones(cls: type[Any]) -> None:
    rows = documented(cls)
    for attribute in public_fields(cls):
        type_cell, cell = rows[attribute.name]
        assert type_cell, f"{cls.__name__}.{attribute.name}: no type"
        expected = real_default(attribute)
        if cell == "none":
            assert expected is None, f"{cls.__name__}.{attribute.name}: default is {expected!r}"
            continue
        match = re.fullmatch(r"`(.+)`", cell)
        assert match, f"{cls.__name__}.{attribute.name}: default {cell!r} is not `value` or none"
        value = tomllib.loads(f"v = {match[1]}")["v"]
        assert value == expected, f"{cls.__name__}.{attribute.name}: documented {value!r}"
        assert type(value) is type(expected), f"{cls.__name__}.{attribute.name}: {value!r}"


def test_literal_choices_are_documented() -> None:
    for condition in get_args(Condition):
        assert f"| `{condition}` |" in DOC, condition
    for policy in get_args(RestartPolicy):
        assert f'| `"{policy}"` |' in DOC, policy
    for placeholder in re.findall(r"\{[^{}]+\}", KNOWN):
        assert f"`{placeholder}`" in DOC, placeholder


def toml_examples() -> list[str]:
    return re.findall(r"^```toml\n(.*?)^```$", DOC, flags=re.MULTILINE | re.DOTALL)


def test_there_are_examples() -> None:
    assert len(toml_examples()) >= 3


@pytest.mark.parametrize("index", range(len(toml_examples())))
def test_toml_examples_load(tmp_path: Path, index: int) -> None:
    text = toml_examples()[index]
    name = "pyproject.toml" if "[tool.dspy-infra" in text else "dspy-infra.toml"
    path = tmp_path / name
    path.write_text(text)
    config = load_config(path, environ={})
    assert config.services, "an example shows at least one service"
    assert not (tmp_path / ".dspy-infra").exists()


def test_documented_environment_variables_work(tmp_path: Path) -> None:
    path = tmp_path / "dspy-infra.toml"
    path.write_text(toml_examples()[0])
    found = dict(re.findall(r"`(DSPY_INFRA_[A-Z_]+)=([^`\s]+)`", DOC))
    assert {"DSPY_INFRA_BACKEND", "DSPY_INFRA_SERVICES__REDIS__RESTART"} <= set(found)
    # The one documented as an error is one.
    assert found.pop("DSPY_INFRA_PROJECT") == "123"
    with pytest.raises(ConfigError, match="environment variable DSPY_INFRA_PROJECT"):
        load_config(path, environ={"DSPY_INFRA_PROJECT": "123"})
    config = load_config(path, environ=found)
    assert config.infra.backend == found["DSPY_INFRA_BACKEND"]
    assert config.services["redis"].restart == found["DSPY_INFRA_SERVICES__REDIS__RESTART"]
    assert config.services["redis"].env["LOG_LEVEL"] == "debug"
