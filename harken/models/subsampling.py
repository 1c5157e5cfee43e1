"""Convolutional subsampling front-ends, and the one place their time geometry is defined.

A subsampling module exposes:

* ``factor``: input frames per output frame (the stride, 4 for ``conv2d4``);
* ``receptive_field``: input frames one output frame sees (7 for ``conv2d4``), and
  ``right_context = receptive_field - 1``: the input frames an output frame needs after its first;
  a streaming chunk of C output frames takes ``input_frames(C) = factor * (C - 1) + right_context + 1``
  input frames (``4C + 3``) and advances by ``factor * C``;
* ``output_lengths(n)``: output frames for ``n`` input frames, for an int or an int64 tensor;
* ``project(x)``: the stem without lengths (streaming chunks).

The stems (all 3x3 stride-2 convolutions without padding, so right padding never leaks into a valid
output frame and a chunk of ``input_frames(C)`` frames gives exactly the full forward's frames):

=========  =====================================================================  ======  =========
name       layers                                                                 factor  receptive
=========  =====================================================================  ======  =========
conv2d4    conv 1->C, ReLU, conv C->C, ReLU, linear                               4       7
dwconv4    conv 1->C, ReLU, depthwise conv C, pointwise 1x1 C->C, ReLU, linear     4       7
dwconv8    as dwconv4 with a second depthwise + pointwise stage                   8       15
=========  =====================================================================  ======  =========

The depthwise-separable stems are NeMo FastConformer's idea (its ``dw_striding``), without padding
here: the full C x C x 3 x 3 convolution of ``conv2d4`` is most of the stem's cost, and a depthwise
3x3 plus a pointwise 1x1 costs about a ninth of it.

Everything else in harken (FLOP estimates, streaming chunk sizes, export metadata) asks the module,
or :func:`subsampling_geometry` for a config, instead of repeating the formula.
"""

from __future__ import annotations

from typing import overload

import torch
import torch.nn as nn
import torch.nn.functional as F

from harken.models.registry import EncoderConfig


