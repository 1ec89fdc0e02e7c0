"""The README is part of the interface: its commands, settings and error codes are checked here."""

from __future__ import annotations

import re
from pathlib import Path

from registry.core.errors import ERRORS_BY_CODE
from registry.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def setup_commands() -> list[str]:
    section = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands() -> None:
    commands = setup_commands()
    assert len(commands) == 2
    assert all("\n" not in command for command in commands)
    assert commands[0].endswith("lora-reg server")


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup_commands()[1] in ci.splitlines()
    assert "pytest" in setup_commands()[1] and "ruff check" in setup_commands()[1]


def test_every_server_setting_is_documented() -> None:
    for name in Settings.model_fields:
        assert f"LORA_REG_{name.upper()}" in README, f"LORA_REG_{name.upper()} is not in README"


def test_every_error_code_is_documented() -> None:
    for code in ERRORS_BY_CODE:
        assert f"`{code}`" in README, f"error code {code} is not in README"


def test_compose_stack_has_the_documented_services_with_healthchecks() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "s3", "migrate", "api", "worker"} <= set(services)
    for name in ("postgres", "s3", "api"):
        assert "healthcheck" in services[name], name
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            if rule.get("condition") == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
    api_env = services["api"]["environment"]
    assert api_env["LORA_REG_DATABASE_URL"].startswith("postgresql://")
    assert api_env["LORA_REG_STORAGE_URL"].startswith("s3://")
    assert set(compose["volumes"]) >= {"pgdata", "s3data"}
