"""A killed run's half-written checkpoint directories are cleaned up by the next save."""
from __future__ import annotations

import subprocess
import sys

from falcontune.checkpoint import clean_leftovers


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_clean_leftovers(tmp_path):
    pid = _dead_pid()
    (tmp_path / f".checkpoint-4.tmp-{pid}-ab12cd34").mkdir()      # half-written: removed
    (tmp_path / f".checkpoint-2.del-{pid}-ab12cd35").mkdir()      # half-deleted: removed
    old = tmp_path / f".checkpoint-6.old-{pid}-ab12cd36"          # moved aside, replacement lost
    old.mkdir()
    (old / "adapter_config.json").write_text("{}")
    (tmp_path / f".checkpoint-8.old-{pid}-ab12cd37").mkdir()      # moved aside, replacement landed
    (tmp_path / "checkpoint-8").mkdir()
    live = tmp_path / ".checkpoint-9.tmp-1-ab12cd38"               # pid 1 is alive: left alone
    live.mkdir()
    clean_leftovers(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [live.name, "checkpoint-6", "checkpoint-8"]
    assert (tmp_path / "checkpoint-6" / "adapter_config.json").is_file()
