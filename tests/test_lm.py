"""Modified Kneser-Ney estimation, the ARPA writer/reader, agreement with KenLM, the CLI, tuning."""

from __future__ import annotations

import argparse
import json
import math
import random

import pytest
import torch

from harken.decode.lm import LN10, ArpaLM, KneserNey, build_lm, compute_discounts


def toy_sentences(n=200, seed=0):
    rng = random.Random(seed)
    words = "the cat dog sat on a mat ran to big red".split()
    return [[rng.choice(words) for _ in range(rng.randint(1, 7))] for _ in range(n)]


def test_discounts_from_count_of_counts():
    # t1..t4 = 10, 4, 2, 1: Y = 10/18 = 5/9
    d1, d2, d3 = compute_discounts([10, 4, 2, 1])
    assert d1 == pytest.approx(1 - 2 * (5 / 9) * (4 / 10))  # 5/9
    assert d2 == pytest.approx(2 - 3 * (5 / 9) * (2 / 4))  # 7/6
    assert d3 == pytest.approx(3 - 4 * (5 / 9) * (1 / 2))  # 17/9
    assert compute_discounts([3, 0, 1, 1]) is None  # a zero count-of-counts: fallback


def test_hand_computed_bigram(tmp_path):
    """Corpus "a b" / "a", bigram, discounts (0.5, 1, 1.5) (also what the fallback gives here).

    Unigram continuation counts: a 1 (<s>), b 1 (a), </s> 2 (a, b); sum 4, gamma = 2/4; V = {a, b,
    </s>, <unk>}:  p(a) = p(b) = 0.5/4 + 0.5/4 = 0.25, p(</s>) = 1/4 + 1/8 = 0.375, p(<unk>) = 0.125.
    Bigrams (raw counts): <s> a 2 -> p(a|<s>) = 1/2 + 1/2 * 0.25 = 0.625
    a b 1, a </s> 1 -> gamma(a) = 1/2, p(b|a) = 0.25 + 0.5 * 0.25 = 0.375, p(</s>|a) = 0.4375
    b </s> 1 -> p(</s>|b) = 0.5 + 0.5 * 0.375 = 0.6875
    """
    sents = [["a", "b"], ["a"]]
    for kn in (KneserNey(sents, 2, discounts=(0.5, 1.0, 1.5)), KneserNey(sents, 2)):
        assert kn.discounts[1] == kn.discounts[2] == (0.5, 1.0, 1.5)
        assert kn.prob("a") == pytest.approx(0.25) and kn.prob("</s>") == pytest.approx(0.375)
        assert kn.prob("<unk>") == pytest.approx(0.125) and kn.prob("zebra") == pytest.approx(0.125)
        assert kn.prob("a", ["<s>"]) == pytest.approx(0.625)
        assert kn.prob("b", ["a"]) == pytest.approx(0.375)
        assert kn.prob("</s>", ["a"]) == pytest.approx(0.4375)
        assert kn.prob("a", ["a"]) == pytest.approx(0.5 * 0.25)  # unseen bigram: gamma(a) * p(a)
        assert kn.prob("</s>", ["b"]) == pytest.approx(0.6875)
    kn.write_arpa(tmp_path / "h.arpa")
    text = (tmp_path / "h.arpa").read_text()
    assert "ngram 1=5" in text and "ngram 2=4" in text
    assert f"{math.log10(0.625):.7f}\t<s> a" in text
    assert f"-99.0000000\t<s>\t{math.log10(0.5):.7f}" in text
    lm = ArpaLM.load(tmp_path / "h.arpa")
    assert lm.sentence_logp(["a", "b"]) == pytest.approx(math.log10(0.625 * 0.375 * 0.6875), abs=1e-6)
    assert lm.logp("a", ["a"]) == pytest.approx(math.log10(0.125), abs=1e-6)  # via backoff


@pytest.mark.parametrize("order", [2, 3, 4])
def test_arpa_is_normalised_and_matches_direct_kn(tmp_path, order):
    """For every history (seen contexts, plus unseen/OOV ones), sum_w P(w|h) over the vocabulary is
    1, both from the counts directly and from the written ARPA file read back with backoff."""
    kn = KneserNey(toy_sentences(), order)
    kn.write_arpa(tmp_path / "lm.arpa")
    lm = ArpaLM.load(tmp_path / "lm.arpa")
    hists = {()} | {("zzz",), ("the", "zzz"), ("zzz", "cat"), ("<s>",)}
    for n in range(1, order):
        hists |= {g for g in kn.adjusted[n] if g[-1] != "</s>"}
    assert len(hists) > 10
    worst_sum, worst_diff = 0.0, 0.0
    for h in hists:
        worst_sum = max(worst_sum, abs(math.fsum(10 ** lm.logp(w, h) for w in kn.vocab) - 1.0))
        worst_sum = max(worst_sum, abs(math.fsum(kn.prob(w, h) for w in kn.vocab) - 1.0))
        for w in kn.vocab:
            worst_diff = max(worst_diff, abs(math.log10(kn.prob(w, h)) - lm.logp(w, h)))
    assert worst_sum < 1e-4
    assert worst_diff < 1e-5
    # the discounts of the busy orders come from the count-of-counts, not the fallback
    assert kn.discounts[2] != (0.5, 1.0, 1.5)


