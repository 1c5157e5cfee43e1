import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from harken.models import CtcModel, EncoderConfig, build_encoder, ctc_loss, encoder_flops, encoder_preset
from harken.models.attention import MultiHeadSelfAttention, rel_pos_emb, rel_shift
from harken.models.conformer import _DepthwiseConv1dFn

torch.set_num_threads(2)


def tiny(**kw):
    base = dict(input_dim=20, d_model=32, num_layers=2, num_heads=4, ff_dim=64, conv_kernel=5, dropout=0.0)
    base.update(kw)
    return EncoderConfig(**base)


def feats_batch(lens, dim=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lens), max(lens), dim, generator=g)
    return x, torch.tensor(lens, dtype=torch.int64)


VARIANTS = [
    dict(type="conformer", pos_enc="rel"),
    dict(type="conformer", pos_enc="abs"),
    dict(type="conformer", pos_enc="rel", conv_norm="batch_norm", macaron=False),
    dict(type="conformer", pos_enc="rel", causal=True, subsampling_channels=8),
    dict(type="transformer", pos_enc="abs"),
    dict(type="transformer", pos_enc="rel"),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_lengths(variant):
    enc = build_encoder(tiny(**variant))
    assert enc.subsampling_factor == 4
    x, lens = feats_batch([50, 37, 20, 7])
    out, out_lens = enc(x, lens)
    expect = torch.tensor([11, 8, 4, 1])  # two unpadded 3x3 stride-2 convolutions
    assert out.shape == (4, 11, 32)
    assert out_lens.dtype == torch.int64 and torch.equal(out_lens, expect)
    assert torch.equal(enc.output_lengths(lens), expect)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[2], VARIANTS[3], VARIANTS[4]])
def test_padding_invariance(variant):
    torch.manual_seed(0)
    enc = build_encoder(tiny(**variant)).eval()
    if variant.get("conv_norm") == "batch_norm":  # non-trivial running stats
        bn = enc.layers[0].conv.bn
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x, lens = feats_batch([61, 33])
    x[1, 33:] = 100.0  # garbage in the padding
    with torch.no_grad():
        out, out_lens = enc(x, lens)
        alone, alone_lens = enc(x[1:2, :33], lens[1:2])
    n = int(alone_lens[0])
    assert int(out_lens[1]) == n
    assert torch.allclose(out[1, :n], alone[0, :n], atol=1e-5)


def test_rel_shift_matches_index():
    t = 7
    x = torch.randn(2, 3, t, 2 * t - 1)
    y = rel_shift(x)
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    ref = x[..., i, (t - 1) - i + j]
    assert torch.equal(y, ref)


@pytest.mark.parametrize("rel", [True, False])
def test_sdpa_attention_equals_explicit(rel):
    torch.manual_seed(0)
    cfg = tiny()
    att = MultiHeadSelfAttention(cfg, rel=rel)
    x = torch.randn(3, 9, 32, requires_grad=True)
    lens = torch.tensor([9, 6, 1])
    valid = torch.arange(9)[None, :] < lens[:, None]
    pos = rel_pos_emb(9, 32) if rel else None
    if rel:
        mask = torch.zeros(3, 9).masked_fill(~valid, -1e9)[:, None, None, :]
    else:
        mask = valid[:, None, None, :]
    out = att(x, mask, pos)
    ref = att.forward_explicit(x, valid, pos)
    assert torch.allclose(out, ref, atol=1e-5)
    g = torch.randn_like(out)
    gx, *gp = torch.autograd.grad((out * g).sum(), [x, *att.parameters()])
    rx, *rp = torch.autograd.grad((ref * g).sum(), [x, *att.parameters()])
    assert torch.allclose(gx, rx, atol=1e-4)
    for a, b in zip(gp, rp):
        assert torch.allclose(a, b, atol=1e-4)


