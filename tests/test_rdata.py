"""planner.quality.rdata on R serializations written here byte by byte, following R Internals
("Serialization Formats"): XDR header, flags words, CHARSXP encodings, pairlists, symbol
references, ALTREP sequences, .rds compressions and lazy-load databases."""
import bz2
import gzip
import lzma
import struct
import zlib

import pytest

from planner.quality import rdata

# ----------------------------------------------------------------------------- a tiny writer


def i32(v: int) -> bytes:
    return struct.pack(">i", v)


def flags(t: int, *, attr=False, tag=False, levels=0) -> bytes:
    return i32(t | (attr << 9) | (tag << 10) | (levels << 12))


NIL = i32(254)
UTF8, LATIN1, ASCII = 1 << 3, 1 << 2, 1 << 6


def header(version: int = 3) -> bytes:
    out = b"X\n" + i32(version) + i32(0x040301) + i32(0x030500)
    return out + (i32(5) + b"UTF-8" if version == 3 else b"")


def charsxp(s, levels=UTF8, encoding="utf-8") -> bytes:
    if s is None:
        return flags(9) + i32(-1)                            # NA_character_
    b = s.encode(encoding)
    return flags(9, levels=levels) + i32(len(b)) + b


def symbol(name: str) -> bytes:
    return flags(1) + charsxp(name, levels=ASCII)


def ref(i: int) -> bytes:
    return i32((i << 8) | 255)


def attributes(*cells) -> bytes:
    """A pairlist of (tag bytes, value bytes), ended by NILVALUE."""
    return b"".join(flags(2, tag=True) + tag + value for tag, value in cells) + NIL


def strsxp(items, attrs: bytes = b"") -> bytes:
    body = b"".join(charsxp(s) if not isinstance(s, bytes) else s for s in items)
    return flags(16, attr=bool(attrs)) + i32(len(items)) + body + attrs


def intsxp(vals, attrs: bytes = b"") -> bytes:
    return (flags(13, attr=bool(attrs)) + i32(len(vals))
            + b"".join(i32(-2 ** 31 if v is None else v) for v in vals) + attrs)


def realsxp(vals) -> bytes:
    return flags(14) + i32(len(vals)) + b"".join(struct.pack(">d", v) for v in vals)


def vecsxp(items, attrs: bytes = b"") -> bytes:
    return flags(19, attr=bool(attrs)) + i32(len(items)) + b"".join(items) + attrs


def lglsxp(vals) -> bytes:
    return flags(10) + i32(len(vals)) + b"".join(
        i32(-2 ** 31 if v is None else int(v)) for v in vals)


# ----------------------------------------------------------------------------- streams

def test_character_vector_encodings_and_na():
    raw = header() + strsxp(["line one", None, "Émile", charsxp("café", LATIN1, "latin-1"),
                             "", charsxp("plain", ASCII)])
    v = rdata.unserialize(raw)
    assert isinstance(v, rdata.RVector) and v.rtype == "character"
    assert list(v) == ["line one", None, "Émile", "café", "", "plain"]
    assert rdata.text_of(v) == "line one\n\nÉmile\ncafé\n\nplain\n"


@pytest.mark.parametrize("version", [2, 3])
def test_named_list_with_symbol_reference(version):
    # list(a = c(7L, NA, -3L), b = c(x = 1.5, y = -2)): elements come before the list's own
    # attributes, so b's "names" symbol is written in full and the list's is a reference to it
    # (index 1 of R's reference table)
    b_names = attributes((symbol("names"), strsxp(["x", "y"])))
    b = realsxp([1.5, -2.0])
    b = flags(14, attr=True) + b[4:] + b_names
    raw = header(version) + vecsxp(
        [intsxp([7, None, -3]), b],
        attributes((ref(1), strsxp(["a", "b"]))))
    v = rdata.unserialize(raw)
    d = v.as_dict()
    assert list(d) == ["a", "b"]
    assert d["a"].rtype == "integer" and list(d["a"]) == [7, None, -3]
    assert d["b"].rtype == "double" and d["b"].as_dict() == {"x": 1.5, "y": -2.0}


def test_logical_and_nil():
    assert list(rdata.unserialize(header() + lglsxp([True, None, False]))) == [True, None, False]
    assert rdata.unserialize(header() + NIL) is None


def test_long_vector_length():
    raw = header() + flags(13) + i32(-1) + i32(0) + i32(2) + i32(5) + i32(6)
    assert list(rdata.unserialize(raw)) == [5, 6]


def test_altrep_compact_intseq():
    # 3:7 as R >= 3.5 writes it: ALTREP(info = pairlist(class, package, type), state, attr)
    info = (flags(2) + symbol("compact_intseq") + flags(2) + symbol("base") + flags(2)
            + intsxp([13]) + NIL)
    raw = header() + flags(238) + info + realsxp([5.0, 3.0, 1.0]) + NIL
    v = rdata.unserialize(raw)
    assert v.rtype == "integer" and list(v) == [3, 4, 5, 6, 7]


