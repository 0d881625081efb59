"""docs/api.md's examples run as written (in a scratch folder, with the shared PneumoniaMNIST file)."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_the_api_examples_run(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DCUBE_DATA_DIR", str(shared_data / "medmnist"))
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 3
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), scope)  # noqa: S102 (the project's own documentation)
    out = capsys.readouterr().out
    assert "['normal', 'pneumonia']" in out and "test AUC" in out
    assert (tmp_path / "runs" / "api-example" / "metrics.json").exists()


def test_the_api_refuses_what_it_cannot_read(tmp_path):
    import dcube

    with pytest.raises(FileNotFoundError, match="no metrics yet"):
        dcube.read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a finished dcube run"):
        dcube.load_run(tmp_path)
    with pytest.raises(AttributeError, match="no attribute 'fitt'"):
        dcube.fitt  # noqa: B018
