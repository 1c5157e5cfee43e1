"""Whisper-decoder rescoring of the CTC n-best: the decoder read from the real tiny.en CTranslate2 file
against ctranslate2 itself, the scores on real/synthesized speech, the Engine, CLI and serve wiring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import real_speech, write_tiny_checkpoint


@pytest.fixture(scope="module", autouse=True)
def _tokenizers():
    pytest.importorskip("tokenizers", reason="LOUD SKIP: tokenizers missing (pip install 'harken[pretrained]')")


@pytest.fixture(scope="module")
def rescorer(tiny_en):
    from harken.decode.rescore import WhisperRescorer

    return WhisperRescorer.load(str(tiny_en))


def test_decoder_generates_what_ctranslate2_generates(rescorer, tiny_en, tiny_corpus):
    """Greedy generation through our torch decoder equals ctranslate2's on the same encoder input."""
    ct2 = pytest.importorskip("ctranslate2", reason="LOUD SKIP: ctranslate2 missing; pip install ctranslate2")
    wave, _ = real_speech(tiny_corpus)
    pad = np.zeros(480000, np.float32)
    pad[:len(wave)] = wave
    enc = rescorer.encoder
    with torch.inference_mode():
        feats, lens = enc.frontend(torch.from_numpy(pad)[None], torch.tensor([480000]))
        mem, _ = enc.forward_features(feats, lens, mask_padding=False)
        toks = list(rescorer.prompt)
        for _ in range(60):
            nxt = int(rescorer.decoder(torch.tensor([toks]), mem)[0, -1].argmax())
            if nxt == rescorer.eot:
                break
            toks.append(nxt)
    model = ct2.models.Whisper(str(tiny_en), device="cpu", compute_type="float32", intra_threads=2)
    ref = model.generate(ct2.StorageView.from_array(feats.transpose(1, 2).contiguous().numpy()),
                         [list(rescorer.prompt)], beam_size=1, suppress_blank=False, suppress_tokens=[])
    assert toks[len(rescorer.prompt):] == ref[0].sequences_ids[0]
    assert len(toks) > len(rescorer.prompt) + 3


def test_incremental_decoding_matches_the_whole_sequence(rescorer, tiny_corpus):
    """``WhisperDecoder.step`` with its key/value cache gives the states ``hidden`` gives over the whole
    sequence (the prompt at once, then token by token), and ``transcribe`` (which uses it) returns the
    greedy transcript the uncached loop of the test above produces."""
    wave, text = real_speech(tiny_corpus)
    dec = rescorer.decoder
    with torch.inference_mode():
        mem = rescorer.memory(wave, full_window=True)
        toks = list(rescorer.prompt) + rescorer.token_ids(text)
        full = dec.hidden(torch.tensor([toks]), mem)
        cross = dec.cross_memory(mem)
        n0 = len(rescorer.prompt)
        first, cache = dec.step(torch.tensor([toks[:n0]]), cross)
        parts = [first]
        for t in toks[n0:]:
            h, cache = dec.step(torch.tensor([[t]]), cross, cache)
            parts.append(h)
        inc = torch.cat(parts, dim=1)
        assert cache[0][0].shape[2] == len(toks)
        # float32 sums taken in a different order: the states reach |h| ~ 50-100, so the bound is relative
        # to their scale (a wrong cache is off by O(1), not 1e-4)
        err, scale = float((inc - full).abs().max()), float(full.abs().max())
        assert err <= 2e-5 * scale, (err, scale)
        # greedy without the cache, as the test above runs it
        seq = list(rescorer.prompt)
        for _ in range(80):
            nxt = int(dec(torch.tensor([seq]), mem)[0, -1].argmax())
            if nxt == rescorer.eot:
                break
            seq.append(nxt)
    got, avg_lp, no_speech = rescorer.transcribe(wave)
    want = rescorer.tokenizer.decode([t for t in seq[n0:] if t < rescorer.eot])
    assert got == want and len(got.split()) >= 4
    assert avg_lp < 0 and 0.0 <= no_speech < 0.5


def test_the_right_transcript_scores_best(rescorer, tiny_corpus):
    wave, text = real_speech(tiny_corpus)
    words = text.split()
    wrong = [" ".join(words[:-1]),                             # a word deleted
             " ".join(words[:2] + ["banana"] + words[3:]),     # a word substituted
             " ".join(words[:1] + words[:1] + words[1:]),      # a word repeated
             "".join(words)]                                   # no spaces
    scores = rescorer.score(wave, [text] + wrong)
    assert scores[0] == max(scores) and all(s < scores[0] - 1.0 for s in scores[1:]), scores
    # the memory can be computed once and reused; scores do not depend on the batch they ride in
    mem = rescorer.memory(wave)
    alone = [rescorer.score(wave, [t], memory=mem)[0] for t in [text] + wrong]
    assert np.allclose(alone, scores, atol=1e-3)


