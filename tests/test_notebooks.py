"""Every notebook in ``examples/`` runs top to bottom in a real Jupyter kernel (nbclient + ipykernel, the
``notebook`` extra), headless, offline, on the bundled model: a notebook that breaks fails the suite. The
notebooks are stored without outputs and match ``examples/make_notebooks.py``, which writes them."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
MISSING = [m for m in ("nbclient", "nbformat", "ipykernel") if importlib.util.find_spec(m) is None]
if MISSING:  # not a skip: CI must not pass without running the notebooks
    pytest.fail(f"tests/test_notebooks.py needs {', '.join(MISSING)}: pip install -e '.[notebook]'", pytrace=False)

import nbformat  # noqa: E402
from nbclient import NotebookClient  # noqa: E402
from nbclient.exceptions import CellExecutionError  # noqa: E402

TIMEOUT_S = 240  # per cell; each notebook takes well under 2 min on a 2-core CPU


def this_python_kernel(tmp: Path):
    """A kernel of this very interpreter (the venv the tests run in), whatever kernelspecs the machine has
    registered: a kernelspec written under ``tmp`` and a spec manager that looks only there."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = tmp / "kernels" / "stablefused-tests"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "StableFused tests", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(spec.parent)], ensure_native_kernel=False)
    return KernelManager(kernel_name="stablefused-tests", kernel_spec_manager=ksm)


def execute(nb: nbformat.NotebookNode, cwd: Path) -> nbformat.NotebookNode:
    """Run ``nb`` headless in a fresh kernel of this interpreter, with the repository importable, offline, and
    the run dirs under ``cwd``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "MPLBACKEND": "Agg"}
    client = NotebookClient(nb, km=this_python_kernel(cwd), timeout=TIMEOUT_S,
                            resources={"metadata": {"path": str(cwd)}})
    return client.execute(env=env)  # passed on to the kernel manager: the kernel's environment


def test_there_are_notebooks():
    names = {p.stem for p in NOTEBOOKS}
    assert {"negative_guidance", "inside_denoising", "img2img_strength", "inpainting", "latent_walk",
            "guidance_schedules"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    out = execute(nb, tmp_path)
    errors = [o for c in out.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    shown = [o for c in out.cells for o in c.get("outputs", []) if o.output_type in ("display_data", "execute_result")]
    assert any("image/png" in o.data or "text/html" in o.data for o in shown)  # it shows pictures


def test_notebooks_are_stored_without_outputs_and_as_generated():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import make_notebooks
    finally:
        sys.path.remove(str(EXAMPLES))
    assert {p.stem for p in NOTEBOOKS} == set(make_notebooks.NOTEBOOKS)
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(c.get("outputs", []) == [] and c.get("execution_count") is None
                   for c in nb.cells if c.cell_type == "code"), f"{path.name}: clear its outputs"
        assert nb == make_notebooks.build(path.stem, make_notebooks.NOTEBOOKS[path.stem]), \
            f"{path.name} differs from examples/make_notebooks.py: edit the script and run it"


def test_a_broken_call_fails(tmp_path):
    """The harness really fails: a notebook whose API call is wrong raises, naming the cell's error."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import stablefused as sf\nsf.run('negative_guidance', stepz=3, logger='none')")])
    with pytest.raises(CellExecutionError, match="stepz: unknown setting. Did you mean steps?"):
        execute(nb, tmp_path)
