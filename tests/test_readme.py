"""Every command of README.md is run (or, for the few that need a GPU toolkit, explicitly listed).

* The first code block holds exactly two lines: the install + demo training command, and the test
  command. .ci/run installs as the first says and runs the second; the test command itself is not
  re-run here (that would recurse): it is checked to be `python -m pytest -q`.
* Every `falcontune ...` line of a ```bash block runs in a temporary directory (where `datasets/`
  points at the repository's), in README order, so `generate` finds the adapter trained by the
  first command. The tutorial command needs Falcon-7B weights and the article's dataset: it runs
  with `--model=demo` instead of the model name and weights, and with a 16-example extract of the
  sample under the article's dataset file name; every other flag is kept.
* Every ```python block runs as a script in the same directory.
* Commands that need the CUDA toolkit are listed in ENVIRONMENT_COMMANDS and only syntax-checked;
  a README command that is neither run nor listed fails the test.
* Flags, environment variables and model names mentioned in the text exist in the code.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
TEST_COMMAND = "python -m pytest -q"
INSTALL = 'pip install -e ".[test]"'
TIMEOUT_S = 900

# Troubleshooting commands for machines with an NVIDIA GPU and the CUDA toolkit: not run in tests.
ENVIRONMENT_COMMANDS = {
    "nvcc --version",
    "FALCONTUNE_CUDA=1 CUDA_HOME=/usr/local/cuda pip install -e . --force-reinstall --no-deps",
}
# The tutorial command with the files it needs replaced by the demo model and a small extract.
TUTORIAL_SUBSTITUTIONS = {
    "--model=falcon-7b-instruct-4bit": "--model=demo",
    "--weights=gptq_model-4bit-64g.safetensors": None,  # dropped
}
TUTORIAL_DATASET = "instruction_fr_wikipedia_oracle.json"


def _text() -> str:
    return README.read_text(encoding="utf-8")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every ``` block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def commands(body: str) -> list[str]:
    """The command lines of a shell block (backslash continuations joined, comments skipped)."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _bash_commands() -> list[str]:
    out: list[str] = []
    for lang, body in fenced_blocks(_text()):
        if lang == "bash":
            out += [c for c in commands(body) if c not in out]
    return out


def _python_blocks() -> list[str]:
    out: list[str] = []
    for lang, body in fenced_blocks(_text()):
        if lang == "python" and body not in out:
            out.append(body)
    return out


# ---------------------------------------------------------------------------------------------
# the first lines


def test_first_block_is_install_and_demo_then_tests():
    lines = _text().splitlines()
    assert lines[0] == "```bash" and lines[3] == "```", "README must open with a two-line bash block"
    first, second = lines[1], lines[2]
    assert second == TEST_COMMAND
    install, demo = first.split(" && ")
    assert install == INSTALL
    assert demo.startswith("falcontune finetune --model=demo --dataset=datasets/fr_instructions.json ")


def test_ci_script_matches_the_first_lines():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    runs = [line.strip() for line in ci if line.strip() and not line.strip().startswith("#")]
    assert any(line.endswith(INSTALL) for line in runs), f".ci/run must run `{INSTALL}`"
    assert any(line.endswith(TEST_COMMAND.replace("python ", "", 1)) for line in runs), \
        f".ci/run must run `{TEST_COMMAND}`"


def test_every_command_is_covered():
    for cmd in _bash_commands():
        covered = (cmd.startswith(INSTALL + " && falcontune ") or cmd == TEST_COMMAND
                   or cmd.startswith("falcontune ") or cmd in ENVIRONMENT_COMMANDS)
        assert covered, f"README command not run by any test: {cmd!r} (run it, or list it in ENVIRONMENT_COMMANDS)"
    assert ENVIRONMENT_COMMANDS <= set(_bash_commands()), "ENVIRONMENT_COMMANDS lists a command not in README"


def test_environment_commands_are_valid_shell():
    for cmd in ENVIRONMENT_COMMANDS:
        r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert r.returncode == 0, (cmd, r.stderr)


# ---------------------------------------------------------------------------------------------
# running the commands


