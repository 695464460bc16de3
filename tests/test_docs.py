"""Every document a source or doc file of the repository cites exists (issue 14, item 11)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = {".py", ".c", ".h", ".cu", ".cuh", ".md", ".sh", ".toml", ".ipynb", ".in", ".txt", ".cfg", ""}
CITE = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)\b")


def _files() -> list[Path]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode()
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()
                 and not any(part in ("build", ".git", "__pycache__") for part in p.relative_to(ROOT).parts)]
    return [ROOT / n for n in names if (ROOT / n).suffix in TEXT and (ROOT / n).is_file()]


def _resolves(cited: str, where: Path) -> bool:
    """A path from the repository root or from the citing file; a bare name anywhere in docs/,
    next to the citing file or at the root (prose says "DESIGN.md" for docs/DESIGN.md)."""
    candidates = [ROOT / cited, where.parent / cited]
    if "/" not in cited:
        candidates.append(ROOT / "docs" / cited)
    return any(c.is_file() for c in candidates)


def test_every_cited_doc_exists():
    missing = []
    cited = 0
    for f in _files():
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for m in CITE.finditer(text):
            name = m.group(1)
            line_start = text.rfind("\n", 0, m.start()) + 1
            if "://" in text[line_start:m.start()]:  # part of a URL
                continue
            cited += 1
            if not _resolves(name, f):
                missing.append(f"{f.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {name}")
    assert cited > 20, f"the scan found only {cited} citations: the pattern is broken"
    assert not missing, "cited documents that do not exist:\n" + "\n".join(missing)
