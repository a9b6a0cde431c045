"""Public-domain training text for the stand-in model, read straight from Debian packages.

Sources (all public domain): Jane Austen's six novels (`r-cran-janeaustenr`, R lazy-load data),
the World English Bible (`sword-text-web`) and the Spanish Reina-Valera 1909 (`sword-text-sparv`),
both SWORD zText modules. `fetch()` downloads and unpacks the .deb files with apt-get.
"""

from __future__ import annotations

import html
import re
import struct
import subprocess
import zlib
from pathlib import Path

PACKAGES = ("r-cran-janeaustenr", "sword-text-web", "sword-text-sparv")
AUSTEN_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
SWORD = "usr/share/sword/modules/texts/ztext/{module}"


def fetch(workdir: Path) -> Path:
    """Download and unpack the source packages into workdir/root (idempotent)."""
    root = workdir / "root"
    workdir.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        if not list(workdir.glob(f"{name}_*.deb")):
            subprocess.run(["apt-get", "download", name], cwd=workdir, check=True)
        deb = next(workdir.glob(f"{name}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


# --- R lazy-load database (janeaustenr) -------------------------------------------------------

def _r_objects(blob: bytes):
    """Yield each decompressed object: 4-byte big-endian length, then a zlib stream."""
    pos = 0
    while pos + 4 < len(blob):
        inflater = zlib.decompressobj()
        data = inflater.decompress(blob[pos + 4:])
        pos = len(blob) - len(inflater.unused_data)
        yield data


def _r_string_vectors(data: bytes, min_len: int = 500):
    """Find STRSXP vectors (type 16) of CHARSXPs (type 9) in R's XDR serialization."""
    pos = 0
    while pos + 8 <= len(data):
        flags, count = struct.unpack_from(">ii", data, pos)
        if flags & 0xFF == 16 and count >= min_len:
            found = _r_read_charsxps(data, pos + 8, count)
            if found is not None:
                strings, pos = found
                yield strings
                continue
        pos += 1


def _r_read_charsxps(data: bytes, pos: int, count: int) -> tuple[list[str], int] | None:
    out = []
    for _ in range(count):
        if pos + 8 > len(data):
            return None
        flags, length = struct.unpack_from(">ii", data, pos)
        if flags & 0xFF != 9:
            return None
        pos += 8
        if length < 0:
            out.append("")
            continue
        out.append(data[pos:pos + length].decode("utf-8", "replace"))
        pos += length
    return out, pos


def austen(root: Path) -> list[str]:
    """The six novels, one string each, paragraphs separated by blank lines."""
    blob = (root / AUSTEN_RDB).read_bytes()
    books = []
    for obj in _r_objects(blob):
        for lines in _r_string_vectors(obj):
            books.append(_paragraphs(lines))
    return books


def _paragraphs(lines: list[str]) -> str:
    paras, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


# --- SWORD zText (Bibles) --------------------------------------------------------------------

_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_TITLE = re.compile(r"<title\b.*?</title>", re.S)
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"[ \t]+")


def _verse_text(osis: str) -> str:
    text = _TITLE.sub("", _NOTE.sub("", osis))
    text = html.unescape(_TAG.sub("", text))
    return _SPACE.sub(" ", text).strip()


def _testament(folder: Path, name: str) -> list[str]:
    bzs = (folder / f"{name}.bzs").read_bytes()
    bzz = (folder / f"{name}.bzz").read_bytes()
    bzv = (folder / f"{name}.bzv").read_bytes()
    blocks: dict[int, bytes] = {}
    verses = []
    for i in range(len(bzv) // 10):
        block, offset, size = struct.unpack_from("<IIH", bzv, i * 10)
        if size == 0:
            continue
        if block not in blocks:
            boff, bsize, _ = struct.unpack_from("<III", bzs, block * 12)
            blocks[block] = zlib.decompress(bzz[boff:boff + bsize])
        raw = blocks[block][offset:offset + size].decode("utf-8", "replace")
        verse = _verse_text(raw)
        if verse:
            verses.append(verse)
    return verses


def bible(root: Path, module: str) -> str:
    """Both testaments, about 20 verses to a paragraph."""
    folder = root / SWORD.format(module=module)
    verses = _testament(folder, "ot") + _testament(folder, "nt")
    return "\n\n".join(" ".join(verses[i:i + 20]) for i in range(0, len(verses), 20))


def sources(root: Path) -> dict[str, str]:
    """Every source by name: English novels, English Bible, Spanish Bible."""
    return {
        "austen": "\n\n".join(austen(root)),
        "web": bible(root, "engWEB2015eb"),
        "rv1909": bible(root, "spaRV1909eb"),
    }


def split(text: str, held_out_chars: int) -> tuple[str, str]:
    """Hold out the tail of a source, cut at a paragraph boundary."""
    cut = text.rfind("\n\n", 0, len(text) - held_out_chars)
    return text[:cut], text[cut + 2:]
