"""bench/offline_text.py: reading .deb files; reST, fortunes, dictd and Texinfo HTML text turned
into prose sentences and passages."""

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
    for package in ("fortunes", "fortunes-min", "dict-gcide", "texinfo"):
        _deb(tmp_path / f"{package}_1_all.deb", {"./usr/share/doc/x": b"x"})
    (tmp_path / "python3.11-doc_1_all.deb").write_bytes(b"!<arch>\ngarbage")
    with pytest.raises(SystemExit) as stop:
        offline_text.main([f"--out={tmp_path / 'out'}", f"--debs={tmp_path}"])
    assert str(stop.value) == (f"error: {tmp_path / 'python3.11-doc_1_all.deb'}: a garbled ar "
                               "header at byte 8")
    assert not (tmp_path / "out").exists()


def _sentences(count: int, word: str = "word") -> list[str]:
    return [f"This {word} sentence number {i} has seven words." for i in range(count)]


def test_paragraphs_group_into_passages_of_100_to_250_words():
    ten = " ".join(_sentences(10))  # 80 words.
    assert [len(p.split()) for p in offline_text.group_paragraphs(
        [ten, ten, ten, ten, "Too short.", " ".join(["long"] * 300)])] == [240, 300]
    # Whatever is left under 100 words at the end is dropped, not joined to the next page.
    assert list(offline_text.group_paragraphs([ten])) == []


def test_passages_keep_multi_sentence_prose_only():
    prose = " ".join(_sentences(15))  # 120 words, 15 sentences.
    one_sentence = " ".join(["word"] * 120) + "."
    code = prose + " " + "x = {y}; " * 10
    assert offline_text.prose_paragraph_passages(
        [prose, prose, one_sentence, code, " ".join(_sentences(40))]) == [prose]
    # A manual naming a command or two stays prose: under 1 % code-like characters.
    named = prose.replace("number 3", "@node 3")
    assert offline_text.prose_paragraph_passages([named]) == [named]


def test_texinfo_pages_lose_navigation_code_and_tables():
    page = ("<div class=\"header\">\n<p>Next: <a href=\"x.html\">X</a></p>\n</div>\n"
            "<p>The <code>@node</code> line names a node &mdash; see\n<em>Nodes</em>.</p>\n"
            "<pre class=\"example\"><p>not prose</p></pre>\n"
            "<table><tr><td><p>a cell</p></td></tr></table>\n<p>Last.</p>")
    assert list(offline_text.html_paragraphs(page)) == [
        "The @node line names a node \u2014 see Nodes.", "Last."]
    paragraph = "<p>" + " ".join(_sentences(8)) + "</p>"  # 64 words a paragraph.
    files = {"./usr/share/doc/texinfo/html/b.html": (paragraph * 2).encode(),
             "./usr/share/doc/texinfo/html/a.html": (paragraph * 3).encode()}
    assert [len(p.split()) for p in offline_text.manual_passages(files)] == [192, 128]


def test_topic_fortunes_are_labelled_by_their_file():
    fortune = b"Art is a lie that makes us realize the truth.\n%\nShort.\n"
    files = {"./usr/share/games/fortunes/art": fortune,
             "./usr/share/games/fortunes/art.dat": b"\x00",
             "./usr/share/games/fortunes/zippy": b"Yow! Are we having fun yet, today?\n"}
    assert offline_text.topic_fortunes(files, ("art", "food")) == {
        "art": ["Art is a lie that makes us realize the truth."], "food": []}


def test_held_out_chapters_are_the_ones_preparation_holds_out():
    from distil_flax.data.units import is_held_out

    chapters = [" ".join(_sentences(30, word=f"w{i}")) for i in range(200)]
    sentences, passages = offline_text.held_out_chapters(chapters, eval_every=50)
    held = [c for c in chapters if is_held_out(c, 50)]
    assert held and len(sentences) == 30 * len(held)
    assert len(passages) == len(held) and all(p in held for p in passages)  # 240 words each.