def _falcontune_argv0() -> list[str]:
    script = shutil.which("falcontune", path=os.pathsep.join((str(Path(sys.executable).parent),
                                                              os.environ.get("PATH", ""))))
    return [script] if script else [sys.executable, "-m", "falcontune"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tutorial_argv(cmd: str) -> list[str]:
    out = []
    for arg in shlex.split(cmd):
        if arg in TUTORIAL_SUBSTITUTIONS:
            if TUTORIAL_SUBSTITUTIONS[arg] is not None:
                out.append(TUTORIAL_SUBSTITUTIONS[arg])
        else:
            out.append(arg)
    return out


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, f"{argv}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    assert "falcontune: error" not in r.stderr
    return r


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working directory with datasets/ and the article's dataset name (a 16-example extract)."""
    work = tmp_path_factory.mktemp("readme")
    (work / "datasets").symlink_to(REPO / "datasets", target_is_directory=True)
    records = json.loads((REPO / "datasets" / "fr_instructions.json").read_text(encoding="utf-8"))
    (work / TUTORIAL_DATASET).write_text(json.dumps(records[:16], ensure_ascii=False), encoding="utf-8")
    return work


@pytest.fixture(scope="module")
def demo_run(sandbox):
    """Line 1 of the README without its install part (CI has just installed as it says)."""
    first = _text().splitlines()[1]
    demo = first.split(" && ", 1)[1]
    argv = shlex.split(demo)
    r = _run(_falcontune_argv0() + argv[1:], sandbox)
    return sandbox, r


def test_demo_command_trains_an_adapter(demo_run):
    work, r = demo_run
    assert re.search(r"'loss': \d+\.\d+", r.stdout), r.stdout[-2000:]
    assert "train_loss" in r.stdout
    out = work / "demo-lora"
    assert (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["r"] == 16


def test_demo_command_keeps_every_example_and_shows_learning(demo_run):
    """What the README promises a first-time user: no example cut, a loss that starts near a uniform
    guess over the vocabulary and visibly drops, an eval loss that drops too."""
    work, r = demo_run
    assert "were cut" not in r.stdout and "174 records" in r.stdout
    log = [json.loads(x) for x in (work / "demo-lora" / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [x["loss"] for x in log if "loss" in x]
    evals = [x["eval_loss"] for x in log if "eval_loss" in x]
    assert math.log(2048) - 0.5 < losses[0] < math.log(2048) + 1.0, losses  # the first 10 steps' mean
    assert losses[-1] < losses[0] - 1.5 and min(losses) < 5.2, losses
    assert evals[-1] < evals[0] - 0.2, evals


def test_other_falcontune_commands_run(demo_run):
    work, _ = demo_run
    ran = []
    for cmd in _bash_commands():
        if not cmd.startswith("falcontune "):
            continue
        argv = shlex.split(cmd)
        if "--model=falcon-7b-instruct-4bit" in argv:
            argv = _tutorial_argv(cmd)
        r = _run(_falcontune_argv0() + argv[1:], work)
        ran.append((argv[1], r))
    kinds = [k for k, _ in ran]
    assert {"finetune", "check-dataset", "generate", "plot"} <= set(kinds), kinds
    for kind, r in ran:
        if kind == "check-dataset":
            assert ": OK" in r.stdout
        elif kind == "generate":
            assert r.stdout.strip(), "generate printed nothing"
    # the trained demo model recites the template of the sample, as the README says
    recited = [r.stdout for (kind, r), cmd in zip(ran, [c for c in _bash_commands() if c.startswith("falcontune ")])
               if kind == "generate" and "--prompt=Below is an instruction" in shlex.split(cmd)]
    assert recited and recited[0].startswith(" that describes a task, paired with an input"), recited
    assert (work / "demo-lora" / "courbes.png").is_file()
    assert (work / "falcon-7b-sample-4bit" / "adapter_model.safetensors").is_file()


def test_python_blocks_run(demo_run):
    work, _ = demo_run
    blocks = _python_blocks()
    assert blocks, "README has no Python example"
    for i, body in enumerate(blocks):
        script = work / f"readme_block_{i}.py"
        script.write_text(body, encoding="utf-8")
        r = _run([sys.executable, str(script)], work)
        assert "train_loss" in r.stdout
    assert (work / "demo-lora-api" / "adapter_model.safetensors").is_file()
    # the answer is printed once (streamed), not streamed and then printed again
    import falcontune as ft

    model = ft.load_model("demo")
    model.load_lora(work / "demo-lora-api")
    model.eval()
    answer = model.generate(instruction="Comment faire une demande de carte d'identité ?", max_new_tokens=32)
    assert answer and r.stdout.count(answer) == 1 and r.stdout.endswith(answer + "\n"), (answer, r.stdout[-500:])


# ---------------------------------------------------------------------------------------------
# what the text mentions exists


def _cli_flags() -> set[str]:
    from falcontune.cli import build_parser

    flags: set[str] = set()
    parser = build_parser()
    for action in parser._subparsers._group_actions:  # the sub-commands
        for sub in action.choices.values():
            for a in sub._actions:
                flags.update(o for o in a.option_strings if o.startswith("--"))
    return flags


def test_flags_in_text_exist():
    mentioned = set(re.findall(r"(--[a-z][a-z_]+)(?==|`|\s)", _text()))
    mentioned -= {"--force-reinstall", "--no-deps", "--version"}  # pip's, and nvcc's
    missing = sorted(mentioned - _cli_flags())
    assert not missing, f"README mentions flags the CLI does not have: {missing}"


def test_environment_variables_exist():
    setup = (REPO / "setup.py").read_text(encoding="utf-8")
    for var in set(re.findall(r"\bFALCONTUNE_[A-Z_]+", _text())):
        assert var in setup, f"README mentions {var}, which setup.py does not read"


def test_model_names_exist():
    from falcontune.models import KNOWN_MODELS

    section = _text().split("## Modèles pris en charge", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    names = {n for row in rows for n in re.findall(r"`([a-z0-9-]+)`", row.split("|")[1])}
    assert names, "no model table found"
    assert names - {"demo"} == set(KNOWN_MODELS), sorted(names ^ set(KNOWN_MODELS))


def test_performance_rows_come_from_perf_md():
    """The README's performance table is an excerpt of docs/PERF.md: no number of its own."""
    section = _text().split("## Performances", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    perf = (REPO / "docs" / "PERF.md").read_text(encoding="utf-8").splitlines()
    assert len(rows) >= 3, "no performance table in README"
    for row in rows:
        assert row in perf, f"README performance row not in docs/PERF.md: {row}"
