"""The report's row cache goes to a folder of each test, never to the user's $LLMKIT_HOME (the default model's folder
stays where it is: only llmkit.compress.report's view of the home moves)."""
import pytest


@pytest.fixture(autouse=True)
def report_home(tmp_path, monkeypatch):
    from llmkit.compress import report

    home = tmp_path / "report-home"
    monkeypatch.setattr(report, "llmkit_home", lambda: home)
    return home
