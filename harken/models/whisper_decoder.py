"""Whisper's pretrained text decoder as a torch module, read from a CTranslate2 model directory.

Used to *score* given transcripts (teacher forcing, one batched forward), never to generate them:
a CTC model's n-best list is rescored by the log-probability Whisper's decoder gives each entry
given the audio (WeNet's "attention rescoring", with a decoder that has heard 680,000 hours of real
speech).  See :mod:`harken.decode.rescore`.

Architecture (Radford et al. 2022; CTranslate2's tensor names): token embedding + learned positions,
``n`` pre-LN blocks of causal self-attention, cross-attention over the encoder output and a GELU MLP,
a final LN, and logits through the (tied) token embedding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class WhisperDecoderLoadError(ValueError):
    pass


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.self_ln = nn.LayerNorm(d)
        self.self_qkv = nn.Linear(d, 3 * d)
        self.self_out = nn.Linear(d, d)
        self.cross_ln = nn.LayerNorm(d)
        self.cross_q = nn.Linear(d, d)
        self.cross_kv = nn.Linear(d, 2 * d)
        self.cross_out = nn.Linear(d, d)
        self.mlp_ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ff)
        self.fc2 = nn.Linear(ff, d)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B,T,D) -> (B,H,T,D/H)
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, self_mask: torch.Tensor, mem_kv: tuple[torch.Tensor, torch.Tensor],
                mem_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.self_qkv(self.self_ln(x)).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v), attn_mask=self_mask)
        x = x + self.self_out(a.transpose(1, 2).reshape(b, t, d))
        return self._cross_and_mlp(x, mem_kv, mem_mask)

    def _cross_and_mlp(self, x: torch.Tensor, mem_kv: tuple[torch.Tensor, torch.Tensor],
                       mem_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q = self._split(self.cross_q(self.cross_ln(x)))
        a = F.scaled_dot_product_attention(q, mem_kv[0], mem_kv[1], attn_mask=mem_mask)
        x = x + self.cross_out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_ln(x))))

    def memory(self, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.cross_kv(mem).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward_cached(self, x: torch.Tensor, mem_kv: tuple[torch.Tensor, torch.Tensor],
                       past: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, tuple]:
        """``forward`` for the ``l`` newest positions of a sequence whose earlier self-attention keys
        and values are ``past`` ((B,H,P,D/H) each, or None); returns the new states and the keys and
        values of all P + l positions."""
        b, t, d = x.shape
        q, k, v = self.self_qkv(self.self_ln(x)).chunk(3, dim=-1)
        k, v = self._split(k), self._split(v)
        p = 0
        if past is not None:
            p = past[0].shape[2]
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        # new position i (absolute p + i) sees every past position and the new ones up to itself
        mask = torch.ones(t, p + t, dtype=torch.bool, device=x.device).tril(diagonal=p)
        a = F.scaled_dot_product_attention(self._split(q), k, v, attn_mask=mask)
        x = x + self.self_out(a.transpose(1, 2).reshape(b, t, d))
        return self._cross_and_mlp(x, mem_kv, None), (k, v)


class WhisperDecoder(nn.Module):
    """``forward(tokens (B,L), memory (B,T,D), mem_lens (B,)) -> logits (B,L,V)``."""

    def __init__(self, vocab: int, d: int, heads: int, ff: int, layers: int, max_positions: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.positions = nn.Parameter(torch.zeros(max_positions, d), requires_grad=False)
        self.blocks = nn.ModuleList(_Block(d, heads, ff) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    @property
    def max_positions(self) -> int:
        return self.positions.shape[0]

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor,
                mem_lens: torch.Tensor | None = None, shared_memory: bool = False) -> torch.Tensor:
        """``shared_memory``: ``memory`` is (1,T,D), the same audio for every row of ``tokens`` (the
        n-best of one utterance): cross-attention keys/values are computed once and broadcast."""
        return self.logits(self.hidden(tokens, memory, mem_lens, shared_memory))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., D) -> vocabulary logits (..., V) (the tied embedding)."""
        return h @ self.embed.weight.T

    def hidden(self, tokens: torch.Tensor, memory: torch.Tensor, mem_lens: torch.Tensor | None = None,
               shared_memory: bool = False) -> torch.Tensor:
        """The final-LN hidden states (B,L,D) that :meth:`logits` projects."""
        b, L = tokens.shape
        if L > self.max_positions:
            raise ValueError(f"whisper decoder: {L} tokens exceed its {self.max_positions} positions")
        x = self.embed(tokens) + self.positions[:L]
        causal = torch.ones(L, L, dtype=torch.bool, device=tokens.device).tril()
        mem_mask = None
        if mem_lens is not None:
            t = memory.shape[1]
            mem_mask = (torch.arange(t, device=memory.device)[None, :] < mem_lens[:, None])[:, None, None, :]
        for blk in self.blocks:
            k, v = blk.memory(memory)
            if shared_memory:
                k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
            x = blk(x, causal, (k, v), mem_mask)
        return self.ln(x)

    def cross_memory(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every block's cross-attention keys and values of ``memory`` (B,T,D), for :meth:`step`."""
        return [blk.memory(memory) for blk in self.blocks]

    def step(self, tokens: torch.Tensor, cross: list[tuple[torch.Tensor, torch.Tensor]],
             cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[torch.Tensor, list]:
        """Incremental decoding: the final-LN hidden states (B,l,D) of ``tokens`` (B,l), the next l
        tokens after the ones ``cache`` holds (None: the sequence starts here), and the new cache.
        The same numbers as :meth:`hidden` over the whole sequence, at the cost of the new tokens only:
        the cross-attention keys and values come once from :meth:`cross_memory`."""
        p = 0 if cache is None else cache[0][0].shape[2]
        b, L = tokens.shape
        if p + L > self.max_positions:
            raise ValueError(f"whisper decoder: {p + L} tokens exceed its {self.max_positions} positions")
        x = self.embed(tokens) + self.positions[p:p + L]
        new = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk.forward_cached(x, cross[i], None if cache is None else cache[i])
            new.append(kv)
        return self.ln(x), new


def load_ct2_decoder(path: str | Path) -> WhisperDecoder:
    """The decoder of a CTranslate2 Whisper model directory (float32)."""
    from harken.models.ct2 import read_model_dir

    m = read_model_dir(path)
    if not m.has("decoder/embeddings/weight"):
        raise WhisperDecoderLoadError(f"{path}: no Whisper decoder in this CTranslate2 model")

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(m.float(name).copy())

    emb = t("decoder/embeddings/weight")
    pos = t("decoder/position_encodings/encodings")
    n = 0
    while m.has(f"decoder/layer_{n}/ffn/linear_0/weight"):
        n += 1
    if n == 0:
        raise WhisperDecoderLoadError(f"{path}: the Whisper decoder has no layers")
    heads = int(m.get("decoder/num_heads")) if m.has("decoder/num_heads") else max(1, emb.shape[1] // 64)
    ff = t("decoder/layer_0/ffn/linear_0/weight").shape[0]
    dec = WhisperDecoder(emb.shape[0], emb.shape[1], heads, ff, n, pos.shape[0])
    sd = {"embed.weight": emb, "positions": pos, "ln.weight": t("decoder/layer_norm/gamma"),
          "ln.bias": t("decoder/layer_norm/beta")}
    names = (("self_ln", "self_attention/layer_norm"), ("self_qkv", "self_attention/linear_0"),
             ("self_out", "self_attention/linear_1"), ("cross_ln", "attention/layer_norm"),
             ("cross_q", "attention/linear_0"), ("cross_kv", "attention/linear_1"),
             ("cross_out", "attention/linear_2"), ("mlp_ln", "ffn/layer_norm"), ("fc1", "ffn/linear_0"),
             ("fc2", "ffn/linear_1"))
    for i in range(n):
        for ours, theirs in names:
            p = f"decoder/layer_{i}/{theirs}/"
            if ours.endswith("_ln"):
                sd[f"blocks.{i}.{ours}.weight"], sd[f"blocks.{i}.{ours}.bias"] = t(p + "gamma"), t(p + "beta")
            else:
                sd[f"blocks.{i}.{ours}.weight"] = t(p + "weight")
                # CTranslate2 drops Whisper's absent key bias; the fused projections keep a zero for it
                sd[f"blocks.{i}.{ours}.bias"] = (t(p + "bias") if m.has(p + "bias")
                                                 else torch.zeros(sd[f"blocks.{i}.{ours}.weight"].shape[0]))
    dec.load_state_dict(sd)
    return dec.eval()


def special_tokens(path: str | Path) -> dict[str, int]:
    """Ids of ``<|startoftranscript|>``, ``<|notimestamps|>``, ``<|endoftext|>`` (and the English/
    transcribe tokens of a multilingual model) from the directory's ``tokenizer.json``/vocabulary."""
    d = Path(path)
    vocab: dict[str, int] = {}
    tj = d / "tokenizer.json"
    if tj.is_file():
        j = json.loads(tj.read_text(encoding="utf-8"))
        vocab.update(j.get("model", {}).get("vocab", {}))
        for a in j.get("added_tokens", []):
            vocab[a["content"]] = a["id"]
    vf = d / "vocabulary.txt"
    if not vocab and vf.is_file():
        vocab = {w: i for i, w in enumerate(vf.read_text(encoding="utf-8").splitlines())}
    out = {}
    for key, tok in (("sot", "<|startoftranscript|>"), ("notimestamps", "<|notimestamps|>"),
                     ("eot", "<|endoftext|>"), ("en", "<|en|>"), ("transcribe", "<|transcribe|>"),
                     ("nospeech", "<|nocaptions|>"), ("nospeech", "<|nospeech|>")):
        if tok in vocab:
            out[key] = int(vocab[tok])
    for need in ("sot", "notimestamps", "eot"):
        if need not in out:
            raise WhisperDecoderLoadError(f"{d}: no {need} token in tokenizer.json / vocabulary.txt")
    return out
