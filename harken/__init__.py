"""harken: from raw audio to a deployed speech recognizer."""

__version__ = "0.1.0"

__all__ = ["Recognizer", "__version__"]


def __getattr__(name):  # lazy: importing harken must not import torch
    if name == "Recognizer":
        from harken.recognizer import Recognizer

        return Recognizer
    raise AttributeError(f"module 'harken' has no attribute {name!r}")
