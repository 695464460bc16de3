"""The French tutorial notebook, executed end to end in demo mode, as a user runs it.

notebooks/falcontune_fr.ipynb runs with FALCONTUNE_MODE=demo in a fresh kernel of a fresh virtual
environment (it sees this interpreter's packages: ipykernel, numpy, ...), from a working directory
that is not the repository, with one edit a user would make: SOURCE_FALCONTUNE points at the sdist
of this checkout (`python -m build --sdist`). The install cell must install falcontune from it
(the kernel imports nothing from the checkout: no PYTHONPATH), and the rest of the notebook must
run on that installation: the small ``demo`` model and a 40-example extract of
datasets/fr_instructions.json replace Falcon-7B and the full corpus, and nothing is downloaded
besides pip's build requirements. The executed notebook is written next to the outputs
(``executed.ipynb``) for inspection when a check fails.

Shell cells (``!falcontune ...``) do not raise when the command fails, so their outputs are
checked here for the success messages and for the CLI's one-line error format.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

try:  # the [test] extra installs them; a bare GPU machine may lack them
    import nbformat
    from nbclient import NotebookClient
except ImportError as e:
    if os.environ.get("CI", "").lower() == "true":
        raise
    pytest.skip(f"notebook tests need nbformat and nbclient ({e})", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "falcontune_fr.ipynb"
CELL_TIMEOUT_S = 900
DEMO_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


# ---------------------------------------------------------------------------------------------
# static checks (fast)


def _load() -> Any:
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_valid_and_stored_without_outputs():
    nb = _load()
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"cell {cell.get('id')} was saved with outputs: clear them before committing"


def test_code_cells_are_valid_ipython():
    """Every code cell (IPython syntax: !commands, {var} interpolation) compiles."""
    from IPython.core.inputtransformer2 import TransformerManager

    tm = TransformerManager()
    for cell in _load().cells:
        if cell.cell_type == "code":
            compile(tm.transform_cell(cell.source), f"<cell {cell.get('id')}>", "exec")


def test_tagged_cells_exist():
    tags = {t for c in _load().cells for t in c.metadata.get("tags", [])}
    assert {"mode", "config", "corpus", "check-bad", "check-cli", "check-api", "cli-finetune",
            "plot-helper", "api-finetune", "metrics", "generate", "cli-generate", "resume"} <= tags


def test_flags_mentioned_exist():
    """Every --flag the notebook shows or explains is an option of the falcontune command."""
    from falcontune.cli import build_parser

    parser = build_parser()
    known = {o for action in parser._subparsers._group_actions for sub in action.choices.values()
             for a in sub._actions for o in a.option_strings}
    text = "\n".join(c.source for c in _load().cells)
    mentioned = set(re.findall(r"(--[a-z][a-z_]+)(?==|`|\s|$)", text, re.M)) - {"--depth", "--query", "--format", "--sdist"}  # git, nvidia-smi, build
    assert mentioned, "no flag found"
    assert not sorted(mentioned - known), sorted(mentioned - known)


# ---------------------------------------------------------------------------------------------
# execution (demo mode)


def _with_source(nb: Any, source: Any) -> Any:
    """The user's one edit: SOURCE_FALCONTUNE = "<source>" in the install cell."""
    cell = _cell(nb, "install")
    assert 'SOURCE_FALCONTUNE = ""' in cell.source
    cell.source = cell.source.replace('SOURCE_FALCONTUNE = ""', f"SOURCE_FALCONTUNE = {str(source)!r}", 1)
    return nb


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(python of a fresh venv that sees this interpreter's packages, a kernel spec directory for it)."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(root / "env")], check=True)
    python = root / "env" / "bin" / "python"
    spec = root / "kernels" / "falcontune-venv"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "falcontune venv", "language": "python"}), encoding="utf-8")
    return python, root / "kernels"


def _kernel_env(python: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from the checkout
    env.update(FALCONTUNE_MODE="demo", PYTHONUNBUFFERED="1", MPLBACKEND="Agg", FALCONTUNE_CACHE=str(cache))
    env["PATH"] = os.pathsep.join((str(python.parent), env.get("PATH", "")))
    return env


def _execute(nb: Any, venv: Any, work: Path, cache: Path, allow_errors: bool = False) -> Any:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    python, kernels = venv
    work.mkdir(parents=True, exist_ok=True)
    km = KernelManager(kernel_name="falcontune-venv", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, allow_errors=allow_errors,
                            resources={"metadata": {"path": str(work)}})
    try:
        client.execute(env=_kernel_env(python, cache))
    finally:
        nbformat.write(nb, work.parent / f"{work.name}-executed.ipynb")
    return nb


@pytest.fixture(scope="module")
def executed(tmp_path_factory, sdist, venv):
    """(executed notebook, working directory, {tag: concatenated text output})."""
    work = tmp_path_factory.mktemp("notebook")
    nb = _execute(_with_source(_load(), sdist), venv, work, tmp_path_factory.mktemp("cache"))
    texts: dict[str, str] = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for tag in cell.metadata.get("tags", []):
            texts[tag] = _text(cell)
    return nb, work, texts


def _text(cell: Any) -> str:
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            parts.append(out.get("data", {}).get("text/plain", ""))
        elif out.output_type == "error":
            parts.append("\n".join(out.traceback))
    return "".join(parts)


def _cell(nb: Any, tag: str) -> Any:
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}"
    return cells[0]


