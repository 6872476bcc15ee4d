#!/usr/bin/env python3
"""Rebuild ``corpus.jsonl.xz`` from the Debian package ``r-cran-janeaustenr``, with no R and no network.

It reads Jane Austen's six novels out of the package's R lazy-load data base (``Rdata.{rdx,rdb}`` inside the
``.deb``), splits every novel into chapters and writes one JSON object per chapter, xz-compressed. The output is
byte-for-byte deterministic for a given package. The commands and the provenance are in PROVENANCE.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import re
import struct
import sys
import tarfile
import zlib
from pathlib import Path

EXPECTED_DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
DATA_DIR = "usr/lib/R/site-library/janeaustenr/data/"
PACKAGE = "Debian r-cran-janeaustenr 1.0.0-1 (CRAN janeaustenr 1.0.0)"

# R object name -> (title, year of first publication, Project Gutenberg eBook number)
BOOKS = {
    "sensesensibility": ("Sense and Sensibility", 1811, 161),
    "prideprejudice": ("Pride and Prejudice", 1813, 1342),
    "mansfieldpark": ("Mansfield Park", 1814, 141),
    "emma": ("Emma", 1815, 158),
    "northangerabbey": ("Northanger Abbey", 1817, 121),
    "persuasion": ("Persuasion", 1817, 105),
}
AUTHOR = "Jane Austen"

CHAPTER_RE = re.compile(r"^(?:CHAPTER|Chapter)\s+([IVXLC]+|\d+)\.?$")
VOLUME_RE = re.compile(r"^VOLUME\s+([IVX]+)$")
SECTION_RE = re.compile(r"^ADVERTISEMENT BY THE AUTHORESS\b")  # Northanger Abbey's preface
END_OF_TEXT_RE = re.compile(r"^A NOTE ON THE TEXT$")  # modern editor's note after Northanger Abbey
END_MARK_RE = re.compile(r"^(?:FINIS|Finis|THE END)$")
SCENE_BREAK_RE = re.compile(r"^[*\s]+$")
ITALICS_RE = re.compile(r"_([^_]+)_")  # Gutenberg's _italic_ markup


# --------------------------------------------------------------------------
# Reading the package: .deb (ar archive) -> data.tar.* -> Rdata.rdx / Rdata.rdb
# --------------------------------------------------------------------------

def read_deb_member(deb: bytes, wanted: str) -> bytes:
    """Return one file from the data tarball of a Debian binary package."""
    assert deb[:8] == b"!<arch>\n", "not an ar archive / .deb"
    pos = 8
    while pos < len(deb):
        name = deb[pos:pos + 16].decode().strip().rstrip("/")
        size = int(deb[pos + 48:pos + 58].decode().strip())
        body = deb[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                for member in tar.getmembers():
                    if member.name.lstrip("./") == wanted:
                        return tar.extractfile(member).read()
            raise FileNotFoundError(wanted)
    raise ValueError("no data.tar member in .deb")


class RUnserializer:
    """Minimal reader for R's XDR serialization format (enough for this package)."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _bytes(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def _length(self) -> int:
        n = self._int()
        return (self._int() << 32) + self._int() if n == -1 else n

    def read(self):
        assert self._bytes(2) == b"X\n", "only XDR-format serializations are supported"
        version = self._int()
        self._int(), self._int()  # writer / minimal reader R versions
        if version == 3:
            self._bytes(self._int())  # native encoding name
        return self._item()

    def _item(self):
        flags = self._int()
        sexptype, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if sexptype == 254:  # NILVALUE_SXP
            return None
        if sexptype == 255:  # REFSXP
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if sexptype == 1:  # SYMSXP
            sym = ("symbol", self._item())
            self.refs.append(sym)
            return sym
        if sexptype in (2, 239):  # LISTSXP / ATTRLISTSXP (pairlist) -> list of (tag, value)
            if has_attr:
                self._item()
            tag = self._item()[1] if has_tag else None
            head = [(tag, self._item())]
            tail = self._item()
            return head + (tail or [])
        if sexptype == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None  # NA_character_
            levels = flags >> 12  # encoding bits: 4 = latin1, 8 = UTF-8, 64 = ASCII
            latin1 = levels & 4 and not levels & 8
            return self._bytes(n).decode("latin-1" if latin1 else "utf-8")
        if sexptype in (10, 13):  # LGLSXP, INTSXP
            n = self._length()
            value = list(struct.unpack(">%di" % n, self._bytes(4 * n)))
        elif sexptype == 14:  # REALSXP
            n = self._length()
            value = list(struct.unpack(">%dd" % n, self._bytes(8 * n)))
        elif sexptype in (16, 19):  # STRSXP, VECSXP
            value = [self._item() for _ in range(self._length())]
        else:
            raise ValueError(f"unsupported R SEXP type {sexptype}")
        if has_attr:
            attributes = dict(self._item())
            if "names" in attributes:
                return dict(zip(attributes["names"], value))
        return value


def load_lazydata(rdx: bytes, rdb: bytes) -> dict[str, list[str]]:
    """Fetch every object of an R lazy-load data base (``Rdata.rdx`` index + ``Rdata.rdb``)."""
    index = RUnserializer(gzip.decompress(rdx)).read()
    assert index["compressed"] == [1], "expected zlib-compressed entries"
    objects = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[offset:offset + length]
        (raw_len,) = struct.unpack(">I", blob[:4])
        raw = zlib.decompress(blob[4:])
        assert len(raw) == raw_len
        objects[name] = RUnserializer(raw).read()
    return objects


