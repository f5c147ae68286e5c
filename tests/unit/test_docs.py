"""README.md's settings tables are the ones operations/settings.py generates."""

from pathlib import Path

from llmhost import docs

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_tables_match_the_settings_module():
    text = README.read_text()
    assert docs.BEGIN in text and docs.END in text
    assert docs.readme_with_tables(text) == text, "run: python -m llmhost.docs --write"


def test_every_setting_is_in_the_readme():
    from llmhost.settings import HOST_SETTINGS, MODEL_SETTINGS, SERVICE_SETTINGS

    text = README.read_text()
    for setting in HOST_SETTINGS + SERVICE_SETTINGS + MODEL_SETTINGS:
        assert f"| `{setting.name}` |" in text
