"""Transcribing with an already fine-tuned Hugging Face CTC model directory (``Wav2Vec2ForCTC`` and
friends: HuBERT, WavLM, data2vec-audio -- anything ``AutoModelForCTC`` loads), saved together
with its ``Wav2Vec2Processor`` (``preprocessor_config.json`` + ``vocab.json``/tokenizer files).

    rec = HFWav2Vec2Recognizer.load("models/wav2vec2-base-960h")
    rec.transcribe("a.wav").text

Text is exactly what ``processor.batch_decode(logits.argmax(-1))`` gives for the model run on
``processor(wave)``: the processor's feature extractor prepares the input, the tokenizer decodes.
Word times come from the tokenizer's CTC word offsets (frames of ``prod(conv_stride)`` samples,
20 ms); confidences are mean greedy-path posteriors, as in :class:`harken.recognizer.Recognizer`.

Batching: when the feature extractor returns an attention mask (``return_attention_mask: true``,
the layer-norm checkpoints such as large-lv60) files are batched by duration; otherwise (base
models) Hugging Face requires unpadded input for correct results, so each file is run alone.
Nothing is downloaded (``local_files_only=True``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from harken.audio import SAMPLE_RATE, as_waveform, load_audio
from harken.data.sampler import length_batches
from harken.recognizer import Transcript, Word


def is_hf_ctc_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding a Hugging Face model config and a feature-extractor config
    (``preprocessor_config.json``, or ``processor_config.json`` as transformers 5 writes it)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (
        (p / "preprocessor_config.json").is_file() or (p / "processor_config.json").is_file())


class HFWav2Vec2Recognizer:
    def __init__(self, model, processor, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.processor = processor
        self.feature_extractor = processor.feature_extractor
        self.tokenizer = processor.tokenizer
        sr = int(getattr(self.feature_extractor, "sampling_rate", SAMPLE_RATE))
        if sr != SAMPLE_RATE:
            raise ValueError(f"the model expects {sr} Hz audio; harken loads audio at {SAMPLE_RATE} Hz")
        self.batched = bool(getattr(self.feature_extractor, "return_attention_mask", False))
        self.blank_id = int(self.tokenizer.pad_token_id)
        self.frame_seconds = math.prod(model.config.conv_stride) / SAMPLE_RATE

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu",
             num_threads: int | None = None) -> "HFWav2Vec2Recognizer":
        """Load a local fine-tuned CTC model directory and its processor."""
        try:
            from transformers import AutoModelForCTC, Wav2Vec2Processor
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("Hugging Face models need `transformers`: pip install 'harken[wav2vec2]'") from e
        if num_threads:
            torch.set_num_threads(num_threads)
        if not is_hf_ctc_dir(path):
            raise FileNotFoundError(f"{path}: not a Hugging Face CTC model dir (needs config.json and "
                                    f"preprocessor_config.json or processor_config.json; nothing is downloaded)")
        processor = Wav2Vec2Processor.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCTC.from_pretrained(str(path), local_files_only=True)
        return cls(model, processor, device)

    # -------------------------------------------------------------------------------------
    @staticmethod
    def _as_wave(audio) -> tuple[np.ndarray, str]:
        return as_waveform(audio)

    @torch.inference_mode()
    def logits(self, waves: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Model logits (B,T,V) for a batch of waveforms and the valid frames per utterance."""
        feats = self.feature_extractor(list(waves), sampling_rate=SAMPLE_RATE, padding=True,
                                       return_tensors="pt")
        kwargs = {}
        if "attention_mask" in feats:
            kwargs["attention_mask"] = feats["attention_mask"].to(self.device)
        logits = self.model(feats["input_values"].to(self.device), **kwargs).logits
        lens = torch.tensor([len(w) for w in waves])
        out_lens = self.model._get_feat_extract_output_lengths(lens).clamp(min=0, max=logits.shape[1]).long()
        return logits, out_lens

    def _decode(self, waves: Sequence[np.ndarray]) -> list[Transcript]:
        from harken.decode.greedy import greedy_frames

        logits, out_lens = self.logits(waves)
        ids = logits.argmax(-1).cpu()
        paths = greedy_frames(torch.log_softmax(logits.float(), -1).cpu(), out_lens, blank=self.blank_id)
        out = []
        for b, w in enumerate(waves):
            dec = self.tokenizer.decode(ids[b, : int(out_lens[b])].tolist(), output_word_offsets=True)
            toks = paths[b]
            words = []
            for wo in dec.word_offsets or []:
                s, e = int(wo["start_offset"]), int(wo["end_offset"])
                cs = [c for _, ts, te, c in toks if ts < e and te >= s]
                words.append(Word(wo["word"], s * self.frame_seconds, e * self.frame_seconds,
                                  float(np.mean(cs)) if cs else 0.0))
            conf = float(np.mean([c for *_, c in toks])) if toks else 0.0
            out.append(Transcript(text=dec.text, words=words, confidence=conf, duration=len(w) / SAMPLE_RATE))
        return out

    def transcribe(self, audio) -> Transcript:
        """Transcribe one file path, raw file bytes or a float32 16 kHz waveform."""
        wave, src = self._as_wave(audio)
        t = self._decode([wave])[0]
        t.source = src
        return t

    def transcribe_batch(self, files: Sequence[str], max_duration: float = 200.0) -> list[Transcript]:
        """Transcribe many files (duration-sorted batches when the model supports padding, else
        one by one); results in the input order."""
        waves = [load_audio(f) for f in files]
        results: list[Transcript | None] = [None] * len(waves)
        # base models (no attention mask) are decoded one by one so that padding cannot change them
        lengths = [len(w) / SAMPLE_RATE for w in waves]
        for batch in length_batches(lengths, max_duration, max_size=None if self.batched else 1):
            for i, t in zip(batch, self._decode([waves[i] for i in batch])):
                t.source = str(files[i])
                results[i] = t
        return results  # type: ignore[return-value]