# --------------------------------------------------------------------------
# Text processing
# --------------------------------------------------------------------------

def split_sections(lines: list[str]) -> list[tuple[str, list[str]]]:
    """Split a novel (list of lines) into (section label, lines) at chapter headings.

    Front matter before the first heading (title, "By Jane Austen", year) is
    dropped; volume headings only label the chapters that follow them; the
    modern "A NOTE ON THE TEXT" appendix and "THE END"/"FINIS" marks are cut.
    """
    sections: list[tuple[str, list[str]]] = []
    volume = None
    for line in lines:
        stripped = line.strip()
        if END_OF_TEXT_RE.match(stripped):
            break
        if END_MARK_RE.match(stripped):
            continue
        if m := VOLUME_RE.match(stripped):
            volume = m.group(1)
        elif m := CHAPTER_RE.match(stripped):
            label = f"Chapter {m.group(1)}"
            sections.append((f"Volume {volume}, {label}" if volume else label, []))
        elif SECTION_RE.match(stripped):
            sections.append(("Advertisement by the Authoress", []))
        elif sections:
            sections[-1][1].append(line)
    return sections


def is_indented(line: str) -> bool:
    return line[:2].isspace()


def format_paragraph(lines: list[str]) -> str:
    """Unwrap one paragraph.

    Ordinary hard-wrapped prose is joined into one line.  A run of indented
    lines keeps its line breaks when it looks like verse or letter layout
    (every line after the first starts with a capital, or all lines are short, e.g. a
    salutation or signature); an indented run of long lines that continue in
    lower case is a letter printed as an indented block and is joined too.
    """
    runs: list[list[str]] = []
    for line in lines:
        if runs and is_indented(runs[-1][-1]) == is_indented(line):
            runs[-1].append(line)
        else:
            runs.append([line])
    out: list[str] = []
    for run in runs:
        words = [" ".join(line.split()) for line in run]
        initials = [w.lstrip("\"'(-").strip()[:1] for w in words[1:]]
        verse_like = all(c.isupper() for c in initials if c.isalpha())
        short_lines = max(len(w) for w in words) < 30
        if not is_indented(run[0]) or not (verse_like or short_lines):
            out.append(" ".join(words))
        else:
            out.extend(words)
    return "\n".join(out)


def format_section(lines: list[str]) -> str:
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.rstrip())
        elif current:
            paragraphs.append(current)
            current = []
    out = []
    for para in paragraphs:
        flat = " ".join(" ".join(para).split())
        if flat.startswith("[") and flat.endswith("]") and "edition" in flat.lower():
            continue  # editors' volume-break notes, e.g. "[End volume one of this edition. ...]"
        if SCENE_BREAK_RE.match(flat):
            out.append("* * *")
            continue
        out.append(ITALICS_RE.sub(r"\1", format_paragraph(para)))
    return "\n\n".join(out)


def build_documents(novels: dict[str, list[str]]) -> list[dict]:
    """One document per chapter, books interleaved by relative position.

    Documents are ordered by (position of the chapter within its novel as a
    fraction of the novel's chapter count, publication order of the novel), so
    every stretch of the file -- in particular the last ~5 % used as a test
    split -- mixes all six novels.
    """
    keyed = []
    for book_index, (key, (title, year, ebook)) in enumerate(BOOKS.items()):
        sections = split_sections(novels[key])
        for i, (label, lines) in enumerate(sections):
            text = format_section(lines)
            assert text, (title, label)
            assert "gutenberg" not in text.lower(), (title, label)  # no licence boilerplate left
            doc = {
                "title": f"{title}: {label}",
                "author": AUTHOR,
                "source": f"Project Gutenberg eBook #{ebook} ({title}, {year}), "
                          f"via {PACKAGE} object '{key}'",
                "text": text,
            }
            keyed.append(((i + 0.5) / len(sections), book_index, doc))
    keyed.sort(key=lambda item: item[:2])
    return [doc for _, _, doc in keyed]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("deb", type=Path, help="r-cran-janeaustenr_1.0.0-1_all.deb")
    parser.add_argument("-o", "--output", type=Path,
                        default=Path(__file__).resolve().parent / "corpus.jsonl.xz")
    parser.add_argument("--any-version", action="store_true",
                        help="accept a .deb whose sha256 differs from the one documented")
    args = parser.parse_args(argv)

    deb = args.deb.read_bytes()
    digest = hashlib.sha256(deb).hexdigest()
    if digest != EXPECTED_DEB_SHA256 and not args.any_version:
        sys.exit(f"{args.deb}: sha256 {digest} != expected {EXPECTED_DEB_SHA256} "
                 "(pass --any-version to build from it anyway)")

    novels = load_lazydata(read_deb_member(deb, DATA_DIR + "Rdata.rdx"),
                           read_deb_member(deb, DATA_DIR + "Rdata.rdb"))
    docs = build_documents(novels)
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    compressed = lzma.compress(payload, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    args.output.write_bytes(compressed)
    chars = sum(len(d["text"]) for d in docs)
    print(f"{args.output}: {len(docs)} documents, {chars:,} characters of text, "
          f"{len(payload):,} bytes JSONL, {args.output.stat().st_size:,} bytes xz")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