def test_pick_best_combines_first_and_second_pass():
    from harken.decode.rescore import pick_best

    assert pick_best([-1.0, -2.0], [-10.0, -5.0], 0.0) == 0
    assert pick_best([-1.0, -2.0], [-10.0, -5.0], 1.0) == 1
    with pytest.raises(ValueError):
        pick_best([], [], 1.0)


def test_too_long_and_bad_reference(rescorer, tmp_path):
    from harken.decode.rescore import RescoreError, RescoreTooLong, WhisperRescorer

    with pytest.raises(RescoreTooLong, match="30 s"):
        rescorer.memory(np.zeros(31 * 16000, np.float32))
    (tmp_path / "model.bin").write_bytes(b"not a model")
    with pytest.raises((RescoreError, ValueError)):
        WhisperRescorer(str(tmp_path))
    with pytest.raises(RescoreError, match="no such|not"):
        WhisperRescorer(str(tmp_path / "missing"))


def test_options_refuse_rescoring_without_a_beam():
    from harken.runtime import DecodeOptions

    with pytest.raises(ValueError, match="beam"):
        DecodeOptions(method="greedy", rescore="auto")
    with pytest.raises(ValueError, match="rescore_nbest"):
        DecodeOptions(method="beam", rescore="auto", rescore_nbest=1)


def test_engine_picks_the_best_combined_candidate(rescorer, tiny_en, tiny_corpus, tmp_path):
    """Behind any CTC model: the Engine's rescored text is the n-best entry with the best
    ``beam score + weight * Whisper log p``, recomputed here from the public pieces."""
    from harken.decode import DecodeConfig, build_decoder
    from harken.decode.rescore import pick_best
    from harken.runtime import DecodeOptions, Engine

    ckpt = write_tiny_checkpoint(Path(tiny_corpus[0]), tmp_path / "tiny.pt")
    eng = Engine.load(ckpt)
    wave, _ = real_speech(tiny_corpus)
    wave = wave[: 3 * 16000]
    opts = DecodeOptions(method="beam", beam_size=8, rescore=str(tiny_en), rescore_weight=2.0, rescore_nbest=6)
    with pytest.raises(Exception, match="Whisper-CTC"):
        eng.transcribe(wave, options=opts.with_(rescore="auto"))
    t = eng.transcribe(wave, options=opts)
    assert "rescore" in t.timings and t.timings["rescore"] > 0
    lp = eng.log_probs([wave])[0]
    hyps = build_decoder(eng.tokenizer, DecodeConfig(method="beam", beam_size=8)).decode(
        lp[None], torch.tensor([lp.shape[0]]), nbest=6)[0]
    scores = rescorer.score(wave, [h.text for h in hyps])
    assert t.text == hyps[pick_best([h.score for h in hyps], scores, 2.0)].text
    # weight 0: the first pass's best, as without rescoring
    plain = eng.transcribe(wave, options=DecodeOptions(method="beam", beam_size=8))
    assert eng.transcribe(wave, options=opts.with_(rescore_weight=0.0)).text == plain.text