def test_runs_without_errors(executed):
    nb, _, texts = executed
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o.output_type == "error"]
    for tag, text in texts.items():
        # shell commands report failures on one line and do not stop the notebook
        assert "falcontune: error" not in text, f"cell {tag!r}: {text[-2000:]}"
        assert "Traceback" not in text, f"cell {tag!r}: {text[-2000:]}"
    assert "Mode démo" in texts["mode"]


def test_dataset_checks(executed):
    _, _, texts = executed
    bad = texts["check-bad"]  # records 2 and 3 of essai.jsonl are wrong, record 1 is fine
    assert re.search(r"\brecord 2\b", bad) and re.search(r"\brecord 3\b", bad), bad
    assert not re.search(r"\brecord 1\b", bad), bad
    assert "'output'" in bad and "'instruction'" in bad
    for tag in ("check-cli", "check-api"):
        assert ": OK" in texts[tag], texts[tag]
        assert re.search(r"\b40 / 40\b", texts[tag]), texts[tag]
        assert "384 tokens" in texts[tag], texts[tag]  # truncation counted at CUTOFF_LEN
        assert re.search(r"truncated to 384 tokens: 0\b", texts[tag]), texts[tag]  # every example kept whole


def test_command_line_training_and_resume(executed):
    _, work, texts = executed
    out = texts["cli-finetune"]
    assert re.search(r"'loss': \d+\.\d+", out), out[-2000:]
    assert "LoRA adapter saved" in out
    adapter = work / "falcontune-travail" / "falcon-7b-sample-4bit"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "adapter_config.json").is_file()
    assert "Resuming from" in texts["resume"] and "checkpoint-" in texts["resume"]
    assert "LoRA adapter saved" in texts["resume"]


def test_api_training_prints_loss_plots_and_writes_adapter(executed):
    nb, work, texts = executed
    out = texts["api-finetune"]
    m = re.search(r"loss finale \(dernier pas[^)]*\) : (\d+\.\d+)", out)
    assert m, out[-2000:]
    assert float(m.group(1)) > 0
    # the live plot: a PNG with matplotlib, the text chart without it (decided by the environment)
    cell = _cell(nb, "api-finetune")
    displays = [o for o in cell.outputs if o.output_type == "display_data"]
    assert displays, "the live plot display is missing"
    final = displays[0]["data"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert "image/png" in final, f"expected the matplotlib figure, got {list(final)}"
    else:
        text = final["text/plain"]
        assert "mode texte" in text
        assert re.search(r"pas (\d+)/\1", text), text  # the last update shows the finished run
        assert re.search("[▁▂▃▄▅▆▇█]{5,}", text), text
    assert "Courbes" in texts["plot-helper"]

    adapter = work / "falcontune-travail" / "falcon-7b-lora-fr"
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["r"] == 16 and config["target_modules"] == DEMO_TARGETS  # the demo's LORA_R and CIBLES
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "log.jsonl").is_file()

    import falcontune as ft

    model = ft.load_model("demo")
    model.load_lora(adapter)  # the written adapter loads back
    assert model.lora_config["r"] == 16


def test_metrics_table_and_generation(executed):
    _, _, texts = executed
    assert re.search(r"^\s+\d+\s+\d\.\d\d\s+\d+\.\d{4}", texts["metrics"], re.M), texts["metrics"]
    assert re.search(r"culmine à 1\.0e-02 au pas 5 ", texts["metrics"]), texts["metrics"]  # demo LR, warmup_steps=5
    gen = texts["generate"]
    assert "AVANT" in gen and "APRÈS" in gen
    assert gen.count("▶") == 6
    assert "<table>" in "".join(
        o.get("data", {}).get("text/html", "") for o in _cell(executed[0], "side-by-side").outputs)


# ---------------------------------------------------------------------------------------------
# issue 15: the install cell, outputs outside the repository, what the demo shows