def test_depthwise_custom_backward():
    torch.manual_seed(0)
    xp = torch.randn(3, 6, 20, requires_grad=True)
    w = torch.randn(6, 1, 5, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    y1 = _DepthwiseConv1dFn.apply(xp, w, b)
    y2 = F.conv1d(xp, w, b, groups=6)
    assert torch.allclose(y1, y2, atol=1e-6)
    g = torch.randn_like(y1)
    g1 = torch.autograd.grad((y1 * g).sum(), [xp, w, b])
    g2 = torch.autograd.grad((y2 * g).sum(), [xp, w, b])
    for a, c in zip(g1, g2):
        assert torch.allclose(a, c, atol=1e-4)


def test_activation_checkpointing_same_grads():
    torch.manual_seed(0)
    m1 = CtcModel(tiny(dropout=0.1), 11)
    m2 = CtcModel(tiny(dropout=0.1, activation_checkpointing=True), 11)
    m2.load_state_dict(m1.state_dict())
    x, lens = feats_batch([40, 30])
    tg = torch.tensor([[1, 2, 3], [4, 5, 0]])
    tl = torch.tensor([3, 2])
    grads = []
    for m in (m1, m2):
        m.train()
        torch.manual_seed(123)
        lp, ol = m(x, lens)
        ctc_loss(lp, ol, tg, tl).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def _toy_lp(seed=0, b=2, t=12, v=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, v, generator=g).log_softmax(-1)


def test_ctc_loss_plain_and_reductions():
    lp = _toy_lp()
    ol = torch.tensor([12, 9])
    tg = torch.tensor([[1, 2, 3], [2, 2, 0]])
    tl = torch.tensor([3, 2])
    ref = F.ctc_loss(lp.transpose(0, 1), tg, ol, tl, reduction="none", zero_infinity=True)
    per = ctc_loss(lp, ol, tg, tl, reduction="none")
    assert torch.allclose(per, ref)
    assert torch.allclose(ctc_loss(lp, ol, tg, tl), ref.sum())
    assert torch.allclose(ctc_loss(lp, ol, tg, tl, reduction="mean"), ref.mean())
    assert torch.allclose(ctc_loss(lp, ol, tg, tl, label_smoothing=0.0), ref.sum())
    # infeasible utterance -> zeroed, not inf
    bad = ctc_loss(lp, torch.tensor([12, 2]), tg, torch.tensor([3, 2]), reduction="none")
    assert torch.isfinite(bad).all() and bad[1] == 0


def test_label_smoothing_term():
    ol = torch.tensor([12, 9])
    tg = torch.tensor([[1, 2, 3], [2, 2, 0]])
    tl = torch.tensor([3, 2])
    lp = _toy_lp()
    a = 0.3
    ls = ctc_loss(lp, ol, tg, tl, label_smoothing=a, reduction="none")
    plain = ctc_loss(lp, ol, tg, tl, reduction="none")
    v = lp.size(-1)
    kl = -math.log(v) - lp.mean(-1)  # KL(U || p_t)
    kl_sum = torch.stack([kl[0, :12].sum(), kl[1, :9].sum()])
    assert torch.allclose(ls, (1 - a) * plain + a * kl_sum, atol=1e-5)
    assert (kl >= -1e-6).all()
    # uniform posteriors: regulariser is zero
    uni = torch.full_like(lp, -math.log(v))
    assert torch.allclose(
        ctc_loss(uni, ol, tg, tl, label_smoothing=a, reduction="none"),
        (1 - a) * ctc_loss(uni, ol, tg, tl, reduction="none"),
        atol=1e-5,
    )


def test_label_smoothing_increases_entropy():
    ol = torch.tensor([12, 12])
    tg = torch.tensor([[1, 2, 3], [2, 4, 0]])
    tl = torch.tensor([3, 2])

    def train(alpha):
        logits = torch.zeros(2, 12, 6, requires_grad=True)
        opt = torch.optim.Adam([logits], lr=0.1)
        for _ in range(150):
            loss = ctc_loss(logits.log_softmax(-1), ol, tg, tl, label_smoothing=alpha)
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
        lp = logits.detach().log_softmax(-1)
        return -(lp.exp() * lp).sum(-1).mean()

    assert train(0.2) > train(0.0) + 0.05


def test_ctc_model_frontend_and_config():
    class FakeFrontend(torch.nn.Module):  # (B,S) -> (B,S//10,20)
        def forward(self, wave, lens):
            b, s = wave.shape
            return wave[:, : s // 10 * 10].reshape(b, s // 10, 10).repeat(1, 1, 2), lens // 10

    m = CtcModel(tiny(), 13, frontend=FakeFrontend())
    lp, ol = m(torch.randn(2, 500), torch.tensor([500, 300]))
    assert lp.shape == (2, 11, 13) and lp.dtype == torch.float32
    assert torch.equal(ol, torch.tensor([11, 6]))
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 11), atol=1e-5)
    m2 = CtcModel.from_config(m.config())
    assert m2.config() == m.config()
    m2.load_state_dict(m.state_dict())
    assert m.subsampling_factor == 4


