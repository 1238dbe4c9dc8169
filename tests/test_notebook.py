"""notebooks/walkthrough.ipynb runs top to bottom (its code cells, in-process, on the tiny model)."""

from __future__ import annotations

from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "walkthrough.ipynb"


def test_walkthrough_notebook_runs(data_dir, tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUANTKIT_DATA_DIR", str(data_dir))
    monkeypatch.setenv("QUANTKIT_NOTEBOOK_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("QUANTKIT_NOTEBOOK_LIMIT", "2")
    monkeypatch.delenv("QUANTKIT_NOTEBOOK_MODEL", raising=False)
    namespace: dict = {"__name__": "__notebook__"}
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert len(cells) >= 5
    for i, cell in enumerate(cells):
        assert not cell.get("outputs"), "commit the notebook without outputs"
        exec(compile(cell.source, f"{NOTEBOOK.name}[code cell {i}]", "exec"), namespace)  # noqa: S102
    report = tmp_path / "out" / "report"
    assert {"results.json", "report.md", "report.html"} <= {p.name for p in report.iterdir()}
    assert set(namespace["scores"]) == {"bf16", "ptq"}
