"""Model references and GGUF name matching (pure functions of pyllama.store.refs)."""

from __future__ import annotations

import pytest

from pyllama.store import HfRef, InvalidReferenceError, UrlRef, is_reference, parse_reference
from pyllama.store.refs import available_quants, matches_quant, pick_gguf, split_parts


def test_parse_forms() -> None:
    assert parse_reference("hf:org/repo:Q4_K_M") == HfRef("org/repo", quant="Q4_K_M")
    assert parse_reference("hf:org/repo") == HfRef("org/repo")
    assert parse_reference("hf:org/repo:Q8_0@v1.0") == HfRef("org/repo", quant="Q8_0", revision="v1.0")
    assert parse_reference("hf:org/re.po/sub/dir/m-Q4_K_M.gguf@refs/pr/1") == HfRef(
        "org/re.po", path="sub/dir/m-Q4_K_M.gguf", revision="refs/pr/1")
    assert parse_reference("https://example.com/a/b%20c.gguf?x=1") == UrlRef("https://example.com/a/b%20c.gguf?x=1")
    assert UrlRef("https://example.com/a/b%20c.gguf?x=1").filename == "b c.gguf"
    assert str(parse_reference("hf:org/repo:Q8_0@main")) == "hf:org/repo:Q8_0@main"
    assert is_reference("HF:org/repo") and is_reference("http://x/y.gguf")
    assert not is_reference("model.gguf") and not is_reference("/abs/hf:x") and not is_reference(b"hf:org/repo")


@pytest.mark.parametrize("text", ["hf:", "hf:org", "hf:org/repo/../x.gguf", "hf:org/repo@", "hf:/repo",
                                  "hf:org/repo:Q4 K", "https://example.com/", "https://example.com",
                                  "model.gguf", "hf:org/repo//x.gguf"])
def test_invalid_references(text: str) -> None:
    with pytest.raises(InvalidReferenceError):
        parse_reference(text)


def test_quant_matching_is_exact() -> None:
    assert matches_quant("Model-Q4_K_M.gguf", "q4_k_m")
    assert matches_quant("model.Q4_K_M-00001-of-00002.gguf", "Q4_K_M")
    assert matches_quant("Q4_K_M/model-00001-of-00002.gguf", "Q4_K_M")
    assert not matches_quant("model-Q4_K_M.gguf", "Q4_K")
    assert not matches_quant("model-IQ4_XS.gguf", "Q4_XS")
    assert matches_quant("model-UD-Q4_K_XL.gguf", "UD-Q4_K_XL")


def test_pick_gguf() -> None:
    files = ["README.md", "model-Q8_0.gguf", "model-Q4_K_M.gguf", "mmproj-model-Q4_K_M.gguf",
             "big/model-Q4_K_M-00002-of-00002.gguf", "big/model-Q4_K_M-00001-of-00002.gguf", "model-IQ4_XS.gguf"]
    assert pick_gguf(files, "Q8_0") == "model-Q8_0.gguf"
    assert pick_gguf(files, None) == "model-Q4_K_M.gguf"  # the default, at the top level first
    assert pick_gguf(files, "iq4_xs") == "model-IQ4_XS.gguf"
    assert pick_gguf(files, "Q5_K_M") is None
    assert pick_gguf(["a/b-Q4_K_M-00002-of-00002.gguf", "a/b-Q4_K_M-00001-of-00002.gguf"], "Q4_K_M") == \
        "a/b-Q4_K_M-00001-of-00002.gguf"
    assert pick_gguf(["only-F16.gguf", "README.md"], None) == "only-F16.gguf"
    assert pick_gguf(["a-F16.gguf", "a-Q8_0.gguf"], None) is None  # no default to choose
    assert available_quants(files) == ["IQ4_XS", "Q4_K_M", "Q8_0"]


def test_split_parts() -> None:
    assert split_parts("d/m-00002-of-00003.gguf") == ["d/m-00001-of-00003.gguf", "d/m-00002-of-00003.gguf",
                                                      "d/m-00003-of-00003.gguf"]
    assert split_parts("m.gguf") is None
    assert split_parts("m-00004-of-00003.gguf") is None
