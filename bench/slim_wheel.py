"""Repack a wheel without the shared libraries a machine does not need, with a correct RECORD.

    python3 bench/slim_wheel.py SRC.whl DEST_DIR --keep-lib cpu --keep-lib cuda130 --keep-lib cuda132

bitsandbytes ships one native library per CUDA/ROCm/XPU runtime (libbitsandbytes_<tag>.so,
~130 MB unpacked, 43 MB zipped). The GPU machine runs CUDA 13 only: the wheel keeps the CPU
library and the cuda13x ones, and every other ``lib<name>_<tag>.so`` is dropped. RECORD is
rewritten from the kept bytes (sha256, urlsafe base64 without padding, size), as the wheel
spec (PEP 376/427) asks, so installers that check it accept the result.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import re
import sys
import zipfile
from pathlib import Path

# lib<anything>_<tag>.so at any depth: the per-runtime native libraries
_RUNTIME_LIB = re.compile(r"(?:^|/)lib[^/]*_(?P<tag>[a-z]+[0-9]*)\.so$")


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _record_name(names: list[str]) -> str:
    records = [n for n in names if re.fullmatch(r"[^/]+\.dist-info/RECORD", n)]
    if len(records) != 1:
        raise ValueError(f"expected one .dist-info/RECORD in the wheel, found {records or 'none'}")
    return records[0]


def slim(src: Path, dest_dir: Path, keep: set[str]) -> tuple[Path, list[str]]:
    """Write DEST_DIR/<src name> without the runtime libraries whose tag is not in `keep`.
    Returns the new wheel and the names dropped."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / src.name
    if out.resolve() == src.resolve():
        raise ValueError(f"{src}: the slim wheel would overwrite its source")
    dropped: list[str] = []
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        record = _record_name(names)
        lines: list[str] = []
        tmp = out.with_suffix(".part")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
            for info in zin.infolist():
                m = _RUNTIME_LIB.search(info.filename)
                if info.filename == record:
                    continue
                if m and m.group("tag") not in keep:
                    dropped.append(info.filename)
                    continue
                data = zin.read(info)
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
                if not info.is_dir():
                    lines.append(record_line(info.filename, data))
            lines.append(f"{record},,")
            zout.writestr(record, "\n".join(lines) + "\n")
        tmp.replace(out)
    return out, dropped


def check_record(wheel: Path) -> int:
    """Every file listed with the right hash and size, and nothing unlisted; returns the count."""
    with zipfile.ZipFile(wheel) as z:
        names = [i.filename for i in z.infolist() if not i.is_dir()]
        record = _record_name(names)
        listed = {}
        for line in z.read(record).decode().splitlines():
            name, digest, size = line.rsplit(",", 2)
            listed[name] = (digest, size)
        if set(listed) != set(names):
            raise ValueError(f"{wheel.name}: RECORD and the archive differ: "
                             f"{sorted(set(listed) ^ set(names))[:5]}")
        for name in names:
            if name == record:
                continue
            want = record_line(name, z.read(name)).split(",", 1)[1]
            if ",".join(listed[name]) != want:
                raise ValueError(f"{wheel.name}: RECORD entry of {name} does not match its bytes")
        return len(names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--keep-lib", action="append", default=[], metavar="TAG",
                    help="runtime tag of a native library to keep (cpu, cuda130, ...); repeat")
    a = ap.parse_args(argv)
    out, dropped = slim(a.wheel, a.dest, set(a.keep_lib))
    n = check_record(out)
    mb = out.stat().st_size / 1e6
    print(f"{out}: {n} files, {mb:.1f} MB (dropped {len(dropped)}: {', '.join(Path(d).name for d in dropped)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
