"""A reader for R's serialized data, enough to take text out of an R package without R.

Used for Jane Austen's novels, which Debian ships as the R package ``r-cran-janeaustenr``: its
``data/`` folder is a lazy-load database, ``Rdata.rdx`` (an index, itself a compressed
serialization) plus ``Rdata.rdb`` (the objects, each compressed on its own). Every novel is a
character vector, one element per line of the Project Gutenberg text.

Format (R Internals, "Serialization Formats"; ``src/main/serialize.c``):

* a stream starts with ``X\\n`` (XDR: big-endian 32-bit integers, IEEE doubles), then the
  format version (2 or 3), the writer's and the minimal reader's R version; version 3 adds the
  native encoding (length + bytes);
* each item starts with a flags word: ``type = flags & 0xFF``, bit 9 has-attributes, bit 10
  has-tag, ``levels = flags >> 12`` (for strings: bit 3 UTF-8, bit 2 latin-1, bit 1 bytes);
* vectors: a length (``-1`` then two words for lengths >= 2^31) and the elements; a string is
  a ``CHARSXP`` with a byte count (``-1``: ``NA``); pairlists are (attributes, tag, car) cells
  chained through the cdr; symbols enter a reference table that ``REFSXP`` items point into;
* ``.rds`` files are one stream, compressed as a whole (gzip, bzip2, xz) or not;
* a lazy-load blob (``.rdb`` at the index's offset and length) is a 4-byte big-endian length of
  the stream and the compressed stream: zlib for ``compressed = 1``; for 2 and 3 a type byte
  follows (``'0'`` stored, ``'1'`` zlib, ``'2'`` bzip2, ``'Z'`` raw LZMA2 stream).

``NA`` elements read as ``None``.

    >>> rds = read_rds("pkg/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx")  # doctest: +SKIP
    >>> books = read_lazyload("pkg/usr/lib/R/site-library/janeaustenr/data")     # doctest: +SKIP
    >>> books["persuasion"][:2]                                                   # doctest: +SKIP
    ['Persuasion', '']

Command line: ``python -m planner.quality.rdata DATA_DIR OUT_DIR`` writes every character
vector of the database as ``OUT_DIR/<name>.txt`` (one element per line, ``NA`` as an empty line).
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
import sys
import zlib
from typing import Any, Optional

# SEXP types (Rinternals.h) and the serializer's special codes (serialize.c)
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP = 9, 10, 13, 14, 15, 16, 17
VECSXP, EXPRSXP, RAWSXP = 19, 20, 24
ALTREP_SXP, ATTRLISTSXP, ATTRLANGSXP = 238, 239, 240
BASEENV_SXP, EMPTYENV_SXP, GLOBALENV_SXP, NILVALUE_SXP, REFSXP = 241, 242, 253, 254, 255
_SINGLETONS = {BASEENV_SXP: "<baseenv>", EMPTYENV_SXP: "<emptyenv>",
               GLOBALENV_SXP: "<globalenv>"}

NA_INTEGER = -2 ** 31
_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10
_LATIN1, _UTF8 = 1 << 2, 1 << 3

_VECTOR_NAMES = {LGLSXP: "logical", INTSXP: "integer", REALSXP: "double", CPLXSXP: "complex",
                 STRSXP: "character", VECSXP: "list", EXPRSXP: "expression", RAWSXP: "raw"}


class RVector(list):
    """An R vector: its elements in a list (``NA`` as ``None``), the R type name (``rtype``:
    ``"character"``, ``"integer"``, ``"list"``, ...) and its attributes (``attributes``: name
    -> value)."""

    def __init__(self, rtype: str, items=(), attributes: Optional[dict] = None):
        super().__init__(items)
        self.rtype = rtype
        self.attributes = attributes or {}

    @property
    def names(self) -> Optional[list]:
        return self.attributes.get("names")

    def as_dict(self) -> dict:
        """``{name: element}`` of a named vector."""
        if self.names is None or len(self.names) != len(self):
            raise ValueError(f"R {self.rtype} vector of {len(self)} elements has no names "
                             f"(attributes: {sorted(self.attributes)})")
        return dict(zip(self.names, self))

    def __repr__(self) -> str:
        return f"RVector({self.rtype!r}, {list.__repr__(self)}, {self.attributes!r})"


class RSymbol(str):
    """An R symbol (a name)."""


class RPairlist(list):
    """A pairlist (attribute lists, calls): ``[(tag or None, value), ...]``."""

    def as_dict(self) -> dict:
        return {tag: value for tag, value in self}


class RFormatError(ValueError):
    """The bytes are not an R serialization this reader understands (says where and why)."""


class _Reader:
    """Reads one XDR stream; ``refs``: symbols and environments in order of appearance."""

    def __init__(self, data: bytes, origin: str):
        self.b, self.p, self.origin = data, 0, origin
        self.refs: list = []

    def fail(self, what: str) -> RFormatError:
        return RFormatError(f"{self.origin}: {what} (at byte {self.p} of {len(self.b)})")

    def int(self) -> int:
        if self.p + 4 > len(self.b):
            raise self.fail("stream ends inside an integer")
        (v,) = struct.unpack_from(">i", self.b, self.p)
        self.p += 4
        return v

    def take(self, n: int) -> bytes:
        if n < 0 or self.p + n > len(self.b):
            raise self.fail(f"stream ends inside a {n}-byte field")
        out = self.b[self.p:self.p + n]
        self.p += n
        return out

    def header(self) -> int:
        magic = self.take(2)
        if magic != b"X\n":
            kind = {b"A\n": "ASCII", b"B\n": "native binary"}.get(magic)
            raise self.fail(f"format {kind} is not supported, only XDR ('X\\n')" if kind else
                            f"not an R serialization: starts with {magic!r}, expected b'X\\n'")
        version = self.int()
        self.int()                                               # writer's R version
        self.int()                                               # minimal reader's R version
        if version == 3:
            self.take(self.int())                                # native encoding name
        elif version != 2:
            raise self.fail(f"serialization version {version}, expected 2 or 3")
        return version

    def length(self) -> int:
        n = self.int()
        if n == -1:                                              # long vector: two words
            hi, lo = self.int(), self.int()
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        if n < 0:
            raise self.fail(f"negative vector length {n}")
        return n

    def item(self) -> Any:
        flags = self.int()
        t = flags & 0xFF
        if t == NILVALUE_SXP:
            return None
        if t == REFSXP:
            i = (flags >> 8) or self.int()
            if not 1 <= i <= len(self.refs):
                raise self.fail(f"reference {i} but only {len(self.refs)} are known")
            return self.refs[i - 1]
        if t in _SINGLETONS:
            return _SINGLETONS[t]
        if t == SYMSXP:
            sym = RSymbol(self.item() or "")
            self.refs.append(sym)
            return sym
        if t == CHARSXP:
            return self.chars(flags)
        if t in (LISTSXP, LANGSXP, ATTRLISTSXP, ATTRLANGSXP, DOTSXP):
            return self.pairlist(flags)
        if t in _VECTOR_NAMES:
            return self.vector(t, flags)
        if t == ALTREP_SXP:
            return self.altrep()
        raise self.fail(f"SEXP type {t} (flags {flags:#x}) is not supported; this reader takes "
                        f"vectors, lists, pairlists, symbols and references")

    def chars(self, flags: int) -> Optional[str]:
        n = self.int()
        if n == -1:
            return None                                          # NA_character_
        raw = self.take(n)
        return raw.decode("latin-1" if (flags >> 12) & _LATIN1 else "utf-8", errors="replace")

    def pairlist(self, flags: int) -> RPairlist:
        out = RPairlist()
        while True:
            t = flags & 0xFF
            if t == NILVALUE_SXP:
                return out
            if t not in (LISTSXP, LANGSXP, ATTRLISTSXP, ATTRLANGSXP, DOTSXP):
                out.append((None, self._item_with_flags(flags)))  # a dotted (improper) tail
                return out
            if flags & _HAS_ATTR:
                self.item()                                      # a cell's own attributes
            tag = self.item() if flags & _HAS_TAG else None
            out.append((tag, self.item()))
            flags = self.int()                                   # the cdr: next cell or nil

    def _item_with_flags(self, flags: int) -> Any:
        self.p -= 4                                              # re-read the flags word
        return self.item()

    def vector(self, t: int, flags: int) -> RVector:
        n = self.length()
        if t == STRSXP:
            items = []
            for _ in range(n):
                f = self.int()
                if f & 0xFF != CHARSXP:
                    raise self.fail(f"element of a character vector has type {f & 0xFF}")
                items.append(self.chars(f))
        elif t in (VECSXP, EXPRSXP):
            items = [self.item() for _ in range(n)]
        elif t in (LGLSXP, INTSXP):
            vals = struct.unpack(f">{n}i", self.take(4 * n))
            items = [None if v == NA_INTEGER else (bool(v) if t == LGLSXP else v) for v in vals]
        elif t == REALSXP:
            items = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif t == CPLXSXP:
            vals = struct.unpack(f">{2 * n}d", self.take(16 * n))
            items = [complex(vals[2 * i], vals[2 * i + 1]) for i in range(n)]
        else:                                                    # RAWSXP
            items = list(self.take(n))
        attrs = self.item().as_dict() if flags & _HAS_ATTR else {}
        return RVector(_VECTOR_NAMES[t], items, attrs)

    def altrep(self) -> RVector:
        """ALTREP objects R writes compactly: integer / real sequences and wrappers."""
        info = self.item()                                       # pairlist(class, package, type)
        state = self.item()
        attrs = self.item()
        cls = str(info[0][1]) if isinstance(info, RPairlist) and info else "?"
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = (int(x) if cls == "compact_intseq" else x for x in state)
            out = RVector("integer" if cls == "compact_intseq" else "double",
                          [start + i * step for i in range(int(n))])
        elif cls.startswith("wrap_"):
            out = state[0]                                       # list(x, metadata)
        else:
            raise self.fail(f"ALTREP class {cls!r} is not supported")
        if isinstance(attrs, RPairlist):
            out.attributes = attrs.as_dict()
        return out


def unserialize(data: bytes, origin: str = "<bytes>") -> Any:
    """The object of one uncompressed XDR serialization ``data``."""
    r = _Reader(data, origin)
    r.header()
    return r.item()


def decompress_stream(data: bytes, origin: str = "<bytes>") -> bytes:
    """An ``.rds`` file's bytes with its compression (gzip, bzip2, xz, or none) removed."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data, format=lzma.FORMAT_XZ)
    if data[:2] in (b"X\n", b"A\n", b"B\n"):
        return data
    raise RFormatError(f"{origin}: neither gzip, bzip2, xz nor an R serialization "
                       f"(starts with {data[:6]!r})")