class Conv2dSubsampling4(nn.Module):
    """4x time subsampling: two 3x3 stride-2 convolutions (no padding, WeNet
    style) + ReLU, then a linear projection to ``d_model``.

    ``T' = ((T - 1) // 2 - 1) // 2``.  Because there is no padding, every valid
    output frame only sees valid input frames, so right padding never leaks.
    The linear layer consumes features ordered (freq, channel).
    """

    factor = 4
    receptive_field = 7  # input frames one output frame sees
    right_context = 6

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.subsampling != "conv2d4":
            raise ValueError(f"unsupported subsampling {cfg.subsampling!r}")
        C = cfg.channels
        self.conv1 = nn.Conv2d(1, C, 3, 2)
        self.conv2 = nn.Conv2d(C, C, 3, 2)
        self.out_freq = self.output_size(cfg.input_dim)
        self.out = nn.Linear(C * self.out_freq, cfg.d_model)

    @staticmethod
    def output_size(n: int) -> int:
        """Output size along one axis (time or frequency) for ``n`` inputs (ints; >= 0)."""
        return max(0, ((n - 1) // 2 - 1) // 2)

    @overload
    @staticmethod
    def output_lengths(lens: int) -> int: ...

    @overload
    @staticmethod
    def output_lengths(lens: torch.Tensor) -> torch.Tensor: ...

    @staticmethod
    def output_lengths(lens):
        """Output frames for ``lens`` input frames: an int, or a tensor of lengths (same dtype)."""
        if isinstance(lens, torch.Tensor):
            return torch.clamp(torch.div(torch.div(lens - 1, 2, rounding_mode="floor") - 1, 2,
                                         rounding_mode="floor"), min=0)
        return Conv2dSubsampling4.output_size(int(lens))

    def input_frames(self, out_frames: int) -> int:
        """The fewest input frames that give ``out_frames`` output frames (a streaming chunk)."""
        return self.factor * (out_frames - 1) + self.right_context + 1 if out_frames > 0 else 0

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B,T,F) -> (B,T',d_model) without lengths (streaming chunks)."""
        x = x.unsqueeze(1)  # (B,1,T,F)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))  # (B,C,T',F')
        b, c, t, f = x.shape
        return self.out(x.permute(0, 2, 3, 1).reshape(b, t, f * c))

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.unsqueeze(1)  # (B,1,T,F)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))  # (B,C,T',F')
        # flatten (freq, channel) with -1 for time: no Python-int time size enters a trace
        x = x.permute(0, 2, 3, 1).flatten(2)
        return self.out(x), self.output_lengths(lens)


class DepthwiseConv2dSubsampling(nn.Module):
    """Depthwise-separable conv2d subsampling (NeMo FastConformer style, without padding): a full
    3x3 stride-2 convolution 1 -> C + ReLU, then per further 2x a depthwise 3x3 stride-2
    convolution, a pointwise 1x1 C -> C and a ReLU, then a linear projection to ``d_model``
    (features ordered (freq, channel), as in :class:`Conv2dSubsampling4`).

    ``stages`` stride-2 stages give ``factor = 2 ** stages`` and a receptive field of
    ``2 ** (stages + 1) - 1`` input frames; the lengths follow ``T -> (T - 1) // 2`` per stage.
    Subclasses fix ``stages`` (and so the geometry as class attributes)."""

    stages = 0
    factor = 1
    receptive_field = 1
    right_context = 0
    name = ""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.subsampling != self.name:
            raise ValueError(f"{type(self).__name__} is {self.name!r}, not {cfg.subsampling!r}")
        C = cfg.channels
        self.conv1 = nn.Conv2d(1, C, 3, 2)
        self.dw = nn.ModuleList(nn.Conv2d(C, C, 3, 2, groups=C) for _ in range(self.stages - 1))
        self.pw = nn.ModuleList(nn.Conv2d(C, C, 1) for _ in range(self.stages - 1))
        self.out_freq = self.output_size(cfg.input_dim)
        if self.out_freq < 1:
            raise ValueError(f"{self.name} subsampling needs input_dim >= {self.receptive_field}, "
                             f"not {cfg.input_dim}")
        self.out = nn.Linear(C * self.out_freq, cfg.d_model)

    @classmethod
    def output_size(cls, n: int) -> int:
        """Output size along one axis (time or frequency) for ``n`` inputs (ints; >= 0)."""
        n = int(n)
        for _ in range(cls.stages):
            n = max(0, (n - 1) // 2)
        return n

    @classmethod
    def output_lengths(cls, lens):
        """Output frames for ``lens`` input frames: an int, or a tensor of lengths (same dtype)."""
        if isinstance(lens, torch.Tensor):
            for _ in range(cls.stages):
                lens = torch.clamp(torch.div(lens - 1, 2, rounding_mode="floor"), min=0)
            return lens
        return cls.output_size(int(lens))

    def input_frames(self, out_frames: int) -> int:
        """The fewest input frames that give ``out_frames`` output frames (a streaming chunk)."""
        return self.factor * (out_frames - 1) + self.right_context + 1 if out_frames > 0 else 0

    def _convs(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x.unsqueeze(1)))  # (B,C,T1,F1)
        for dw, pw in zip(self.dw, self.pw):
            x = F.relu(pw(dw(x)))
        return x  # (B,C,T',F')

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B,T,F) -> (B,T',d_model) without lengths (streaming chunks)."""
        x = self._convs(x)
        b, c, t, f = x.shape
        return self.out(x.permute(0, 2, 3, 1).reshape(b, t, f * c))

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # flatten (freq, channel) with -1 for time: no Python-int time size enters a trace
        x = self._convs(x).permute(0, 2, 3, 1).flatten(2)
        return self.out(x), self.output_lengths(lens)


class DwConv2dSubsampling4(DepthwiseConv2dSubsampling):
    """``dwconv4``: 4x, receptive field 7 (the geometry of ``conv2d4``), about a third of its cost
    at 144 channels."""

    name, stages, factor, receptive_field, right_context = "dwconv4", 2, 4, 7, 6


class DwConv2dSubsampling8(DepthwiseConv2dSubsampling):
    """``dwconv8``: 8x (80 ms output frames), receptive field 15: every encoder layer runs at half
    the frames of the 4x stems."""

    name, stages, factor, receptive_field, right_context = "dwconv8", 3, 8, 15, 14


SUBSAMPLINGS: dict[str, type[nn.Module]] = {"conv2d4": Conv2dSubsampling4, "dwconv4": DwConv2dSubsampling4,
                                            "dwconv8": DwConv2dSubsampling8}


def subsampling_class(name: str) -> type[nn.Module]:
    if name not in SUBSAMPLINGS:
        raise ValueError(f"unknown subsampling {name!r}; known: {sorted(SUBSAMPLINGS)}")
    return SUBSAMPLINGS[name]


def build_subsampling(cfg: EncoderConfig) -> nn.Module:
    return subsampling_class(cfg.subsampling)(cfg)


def subsampling_geometry(cfg: EncoderConfig) -> tuple[int, int]:
    """(factor, right_context) of the subsampling ``cfg`` names, without building it."""
    cls = subsampling_class(cfg.subsampling)
    return int(cls.factor), int(cls.right_context)
