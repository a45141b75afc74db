"""The quickstart notebook runs top to bottom on a CPU as in a fresh Colab kernel: its code cells exec'd in
order in a new process (one CPU device, fewer steps, the suite's fast compiler), its jax settings and
compile cache start clean."""

import json
import os
import subprocess
import sys
from pathlib import Path

import conftest
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"

RUNNER = r"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import numpy as np

cells = json.loads(open(sys.argv[1]).read())["cells"]
code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
assert "pip" in code[0]  # Colab's install cell comes first
namespace = {"__name__": "__main__"}
for index, source in enumerate(code):
    source = source.replace("STEPS = 40", "STEPS = 4")
    exec(compile(source, f"quickstart.ipynb cell {index}", "exec"), namespace)
ns = namespace
summary = {"dpo_steps": ns["dpo"]["steps"], "dropped": ns["result"].dropped, "hf": ns["HF_DIR"] is not None,
           "study": [(r.get("loss.beta"), r["status"]) for r in ns["study_rows"]],
           "table": (ns["workdir"] / "results.md").read_text()}
if ns["HF_DIR"] is not None:
    scores = [ns["chosen_score"], ns["rejected_score"]]
    summary["scores"] = scores
    summary["ragged_equal"] = bool(np.allclose(np.asarray(ns["rm"](ns["pair_ids"])), scores, atol=1e-5))
print("SUMMARY " + json.dumps(summary))
"""


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on Colab
    env.update(JAX_PLATFORMS="cpu", MPLBACKEND="Agg", HF_HUB_OFFLINE="1")
    if os.environ.get("JAXRL_TEST_FULL_XLA") != "1":  # the suite's fast compiler (tests/conftest.py), no more
        env["XLA_FLAGS"] = " ".join(f for f in conftest._FLAGS if "device_count" not in f)
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(NOTEBOOK)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=NOTEBOOK.parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.rsplit("SUMMARY ", 1)[1])
    assert summary["dpo_steps"] == 4 and summary["dropped"] == {"identical": 1}
    assert sorted(summary["study"]) == [[0.1, "finished"], [0.5, "finished"]]
    assert "| dpo | 0.1 |" in summary["table"] and "| dpo | 0.5 |" in summary["table"]
    try:
        import transformers  # noqa: F401
    except ImportError:
        assert not summary["hf"]  # the HF cells skip themselves
    else:
        assert summary["hf"] and summary["ragged_equal"] and all(abs(s) < 100 for s in summary["scores"])
