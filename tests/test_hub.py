"""Hub repo ids (--model / --weights / --tokenizer = ORG/NAME[@REV]) resolved offline from a
Hugging Face cache these tests fill in the layout huggingface_hub expects:
``HF_HOME/hub/models--ORG--NAME/{blobs/<sha256>, refs/<branch>, snapshots/<commit>/<file> -> blob}``."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

import falcontune as ft
from falcontune import cli, hub, testing
from falcontune.model import open_checkpoint
from falcontune.tokenizer import train_demo_tokenizer

REPO_ID = "TheBloke/falcon-7b-instruct-GPTQ"
try:  # huggingface_hub >= 1.x caches each commit's file listing and tells a partial snapshot
    from huggingface_hub.errors import IncompleteSnapshotError  # noqa: F401
    HUB_LISTS_TREES = True
except ImportError:
    HUB_LISTS_TREES = False


def fill_cache(hf_home: Path, repo_id: str, files: dict[str, Path], revision: str = "main",
               commit: Optional[str] = None, listed: tuple[str, ...] = ()) -> str:
    """Put ``files`` (name in the repo -> local file) into the cache as one snapshot of ``repo_id``,
    reachable as ``revision``; returns the snapshot's commit hash. ``listed``: write the repo's file
    listing (``trees/<commit>.json``, as huggingface_hub >= 1.x caches it) with these names too, as
    an interrupted download leaves it."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    if listed:
        (repo / "trees").mkdir(exist_ok=True)
        entries = {name: {"size": 1, "blob_id": "0" * 40} for name in (*files, *listed)}
        (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": entries}))
    return commit


def _dir_files(d: Path) -> dict[str, Path]:
    return {p.name: p for p in d.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny GPTQ models (seeds 0 and 1) with a demo tokenizer, the first cached under
    REPO_ID@main, the second under REPO_ID@v2; a repo without config.json, one without weights."""
    root = tmp_path_factory.mktemp("hub")
    tok = train_demo_tokenizer(["le chat dort sur le tapis rouge", "the cat sleeps on the red mat"] * 20,
                               vocab_size=300, out_path=root / "tokenizer.json")
    models = {}
    for seed in (0, 1):
        models[seed] = testing.make_checkpoint(root / f"m{seed}", preset="tiny", vocab_size=tok.vocab_size,
                                               seed=seed, tokenizer=root / "tokenizer.json",
                                               weights_name="model.safetensors")
    home = root / "hf"
    fill_cache(home, REPO_ID, _dir_files(models[0]))
    fill_cache(home, REPO_ID, _dir_files(models[1]), revision="v2")
    no_cfg = {k: v for k, v in _dir_files(models[0]).items() if k != "config.json"}
    fill_cache(home, "someone/no-config", no_cfg)
    fill_cache(home, "someone/no-weights", {k: v for k, v in _dir_files(models[0]).items()
                                            if k.endswith("config.json")})  # config + quantize_config
    fill_cache(home, "someone/tokenizer-only", {"tokenizer.json": root / "tokenizer.json"})
    fill_cache(home, "someone/partial", {"config.json": models[0] / "config.json"}, listed=("model.safetensors",))
    return {"root": root, "home": home, "m0": models[0], "m1": models[1]}


@pytest.fixture
def offline_cache(tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tiny["home"]))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tiny["home"]


def _logits(model: ft.FalconModel) -> np.ndarray:
    return model.forward(np.array([[5, 17, 40, 3, 99]]))


# ---------------------------------------------------------------------------------------------
# the bar: `falcontune generate --model=ORG/NAME` offline from a pre-filled cache


def test_generate_by_repo_id_offline(tiny: dict[str, Path]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tiny["home"])}
    env.pop("HF_HUB_CACHE", None)
    args = ["--prompt=le chat", "--max_new_tokens=6", "--backend=cpu"]
    by_id = subprocess.run([sys.executable, "-m", "falcontune", "generate", f"--model={REPO_ID}", *args],
                           env=env, capture_output=True, text=True, timeout=120)
    assert by_id.returncode == 0, by_id.stderr
    local = subprocess.run([sys.executable, "-m", "falcontune", "generate", f"--model={tiny['m0']}", *args],
                           env=env, capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr
    assert by_id.stdout.strip() and by_id.stdout == local.stdout  # the same model, greedy


def test_repo_id_revisions_weights_and_tokenizer(offline_cache: Path, tiny: dict[str, Path]) -> None:
    main = ft.load_model(REPO_ID, device="cpu")
    assert main.name == REPO_ID and main.tokenizer is not None
    np.testing.assert_array_equal(_logits(main), _logits(ft.load_model(tiny["m0"], device="cpu")))
    v2 = ft.load_model(f"{REPO_ID}@v2", device="cpu")
    np.testing.assert_array_equal(_logits(v2), _logits(ft.load_model(tiny["m1"], device="cpu")))
    assert not np.array_equal(_logits(main), _logits(v2))
    commit = (offline_cache / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "refs" / "v2").read_text()
    by_commit = ft.load_model(f"{REPO_ID}@{commit}", device="cpu")
    np.testing.assert_array_equal(_logits(by_commit), _logits(v2))
    # config from a local directory, weights and tokenizer from repos
    mixed = open_checkpoint(tiny["m0"], weights=f"{REPO_ID}@v2", tokenizer="someone/tokenizer-only")
    assert mixed.store.files[0].parent.name == commit and mixed.tokenizer_file.name == "tokenizer.json"
    assert "tokenizer-only" in str(mixed.tokenizer_file)
    # a repo holding only config.json / tokenizer is enough as --model when --weights is given
    ok = open_checkpoint("someone/no-weights", weights=tiny["m0"] / "model.safetensors")
    assert ok.config.hidden_size == 64


def test_known_name_downloads_its_repo(offline_cache: Path, tiny: dict[str, Path]) -> None:
    """falcon-7b-instruct-4bit without --weights: TheBloke/falcon-7b-instruct-GPTQ, its own config.json."""
    m = ft.load_model("falcon-7b-instruct-4bit", device="cpu")
    np.testing.assert_array_equal(_logits(m), _logits(ft.load_model(tiny["m0"], device="cpu")))


@pytest.mark.parametrize("args, needle", [
    (["--model=tiiuae/falcon-7b"], "Hub repo tiiuae/falcon-7b is not in the Hugging Face cache"),
    ([f"--model={REPO_ID}@nope"], "(revision nope) is not in the Hugging Face cache"),
    (["--model=someone/no-config"], "has no config.json"),
    (["--model=someone/no-weights"], "has no safetensors weights"),
    (["--model=falcon-40b-instruct-4bit"], "--weights"),
    ([f"--model={REPO_ID}", "--tokenizer=someone/no-weights"], "has no tokenizer.json"),
    ([f"--model={REPO_ID}", "--weights=models/nope.safetensors"], "weights not found: models/nope.safetensors"),
    # an interrupted download: the cached listing names a file the snapshot lacks (older
    # huggingface_hub versions keep no listing: the snapshot then simply has no weights)
    (["--model=someone/partial"], "only partly in the Hugging Face cache" if HUB_LISTS_TREES
     else "has no safetensors weights"),
])
def test_hub_errors_are_one_line(offline_cache: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                 needle: str) -> None:
    code = cli.main(["generate", *args, "--prompt=x", "--backend=cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("falcontune: error: "), err
    assert needle in err[0], err[0]
    if "not in the Hugging Face cache" in needle:
        assert "HF_HUB_OFFLINE=1" in err[0] and "is not a local path either" in err[0]


# ---------------------------------------------------------------------------------------------
# hub.py units


@pytest.mark.parametrize("text, repo, rev", [
    ("TheBloke/falcon-7b-instruct-GPTQ", "TheBloke/falcon-7b-instruct-GPTQ", None),
    ("tiiuae/falcon-7b@v1.0", "tiiuae/falcon-7b", "v1.0"),
    ("TheBloke/falcon-40b-instruct-GPTQ@gptq-3bit--1g-actorder_True", "TheBloke/falcon-40b-instruct-GPTQ",
     "gptq-3bit--1g-actorder_True"),
    ("org/name@refs/pr/1", "org/name", "refs/pr/1"),
])
def test_parse_repo_ref(text: str, repo: str, rev: Optional[str]) -> None:
    ref = hub.parse_repo_ref(text)
    assert ref is not None and (ref.repo, ref.revision, str(ref)) == (repo, rev, text)


@pytest.mark.parametrize("text", ["demo", "./a/b", "/abs/dir", "a/b/c", "../x", "a/..", "dir/model.safetensors",
                                  "d/tokenizer.json", "org/name@", "a b/c"])
def test_not_repo_refs(text: str) -> None:
    assert hub.parse_repo_ref(text) is None


def test_cache_dir_and_offline_follow_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert hub.cache_dir() == Path.home() / ".cache" / "huggingface" / "hub" and not hub.offline()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub.cache_dir() == tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline()


def test_online_download_request(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny: dict[str, Path]) -> None:
    """Online (HF_HUB_OFFLINE unset): what is asked of huggingface_hub. The call itself is replaced:
    no test reaches the network."""
    import huggingface_hub

    calls = []

    def fake(repo_id: str, **kw: object) -> str:
        calls.append((repo_id, kw))
        return str(tiny["m0"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    ckpt = open_checkpoint(f"{REPO_ID}@gptq-4bit-64g")
    assert ckpt.config.hidden_size == 64
    (repo_id, kw), = calls
    assert repo_id == REPO_ID and kw["revision"] == "gptq-4bit-64g" and kw["local_files_only"] is False
    assert kw["cache_dir"] == str(tmp_path / "home" / "hub")
    assert set(kw["allow_patterns"]) == {"*.json", "*.safetensors"} and kw["ignore_patterns"] == ["*/*"]
    calls.clear()
    open_checkpoint(tiny["m0"], tokenizer="org/tok")
    assert calls[0][1]["allow_patterns"] == ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
