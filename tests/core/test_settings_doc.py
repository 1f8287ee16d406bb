"""docs/settings.md lists every setting of `bot.core.settings.Settings` with its default,
and nothing else: the table cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

from bot.core.settings import Settings

TABLE = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def documented(table: Path = TABLE) -> dict[str, str]:
    """variable → its default cell, from the table's rows."""
    rows: dict[str, str] = {}
    for line in table.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and (name := re.fullmatch(r"`([A-Z0-9_]+)`", cells[0])):
            rows[name[1]] = cells[1]
    return rows


def shown(value: object) -> str | None:
    """How a default is written in the table's default cell (None: not checked)."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"`{value:g}`"
    if isinstance(value, str):
        return f"`{value}`"
    return None


def test_every_setting_is_documented_with_its_default() -> None:
    rows = documented()
    fields = {name.upper(): field for name, field in Settings.model_fields.items()}
    assert sorted(set(fields) - set(rows)) == [], "settings missing from docs/settings.md"
    assert sorted(set(rows) - set(fields)) == [], "docs/settings.md lists settings that do not exist"
    wrong = {}
    for name, field in fields.items():
        expected = shown(field.default)
        if expected is not None and not rows[name].startswith(expected):
            wrong[name] = (rows[name], expected)
        if field.default is None and re.match(r"`[\d.]+`", rows[name]):
            wrong[name] = (rows[name], "unset (—)")
    assert wrong == {}, "defaults in docs/settings.md that the code does not have"


def test_the_table_reader_sees_a_drift(tmp_path: Path) -> None:
    table = tmp_path / "settings.md"
    table.write_text("| variable | default | meaning |\n|---|---|---|\n| `N_CTX` | `2048` | context |\n")
    assert documented(table) == {"N_CTX": "`2048`"}
    assert shown(Settings.model_fields["n_ctx"].default) == "`4096`", "so a table saying 2048 fails"
