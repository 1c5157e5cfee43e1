"""Decoding: greedy, CTC prefix beam search, word n-gram LM shallow fusion and hotwords.

    from harken.decode import DecodeConfig, decode
    hyps = decode(log_probs, lens, tokenizer, DecodeConfig(method="beam_lm", lm_path="lm.arpa",
                                                           hotwords=[("rosalind", 4.0)]))
    hyps[0][0].text   # best hypothesis of the first utterance

``decode`` returns, per utterance, a list of ``Hypothesis`` (best first; ``nbest`` of them for the
beam methods, one for greedy).  ``decode_texts`` returns just the best texts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harken.decode.beam import CtcBeamSearch, Hypothesis, ctc_prefix_beam_search, greedy_hypotheses
from harken.decode.context import ContextGraph, parse_hotword
from harken.decode.rescore import DEFAULT_RESCORE_NBEST, DEFAULT_RESCORE_WEIGHT

METHODS = ("greedy", "beam", "beam_lm")


@dataclass
class DecodeConfig:
    method: str = "greedy"  # greedy | beam | beam_lm
    beam_size: int = 8
    lm_path: str | None = None  # ARPA file (beam_lm)
    lm_weight: float = 0.5  # multiplies the natural-log LM probability
    word_bonus: float = 0.0  # added per word (beam_lm)
    hotwords: list[tuple[str, float]] = field(default_factory=list)  # (phrase, boost per token)
    nbest: int = 1
    topk: int = 8  # non-blank tokens expanded per frame (0: all)
    blank_skip: float = 0.999  # frames with P(blank) above this count as pure blank (1.0: off)
    # second pass (the Engine's): Whisper's decoder rescores the rescore_nbest best (harken.decode.rescore)
    rescore: str | None = None  # CTranslate2 Whisper dir, pkg:PACKAGE/DIR, or "auto" (a Whisper-CTC model's)
    rescore_weight: float = DEFAULT_RESCORE_WEIGHT
    rescore_nbest: int = DEFAULT_RESCORE_NBEST

    def validate(self) -> "DecodeConfig":
        if self.method not in METHODS:
            raise ValueError(f"unknown decode method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.method == "beam_lm" and not self.lm_path:
            raise ValueError("decode method beam_lm needs lm_path")
        if self.method == "greedy" and self.hotwords:
            raise ValueError("hotwords need decode method beam or beam_lm")
        if self.beam_size < 1:
            raise ValueError("beam_size must be >= 1")
        if self.rescore and self.method == "greedy":
            raise ValueError("rescoring needs decode method beam or beam_lm (an n-best list to rescore)")
        return self


def build_decoder(tokenizer, cfg: DecodeConfig) -> CtcBeamSearch | None:
    """The beam decoder for ``cfg`` (None for greedy); reuse it across batches."""
    cfg.validate()
    if cfg.method == "greedy":
        return None
    lm = None
    if cfg.method == "beam_lm":
        from harken.decode.lm import load_lm

        lm = load_lm(cfg.lm_path)
    ctx = ContextGraph.from_phrases(cfg.hotwords, tokenizer) if cfg.hotwords else None
    return CtcBeamSearch(tokenizer, beam_size=cfg.beam_size, topk=cfg.topk, blank_skip=cfg.blank_skip,
                         lm=lm, lm_weight=cfg.lm_weight, word_bonus=cfg.word_bonus, context=ctx)


def decode(log_probs, lens, tokenizer, cfg: DecodeConfig | None = None,
           decoder: CtcBeamSearch | None = None) -> list[list[Hypothesis]]:
    """Decode a batch of CTC log-probs (B,T,V) with valid lengths (B,)."""
    cfg = (cfg or DecodeConfig()).validate()
    if cfg.method == "greedy":
        return greedy_hypotheses(log_probs, lens, tokenizer)
    decoder = decoder or build_decoder(tokenizer, cfg)
    return decoder.decode(log_probs, lens, nbest=cfg.nbest)


def decode_texts(log_probs, lens, tokenizer, cfg: DecodeConfig | None = None,
                 decoder: CtcBeamSearch | None = None) -> list[str]:
    return [h[0].text if h else "" for h in decode(log_probs, lens, tokenizer, cfg, decoder)]


__all__ = ["DecodeConfig", "Hypothesis", "CtcBeamSearch", "ContextGraph", "decode", "decode_texts",
           "build_decoder", "ctc_prefix_beam_search", "greedy_hypotheses", "parse_hotword", "METHODS"]
