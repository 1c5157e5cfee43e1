"""Convolutional subsampling front-ends."""

from __future__ import annotations

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

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.subsampling != "conv2d4":
            raise ValueError(f"unsupported subsampling {cfg.subsampling!r}")
        C = cfg.channels
        self.conv1 = nn.Conv2d(1, C, 3, 2)
        self.conv2 = nn.Conv2d(C, C, 3, 2)
        f2 = ((cfg.input_dim - 1) // 2 - 1) // 2
        self.out = nn.Linear(C * f2, cfg.d_model)

    @staticmethod
    def output_lengths(lens: torch.Tensor) -> torch.Tensor:
        return torch.clamp(((lens - 1) // 2 - 1) // 2, min=0)

    # input frames an output frame sees (7) and the input stride between output frames (4):
    # a streaming chunk of C output frames takes 4*C + 3 input frames and advances by 4*C
    right_context = 6

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
        b, c, t, f = x.shape
        x = x.permute(0, 2, 3, 1).reshape(b, t, f * c)
        return self.out(x), self.output_lengths(lens)
