"""Incremental detokenization and stop strings that span tokens."""

from __future__ import annotations

from strata.engine.output_text import OutputText


def test_stop_string_split_over_tokens_is_held_back_and_cut(engine):
    tok = engine.tokenizer
    ids = tok.encode("Hello world, the END is near", add_special_tokens=False)
    text = OutputText(tok, ["END"], True)
    emitted = ""
    for i in range(1, len(ids) + 1):
        text.update(ids[:i])
        emitted += text.take_delta(final=False)
        assert "E" not in emitted.split("the ")[-1] or text.stopped
        if text.stopped:
            break
    emitted += text.take_delta(final=True)
    assert text.stopped
    assert emitted == "Hello world, the "


def test_partial_stop_prefix_released_at_end(engine):
    tok = engine.tokenizer
    ids = tok.encode("It costs 5 dollars", add_special_tokens=False)
    text = OutputText(tok, ["dollars and cents"], True)
    out = ""
    for i in range(1, len(ids) + 1):
        text.update(ids[:i])
        out += text.take_delta(final=False)
    assert out == "It costs 5 "  # " dollars" could still become the stop string
    out += text.take_delta(final=True)
    assert out == "It costs 5 dollars" and not text.stopped


def test_multibyte_characters_are_not_split(engine):
    tok = engine.tokenizer
    ids = tok.encode("naïve café 東京", add_special_tokens=False)
    text = OutputText(tok, [], True)
    out = ""
    for i in range(1, len(ids) + 1):
        text.update(ids[:i])
        delta = text.take_delta(final=False)
        assert "\ufffd" not in delta
        out += delta
    out += text.take_delta(final=True)
    assert out == "naïve café 東京"


def test_incremental_text_is_the_whole_decode(engine):
    """Token by token, the text is what decoding the whole output gives (spaces, code, emoji, CJK, specials)."""
    tok = engine.tokenizer
    sample = "def f(x):\n    return x  # ok 👍🏽 naïve   東京, <|im_end|> done.\n\n  Ünïcödé ✓"
    ids = tok.encode(sample, add_special_tokens=False)
    for skip_special in (True, False):
        text = OutputText(tok, [], skip_special)
        for i in range(1, len(ids) + 1):
            text.update(ids[:i])
            whole = tok.decode(ids[:i], skip_special_tokens=skip_special)
            assert text.text == whole or (whole.endswith("\ufffd") and text.text.rstrip("\ufffd") in whole)
        assert text.text == tok.decode(ids, skip_special_tokens=skip_special)
