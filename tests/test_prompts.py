"""Prompt file readers: formats, CRLF, non-ASCII, blank lines and malformed files."""

from pathlib import Path

import pytest

from atlas.ingest.prompts import PromptFileError, read_prompts

DATA = Path(__file__).resolve().parent.parent / "data" / "prompts"


def test_plain_text_crlf_blank_lines_and_non_ascii(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("a red car\r\n\r\n  \r\na café with naïve décor ✨\r\nlast line no newline".encode())
    ps = read_prompts(f)
    assert [p.text for p in ps.prompts] == ["a red car", "a café with naïve décor ✨", "last line no newline"]
    assert [p.source_line for p in ps.prompts] == [1, 4, 5]
    assert ps.blank_lines == 2
    assert ps.format == "txt"


def test_limit_counts_prompts_not_blank_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\none\n\ntwo\nthree\n")
    ps = read_prompts(f, limit=2)
    assert [p.text for p in ps.prompts] == ["one", "two"]


def test_not_utf8_names_the_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"fine\nalso fine\nbad \xe9t\xe9\n")
    with pytest.raises(PromptFileError, match=r"line 3 is not valid UTF-8"):
        read_prompts(f)


def test_tsv_prompt_column_with_quotes(tmp_path):
    f = tmp_path / "p.tsv"
    f.write_text('Category\tPrompt\nx\t"G I G G L E" painted on a wall\ny\t\nz\ta dog\n')
    ps = read_prompts(f)
    assert [p.text for p in ps.prompts] == ['"G I G G L E" painted on a wall', "a dog"]
    assert [p.source_line for p in ps.prompts] == [2, 4]
    assert ps.blank_lines == 1


def test_tsv_without_prompt_column(tmp_path):
    f = tmp_path / "p.tsv"
    f.write_text("text\tcat\na\tb\n")
    with pytest.raises(PromptFileError, match="no 'Prompt' column"):
        read_prompts(f)


def test_jsonl(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a cat", "id": 1}\n\n{"prompt": "a dog"}\n')
    assert [p.text for p in read_prompts(f).prompts] == ["a cat", "a dog"]
    f.write_text('{"prompt": "a cat"}\n{"text": "no prompt field"}\n')
    with pytest.raises(PromptFileError, match="line 2: expected an object with a string 'prompt'"):
        read_prompts(f)
    f.write_text('{"prompt": "a cat"}\n{broken\n')
    with pytest.raises(PromptFileError, match="line 2: not valid JSON"):
        read_prompts(f)


def test_empty_file_is_an_error(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n \n")
    with pytest.raises(PromptFileError, match="no prompts found"):
        read_prompts(f)


def test_shipped_prompt_sets_read_completely():
    parti = read_prompts(DATA / "PartiPrompts.tsv")
    assert len(parti.prompts) == 1632
    assert any("Dalí" in p.text for p in parti.prompts)
    color = read_prompts(DATA / "t2i-compbench" / "color_val.txt")
    assert len(color.prompts) == 300 and color.blank_lines == 0
    assert not any("\r" in p.text for p in color.prompts)
    assert color.prompts[0].text == "a green bench and a blue bowl"
