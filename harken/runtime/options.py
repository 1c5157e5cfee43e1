"""Per-call decoding options and per-item errors of the inference API."""

from __future__ import annotations

from dataclasses import dataclass, field

from harken.decode.rescore import DEFAULT_RESCORE_NBEST, DEFAULT_RESCORE_WEIGHT

__all__ = ["DecodeOptions", "ItemError", "ERROR_CODES"]

METHODS = ("greedy", "beam", "beam_lm")
ERROR_CODES = ("too_long", "bad_audio", "internal")


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode one call's audio (immutable and hashable, so decoders are cached per option set).

    ``method``: "greedy", "beam" (CTC prefix beam search) or "beam_lm" (with the word n-gram LM
    at ``lm_path``, an ARPA file); ``hotwords``: (phrase, boost per token) pairs, beam methods only;
    ``word_timestamps``: word times and confidences by forced alignment (costs an alignment pass,
    so it is off unless asked for); ``rescore``: a CTranslate2 Whisper directory (or
    ``pkg:PACKAGE/DIR``, or "auto": a Whisper-CTC model's own) whose decoder rescores the beam's
    ``rescore_nbest`` best by ``score + rescore_weight * log p_whisper`` (:mod:`harken.decode.rescore`)."""

    method: str = "greedy"
    beam_size: int = 8
    lm_path: str | None = None
    lm_weight: float = 0.5
    word_bonus: float = 0.0
    hotwords: tuple = ()
    word_timestamps: bool = False
    topk: int = 8
    blank_skip: float = 0.999
    rescore: str | None = None
    rescore_weight: float = DEFAULT_RESCORE_WEIGHT
    rescore_nbest: int = DEFAULT_RESCORE_NBEST

    def __post_init__(self):
        hw = tuple((str(p), float(b)) for p, b in (self.hotwords or ()))
        object.__setattr__(self, "hotwords", hw)
        if self.method not in METHODS:
            raise ValueError(f"unknown decode method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.method == "beam_lm" and not self.lm_path:
            raise ValueError("decode method beam_lm needs lm_path (an ARPA language model)")
        if self.method == "greedy" and self.hotwords:
            raise ValueError("hotwords need decode method beam or beam_lm")
        if int(self.beam_size) < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.rescore:
            if self.method == "greedy":
                raise ValueError("rescoring needs decode method beam or beam_lm (an n-best list to rescore)")
            if int(self.rescore_nbest) < 2:
                raise ValueError(f"rescore_nbest must be >= 2, got {self.rescore_nbest}")

    @property
    def decoder_key(self) -> tuple:
        """The fields that shape the decoder (everything but ``word_timestamps``)."""
        return (self.method, int(self.beam_size), self.lm_path, float(self.lm_weight), float(self.word_bonus),
                self.hotwords, int(self.topk), float(self.blank_skip))

    def decode_config(self):
        from harken.decode import DecodeConfig

        return DecodeConfig(method=self.method, beam_size=int(self.beam_size), lm_path=self.lm_path,
                            lm_weight=float(self.lm_weight), word_bonus=float(self.word_bonus),
                            hotwords=list(self.hotwords), topk=int(self.topk), blank_skip=float(self.blank_skip),
                            rescore=self.rescore, rescore_weight=float(self.rescore_weight),
                            rescore_nbest=int(self.rescore_nbest))

    @classmethod
    def from_config(cls, cfg, word_timestamps: bool = False) -> "DecodeOptions":
        """From a :class:`harken.decode.DecodeConfig` (or None: greedy)."""
        if cfg is None:
            return cls(word_timestamps=word_timestamps)
        if isinstance(cfg, DecodeOptions):
            return cfg
        return cls(method=cfg.method, beam_size=cfg.beam_size, lm_path=cfg.lm_path, lm_weight=cfg.lm_weight,
                   word_bonus=cfg.word_bonus, hotwords=tuple(tuple(h) for h in cfg.hotwords), topk=cfg.topk,
                   blank_skip=cfg.blank_skip, word_timestamps=word_timestamps,
                   rescore=cfg.rescore, rescore_weight=cfg.rescore_weight, rescore_nbest=cfg.rescore_nbest)

    def with_(self, **kw) -> "DecodeOptions":
        import dataclasses

        return dataclasses.replace(self, **kw)


@dataclass
class ItemError(Exception):
    """One input of a batch call that could not be transcribed; the others are unaffected.

    ``code``: "too_long" (over the call's ``max_item_seconds``), "bad_audio" (not a usable
    waveform: wrong type, shape, NaN/Inf, undecodable bytes) or "internal" (a failure of ours)."""

    code: str
    message: str
    index: int = -1
    source: str = ""
    timings: dict = field(default_factory=dict)
    audio_code: str = ""  # for bad_audio from harken.audio: the AudioError's code (corrupt, too_long, ...)

    def __post_init__(self):
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def as_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}, "source": self.source}