def _harken(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "harken.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_rescore_errors_are_one_line(tiny_corpus, tmp_path):
    ckpt = write_tiny_checkpoint(Path(tiny_corpus[0]), tmp_path / "tiny.pt")
    from harken.data.manifest import read_manifest

    wav = read_manifest(Path(tiny_corpus[0]) / "test_seen.jsonl")[0].audio
    for args, needle in (((str(ckpt), wav, "--rescore", str(tmp_path / "nope")), "no such directory"),
                         ((str(ckpt), wav, "--rescore-weight", "2"), "need --rescore"),
                         ((str(ckpt), wav, "--rescore", "auto"), "Whisper-CTC")):
        r = _harken("transcribe", "--checkpoint", *args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert needle in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_transcribe_with_rescoring(tiny_en, tiny_corpus, tmp_path):
    ckpt = write_tiny_checkpoint(Path(tiny_corpus[0]), tmp_path / "tiny.pt")
    from harken.data.manifest import read_manifest

    wav = read_manifest(Path(tiny_corpus[0]) / "test_seen.jsonl")[0].audio
    r = _harken("transcribe", "--checkpoint", str(ckpt), wav, "--rescore", str(tiny_en), "--format", "json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "text" in out


def test_serve_config_checks_the_rescorer(tmp_path):
    from harken.serve.config import ServeConfig

    with pytest.raises(Exception, match="rescore"):
        ServeConfig(rescore=str(tmp_path / "nope")).validate()
    with pytest.raises(Exception, match="rescore_nbest"):
        ServeConfig(rescore="auto", rescore_nbest=1).validate()


def test_a_whisper_ctc_checkpoint_rescored_by_its_own_whisper(tiny_en, tiny_corpus, tmp_path):
    """A checkpoint rebuilds without the package but remembers what it was fine-tuned from: the Engine's
    ``rescore="auto"`` (and the CLI's ``--rescore auto``) load that Whisper."""
    from harken.config import EncoderConfig, ExperimentConfig, to_dict
    from harken.data.manifest import read_manifest
    from harken.models.build import build_model
    from harken.runtime import DecodeOptions, Engine
    from harken.text.tokenizer import CharTokenizer
    from harken.train.checkpoint import atomic_save

    corpus = Path(tiny_corpus[0])
    tok = CharTokenizer.build([r.text for r in read_manifest(corpus / "train.jsonl")])
    cfg = ExperimentConfig()
    from harken.models.whisper import WhisperEncoder

    cfg.model.encoder = WhisperEncoder.prepare_config(EncoderConfig(type="whisper", pretrained=str(tiny_en),
                                                                    dropout=0.0))
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size)
    with torch.no_grad():
        model.output.bias[0] -= 4.0
    ckpt = tmp_path / "wctc.pt"
    atomic_save({"config": to_dict(cfg), "model": model.state_dict(), "tokenizer": tok.to_dict()}, ckpt)
    eng = Engine.load(ckpt)
    assert eng.info.extra["pretrained"] == str(tiny_en)
    assert eng.rescorer(DecodeOptions(method="beam", rescore="auto")).path == Path(tiny_en)
    rec = read_manifest(corpus / "test_seen.jsonl")[0]
    r = _harken("transcribe", "--checkpoint", str(ckpt), rec.audio, "--rescore", "auto")
    assert r.returncode == 0, r.stderr[-2000:]


def test_tune_picks_the_rescoring_weight(tiny_en, tiny_corpus, tmp_path):
    """``harken tune --rescore``: weight 0 reproduces the first pass's WER; every weight is reported and
    the chosen one is the lowest WER of the table."""
    from harken.data.manifest import read_manifest

    corpus = Path(tiny_corpus[0])
    ckpt = write_tiny_checkpoint(corpus, tmp_path / "tiny.pt")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(r.text for r in read_manifest(corpus / "train.jsonl")) + "\n")
    lm = tmp_path / "lm.arpa"
    assert _harken("lm", "build", "--text", str(text), "--order", "2", "--out", str(lm)).returncode == 0
    r = _harken("tune", "--checkpoint", str(ckpt), "--manifest", str(corpus / "dev.jsonl"), "--lm", str(lm),
                "--lm-weights", "0.5", "--word-bonuses", "0", "--beam-size", "8", "--rescore", str(tiny_en),
                "--rescore-weights", "0,1,3", "--rescore-nbest", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    rows = {float(x.split()[0].split("=")[1]): float(x.split("WER=")[1].strip().rstrip("%"))
            for x in r.stdout.splitlines() if x.startswith("rescore_weight=")}
    assert sorted(rows) == [0.0, 1.0, 3.0]
    assert rows[0.0] == pytest.approx(100 * out["wer"], abs=0.01)
    assert out["rescore_weight"] in rows and rows[out["rescore_weight"]] == min(rows.values())


def test_a_live_server_rescores_beam_requests(tiny_en, tiny_corpus, tmp_path):
    """``harken serve`` with ``rescore=``: beam requests come back rescored (equal to the Engine's own
    rescored text), greedy requests are not touched."""
    import httpx

    from harken.audio import load_audio
    from harken.data.manifest import read_manifest
    from harken.runtime import DecodeOptions, Engine
    from harken.serve.config import load_serve_config
    from harken.serve.testing import LiveServer

    ckpt = write_tiny_checkpoint(Path(tiny_corpus[0]), tmp_path / "tiny.pt")
    eng = Engine.load(ckpt, num_threads=1)
    rec = sorted(read_manifest(Path(tiny_corpus[0]) / "test_seen.jsonl"), key=lambda r: r.duration)[0]
    data = open(rec.audio, "rb").read()
    wave = load_audio(data)
    cfg = load_serve_config(None, ["store.url=null", "grpc_port=0", f"rescore={tiny_en}", "rescore_weight=3.0",
                                   "rescore_nbest=4"])
    want = eng.transcribe(wave, DecodeOptions(method="beam", beam_size=4, rescore=str(tiny_en),
                                              rescore_weight=3.0, rescore_nbest=4)).text
    with LiveServer(cfg, eng) as srv:
        r = httpx.post(srv.url + "/v1/transcribe", files={"file": ("a.wav", data, "audio/wav")},
                       data={"decoding": "beam", "beam_size": "4"}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["text"] == want
        r = httpx.post(srv.url + "/v1/transcribe", files={"file": ("a.wav", data, "audio/wav")}, timeout=120)
        assert r.status_code == 200 and r.json()["text"] == eng.transcribe(wave).text
