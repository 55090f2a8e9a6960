"""The README stays true: every setting a user can set is documented there."""

from __future__ import annotations

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.unit


def test_every_setting_is_documented_in_the_readme():
    from components.settings import Settings

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    missing = [
        f"FLYWHEEL_{name.upper()}"
        for name in Settings.model_fields
        if f"`FLYWHEEL_{name.upper()}`" not in readme
    ]
    assert not missing, f"settings missing from the README's Settings table: {missing}"


def test_every_cli_command_is_documented_in_the_readme():
    from typer.main import get_command

    from components.cli import app

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    group = get_command(app)
    names = []
    for name, command in group.commands.items():
        subs = getattr(command, "commands", None)
        names += [f"flywheel {name} {sub}" for sub in subs] if subs else [f"flywheel {name}"]
    missing = [n for n in names if n not in readme]
    assert not missing, f"commands missing from the README: {missing}"
