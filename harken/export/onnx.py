"""ONNX (and TorchScript) export of a harken CTC checkpoint.

Two ONNX variants, both single self-contained files (no external-data sidecar), exported with the
dynamo exporter (``torch.onnx.export(..., dynamo=True)``) so that batch and time stay dynamic.
The model is exported in eval mode: dither, SpecAugment and dropout are training-only and absent.

``variant="wave"`` (``model_type=harken_ctc_wave``): the whole recognizer front to back.

    input  0  ``waveform``       float32 (batch, samples), mono in [-1, 1] at the model's ``sample_rate``
                                 (16 or 8 kHz, in the metadata), right-padded
    input  1  ``waveform_lens``  int64   (batch,)          valid samples per row
    output 0  ``log_probs``      float32 (batch, T', V)    log-softmax over the vocabulary
    output 1  ``log_probs_lens`` int64   (batch,)          valid output frames per row

  Fbank (Kaldi-compatible, the checkpoint's own settings) and global CMVN are inside the graph, so
  a runtime needs only the .onnx file: everything else is in ``metadata_props`` (below).

``variant="sherpa-wenet"`` (``model_type=wenet_ctc``): sherpa-onnx's WeNet-CTC contract
(``OfflineRecognizer.from_wenet_ctc``; see shared/SHERPA_ONNX_CONTRACT.md section 2).

    input  0  ``x``              float32 (N, T, 80)  log-mel fbank computed by sherpa (no CMVN)
    input  1  ``x_lens``         int64   (N,)        valid feature frames
    output 0  ``log_probs``      float32 (N, T', V)
    output 1  ``log_probs_lens`` int64   (N,)

  Global CMVN is inside the graph; ``tokens.txt`` (``symbol id`` per line, ``<blk> 0``) is
  written beside the model. sherpa computes its own features with fixed settings (20 Hz to
  Nyquist - 400 Hz, i.e. 7600 Hz at 16 kHz and 3600 Hz at 8 kHz; snip_edges false, dither 1.0,
  povey window) at the sample rate it is given (:func:`harken.export.sherpa.recognizer` passes the
  model's); a checkpoint whose fbank differs is refused unless ``force=True`` (it would run, but
  transcribe worse).

Metadata keys (ONNX ``metadata_props``; every value is a string):

    ========================  =======================================================================
    key                       value
    ========================  =======================================================================
    model_type                ``harken_ctc_wave`` (wave) or ``wenet_ctc`` (sherpa-wenet)
    harken_variant            ``wave`` or ``sherpa-wenet``
    harken_version            harken's ``__version__`` at export time
    sample_rate               input sample rate in Hz: ``16000`` or ``8000`` (the fbank's; feed audio
                              resampled to it)
    feature_config            JSON of :class:`harken.features.FbankConfig` (the checkpoint's fbank;
                              ``dither`` is whatever training used: the graph never dithers)
    feature_dim               fbank bins (input feature size of the encoder), e.g. ``80``
    vocabulary                JSON list of the token symbols, index = token id (``▁`` = word start)
    vocab_size                ``len(vocabulary)`` (= V)
    tokenizer_kind            ``char`` or ``bpe`` (decoding either: join symbols, ``▁`` -> space)
    blank_id                  CTC blank id (``0``)
    subsampling_factor        input feature frames per output frame (``4``)
    frame_shift_ms            fbank hop in ms (``10``)
    output_frame_shift_ms     ms of audio per output frame (frame_shift_ms x subsampling_factor)
    time_offset_ms            add to ``t * output_frame_shift_ms`` for the centre-aligned start of
                              output frame t (see :func:`harken.decode.align.frame_offset`)
    encoder_type              ``conformer`` / ``transformer`` / ...
    encoder_config            JSON of the encoder config (informational)
    streaming_chunk           the encoder's attention chunk in output frames (``chunk_size``); ``0`` =
                              not streaming (full context). The graph is still a whole-utterance
                              graph (no cache inputs): a chunked model runs its chunk mask inside
    left_chunks               chunks of left context with streaming_chunk > 0 (``-1`` = all)
    min_input                 smallest accepted size of input 0's time axis (samples for wave,
                              frames for sherpa-wenet); pad shorter inputs (lengths stay true)
    input_kind                ``waveform`` or ``fbank``
    source_checkpoint         the checkpoint file name (informational)
    ========================  =======================================================================

:func:`read_metadata` returns them decoded (ints as int, JSON as objects).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from harken.fsutil import atomic_write_bytes

__all__ = ["ExportError", "export_onnx", "read_metadata", "load_checkpoint_model",
           "write_tokens", "SHERPA_FBANK", "VARIANTS", "MODEL_TYPES"]

VARIANTS = ("wave", "sherpa-wenet")
MODEL_TYPES = {"wave": "harken_ctc_wave", "sherpa-wenet": "wenet_ctc"}
DEFAULT_OPSET = 18

# the front end sherpa-onnx computes for WeNet CTC models (contract section 2); dither is ignored.
# sample_rate is the one setting sherpa takes from its caller (from_wenet_ctc(sample_rate=...)): any
# model rate (harken.audio.MODEL_SAMPLE_RATES) matches; the value here is sherpa's default.
SHERPA_FBANK = dict(sample_rate=16000, num_mel_bins=80, frame_length_ms=25.0, frame_shift_ms=10.0,
                    preemph_coeff=0.97, remove_dc_offset=True, window_type="povey", round_to_power_of_two=True,
                    low_freq=20.0, high_freq=-400.0, snip_edges=False, input_scale=32768.0, use_power=True)

_INT_KEYS = {"sample_rate", "feature_dim", "vocab_size", "blank_id", "subsampling_factor", "streaming_chunk",
             "left_chunks", "min_input"}
_FLOAT_KEYS = {"frame_shift_ms", "output_frame_shift_ms", "time_offset_ms"}
_JSON_KEYS = {"feature_config", "vocabulary", "encoder_config"}


class ExportError(RuntimeError):
    """An export that cannot be done (unsupported model, failed scripting, contract mismatch)."""


# ------------------------------------------------------------------------------------ loading
def load_checkpoint_model(checkpoint: str | os.PathLike):
    """``(model in eval mode on CPU, tokenizer, ExperimentConfig)`` from a harken checkpoint
    (:func:`harken.models.load.load_model`: ``weights_only``, no training code).

    Raises FileNotFoundError for a missing path and ValueError for a file that is not a harken
    checkpoint, each with the path in the message."""
    from harken.models.load import load_model

    lm = load_model(checkpoint)
    return lm.model, lm.tokenizer, lm.config


# ------------------------------------------------------------------------------------ wrappers
class _FeatsCtc(nn.Module):
    """Features (N, T, F) -> CMVN -> encoder -> log-probs: the sherpa-wenet graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.cmvn = model.frontend.cmvn
        self.model = model

    def forward(self, x: Tensor, x_lens: Tensor) -> tuple[Tensor, Tensor]:
        x_lens = x_lens.to(torch.int64)
        x = self.cmvn(x)
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < x_lens[:, None]
        x = x * mask[:, :, None].to(x.dtype)
        lp, lens = self.model.encode_features(x, x_lens)
        return lp, lens.to(torch.int64)


