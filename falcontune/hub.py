"""Hugging Face Hub repo ids (``ORG/NAME`` or ``ORG/NAME@REVISION``) -> a local snapshot directory.

Downloads go through ``huggingface_hub`` and its cache (``models--ORG--NAME/{blobs,refs,snapshots}``),
so a model fetched by transformers is reused here and the other way round. Only what falcontune
reads is fetched: the top-level JSON files (config.json, quantize_config.json, tokenizer files,
safetensors indexes) and the top-level ``*.safetensors`` files, whatever their names.

The environment is read at each call, not at import: HF_HUB_CACHE / HF_HOME (where the cache is),
HF_HUB_OFFLINE=1 (never touch the network: the snapshot must already be cached), HF_TOKEN (private
or gated repos; read by huggingface_hub itself).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple, Optional

__all__ = ["HubError", "RepoRef", "parse_repo_ref", "cache_dir", "offline", "snapshot"]

#: ORG/NAME with the characters the Hub allows, then an optional @revision (branch, tag or commit;
#: branches may hold '/', as in TheBloke's "gptq-4bit-32g-actorder_True" or "refs/pr/1")
_REPO_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)"
                       r"(?:@(?P<rev>[A-Za-z0-9_.][A-Za-z0-9_./-]*))?$")
_MODEL_FILES = ["*.json", "*.safetensors"]
_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
_FILE_SUFFIXES = (".safetensors", ".json", ".bin")
_TRUE = ("1", "true", "yes", "on", "y", "t")


class HubError(ValueError):
    """A repo id that cannot be resolved to usable local files (not cached offline, not found,
    gated, a needed file missing)."""


class RepoRef(NamedTuple):
    """A repo id as the user wrote it (``ORG/NAME[@REV]``), split into ``repo`` and ``revision``."""

    text: str
    repo: str
    revision: Optional[str]

    def __str__(self) -> str:
        return self.text


def parse_repo_ref(text: str) -> Optional[RepoRef]:
    """``ORG/NAME`` or ``ORG/NAME@REV`` -> RepoRef; anything else (a path such as ``./x/y``,
    ``/abs`` or ``dir/file.safetensors``, a single name, ``..``) -> None."""
    m = _REPO_REF.match(text)
    if m is None or ".." in m.group("repo") or m.group("repo").endswith(_FILE_SUFFIXES):
        return None  # "dir/model.safetensors" is a missing file, not a repo
    return RepoRef(text, m.group("repo"), m.group("rev"))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def offline() -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE) set to a true value."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def cache_dir() -> Path:
    """The hub cache huggingface_hub uses, from the environment as it is now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _describe(ref: RepoRef) -> str:
    return f"Hub repo {ref.repo}" + (f" (revision {ref.revision})" if ref.revision else "")


def _download(ref: RepoRef, patterns: list[str]) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import utils as hf_errors  # where every version since 0.20 exports them
    except ImportError:  # a dependency; only a broken install lands here
        raise HubError(f"{ref}: reading Hub repo ids needs the huggingface_hub package "
                       "(pip install huggingface_hub)") from None
    where = cache_dir()
    what = _describe(ref)
    try:
        path = huggingface_hub.snapshot_download(
            ref.repo, revision=ref.revision, cache_dir=str(where), local_files_only=offline(),
            allow_patterns=patterns, ignore_patterns=["*/*"])
    except hf_errors.GatedRepoError:
        raise HubError(f"{what} is gated: accept its conditions on the Hub, then set HF_TOKEN "
                       "to a token of that account") from None
    except hf_errors.RepositoryNotFoundError:
        raise HubError(f"{what} not found on the Hub (a private repo needs HF_TOKEN)") from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"{what}: no such revision on the Hub") from None
    except hf_errors.LocalEntryNotFoundError as e:
        partial = type(e).__name__ == "IncompleteSnapshotError"  # huggingface_hub >= 1.x: files missing
        if offline() and partial:
            raise HubError(f"{what} is only partly in the Hugging Face cache ({where}) and HF_HUB_OFFLINE=1 "
                           f"forbids downloading the rest: download it once online") from None
        if offline():
            raise HubError(f"{what} is not in the Hugging Face cache ({where}) and HF_HUB_OFFLINE=1 "
                           f"forbids downloading it: download it once online (https://huggingface.co/{ref.repo}; or "
                           "check HF_HOME)") from None
        cause = e.__cause__ or e
        raise HubError(f"{what} could not be downloaded ({type(cause).__name__}: {cause}) and is not in "
                       f"the Hugging Face cache ({where})") from None
    except hf_errors.HFValidationError as e:
        raise HubError(f"'{ref}' is not a valid Hub repo id ({e})") from None
    except hf_errors.HfHubHTTPError as e:
        raise HubError(f"{what}: the Hub answered {e}") from None
    return Path(path)


def _listing(d: Path) -> str:
    names = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    return ", ".join(names) if names else "nothing"


def snapshot(ref: RepoRef, role: str = "model") -> Path:
    """The local snapshot directory of ``ref``, downloaded if needed (not when offline).

    role "model": config.json and safetensors weights must be there; "weights": safetensors;
    "config": config.json (only the JSON files are fetched: the weights come from elsewhere);
    "tokenizer": tokenizer.json (only the tokenizer files are fetched)."""
    patterns = {"tokenizer": _TOKENIZER_FILES, "config": ["*.json"]}.get(role, _MODEL_FILES)
    d = _download(ref, patterns)
    need = {"model": ("config.json", "*.safetensors"), "weights": ("*.safetensors",),
            "config": ("config.json",), "tokenizer": ("tokenizer.json",)}[role]
    for pattern in need:
        if not any(d.glob(pattern)):
            kind = ("safetensors weights (*.safetensors; falcontune does not read .bin checkpoints)"
                    if pattern == "*.safetensors" else pattern)
            raise HubError(f"{_describe(ref)} has no {kind} (the snapshot in {d} holds: {_listing(d)})")
    return d
