"""examples/quickstart.ipynb runs from top to bottom on this interpreter, and is stored clean."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def test_notebook_is_stored_without_outputs():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell["outputs"] == [], f"stored outputs in cell {cell.get('id')}"
        assert cell["execution_count"] is None, f"stored execution count in cell {cell.get('id')}"


def _execute(notebook_path: Path, workdir: Path):
    """Run every cell with a kernel on sys.executable; returns the executed notebook."""
    with warnings.catch_warnings():
        # jupyter_core's announcement of its move to platformdirs, raised on import.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="jupyter_client")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="jupyter_core")
        warnings.filterwarnings("ignore", message=".*platformdirs.*", category=DeprecationWarning)
        nbformat = pytest.importorskip("nbformat")
        nbclient = pytest.importorskip("nbclient")
        pytest.importorskip("ipykernel")
        pytest.importorskip("matplotlib")

    # A kernel spec of our own (found through JUPYTER_PATH), so the kernel runs this interpreter
    # whatever kernels are installed.
    spec_dir = workdir / "kernels" / "nplora-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "nplora test", "language": "python",
        # Jupyter's own inline backend: figures become image/png outputs, nothing opens a window.
        "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline"},
    }))
    notebook = nbformat.read(notebook_path, as_version=4)
    saved_path = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(workdir), saved_path]))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="jupyter_client")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="zmq")
            # nbclient starts the kernel, and shuts it down and closes its sockets at the end.
            client = nbclient.NotebookClient(notebook, kernel_name="nplora-test", timeout=120,
                                             resources={"metadata": {"path": str(workdir)}})
            client.execute()
    finally:
        if saved_path is None:
            del os.environ["JUPYTER_PATH"]
        else:
            os.environ["JUPYTER_PATH"] = saved_path
    return notebook


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    return _execute(NOTEBOOK, tmp_path_factory.mktemp("notebook"))


def _outputs(notebook, kind):
    return [output for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs if kind in output.get("data", {})]


def test_notebook_runs_without_errors(executed):
    # execute() raises CellExecutionError on the first failing cell; this checks what is left.
    for cell in executed.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.outputs:
            assert output.output_type != "error", output
            if output.output_type == "stream" and output.name == "stderr":
                assert "Warning" not in output.text, output.text  # tqdm bars go to stderr too


def test_notebook_shows_the_loss_curve(executed):
    assert _outputs(executed, "image/png"), "no figure was displayed"


def test_notebook_shows_html_reprs(executed):
    tables = [output["data"]["text/html"] for output in _outputs(executed, "text/html")]
    assert any("<strong>LoraModel</strong>" in table for table in tables)
    assert any("<strong>LoraLinear</strong>" in table for table in tables)
    assert any("<strong>AdamW</strong>" in table for table in tables)