def read_rds(path: str) -> Any:
    """The object of an ``.rds`` file (or an ``.rdx`` index)."""
    with open(path, "rb") as f:
        return unserialize(decompress_stream(f.read(), path), path)


# raw LZMA2 as R's R_compress3 writes it; a dictionary of the largest preset decodes any level
_LZMA2_RAW = [{"id": lzma.FILTER_LZMA2, "dict_size": 64 << 20}]


def decompress_blob(blob: bytes, compressed: int, origin: str = "<blob>") -> bytes:
    """One lazy-load database entry: 4-byte big-endian length + the compressed stream
    (``compressed``: the index's ``compressed`` value, 0 to 3)."""
    if not compressed:
        return blob
    if len(blob) < 5:
        raise RFormatError(f"{origin}: a compressed entry of {len(blob)} bytes")
    (n,) = struct.unpack_from(">I", blob, 0)
    if compressed == 1:
        kind, body = "1", blob[4:]
    elif compressed in (2, 3):
        kind, body = chr(blob[4]), blob[5:]
    else:
        raise RFormatError(f"{origin}: compression {compressed}, expected 0, 1, 2 or 3")
    if kind == "0":
        out = body
    elif kind == "1":
        out = zlib.decompress(body)
    elif kind == "2":
        out = bz2.decompress(body)
    elif kind == "Z":
        out = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=_LZMA2_RAW)
    else:
        raise RFormatError(f"{origin}: entry compression type {kind!r}, expected 0, 1, 2 or Z")
    if len(out) != n:
        raise RFormatError(f"{origin}: entry holds {len(out)} bytes, its header says {n}")
    return out