class _WaveCtc(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, waveform: Tensor, waveform_lens: Tensor) -> tuple[Tensor, Tensor]:
        lp, lens = self.model(waveform, waveform_lens.to(torch.int64))
        return lp, lens.to(torch.int64)


# ------------------------------------------------------------------------------------ helpers
def _fbank_dict(cfg) -> dict:
    return dataclasses.asdict(cfg.model.fbank)


def _min_feature_frames(model: nn.Module) -> int:
    """Smallest feature-frame count giving at least one output frame."""
    fn = getattr(model, "output_lengths", None)
    for t in range(1, 512):
        if fn is None or int(fn(torch.tensor([t]))[0]) >= 1:
            return max(t, 2)
    raise ExportError("the encoder produces no output frame for inputs up to 512 frames")


def _min_samples(fbank_cfg, frames: int) -> int:
    from harken.features import _num_frames

    hop = int(fbank_cfg.sample_rate * 0.001 * fbank_cfg.frame_shift_ms)
    win = int(fbank_cfg.sample_rate * 0.001 * fbank_cfg.frame_length_ms)
    s = max(win, hop)
    while _num_frames(s, win, hop, fbank_cfg.snip_edges) < frames:
        s += hop // 2 or 1
    return s


def _check_sherpa_fbank(fb, force: bool) -> None:
    from harken.audio import MODEL_SAMPLE_RATES

    d = dataclasses.asdict(fb)
    bad = {k: (d[k], v) for k, v in SHERPA_FBANK.items() if k in d and d[k] != v
           and not (k == "sample_rate" and d[k] in MODEL_SAMPLE_RATES)}
    if bad:
        msg = ", ".join(f"{k}={a!r} (sherpa uses {b!r})" for k, (a, b) in sorted(bad.items()))
        if not force:
            raise ExportError(
                f"this checkpoint's fbank differs from the features sherpa-onnx computes for WeNet CTC "
                f"models: {msg}. Train with sherpa's settings (configs/demo.yaml) or pass force=True "
                f"(--force) to export anyway (it runs, but accuracy drops).")
        warnings.warn(f"exporting for sherpa with a mismatched front end: {msg}", stacklevel=3)


