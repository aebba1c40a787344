"""The dspy-infra command, in process: parsing, messages and exit codes."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from dspy_infra import ConfigError, InfraError, load_config
from dspy_infra.cli import config_cmd, main
from dspy_infra.cli._common import read_token


@pytest.fixture(autouse=True)
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test in an empty directory, free of the developer's DSPY_INFRA_* variables."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("DSPY_INFRA_"):
            monkeypatch.delenv(name)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_no_arguments_prints_help_and_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "usage: dspy-infra" in err
    assert "config" in err
    assert "exit codes" in err


def test_a_family_without_its_command_prints_that_family_s_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert "usage: dspy-infra config" in err
    for command in ("init", "show", "validate"):
        assert command in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("dspy-infra ")


@pytest.mark.parametrize(
    "argv",
    [
        ["bogus"],
        ["config", "bogus"],
        ["config", "validate", "--nope"],
        ["config", "init", "a", "b"],
    ],
    ids=["command", "subcommand", "option", "extra-argument"],
)
def test_bad_arguments_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_init_writes_a_starter_that_validates(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "init"]) == 0
    path = workdir / "dspy-infra.toml"
    assert path.read_text(encoding="utf-8") == config_cmd.STARTER
    assert "wrote dspy-infra.toml" in capsys.readouterr().out

    config = load_config(path, environ={})
    assert list(config.services) == ["kv", "migrate", "api"]
    kv, migrate, api = (config.services[n] for n in ("kv", "migrate", "api"))
    assert kv.health is not None
    assert kv.health.kind == "tcp"
    assert api.health is not None
    assert api.health.kind == "http"
    assert migrate.health is None
    assert list(migrate.depends_on) == ["kv"]
    assert {name: dep.condition for name, dep in api.depends_on.items()} == {
        "kv": "healthy",
        "migrate": "completed_successfully",
    }


def test_init_into_a_directory_writes_the_default_name(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "proj").mkdir()
    assert main(["config", "init", "proj"]) == 0
    assert (workdir / "proj" / "dspy-infra.toml").read_text() == config_cmd.STARTER
    assert "-c proj/dspy-infra.toml" in capsys.readouterr().out


def test_init_refuses_to_overwrite_without_force(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(workdir / "mine.toml", "# my own\n")
    assert main(["config", "init", "mine.toml"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "error: mine.toml already exists (use --force to overwrite it)\n"
    assert path.read_text() == "# my own\n"

    assert main(["config", "init", "mine.toml", "--force"]) == 0
    assert path.read_text() == config_cmd.STARTER


def test_init_into_a_missing_directory_is_a_runtime_failure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["config", "init", "missing/dspy-infra.toml"]) == 1
    assert capsys.readouterr().err.startswith("error: cannot write missing/dspy-infra.toml: ")


def test_validate_reports_the_services_in_file_order(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["config", "init"])
    capsys.readouterr()
    assert main(["config", "validate"]) == 0
    assert capsys.readouterr() == ("ok: dspy-infra.toml: 3 services (kv, migrate, api)\n", "")


def test_validate_counts_one_service_in_the_singular(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workdir / "one.toml", '[services.kv]\ncommand = ["kv"]\n')
    assert main(["config", "validate", "-c", "one.toml"]) == 0
    assert capsys.readouterr().out == "ok: one.toml: 1 service (kv)\n"


def test_validate_names_the_file_and_key_path_of_an_error(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workdir / "bad.toml", '[services.kv]\ncommand = ["kv"]\nrestart = "sometimes"\n')
    assert main(["config", "validate", "--config", "bad.toml"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: bad.toml: services.kv.restart: expected one of ")
    assert "'sometimes'" in err


def test_validate_names_the_environment_variable_of_an_error(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["config", "init"])
    capsys.readouterr()
    monkeypatch.setenv("DSPY_INFRA_MAX_CONCURRENT_STARTS", "0")
    assert main(["config", "validate"]) == 2
    assert capsys.readouterr().err == (
        "error: environment variable DSPY_INFRA_MAX_CONCURRENT_STARTS: "
        "infra.max_concurrent_starts: expected a number >= 1, got 0\n"
    )


def test_validate_without_any_configuration_is_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["config", "validate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no configuration found")
    assert "dspy-infra config init" in err


def test_validate_a_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "validate", "-c", "nope.toml"]) == 2
    assert capsys.readouterr().err == "error: nope.toml: file not found\n"


def test_validate_follows_the_lookup_of_load_config(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workdir / "pyproject.toml", '[tool.dspy-infra.services.kv]\ncommand = ["kv"]\n')
    assert main(["config", "validate"]) == 0
    assert capsys.readouterr().out == "ok: pyproject.toml: 1 service (kv)\n"

    write(workdir / "elsewhere.toml", '[services.a]\ncommand = ["a"]\n')
    monkeypatch.setenv("DSPY_INFRA_CONFIG", "elsewhere.toml")
    assert main(["config", "validate"]) == 0
    assert capsys.readouterr().out == "ok: elsewhere.toml: 1 service (a)\n"


def test_show_prints_toml_that_loads_back_to_the_same_configuration(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["config", "init"])
    capsys.readouterr()
    monkeypatch.setenv("DSPY_INFRA_MAX_CONCURRENT_STARTS", "7")
    monkeypatch.setenv("DSPY_INFRA_SERVICES__API__RESTART", "always")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# resolved from dspy-infra.toml\n")
    data = tomllib.loads(out)
    assert data["infra"]["max_concurrent_starts"] == 7
    assert data["services"]["api"]["restart"] == "always"
    assert data["infra"]["state_dir"] == str(workdir / ".dspy-infra")

    # The overrides are baked into what was shown: without them it loads to
    # what the file with them (this test's environment) loads to.
    shown = write(workdir / "shown.toml", out)
    assert load_config(shown, environ={}) == load_config("dspy-infra.toml")


def test_show_without_a_file_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show"]) == 0
    out, err = capsys.readouterr()
    assert "note: no configuration file found" in err
    assert tomllib.loads(out)["infra"]["backend"] == "local"


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (ConfigError("bad", source="x.toml", path="infra"), 2, "error: x.toml: infra: bad\n"),
        (InfraError("engine down"), 1, "error: engine down\n"),
        (KeyboardInterrupt(), 130, ""),
    ],
    ids=["config-error", "infra-error", "interrupted"],
)
def test_failures_map_to_exit_codes(
    error: BaseException,
    code: int,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def fail(*_: object, **__: object) -> None:
        raise error

    monkeypatch.setattr(config_cmd, "load_config", fail)
    assert main(["config", "validate"]) == code
    assert capsys.readouterr().err == message


def test_a_token_file_with_a_byte_order_mark_gives_the_token(tmp_path: Path) -> None:
    # As Notepad saves it: the mark is no part of the token.
    path = tmp_path / "token.txt"
    path.write_bytes(b"\xef\xbb\xbfsecret-token\r\n")
    assert read_token(path) == "secret-token"
