"""The built-in synthetic English corpus: generated text spoken by offline TTS voices.

``synthesize_corpus(CorpusConfig(...), out_dir)`` builds train / dev / test_seen / test_unseen
splits with manifests; see :mod:`harken.data.corpus.synth`.
"""

from .synth import SPLITS, CorpusConfig, choose_holdout, plan_corpus, synthesize_corpus
from .textgen import generate_sentences, make_splits, normalize_text, number_to_words, vocab_stats
from .voices import SynthesisError, Voice, available_voices, select_voices

__all__ = [
    "SPLITS", "CorpusConfig", "SynthesisError", "Voice", "available_voices", "choose_holdout",
    "generate_sentences", "make_splits", "normalize_text", "number_to_words", "plan_corpus",
    "select_voices", "synthesize_corpus", "vocab_stats",
]