def build_metadata(model: nn.Module, tokenizer, cfg, variant: str, min_input: int,
                   checkpoint: str | os.PathLike = "") -> dict[str, str]:
    """The artifact's metadata: :meth:`harken.models.info.ModelInfo.to_metadata` (the one schema
    the runtime reads) plus the export's own keys (variant, input kind, encoder config, source)."""
    from harken.models.info import ModelInfo, file_model_id

    mid = file_model_id(checkpoint) if checkpoint and os.path.isfile(checkpoint) else ""
    info = ModelInfo.from_model(model, tokenizer, cfg, model_id=mid).replace(
        model_type=MODEL_TYPES[variant], min_input=int(min_input))
    md = info.to_metadata()
    md.update({
        "harken_variant": variant,
        "tokenizer_kind": str(getattr(tokenizer, "kind", "")),
        "encoder_config": json.dumps(cfg.model.encoder.to_dict(), sort_keys=True, default=str),
        "input_kind": "waveform" if variant == "wave" else "fbank",
        "source_checkpoint": Path(checkpoint).name if checkpoint else "",
    })
    if variant != "wave":  # sherpa reads feature_dim etc.; the tokenizer dict is harken's alone
        md.pop("tokenizer", None)
    return md


def set_metadata(proto, md: dict[str, str]) -> None:
    """Replace ``proto.metadata_props`` by ``md`` (keys sorted)."""
    del proto.metadata_props[:]
    for k in sorted(md):
        e = proto.metadata_props.add()
        e.key, e.value = k, str(md[k])


def read_metadata(model_or_path, decode: bool = True) -> dict[str, Any]:
    """The ``metadata_props`` of an ONNX file (or ModelProto); with ``decode`` ints, floats and JSON
    values are parsed."""
    import onnx

    proto = model_or_path
    if not hasattr(proto, "metadata_props"):
        proto = onnx.load(str(model_or_path), load_external_data=False)
    md: dict[str, Any] = {p.key: p.value for p in proto.metadata_props}
    if decode:
        for k, v in list(md.items()):
            try:
                if k in _INT_KEYS:
                    md[k] = int(v)
                elif k in _FLOAT_KEYS:
                    md[k] = float(v)
                elif k in _JSON_KEYS:
                    md[k] = json.loads(v)
            except ValueError:
                pass
    return md


