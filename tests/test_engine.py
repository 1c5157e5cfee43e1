"""The inference Engine: torch and onnxruntime backends agree, warm-up at load, batching, lazy
segments, and the Recognizer layered on top."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from harken.runtime import DecodeOptions, ItemError
from harken.runtime.engine import Engine, VocabTokenizer

TINY = ["model.encoder.d_model=48", "model.encoder.num_layers=2", "model.encoder.num_heads=2",
        "model.encoder.ff_dim=96", "model.encoder.conv_kernel=7", "model.encoder.subsampling_channels=16"]


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_corpus, tmp_path_factory):
    """An untrained tiny model saved as a harken checkpoint (output bias pushed off blank so the
    greedy text is not empty)."""
    from conftest import write_tiny_checkpoint

    from harken.data.manifest import read_manifest

    corpus, _ = tiny_corpus
    recs = read_manifest(corpus / "test_seen.jsonl")
    path = write_tiny_checkpoint(corpus, tmp_path_factory.mktemp("engine") / "model.pt", TINY)
    return path, recs


@pytest.fixture(scope="module")
def tiny_onnx(tiny_ckpt):
    pytest.importorskip("onnxruntime")
    path, _ = tiny_ckpt
    out = path.with_suffix(".onnx")
    try:
        from harken.export.onnx import export_onnx
    except ImportError:  # the exporter is not there yet: a minimal wave export with the same metadata
        return _export_wave(path, out)
    export_onnx(path, out, variant="wave", check=False)
    return out


def _export_wave(ckpt_path, out):
    import dataclasses

    import onnx

    eng = Engine.load(ckpt_path, warmup=False)
    model, cfg = eng.model, eng.config
    s = torch.export.Dim("s", min=1000, max=16000 * 120)
    torch.onnx.export(model, (torch.randn(2, 16000), torch.tensor([16000, 12000])), str(out), dynamo=True,
                      input_names=["waveform", "lengths"], output_names=["log_probs", "out_lens"],
                      dynamic_shapes=({0: torch.export.Dim("b", max=64), 1: s}, {0: torch.export.Dim("b", max=64)}))
    proto = onnx.load(str(out))
    md = {"sample_rate": "16000", "feature_config": json.dumps(dataclasses.asdict(cfg.model.fbank)),
          "vocabulary": json.dumps(eng.tokenizer.tokens), "subsampling_factor": "4", "model_type": "ctc",
          "encoder_type": "conformer", "frame_shift": "0.01", "blank_id": "0", "streaming_chunk": "0"}
    for k, v in md.items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(proto, str(out))
    return out


def test_torch_and_onnx_backends_agree(tiny_ckpt, tiny_onnx):
    path, recs = tiny_ckpt
    et = Engine.load(path, num_threads=1)
    eo = Engine.load(tiny_onnx, num_threads=1)
    assert et.backend_name == "torch" and eo.backend_name == "onnx"
    assert eo.model is None and isinstance(eo.tokenizer.tokens, list)
    files = [r.audio for r in recs[:4]]
    from harken.audio import load_audio

    waves = [load_audio(f) for f in files]
    lt, lo = et.log_probs(waves), eo.log_probs(waves)  # one padded batch each
    for a, b in zip(lt, lo):
        assert a.shape == b.shape
        assert (a - b).abs().max() < 1e-3
    opts = DecodeOptions(word_timestamps=True)
    tt, to = et.transcribe_batch(files, opts), eo.transcribe_batch(files, opts)
    assert any(t.text for t in tt)
    assert [t.text for t in tt] == [t.text for t in to]
    assert [t.source for t in to] == [str(f) for f in files]
    for a, b in zip(tt, to):
        assert abs(a.confidence - b.confidence) < 1e-3
        assert [w.word for w in a.words] == [w.word for w in b.words]
        assert all(abs(x.start - y.start) < 1e-3 for x, y in zip(a.words, b.words))
    # batching does not change results
    assert et.transcribe(files[1]).text == tt[1].text


def test_warmup_at_load(tiny_ckpt):
    path, recs = tiny_ckpt
    eng = Engine.load(path)
    assert eng.warmup_calls == 1  # one dummy inference, before any request
    assert Engine.load(path, warmup=False).warmup_calls == 0


def test_segments_are_lazy(tiny_ckpt):
    from harken.audio import load_audio

    path, recs = tiny_ckpt
    eng = Engine.load(path, warmup=False)
    sil = np.zeros(16000, np.float32)
    wave = np.concatenate([sil] + [x for r in recs[:3] for x in (load_audio(r.audio), sil)])
    gen = eng.transcribe_segments(wave, batch_size=1)
    assert inspect.isgenerator(gen)
    first = next(gen)  # decoding happens on demand
    rest = list(gen)
    segs = [first] + rest
    assert [s.id for s in segs] == list(range(len(segs))) and len(segs) >= 2
    assert all(a.end <= b.start for a, b in zip(segs, segs[1:]))


def test_recognizer_is_an_engine(tiny_ckpt):
    from harken.recognizer import Recognizer

    path, recs = tiny_ckpt
    rec = Recognizer.load(path)
    assert isinstance(rec, Engine) and rec.warmup_calls == 1
    assert rec.transcribe(recs[0].audio).text == Engine.load(path, warmup=False).transcribe(recs[0].audio).text
    r2 = Recognizer(rec.model, rec.tokenizer, rec.config)
    assert r2.transcribe(recs[0].audio).text == rec.transcribe(recs[0].audio).text
    from harken.decode import DecodeConfig

    r3 = Recognizer(rec.model, rec.tokenizer, rec.config, decode_cfg=DecodeConfig(method="beam", beam_size=4))
    assert r3.options.method == "beam"
    assert isinstance(r3.transcribe(recs[0].audio).text, str)


def test_bad_inputs_have_clear_errors(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    with pytest.raises(FileNotFoundError, match="no such model"):
        Engine.load(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="backend"):
        Engine.load(path, backend="tensorrt")
    with pytest.raises(ValueError, match="onnx"):
        Engine.load(path, backend="onnx")


def test_vocab_tokenizer():
    tok = VocabTokenizer(["<blk>", "<unk>", "\u2581", "a", "b"])
    assert tok.decode([3, 2, 4, 0, 1]) == "a b"
    assert tok.encode("ab a") == [3, 4, 2, 3]
    bpe = VocabTokenizer(["<blk>", "<unk>", "\u2581ab", "\u2581a", "b", "\u2581"])
    assert bpe.decode(bpe.encode("ab ab b")) == "ab ab b"


def test_engine_streaming(tiny_ckpt):
    from harken.audio import load_audio

    path, recs = tiny_ckpt
    eng = Engine.load(path, warmup=False)
    with pytest.raises(ValueError, match="causal"):  # this model has a non-causal conv
        s = eng.stream(chunk_size=4)
        s.accept_waveform(load_audio(recs[0].audio))


# ------------------------------------------------------------------ the server-facing contract
@pytest.fixture(scope="module")
def engine_and_waves(tiny_ckpt):
    from harken.audio import load_audio

    path, recs = tiny_ckpt
    return Engine.load(path, warmup=False), [load_audio(r.audio) for r in recs[:6]]


def test_options_travel_with_the_call(engine_and_waves):
    eng, waves = engine_and_waves
    plain = eng.transcribe(waves[0])
    assert plain.words == []  # word times only on request (no alignment pass)
    timed = eng.transcribe(waves[0], options=DecodeOptions(word_timestamps=True))
    assert timed.text == plain.text and (timed.words or not timed.text)
    beam = eng.transcribe(waves[0], options=DecodeOptions(method="beam", beam_size=4))
    assert isinstance(beam.text, str)
    assert eng.options == DecodeOptions()  # the engine itself did not change
    assert eng.transcribe(waves[0]).text == plain.text
    assert set(plain.timings) >= {"frontend_encoder", "decoder", "alignment", "audio_decode"}


def test_decoder_cache_is_bounded(engine_and_waves):
    from harken.runtime.engine import DECODER_CACHE_SIZE

    eng, waves = engine_and_waves
    for k in range(1, DECODER_CACHE_SIZE + 4):
        eng.transcribe(waves[0], options=DecodeOptions(method="beam", beam_size=k))
    assert len(eng._decoders) == DECODER_CACHE_SIZE


def test_thread_safety_mixed_options(engine_and_waves):
    from concurrent.futures import ThreadPoolExecutor

    eng, waves = engine_and_waves
    variants = [DecodeOptions(), DecodeOptions(word_timestamps=True), DecodeOptions(method="beam", beam_size=3),
                DecodeOptions(method="beam", beam_size=6, word_timestamps=True)]
    jobs = [(i % len(waves), variants[i % len(variants)]) for i in range(32)]
    single = {(w, o): eng.transcribe(waves[w], options=o) for w, o in set(jobs)}
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda j: eng.transcribe(waves[j[0]], options=j[1]), jobs))
    for j, t in zip(jobs, got):
        ref = single[j]
        assert t.text == ref.text
        assert [(w.word, round(w.start, 4)) for w in t.words] == [(w.word, round(w.start, 4)) for w in ref.words]


def test_infer_batch_per_item_errors_and_limits(engine_and_waves):
    eng, waves = engine_and_waves
    sr = eng.sample_rate
    nan = waves[1].copy()
    nan[100] = np.nan
    int16 = np.round(waves[2] * 32767).astype(np.int16)
    long = np.concatenate([waves[3], np.zeros(sr * 3, np.float32), waves[4]])
    items = [waves[0], nan, np.zeros((2, 1600), np.float32), int16, long, "not audio", np.zeros(300, np.float32)]
    res = eng.infer_batch(items, max_item_seconds=len(long) / sr - 1.0)
    assert len(res) == len(items)
    assert res[0].text == eng.infer_batch([waves[0]])[0].text  # the good item is unaffected
    assert isinstance(res[1], ItemError) and res[1].code == "bad_audio" and "NaN" in res[1].message
    assert isinstance(res[2], ItemError) and res[2].code == "bad_audio" and "item 2" in res[2].message
    assert res[3].text == eng.infer_batch([waves[2]])[0].text  # int16 scaled like the float original
    assert isinstance(res[4], ItemError) and res[4].code == "too_long"
    assert isinstance(res[5], ItemError) and res[5].code == "bad_audio"
    assert res[6].text == "" and res[6].duration < 0.05  # shorter than one output frame: empty, no crash
    t = res[0].timings
    assert t["frontend_encoder"] > 0 and 0.0 <= t["padding"] < 1.0 and t["batch_size"] >= 1
    # long-form: cut by VAD into segments instead of refused
    lf = eng.infer_batch([long], max_item_seconds=len(long) / sr - 1.0, long_form=True)[0]
    assert not isinstance(lf, ItemError) and len(lf.segments) >= 1
    # a padded-frame budget splits batches without changing results
    small = eng.infer_batch(waves, max_batch_frames=200)
    assert [r.text for r in small] == [r.text for r in eng.infer_batch(waves)]


def test_short_inputs_are_empty_on_every_backend(tiny_ckpt, tiny_onnx):
    path, _ = tiny_ckpt
    for p in (path, tiny_onnx):
        eng = Engine.load(p, warmup=False)
        for n in (1, 160, 800):
            assert eng.transcribe(np.zeros(n, np.float32)).text == ""


def test_model_info_is_one_schema(tiny_ckpt, tiny_onnx):
    from harken.models.info import ModelInfo

    path, _ = tiny_ckpt
    it, io = Engine.load(path, warmup=False).info, Engine.load(tiny_onnx, warmup=False).info
    assert ModelInfo.from_metadata(it.to_metadata()) == it
    for k in ("sample_rate", "subsampling", "right_context", "vocabulary", "blank_id", "feature_dim"):
        assert getattr(it, k) == getattr(io, k), k
    assert abs(it.time_offset - io.time_offset) < 1e-9 and abs(it.frame_seconds - io.frame_seconds) < 1e-9
    assert it.model_id.startswith("sha256:") and io.model_id.startswith("sha256:")
    d = it.to_dict()
    assert d["vocab_size"] == len(it.vocabulary) and json.dumps(d)


def test_unsafe_and_corrupt_model_files_are_refused(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    raw = tmp_path / "evil.pt"
    raw.write_bytes(pickle.dumps({"config": Payload()}))
    zipped = tmp_path / "evil_zip.pt"
    torch.save({"config": Payload(), "model": {}, "tokenizer": {}}, zipped)
    marker.unlink(missing_ok=True)
    for p in (raw, zipped):
        with pytest.raises(ValueError, match=str(p.name)):
            Engine.load(p)
        assert not marker.exists()  # the payload never ran
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ValueError, match="junk.onnx: not a loadable ONNX"):
        Engine.load(junk)
    junkpt = tmp_path / "junk.pt"
    junkpt.write_bytes(b"PK\x03\x04" + np.random.default_rng(1).bytes(500))
    with pytest.raises(ValueError, match="junk.pt"):
        Engine.load(junkpt)


def test_iter_transcribe_keeps_going_past_a_bad_file(tiny_ckpt, tmp_path):
    path, recs = tiny_ckpt
    eng = Engine.load(path, warmup=False)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    files = [recs[0].audio, str(bad), recs[1].audio]
    got = dict(eng.iter_transcribe(files, max_duration=1.0))
    assert sorted(got) == [0, 1, 2]
    assert isinstance(got[1], ItemError) and got[1].code == "bad_audio" and "bad.wav" in got[1].message
    assert got[0].text == eng.transcribe(recs[0].audio).text and got[2].source == recs[1].audio


# ------------------------------------------------------------------ the CLI on top of it
EXE = [__import__("sys").executable, "-m", "harken.cli"]


def _run(args, **kw):
    import subprocess

    return subprocess.run(EXE + [str(a) for a in args], capture_output=True, text=True, timeout=600, **kw)


def test_cli_transcribe_folder_skips_a_bad_file(tiny_ckpt, tmp_path):
    import shutil

    path, recs = tiny_ckpt
    d = tmp_path / "in"
    d.mkdir()
    for i, r in enumerate(recs[:2]):
        shutil.copy(r.audio, d / f"good{i}.wav")
    (d / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    (d / "notes.mp3").write_text("this is not audio")
    r = _run(["transcribe", "--checkpoint", path, d])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [x for x in r.stdout.splitlines() if x.strip()]
    assert sorted(x.split("\t")[0].rsplit("/", 1)[-1] for x in lines) == ["good0.wav", "good1.wav"]
    assert "corrupt.wav" in r.stderr and "notes.mp3" in r.stderr and "2 of 4 files failed" in r.stderr


def test_cli_eval_and_tune_on_onnx(tiny_ckpt, tiny_onnx, tmp_path):
    from harken.data.manifest import write_manifest

    path, recs = tiny_ckpt
    man = tmp_path / "set.jsonl"
    write_manifest(man, recs[:4])
    out = tmp_path / "eval"
    r = _run(["eval", "--checkpoint", tiny_onnx, man, tmp_path / "missing.jsonl", "--out", out, "--quiet"])
    assert r.returncode == 2 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr
    rows = json.loads((out / "results.json").read_text())
    assert [x["set"] for x in rows] == ["set"] and rows[0]["num_utts"] == 4  # the good set was written
    text = tmp_path / "text.txt"
    text.write_text("\n".join(x.text.lower() for x in recs) + "\n")
    lm = tmp_path / "lm.arpa"
    assert _run(["lm", "build", "--text", text, "--order", "2", "--out", lm]).returncode == 0
    r = _run(["tune", "--checkpoint", tiny_onnx, "--manifest", man, "--lm", lm, "--lm-weights", "0,0.5",
              "--word-bonuses", "-1,0"])  # a list led by a negative number is a value, not an option
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert json.loads(lines[-1])["utts"] == 4
    assert sum("word_bonus=-1" in ln for ln in lines) == 2  # both weights tried with the negative bonus


def test_cli_bad_model_file_is_one_line(tmp_path, tiny_ckpt):
    _, recs = tiny_ckpt
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x04not a checkpoint")
    for model in (bad, tmp_path / "nothing.onnx"):
        r = _run(["transcribe", "--checkpoint", model, recs[0].audio])
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and model.name in r.stderr
    r = _run(["transcribe", "--debug", "--checkpoint", bad, recs[0].audio])
    assert "Traceback" in r.stderr  # --debug shows it
