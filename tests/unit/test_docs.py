"""README.md's settings tables are the ones operations/settings.py generates."""

from operations import docs


def test_readme_settings_tables_match_the_settings_module():
    text = docs.README.read_text()
    assert docs.BEGIN in text and docs.END in text
    assert docs.readme_with_tables(text) == text, "run: python -m operations.docs --write"


def test_every_setting_is_in_the_readme():
    from operations.settings import HOST_SETTINGS, MODEL_SETTINGS, SERVICE_SETTINGS

    text = docs.README.read_text()
    for setting in HOST_SETTINGS + SERVICE_SETTINGS + MODEL_SETTINGS:
        assert f"| `{setting.name}` |" in text