def write_tokens(tokenizer, path: str | os.PathLike) -> Path:
    """sherpa-format tokens.txt (``symbol id`` per line, ``<blk> 0``)."""
    toks = list(tokenizer.tokens)
    if not toks or toks[0] not in ("<blk>", "<blank>", "<eps>"):
        raise ExportError(f"token 0 is {toks[0] if toks else None!r}; sherpa needs the CTC blank <blk> at id 0")
    bad = [t for t in toks if not t or any(c.isspace() for c in t)]
    if bad:
        raise ExportError(f"tokens with whitespace cannot be written to tokens.txt: {bad[:5]}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for i, t in enumerate(toks):
            f.write(f"{t} {i}\n")
    return p


# ------------------------------------------------------------------------------------ export
def export_onnx(checkpoint: str | os.PathLike, out_path: str | os.PathLike, variant: str = "wave",
                opset: int = DEFAULT_OPSET, force: bool = False, check: bool = True) -> Path:
    """Export ``checkpoint`` to a single ONNX file at ``out_path``; returns the path.

    ``variant``: ``"wave"`` (waveform in, fbank + CMVN inside) or ``"sherpa-wenet"`` (fbank in,
    sherpa-onnx's WeNet-CTC contract; also writes ``tokens.txt`` beside the model).
    ``check``: run the exported graph once in onnxruntime at two lengths (if installed) and
    compare with torch; raises :class:`ExportError` on a mismatch. See the module docstring for
    inputs, outputs and metadata."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    model, tok, cfg = load_checkpoint_model(checkpoint)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    enc_type = cfg.model.encoder.type
    wave_in = bool(getattr(model.encoder, "takes_waveform", False))  # e.g. whisper: its log-mel is inside
    if getattr(model, "frontend", None) is None and not wave_in:
        raise ExportError("the model has no feature frontend; nothing to export as a recognizer")
    min_frames = _min_feature_frames(model)
    fb = cfg.model.fbank

    if variant == "wave":
        net = _WaveCtc(model).eval()
        min_in = _min_samples(fb, min_frames) if not (wave_in or enc_type == "wav2vec2") else 400
        n_ex = max(min_in, int(1.3 * fb.sample_rate))
        args = (torch.randn(2, n_ex) * 0.1, torch.tensor([n_ex, n_ex - 3000 if n_ex > min_in + 3000 else n_ex]))
        names_in, time_max = ["waveform", "waveform_lens"], int(fb.sample_rate) * 3600
        max_s = getattr(model.encoder, "max_input_seconds", None)  # whisper: its 30 s position table
        if max_s:
            time_max = int(max_s * fb.sample_rate)
    else:
        if wave_in or enc_type == "wav2vec2":
            raise ExportError(f"sherpa-wenet needs an fbank-input encoder; a {enc_type} encoder reads the waveform "
                              "(export --format onnx instead)")
        _check_sherpa_fbank(fb, force)
        net = _FeatsCtc(model).eval()
        min_in = min_frames
        args = (torch.randn(2, 130, fb.num_mel_bins), torch.tensor([130, 100]))
        names_in, time_max = ["x", "x_lens"], 100 * 3600
    batch = torch.export.Dim("batch", min=1, max=1024)
    time = torch.export.Dim("time", min=min_in, max=time_max)
    dyn = {names_in[0]: {0: batch, 1: time}, names_in[1]: {0: batch}}


    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(net, args, dynamo=True, opset_version=opset, input_names=names_in,
                                     output_names=["log_probs", "log_probs_lens"], dynamic_shapes=dyn,
                                     verbose=False)
        except Exception as e:
            raise ExportError(f"ONNX export of the {variant} variant failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
    proto = prog.model_proto
    md = build_metadata(model, tok, cfg, variant, min_in, checkpoint)
    set_metadata(proto, md)
    atomic_write_bytes(out_path, proto.SerializeToString())
    if variant == "sherpa-wenet":
        write_tokens(tok, out_path.parent / "tokens.txt")
    if check:
        _self_check(net, out_path, names_in, min_in, fb)
    return out_path


def _self_check(net: nn.Module, path: Path, names_in: list[str], min_in: int, fb) -> None:
    """Run the file in onnxruntime at a length other than the traced one; compare with torch."""
    try:
        import onnxruntime  # noqa: F401 (installed?)
    except ImportError:
        return
    from harken.runtime.ort import make_session

    sess = make_session(path)
    g = torch.Generator().manual_seed(0)
    if names_in[0] == "waveform":
        n = max(min_in, 7777)
        x = torch.randn(1, n, generator=g) * 0.1
    else:
        n = max(min_in, 57)
        x = torch.randn(1, n, fb.num_mel_bins, generator=g)
    lens = torch.tensor([n])
    with torch.no_grad():
        ref, ref_lens = net(x, lens)
    got, got_lens = sess.run(None, {names_in[0]: x.numpy(), names_in[1]: lens.numpy()})
    if got.shape != tuple(ref.shape) or got_lens.tolist() != ref_lens.tolist():
        raise ExportError(f"{path}: onnxruntime output shape {got.shape}/{got_lens.tolist()} differs from torch "
                          f"{tuple(ref.shape)}/{ref_lens.tolist()} (the time axis is not dynamic?)")
    diff = float((torch.from_numpy(got) - ref).abs().max())
    if not diff < 1e-2:
        raise ExportError(f"{path}: onnxruntime differs from torch by {diff:.3g} (max abs log-prob)")