def test_kenlm_reads_our_arpa_like_we_do(tmp_path):
    kenlm = pytest.importorskip("kenlm", reason="the kenlm Python module is optional (pip install kenlm "
                                                "compiles from source in ~2 min)")
    rng = random.Random(1)
    sents = toy_sentences()
    vocab = sorted({w for s in sents for w in s}) + ["oov", "zebra"]
    tests = sents[:40] + [[rng.choice(vocab) for _ in range(rng.randint(1, 9))] for _ in range(60)]
    for order in (2, 3, 4):
        kn = KneserNey(sents, order)
        kn.write_arpa(tmp_path / f"o{order}.arpa")
        ours = ArpaLM.load(tmp_path / f"o{order}.arpa")
        ken = kenlm.Model(str(tmp_path / f"o{order}.arpa"))
        assert ken.order == order
        for s in tests:
            ref = 0.0
            hist = ["<s>"]
            for w in s + ["</s>"]:
                ref += math.log10(kn.prob(w, hist))
                hist.append(w)
            k = ken.score(" ".join(s), bos=True, eos=True)
            assert k == pytest.approx(ref, abs=1e-4)
            assert ours.sentence_logp(s) == pytest.approx(k, abs=1e-4)
            per_word = [p for p, _, _ in ken.full_scores(" ".join(s))]
            st, mine = ours.begin(), []
            for w in s:
                lp, st = ours.score(st, w)
                mine.append(lp)
            mine.append(ours.end(st))
            assert mine == pytest.approx(per_word, abs=1e-4)


def run_cli(argv):
    from harken.decode.cli import add_commands

    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers(dest="cmd", required=True))
    a = p.parse_args(argv)
    return a.func(a)


def test_cli_lm_build(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("The cat sat.\nThe dog sat on 2 mats!\n\n")
    assert run_cli(["lm", "build", "--text", str(tmp_path / "t.txt"), "--order", "3",
                    "--out", str(tmp_path / "lm.arpa"), "--builtin"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["estimator"] == "harken" and out["order"] == 3 and len(out["ngrams"]) == 3
    lm = ArpaLM.load(tmp_path / "lm.arpa")
    assert {"the", "cat", "two", "mats", "<unk>", "</s>"} <= lm.vocab  # normalised text
    assert lm.sentence_logp("the cat sat".split()) > lm.sentence_logp("sat cat the".split())
    with pytest.raises(ValueError):
        build_lm(tmp_path / "t.txt", 1, tmp_path / "x.arpa")


def test_cli_lm_build_joins_text_manifests_and_prose(tmp_path, capsys):
    """--text, --manifest (its transcripts) and --sentences (prose cut into sentences) all feed one LM;
    a missing file or no text at all is a one-line user error."""
    from harken.data.manifest import Record, write_manifest

    (tmp_path / "t.txt").write_text("the cat sat\n")
    write_manifest(tmp_path / "m.jsonl", [Record("u1", "a.wav", 1.0, "a zebra ran home")])
    (tmp_path / "prose").write_text("Ships sailed north. Rain fell all night!\n\t\t-- A. Writer\n%\n"
                                    "The quartermaster counted barrels.\n%\n")
    assert run_cli(["lm", "build", "--text", str(tmp_path / "t.txt"), "--manifest", str(tmp_path / "m.jsonl"),
                    "--sentences", str(tmp_path / "prose"), "--order", "2", "--out", str(tmp_path / "lm.arpa"),
                    "--builtin"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["lines"] == 5
    vocab = ArpaLM.load(tmp_path / "lm.arpa").vocab
    assert {"cat", "zebra", "ships", "rain", "quartermaster"} <= vocab and "writer" not in vocab  # attribution dropped
    with pytest.raises(ValueError, match="needs training text"):
        run_cli(["lm", "build", "--out", str(tmp_path / "x.arpa")])
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        run_cli(["lm", "build", "--manifest", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x.arpa")])


def test_grid_search_picks_lm_weight_that_fixes_errors(tmp_path):
    """Acoustics slightly prefer "b a" where the reference says "a b"; an LM trained on "a b" fixes
    it once its weight is large enough."""
    from harken.decode.tune import grid_search
    from harken.text.tokenizer import CharTokenizer

    tok = CharTokenizer(["<blk>", "<unk>", "\u2581", "a", "b"])
    (tmp_path / "t.txt").write_text("a b\n" * 20 + "b b\n")
    build_lm(tmp_path / "t.txt", 2, tmp_path / "lm.arpa", use_lmplz=False)
    lp = torch.full((5, 5), -9.0)
    # frame 0: "b" 0.55 vs "a" 0.45; then space, then "a" 0.55 vs "b" 0.45
    lp[0, 4], lp[0, 3] = math.log(0.55), math.log(0.45)
    lp[1, 0] = 0.0
    lp[2, 2] = 0.0
    lp[3, 0] = 0.0
    lp[4, 3], lp[4, 4] = math.log(0.55), math.log(0.45)
    lp = torch.log_softmax(lp, -1)
    table = []
    w, b, wer = grid_search([lp, lp], ["a b", "a b"], tok, str(tmp_path / "lm.arpa"), [0.0, 0.01, 0.1, 1.0],
                            [0.0], table=table)
    lmw = ArpaLM.load(tmp_path / "lm.arpa")
    gain = (lmw.sentence_logp(["a", "b"]) - lmw.sentence_logp(["b", "a"])) * LN10
    acoustic = 2 * math.log(0.55 / 0.45)
    # each grid point is right exactly when the weighted LM preference beats the acoustic one
    assert [t[2] for t in table] == [0.0 if tw * gain > acoustic else 1.0 for tw, _, _ in table]
    assert table[0][2] == 1.0 and wer == 0.0
    assert w == min(tw for tw, _, twer in table if twer == 0.0) and b == 0.0