def read_lazyload(data_dir: str, stem: str = "Rdata") -> dict:
    """``{name: object}`` of the lazy-load database ``data_dir/<stem>.rdx`` / ``.rdb``."""
    rdx, rdb = (os.path.join(data_dir, stem + ext) for ext in (".rdx", ".rdb"))
    for p in (rdx, rdb):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} is missing: expected an R lazy-load database "
                                    f"({stem}.rdx + {stem}.rdb) in {data_dir}")
    index = read_rds(rdx)
    if not isinstance(index, RVector) or "variables" not in (index.names or []):
        raise RFormatError(f"{rdx}: not a lazy-load index (a list with 'variables')")
    fields = index.as_dict()
    comp = fields.get("compressed")
    compressed = int(comp[0]) if comp else 1
    with open(rdb, "rb") as f:
        db = f.read()
    out = {}
    for name, key in fields["variables"].as_dict().items():
        off, n = (int(x) for x in key)
        if off + n > len(db):
            raise RFormatError(f"{rdb}: entry {name!r} at {off}+{n} lies past the end "
                               f"({len(db)} bytes)")
        raw = decompress_blob(db[off:off + n], compressed, f"{rdb} entry {name!r}")
        out[name] = unserialize(raw, f"{rdb} entry {name!r}")
    return out


def text_of(lines: RVector) -> str:
    """A character vector as text: one element per line, ``NA`` as an empty line."""
    return "".join((s if s is not None else "") + "\n" for s in lines)


def write_texts(data_dir: str, out_dir: str, stem: str = "Rdata") -> dict:
    """Write every character vector of the database as ``out_dir/<name>.txt``; returns
    ``{name: number of lines}``."""
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for name, obj in read_lazyload(data_dir, stem).items():
        if not (isinstance(obj, RVector) and obj.rtype == "character"):
            continue
        with open(os.path.join(out_dir, f"{name}.txt"), "w", encoding="utf-8", newline="\n") as f:
            f.write(text_of(obj))
        counts[name] = len(obj)
    if not counts:
        raise RFormatError(f"{data_dir}: no character vectors in the database")
    return counts


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m planner.quality.rdata DATA_DIR OUT_DIR", file=sys.stderr)
        return 2
    for name, n in write_texts(*argv).items():
        print(f"{name}: {n} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