def test_medium_params_and_flops():
    cfg = encoder_preset("medium")
    m = CtcModel(cfg, 500)
    n = sum(p.numel() for p in m.parameters())
    assert 20e6 < n < 22e6
    fl = encoder_flops(cfg, 1000, 500)
    assert 1.5e10 < fl < 2.0e10  # ~17.7 GFLOP for one 10 s utterance
    smaller = encoder_flops(encoder_preset("medium", subsampling_channels=64), 1000, 500)
    assert smaller < fl


def test_tiny_model_overfits():
    torch.manual_seed(0)
    v, dim = 8, 20
    protos = torch.randn(v, dim) * 2.0
    b, u, seg = 4, 4, 12  # 4 labels x 12 frames = 48 frames -> 11 outputs
    tg = torch.randint(1, v, (b, u))
    x = protos[tg].repeat_interleave(seg, dim=1) + 0.3 * torch.randn(b, u * seg, dim)
    lens = torch.full((b,), u * seg)
    tl = torch.full((b,), u)
    m = CtcModel(tiny(dropout=0.0), v)
    opt = torch.optim.Adam(m.parameters(), lr=5e-3)
    losses = []
    for _ in range(60):
        lp, ol = m(x, lens)
        loss = ctc_loss(lp, ol, tg, tl, reduction="mean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_subsampling_geometry_comes_from_the_module():
    from harken.models.subsampling import Conv2dSubsampling4, subsampling_geometry

    cfg = tiny(subsampling_channels=4)
    sub = Conv2dSubsampling4(cfg).eval()
    assert (sub.factor, sub.right_context) == subsampling_geometry(cfg) == (4, 6)
    ns = list(range(0, 90))
    as_tensor = sub.output_lengths(torch.tensor(ns))
    assert as_tensor.dtype == torch.int64
    assert as_tensor.tolist() == [sub.output_lengths(n) for n in ns]
    with torch.no_grad():
        for n in range(7, 90, 7):  # the formula is what the convolutions really produce
            assert sub.project(torch.randn(1, n, cfg.input_dim)).shape[1] == sub.output_lengths(n)
    assert sub.output_lengths(sub.right_context) == 0 and sub.output_lengths(sub.right_context + 1) == 1
    for c in range(1, 12):  # a streaming chunk of C output frames: 4C + 3 inputs, the fewest that give C
        assert sub.input_frames(c) == 4 * c + 3
        assert sub.output_lengths(sub.input_frames(c)) == c
        assert sub.output_lengths(sub.input_frames(c) - 1) == c - 1
        assert sub.input_frames(c + 1) - sub.input_frames(c) == sub.factor
    enc = build_encoder(cfg)
    assert (enc.subsampling_factor, enc.right_context) == (4, 6)


@pytest.mark.parametrize("pos_enc", ["rel", "abs"])
def test_flops_count_the_position_projection_once_per_batch(pos_enc):
    cfg = encoder_preset("tiny", pos_enc=pos_enc)
    one, eight = encoder_flops(cfg, 1000, 100), encoder_flops(cfg, 1000, 100, batch_size=8)
    if pos_enc == "abs":
        assert eight == 8 * one
    else:
        t = 249  # output frames of 1000 input frames
        shared = 2.0 * cfg.num_layers * (2 * t - 1) * cfg.d_model * cfg.d_model
        assert math.isclose(eight, 8 * one - 7 * shared, rel_tol=1e-12)
    assert CtcModel(cfg, 100).flops(1000, batch_size=8) == eight


def test_registry_imports_no_encoder_until_asked():
    code = (
        "import json, sys\n"
        "import harken.config, harken.models\n"
        "from harken.models.registry import encoder_names, encoder_class\n"
        "names = encoder_names()\n"
        "loaded = sorted(m for m in ('harken.models.conformer', 'harken.models.transformer', "
        "'harken.models.wav2vec2', 'transformers') if m in sys.modules)\n"
        "w2v = encoder_class('wav2vec2')\n"
        "print(json.dumps([names, loaded, w2v.takes_waveform, 'transformers' in sys.modules]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    names, loaded, takes_waveform, transformers_loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"conformer", "transformer", "wav2vec2"} <= set(names)
    assert loaded == []  # listing imports no encoder module
    assert takes_waveform and not transformers_loaded  # wav2vec2's class is known without transformers


def test_unknown_encoder_type_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown encoder type 'nope'; known: .*conformer"):
        build_encoder(tiny(type="nope"))


def test_a_waveform_encoder_is_one_class_and_one_registration():
    """A new encoder declares how it is fed and optimised; build_model and the trainer's helpers
    follow without a branch of their own."""
    from harken.config import ExperimentConfig
    from harken.models.base import Encoder
    from harken.models.build import build_model, find_unused_parameters, param_groups, takes_waveform
    from harken.models.registry import ENCODERS, register_encoder

    @register_encoder("test-wave-conv")
    class WaveConv(Encoder):
        takes_waveform = True
        find_unused_parameters = True

        @classmethod
        def prepare_config(cls, cfg):
            return dataclasses.replace(cfg, d_model=24)

        @classmethod
        def param_groups(cls, model, base_lr, weight_decay):
            enc = list(model.encoder.parameters())
            rest = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
            return [{"name": "head", "params": rest}, {"name": "enc", "params": enc, "lr": base_lr * 0.5}]

        def __init__(self, cfg):
            super().__init__()
            self.cfg, self.d_model = cfg, cfg.d_model
            self.conv = nn.Conv1d(1, cfg.d_model, 400, 160)

        @property
        def subsampling_factor(self):
            return 160

        def output_lengths(self, lens):
            return torch.clamp(torch.div(lens - 400, 160, rounding_mode="floor") + 1, min=0)

        def forward(self, wave, lens):
            return self.conv(wave[:, None]).transpose(1, 2), self.output_lengths(lens)

    try:
        cfg = ExperimentConfig()
        cfg.model.encoder = dataclasses.replace(cfg.model.encoder, type="test-wave-conv", d_model=999)
        assert takes_waveform(cfg.model.encoder)
        model = build_model(cfg, 7)
        assert model.frontend is None and model.takes_waveform and model.output.in_features == 24
        assert model.encoder_cfg.d_model == 24 and cfg.model.encoder.d_model == 999  # caller's config untouched
        lp, n = model(torch.randn(2, 16000), torch.tensor([16000, 8000]))
        assert lp.shape == (2, 98, 7) and n.tolist() == [98, 48]
        groups = param_groups(model, 1e-3, 0.01)
        assert [g["name"] for g in groups] == ["head", "enc"] and groups[1]["lr"] == 5e-4
        assert find_unused_parameters(model)
        fbank = build_model(ExperimentConfig(), 7)  # the default conformer: fbank frontend, default groups
        assert fbank.frontend is not None and not fbank.takes_waveform and not find_unused_parameters(fbank)
        g = param_groups(fbank, 1e-3, 0.01)
        assert [x["weight_decay"] for x in g] == [0.01, 0.0]
        assert sum(len(x["params"]) for x in g) == len(list(fbank.parameters()))
    finally:
        ENCODERS.pop("test-wave-conv", None)
