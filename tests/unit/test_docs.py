"""README.md's settings tables are the ones operations/settings.py generates."""

from pathlib import Path

from llmhost import docs

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_tables_match_the_settings_module():
    text = README.read_text()
    assert docs.BEGIN in text and docs.END in text
    assert docs.readme_with_tables(text) == text, "run: python -m llmhost.docs --write"


def test_each_readme_row_says_what_the_setting_declares():
    """The generator's rows, read back: every setting once, with its own default, meaning and
    what is allowed (the test above only says the README is what the generator prints)."""
    from llmhost.settings import (GATEWAY_SETTINGS, HOST_SETTINGS, MODEL_SETTINGS,
                                  SERVICE_SETTINGS, TUNE_SETTINGS)

    rows = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 5 and cells[0].startswith("`"):
            rows.setdefault(cells[0].strip("`"), []).append(cells)
    named = [(s.name, s) for s in HOST_SETTINGS + SERVICE_SETTINGS + MODEL_SETTINGS]
    named += [(f"llm_gateway.{s.name}", s) for s in GATEWAY_SETTINGS]
    named += [(s.name, s) for s in TUNE_SETTINGS]
    for shown_name, setting in named:
        (name, kind, default, meaning, allowed), = rows.pop(shown_name)
        assert kind == " or ".join(t.__name__ for t in setting.types), setting.name
        shown = "—" if setting.default in (None, ()) else f"`{setting.default!r}`".replace("'", '"')
        assert default == shown, setting.name
        assert meaning == setting.meaning and allowed.replace("\\|", "|") == setting.expected(), setting.name
    assert not rows, f"rows for no setting: {sorted(rows)}"
