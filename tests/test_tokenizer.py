import json

import pytest

from harken.text.tokenizer import (
    SPACE,
    BpeTokenizer,
    CharTokenizer,
    build_tokenizer,
    load_tokenizer,
    tokenizer_from_dict,
)

TEXTS = [
    "hello world",
    "it's a test of the tokenizer",
    "the quick brown fox jumps over the lazy dog",
    "speech recognition is fun",
    "we're going to train a model",
] * 20


def test_char_roundtrip_and_layout(tmp_path):
    tok = build_tokenizer("char", TEXTS, None, tmp_path)
    assert tok.tokens[0] == "<blk>" and tok.tokens[1] == "<unk>"
    assert tok.blank_id == 0 and tok.unk_id == 1
    assert SPACE in tok.tokens and "'" in tok.tokens
    for t in TEXTS[:5]:
        ids = tok.encode(t)
        assert 0 not in ids and 1 not in ids
        assert tok.decode(ids) == t
    assert tok.encode("q9") == [tok.tokens.index("q"), 1]
    # blanks are ignored by decode
    ids = tok.encode("hi there")
    assert tok.decode([0] + ids + [0]) == "hi there"
    lines = (tmp_path / "tokens.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "<blk> 0" and lines[1] == "<unk> 1"
    assert lines[2] == f"{SPACE} 2"
    assert all(line.split(" ")[1] == str(i) for i, line in enumerate(lines))
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, CharTokenizer) and loaded.tokens == tok.tokens
    d = json.loads(json.dumps(tok.to_dict()))
    assert tokenizer_from_dict(d).tokens == tok.tokens


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_bpe_roundtrip(tmp_path, kind):
    tok = build_tokenizer(kind, TEXTS, 40, tmp_path)
    assert isinstance(tok, BpeTokenizer)
    assert tok.tokens[0] == "<blk>" and tok.tokens[1] == "<unk>"
    assert 2 < tok.vocab_size <= 40
    for t in TEXTS[:5]:
        ids = tok.encode(t)
        assert ids and 0 not in ids and all(0 < i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == t
        assert tok.decode([0] + ids + [0, 0]) == t
    assert 1 in tok.encode("zzz 9")  # '9' unseen -> <unk>
    assert (tmp_path / "bpe.model").exists() and (tmp_path / "tokens.txt").exists()
    lines = (tmp_path / "tokens.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == tok.vocab_size and lines[0] == "<blk> 0" and lines[1] == "<unk> 1"
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BpeTokenizer) and loaded.tokens == tok.tokens
    d = json.loads(json.dumps(tok.to_dict()))
    back = tokenizer_from_dict(d)
    assert back.tokens == tok.tokens
    assert back.encode(TEXTS[2]) == tok.encode(TEXTS[2])


def test_load_detects_char_when_only_tokens_txt(tmp_path):
    CharTokenizer.build(["abc d"]).save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), CharTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "tokens.txt"), CharTokenizer)


COMMANDS = ("yes no stop go left right up down one two three four five six seven eight nine zero on off "
            "call cancel help repeat start back next menu").split()


def test_bpe_larger_than_the_text_supports_gives_one_piece_per_word(caplog):
    texts = COMMANDS + [" ".join(COMMANDS[i: i + 3]) for i in range(0, len(COMMANDS), 2)]
    with caplog.at_level("INFO", logger="harken.text.tokenizer"):
        tok = build_tokenizer("bpe", texts, vocab_size=500)
    assert tok.vocab_size < 500
    assert all(len(tok.encode(w)) == 1 for w in COMMANDS)  # word-level units
    assert tok.decode(tok.encode("stop go left")) == "stop go left"
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "vocab_size=500 is more than this text supports" in msg and f"{tok.vocab_size} pieces" in msg
    assert f"{len(COMMANDS)} of its {len(COMMANDS)} distinct words are one piece each" in msg
    caplog.clear()
    with caplog.at_level("INFO", logger="harken.text.tokenizer"):
        build_tokenizer("bpe", TEXTS, vocab_size=40)  # within what the text supports: no capping line
    assert not caplog.records


def test_bpe_vocab_below_the_characters_is_one_clear_error():
    with pytest.raises(ValueError) as e:
        build_tokenizer("bpe", COMMANDS, vocab_size=10)
    msg = str(e.value)
    assert "\n" not in msg and "vocab_size=10 is smaller than the" in msg and "tokenizer.kind=char" in msg
