"""The quickstart notebook runs top to bottom on a CPU (its code cells exec'd in order, with fewer steps)."""

import json
from pathlib import Path

import matplotlib
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(monkeypatch):
    matplotlib.use("Agg")
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert "pip" in code[0]  # Colab's install cell comes first
    namespace = {"__name__": "__main__"}
    for index, source in enumerate(code):
        exec(
            compile(source.replace("STEPS = 40", "STEPS = 4"), f"{NOTEBOOK.name} cell {index}", "exec"),
            namespace,
        )
    assert namespace["dpo"]["steps"] == 4 and namespace["result"].dropped == {"identical": 1}
