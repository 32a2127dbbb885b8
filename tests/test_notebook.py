"""The notebook runs top to bottom (quick mode), keeps its eight sections in order, and shows its figures."""

import shutil

import nbformat
import pytest

from conftest import ROOT

SECTIONS = [
    "0. Required Imports",
    "1. Data Preprocessing",
    "2. Hyperparameters",
    "3. Data Preview",
    "4. Different Convolutional Blocks",
    "5. UNet Model",
    "6. Training the Model",
    "7. Testing the Model",
]


def headings(notebook):
    return [
        line.lstrip("#").strip()
        for cell in notebook.cells
        if cell.cell_type == "markdown"
        for line in cell.source.splitlines()
        if line.startswith("## ")
    ]


def test_the_eight_sections_are_there_in_order():
    notebook = nbformat.read(ROOT / "unet_model.ipynb", as_version=4)
    assert headings(notebook) == SECTIONS


def test_the_committed_notebook_has_clean_outputs():
    notebook = nbformat.read(ROOT / "unet_model.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert all(counts) and counts == sorted(counts), counts  # executed, in order, from a fresh kernel
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors


def cells_missing_their_figure(notebook):
    """Indices of code cells that call ``plt.show()`` but hold no image output."""
    return [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
        and "plt.show()" in cell.source
        and not any(kind.startswith("image/") for output in cell.outputs for kind in output.get("data", {}))
    ]


def test_every_figure_of_the_committed_notebook_is_in_its_outputs():
    # A backend switch during training once left the last figure (section 7) without its image.
    notebook = nbformat.read(ROOT / "unet_model.ipynb", as_version=4)
    assert cells_missing_their_figure(notebook) == []


def test_the_committed_notebook_stays_light():
    # Micrographs stored as PNG once made it 5 MB; as JPEG at the notebook's small size they take far less.
    assert (ROOT / "unet_model.ipynb").stat().st_size < 2_500_000


def test_the_notebook_defines_no_model_block_or_loader_of_its_own():
    notebook = nbformat.read(ROOT / "unet_model.ipynb", as_version=4)
    source = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert "def " not in source and "class " not in source
    assert "layers.Conv2D" not in source and "import unet_model_core as core" in source
    assert "from unet_nuclei import" in source


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_in_quick_mode(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    shutil.copy(ROOT / "unet_model.ipynb", tmp_path / "unet_model.ipynb")
    notebook = nbformat.read(tmp_path / "unet_model.ipynb", as_version=4)
    # The kernel inherits this process's environment: quick mode, and the repository importable.
    monkeypatch.setenv("UNET_QUICK", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    # The kernel's own inline backend, so that the figures land in the outputs as they do for a user.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "quick mode: True" in outputs
    assert "training batch: (4, 64, 64, 1) (4, 64, 64, 3)" in outputs
    assert (tmp_path / "runs" / "latest").is_file()
    assert cells_missing_their_figure(notebook) == []  # training switches no backend