@pytest.mark.parametrize("raw,match", [
    (b"RDX3\n", "not an R serialization"),
    (b"A\n2\n", "ASCII is not supported"),
    (header() + flags(16) + i32(3) + charsxp("a"), "stream ends inside an integer"),
    (header() + flags(4) + i32(0), "SEXP type 4"),
    (header() + ref(3), "reference 3 but only 0 are known"),
    (b"X\n" + i32(4) + i32(0) + i32(0), "serialization version 4"),
], ids=["magic", "ascii", "truncated", "environment", "dangling-ref", "version"])
def test_errors_say_what_and_where(raw, match):
    with pytest.raises(rdata.RFormatError, match=match) as e:
        rdata.unserialize(raw, "sample.rds")
    assert "sample.rds" in str(e.value)


@pytest.mark.parametrize("compress", [lambda b: b, gzip.compress, bz2.compress,
                                      lambda b: lzma.compress(b, format=lzma.FORMAT_XZ)],
                         ids=["none", "gzip", "bzip2", "xz"])
def test_read_rds_compressions(tmp_path, compress):
    p = tmp_path / "x.rds"
    p.write_bytes(compress(header() + strsxp(["It is a truth", None])))
    assert list(rdata.read_rds(str(p))) == ["It is a truth", None]


# ----------------------------------------------------------------------------- lazy-load DB

BOOKS = {"emma": ["EMMA", "", "By Jane Austen", None, "Emma Woodhouse, handsome..."],
         "persuasion": ["Persuasion", "", "Sir Walter Elliot, of Kellynch Hall,"]}


def _blob(raw: bytes, compressed: int, kind: str) -> bytes:
    n = struct.pack(">I", len(raw))
    if compressed == 1:
        return n + zlib.compress(raw)
    body = {"0": raw, "1": zlib.compress(raw), "2": bz2.compress(raw),
            "Z": lzma.compress(raw, format=lzma.FORMAT_RAW,
                               filters=[{"id": lzma.FILTER_LZMA2,
                                         "preset": 9 | lzma.PRESET_EXTREME}])}[kind]
    return n + kind.encode() + body


def _database(folder, compressed: int, kind: str = "1", extra: dict = None):
    objects = {name: header() + strsxp(lines) for name, lines in BOOKS.items()}
    objects.update(extra or {})
    rdb, keys = b"", []
    for name, raw in objects.items():
        blob = _blob(raw, compressed, kind)
        keys.append(intsxp([len(rdb), len(blob)]))
        rdb += blob
    comp = lglsxp([True]) if compressed == 1 else intsxp([compressed])
    names = symbol("names")
    index = header() + vecsxp(
        [vecsxp(keys, attributes((names, strsxp(list(objects))))),
         vecsxp([], attributes((ref(1), strsxp([])))),
         comp],
        attributes((ref(1), strsxp(["variables", "references", "compressed"]))))
    (folder / "Rdata.rdx").write_bytes(gzip.compress(index))
    (folder / "Rdata.rdb").write_bytes(rdb)


@pytest.mark.parametrize("compressed,kind", [(1, "1"), (2, "2"), (2, "0"), (3, "Z"), (3, "1")],
                         ids=["zlib", "bzip2", "stored", "xz-raw", "type3-zlib"])
def test_lazyload_database_to_texts(tmp_path, compressed, kind):
    _database(tmp_path, compressed, kind)
    objs = rdata.read_lazyload(str(tmp_path))
    assert {k: list(v) for k, v in objs.items()} == BOOKS
    out = tmp_path / "txt"
    counts = rdata.write_texts(str(tmp_path), str(out))
    assert counts == {k: len(v) for k, v in BOOKS.items()}
    for name, lines in BOOKS.items():
        want = "".join((s or "") + "\n" for s in lines)
        assert (out / f"{name}.txt").read_bytes() == want.encode("utf-8")


def test_lazyload_skips_objects_that_are_not_text(tmp_path):
    _database(tmp_path, 1, extra={"counts": header() + intsxp([1, 2, 3])})
    counts = rdata.write_texts(str(tmp_path), str(tmp_path / "txt"))
    assert set(counts) == set(BOOKS)
    assert not (tmp_path / "txt" / "counts.txt").exists()


def test_lazyload_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Rdata.rdx is missing"):
        rdata.read_lazyload(str(tmp_path))
    _database(tmp_path, 1)
    db = (tmp_path / "Rdata.rdb").read_bytes()
    (tmp_path / "Rdata.rdb").write_bytes(db[:len(db) // 2])
    with pytest.raises(rdata.RFormatError, match="lies past the end"):
        rdata.read_lazyload(str(tmp_path))


def test_blob_length_is_checked():
    blob = _blob(b"X\n" + b"\0" * 10, 1, "1")
    bad = struct.pack(">I", 99) + blob[4:]
    with pytest.raises(rdata.RFormatError, match="holds 12 bytes, its header says 99"):
        rdata.decompress_blob(bad, 1, "entry")


def test_command_line(tmp_path, capsys):
    _database(tmp_path, 1)
    assert rdata.main([str(tmp_path), str(tmp_path / "out")]) == 0
    assert "persuasion: 3 lines" in capsys.readouterr().out
    assert rdata.main([]) == 2