def test_install_cell_installed_the_sdist_into_the_kernel(executed, sdist, venv):
    _, _, texts = executed
    out = texts["install"]
    assert f"Installation de falcontune depuis {sdist}" in out, out
    assert "Successfully installed" in out and "falcontune-0.1.0" in out, out
    assert "falcontune: " in out  # setup.py's own lines come through (CPU only, or one per CUDA file)
    python, _ = venv
    where = re.search(r"installé dans (\S+)", texts["kernel-import"]).group(1)
    assert Path(where).resolve().is_relative_to(python.parent.parent.resolve()), where  # the venv's copy
    assert "moteur CUDA compilé :" in texts["kernel-import"]


def test_outputs_stay_in_the_working_directory(executed):
    nb, work, texts = executed
    assert sorted(p.name for p in work.iterdir()) == ["falcontune-travail"]
    assert (work / "falcontune-travail" / "essai.jsonl").is_file()
    ignored = subprocess.run(["git", "check-ignore", "-q", "notebooks/falcontune-travail/x"], cwd=REPO)
    assert ignored.returncode == 0, "falcontune-travail/ must be ignored by git when run inside a checkout"


def test_no_progress_bar_warning(executed):
    nb, _, _ = executed
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text = out.get("text", "") if out.output_type == "stream" else ""
            assert "TqdmWarning" not in text and "IProgress" not in text, text


def test_the_plot_title_and_the_printed_loss_agree(executed):
    _, _, texts = executed
    out = texts["api-finetune"]
    title = re.search(r"Titre des courbes :.*loss \(dernier pas\) (\d+\.\d{4})", out)
    printed = re.search(r"loss finale \(dernier pas, comme dans le titre des courbes\) : (\d+\.\d{4})", out)
    assert title and printed and title.group(1) == printed.group(1), out[-1500:]


def test_demo_shows_learning(executed):
    """The demo model's loss starts near ln(2048) and drops; after training it recites the template."""
    _, work, texts = executed
    log = [json.loads(x) for x in (work / "falcontune-travail" / "falcon-7b-lora-fr" / "log.jsonl")
           .read_text(encoding="utf-8").splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[0] > 7.0 and losses[-1] < losses[0] - 1.0, losses
    gen = texts["generate"]
    after = gen.split("APRÈS", 1)[1]
    assert "▷ « Below is an instruction » (après) → that describes a task" in after, gen


def test_last_example_points_at_the_downloaded_weights():
    text = "\n".join(c.source for c in _load().cells)
    download = _cell(_load(), "download").source
    assert 'MODEL_DIR = Path("falcon-7b-instruct-GPTQ")' in download
    assert "--weights=falcon-7b-instruct-GPTQ " in text and "--weights=gptq_model-4bit-64g.safetensors" not in text


def _install_only(source: Any) -> Any:
    """The mode and install cells alone."""
    nb = _load()
    nb.cells = [c for c in nb.cells if {"mode", "install"} & set(c.metadata.get("tags", []))]
    return _with_source(nb, source) if source is not None else nb


def _outputs(nb: Any) -> str:
    return "".join(_text(c) for c in nb.cells if c.cell_type == "code")


def test_install_cell_keeps_an_up_to_date_install_and_upgrades_an_old_one(executed, sdist, venv, tmp_path):
    python, _ = venv
    text = _outputs(_execute(_install_only(sdist), venv, tmp_path / "a", tmp_path / "cache"))
    assert "dans cette version : rien à faire" in text and "Successfully installed" not in text, text
    # as if it had been installed from an older version of the source
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    marker = Path(purelib) / "falcontune-source-du-notebook.json"
    marker.write_text(json.dumps({"source": str(sdist), "empreinte": "une-version-plus-ancienne"}), encoding="utf-8")
    text = _outputs(_execute(_install_only(sdist), venv, tmp_path / "b", tmp_path / "cache"))
    assert "mise à jour" in text and "Successfully installed" in text, text
    assert json.loads(marker.read_text(encoding="utf-8"))["empreinte"] != "une-version-plus-ancienne"


def test_install_cell_without_any_source_stops_with_one_french_sentence(venv, tmp_path):
    nb = _install_only(None)
    # as in a fresh Colab runtime: falcontune is not installed anywhere
    hide = nbformat.v4.new_code_cell("import importlib.util as _u\n_f = _u.find_spec\n"
                                     "_u.find_spec = lambda name, *a, **k: None if name == 'falcontune' else _f(name, *a, **k)")
    nb.cells.insert(1, hide)
    (tmp_path / "w").mkdir()
    nb = _execute(nb, venv, tmp_path / "w", tmp_path / "cache", allow_errors=True)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "ArretInstallation", errors
    assert errors[0].traceback == [f"⛔ {errors[0].evalue}"]  # one sentence, no traceback
    assert "indiquez dans SOURCE_FALCONTUNE" in errors[0].evalue and errors[0].evalue.count(". ") == 0
