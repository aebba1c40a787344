"""The dspy-infra command as a user runs it: a real process in a fresh directory."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dspy_infra import load_config
from dspy_infra.cli.config_cmd import STARTER


def run(
    *argv: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m dspy_infra.cli ARGV`` without the developer's DSPY_INFRA_* variables."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
    return subprocess.run(
        [sys.executable, "-m", "dspy_infra.cli", *argv],
        cwd=cwd,
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_init_validate_show_round_trip(tmp_path: Path) -> None:
    init = run("config", "init", cwd=tmp_path)
    assert (init.returncode, init.stderr) == (0, "")
    assert (tmp_path / "dspy-infra.toml").read_text(encoding="utf-8") == STARTER

    validate = run("config", "validate", cwd=tmp_path)
    assert (validate.returncode, validate.stderr) == (0, "")
    assert validate.stdout == "ok: dspy-infra.toml: 3 services (kv, migrate, api)\n"

    show = run("config", "show", cwd=tmp_path)
    assert (show.returncode, show.stderr) == (0, "")
    (tmp_path / "shown.toml").write_text(show.stdout, encoding="utf-8")
    again = run("config", "validate", "-c", "shown.toml", cwd=tmp_path)
    assert again.stdout == "ok: shown.toml: 3 services (kv, migrate, api)\n"
    assert load_config(tmp_path / "shown.toml", environ={}) == load_config(
        tmp_path / "dspy-infra.toml", environ={}
    )


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "dspy-infra.toml"
    path.write_text("# mine\n", encoding="utf-8")
    result = run("config", "init", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "dspy-infra.toml already exists (use --force to overwrite it)" in result.stderr
    assert path.read_text(encoding="utf-8") == "# mine\n"

    assert run("config", "init", "--force", cwd=tmp_path).returncode == 0
    assert path.read_text(encoding="utf-8") == STARTER


def test_validate_a_broken_file_names_the_key_path(tmp_path: Path) -> None:
    (tmp_path / "dspy-infra.toml").write_text(
        '[services.kv]\ncommand = ["kv"]\n\n[services.api]\ncommand = ["api"]\n'
        'depends_on = { kv = { condition = "ready" } }\n',
        encoding="utf-8",
    )
    result = run("config", "validate", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        "error: dspy-infra.toml: services.api.depends_on.kv.condition: expected one of "
    )


def test_a_compose_warning_is_one_line_of_stderr_that_names_the_file(tmp_path: Path) -> None:
    # Python's own format named the line of our source that loaded the file.
    (tmp_path / "docker-compose.yml").write_text(
        "services:\n  web: {image: nginx, build: .}\n", encoding="utf-8"
    )
    result = run("config", "validate", "-c", "docker-compose.yml", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == "ok: docker-compose.yml: 1 service (web)\n"
    assert result.stderr == (
        "warning: docker-compose.yml: ignored unsupported keys: "
        "web.build (build the image first: dspy_infra.docker.build_image)\n"
    )


def test_show_applies_environment_overrides(tmp_path: Path) -> None:
    assert run("config", "init", cwd=tmp_path).returncode == 0
    env = {
        "DSPY_INFRA_MAX_CONCURRENT_STARTS": "7",
        "DSPY_INFRA_SERVICES__KV__PORTS__MAIN": "6390",
    }
    result = run("config", "show", cwd=tmp_path, env=env)
    assert (result.returncode, result.stderr) == (0, "")
    data = tomllib.loads(result.stdout)
    assert data["infra"]["max_concurrent_starts"] == 7
    assert data["services"]["kv"]["ports"] == {"main": 6390}
    assert data["services"]["api"]["ports"] == {"main": 0}


def test_show_with_config_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    assert run("config", "init", "conf", cwd=tmp_path).returncode == 0
    result = run("config", "show", cwd=tmp_path, env={"DSPY_INFRA_CONFIG": "conf/dspy-infra.toml"})
    assert result.returncode == 0
    # Relative paths are relative to the file, not to where the command ran.
    data = tomllib.loads(result.stdout)
    assert data["infra"]["state_dir"] == str((tmp_path / "conf" / ".dspy-infra").resolve())


def test_no_arguments_prints_help_and_exits_2(tmp_path: Path) -> None:
    result = run(cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: dspy-infra ")


def test_the_console_script_is_installed(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("dspy-infra")
    if not script.exists():
        pytest.skip("the dspy-infra console script is not installed: pip install -e .")
    result = subprocess.run(
        [str(script), "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("dspy-infra ")
