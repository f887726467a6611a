"""bench/offline_text.py: reading .deb files; reST, fortunes and dictd text turned into prose."""

import importlib.util
import io
import os
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("_bench_offline_text",
                                              os.path.join(ROOT, "bench", "offline_text.py"))
offline_text = importlib.util.module_from_spec(spec)
spec.loader.exec_module(offline_text)


def _ar_member(name: str, body: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
    return header + body + (b"\n" if len(body) % 2 else b"")


def _deb(path, files: dict[str, bytes], compression="xz"):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode=f"w:{compression}") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    with open(path, "wb") as f:
        f.write(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n")
                + _ar_member("control.tar.xz", b"x")  # Odd size: the next member is padded.
                + _ar_member(f"data.tar.{compression}", data.getvalue()))


@pytest.mark.parametrize("compression", ["xz", "gz"])
def test_deb_members_reads_the_data_archive(tmp_path, compression):
    deb = tmp_path / "pkg_1.0_all.deb"
    _deb(deb, {"./usr/share/doc/a.rst.txt": b"Alpha.", "./usr/share/doc/b.png": b"\x89PNG",
               "./usr/share/games/fortunes/x": b"Beta."}, compression)
    assert dict(offline_text.deb_members(str(deb), r"\.rst\.txt$")) == {
        "./usr/share/doc/a.rst.txt": b"Alpha."}
    assert offline_text.find_deb(str(tmp_path), "pkg") == str(deb)
    with pytest.raises(FileNotFoundError, match="no other_"):
        offline_text.find_deb(str(tmp_path), "other")
    (tmp_path / "bad.deb").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="no ar magic"):
        list(offline_text.deb_members(str(tmp_path / "bad.deb"), "."))
    whole = deb.read_bytes()
    (tmp_path / "cut.deb").write_bytes(whole[:-10])
    with pytest.raises(ValueError, match=f"data.tar.{compression} is cut short"):
        list(offline_text.deb_members(str(tmp_path / "cut.deb"), "."))


def test_rst_keeps_prose_and_drops_markup():
    rst = """\
Title
=====

.. note::
   Hidden in a directive.

The :func:`~os.path.join` function joins *paths*; see `the docs <https://x>`_ and
``os.sep``. An example::

    join("a", "b")

+-----+-----+
| a   | b   |
+-----+-----+

:param x: a field list.

Last paragraph.
"""
    paragraphs = [offline_text.plain(p) for p in offline_text.rst_paragraphs(rst)]
    assert paragraphs == ["Title",
                          "The join function joins paths; see the docs and os.sep. An example:",
                          "Last paragraph."]


def test_fortunes_drop_attributions_and_binary_index_files():
    files = {"./usr/share/games/fortunes/people": b"A friend is a present you give\n"
                                                  b"yourself.\n\t\t-- R. L. Stevenson\n%\n"
                                                  b"Short.\n",
             "./usr/share/games/fortunes/people.dat": b"\x00\x01binary"}
    assert list(offline_text.fortunes(files)) == [
        "A friend is a present you give yourself.", "Short."]


def test_gcide_definitions_lose_headwords_sources_and_sense_numbers():
    entry = ("Abdomen \\Ab*do\"men\\, n. [L. abdomen.]\n"
             "   1. (Anat.) The belly, or that part of the body between the\n"
             "      thorax and the pelvis. --Cowell.\n"
             "   [1913 Webster]")
    assert list(offline_text.gcide_definitions(entry)) == [
        "The belly, or that part of the body between the thorax and the pelvis."]


def test_prose_passages_keep_sentences_of_words_only():
    kept = "It takes less time to do a thing right than to explain why you did it wrong."
    assert offline_text.prose_passages([
        kept, kept,  # Once.
        "Too short to keep.",
        "x = f(y) == 3 and {a: b} are code, not prose, in this line here.",
        " ".join(["word"] * 41),
    ]) == [kept]


def test_missing_packages_stop_with_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        offline_text.main([f"--out={tmp_path / 'out'}", f"--debs={tmp_path}"])
    assert str(stop.value).startswith("error: no python3.11-doc_*.deb in ")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="error: --debs=.*nowhere: no such directory"):
        offline_text.main([f"--out={tmp_path / 'out'}", f"--debs={tmp_path / 'nowhere'}"])


def test_a_garbled_package_stops_with_one_error_line_and_writes_nothing(tmp_path):
    for package in ("fortunes", "fortunes-min", "dict-gcide"):
        _deb(tmp_path / f"{package}_1_all.deb", {"./usr/share/doc/x": b"x"})
    (tmp_path / "python3.11-doc_1_all.deb").write_bytes(b"!<arch>\ngarbage")
    with pytest.raises(SystemExit) as stop:
        offline_text.main([f"--out={tmp_path / 'out'}", f"--debs={tmp_path}"])
    assert str(stop.value) == (f"error: {tmp_path / 'python3.11-doc_1_all.deb'}: a garbled ar "
                               "header at byte 8")
    assert not (tmp_path / "out").exists()
