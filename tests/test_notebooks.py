"""notebooks/: committed without outputs, and each one runs from top to bottom (nbclient, a real kernel)."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_quickstart_is_there():
    assert "quickstart.ipynb" in [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "strip the outputs before committing"


def test_the_quickstart_runs_and_shows_what_it_says(tmp_path):
    notebook = nbformat.read(NOTEBOOKS[[p.name for p in NOTEBOOKS].index("quickstart.ipynb")], as_version=4)
    # at most 3 minutes a cell: the whole notebook took 70 s here
    NotebookClient(notebook, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    pictures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pictures) == 3  # the scenes, base vs LoRA, the curves: training must not break inline plots
    table = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in text.splitlines()
             if line.split()[:1] in (["oracle"], ["clip"], ["aesthetic"])}
    assert table["oracle"][0] > table["oracle"][1] and table["clip"][0] > table["clip"][1]
    assert table["aesthetic"][0] == pytest.approx(table["aesthetic"][1])  # it ignores the prompt
    assert text.count("iter ") == 2
    report = Path(text.split("report: ")[-1].split()[0])
    assert report.name == "report.html" and report.is_file()
    assert (report.parent / "final/pytorch_lora_weights.safetensors").is_file()
