"""Tests for the encoder, the shifted-window decoder and the supmam_clap model.

Tiny dimensions throughout (width 32, 4 heads, 1-2 blocks) so the file runs in seconds on CPU.
"""
import math
from types import SimpleNamespace

import fairseq  # noqa: F401  (must be imported before the plugin's model modules)
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from mam_clap_plugin.data.audio import resolve_norm_stats
from mam_clap_plugin.models.supmam_clap import SupMamClapConfig, SupMamClapModel, patchify
from mam_clap_plugin.modules.decoder import (
    CosineWindowAttention,
    SwinV2Block,
    WindowBlock,
    WindowDecoder,
    log_relative_coordinates,
    shifted_window_bias,
    shifted_window_mask,
)
from mam_clap_plugin.modules.encoder import AudioEncoder, gather_tokens, num_visible, random_masking
from mam_clap_plugin.modules.transformer import Block, sincos_pos_embed_2d
from mam_clap_plugin.tasks.mam_clap_pretraining import MamClapPretrainingConfig, MamClapPretrainingTask

D = 32
HEADS = 4
FREQ_PATCHES = 8  # 128 mel bins / 16


def make_encoder(depth=2, max_frames=1024, seed=0):
    torch.manual_seed(seed)
    return AudioEncoder(embed_dim=D, depth=depth, num_heads=HEADS, max_frames=max_frames).eval()


def model_cfg(**overrides):
    kw = dict(
        encoder_embed_dim=D,
        encoder_layers=2,
        encoder_attention_heads=HEADS,
        max_frames=256,
        mask_ratio=0.5,
        decoder_embed_dim=D,
        decoder_layers=1,
        decoder_attention_heads=HEADS,
        cls_hidden_dim=16,
    )
    kw.update(overrides)
    return SupMamClapConfig(**kw)


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return SupMamClapModel(model_cfg(**overrides))


def fbank(batch, frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, frames, 128, generator=g)


def patch_slice(i, j):
    """Index of time patch i, frequency patch j in a (B, 1, T, 128) source."""
    return (slice(None), 0, slice(16 * i, 16 * (i + 1)), slice(16 * j, 16 * (j + 1)))


# ----------------------------------------------------------------------------- encoder


@torch.no_grad()
def test_patch_embedding_is_time_major():
    enc = make_encoder(depth=0)
    zero = torch.zeros(1, 1, 1024, 128)
    base = enc.patch_tokens(zero)
    assert base.shape == (1, 64 * FREQ_PATCHES, D)
    # an all-zero source gives conv bias + position table
    torch.testing.assert_close(base, enc.patch_embed.bias.view(1, 1, D) + enc.pos_embed[:, 1:])

    w = enc.patch_embed.weight[:, 0]  # (D, 16, 16)
    for i, j in [(0, 0), (0, 7), (1, 0), (3, 5), (63, 7), (10, 2)]:
        src = zero.clone()
        patch = torch.randn(16, 16)
        src[patch_slice(i, j)] = patch
        diff = enc.patch_tokens(src) - base
        changed = (diff[0].abs().amax(dim=-1) > 1e-6).nonzero().flatten().tolist()
        assert changed == [i * FREQ_PATCHES + j], (i, j, changed)
        # the changed token is exactly the linear patch projection (bias and position cancel)
        torch.testing.assert_close(diff[0, i * FREQ_PATCHES + j], (w * patch).sum(dim=(1, 2)), atol=1e-5, rtol=1e-5)


def test_patchify_matches_token_order():
    src = torch.zeros(2, 1, 128, 128)
    patch = torch.arange(256, dtype=torch.float32).view(16, 16) + 1
    src[1, 0, 16 * 5 : 16 * 6, 16 * 3 : 16 * 4] = patch  # time patch 5, freq patch 3
    p = patchify(src)
    assert p.shape == (2, 64, 256)
    nonzero = p.abs().sum(-1).nonzero().tolist()
    assert nonzero == [[1, 5 * FREQ_PATCHES + 3]]
    # each patch flattened row by row (time row, then its 16 frequency bins)
    torch.testing.assert_close(p[1, 5 * FREQ_PATCHES + 3], patch.flatten())


def test_sincos_table_layout():
    table = sincos_pos_embed_2d(D, 64, 8)
    assert table.shape == (64 * 8, D) and table.dtype == torch.float32
    # hand computation of row t * 8 + f: [sin(t w), cos(t w), sin(f w), cos(f w)], w_i = 1/10000^(i/8)
    omega = 1.0 / 10000 ** (np.arange(8) / 8.0)
    for t, f in [(0, 0), (5, 3), (63, 7), (1, 6)]:
        expected = np.concatenate([np.sin(t * omega), np.cos(t * omega), np.sin(f * omega), np.cos(f * omega)])
        np.testing.assert_allclose(table[t * 8 + f].numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(30, 4, 4)


def test_position_embedding_buffer():
    enc = make_encoder(depth=1)
    sd = enc.state_dict()
    assert "pos_embed" in sd
    assert "pos_embed" not in dict(enc.named_parameters())  # fixed, not learned
    assert sd["pos_embed"].shape == (1, 1 + 64 * 8, D)
    assert torch.count_nonzero(sd["pos_embed"][0, 0]) == 0  # cls slot
    torch.testing.assert_close(sd["pos_embed"][0, 1:], sincos_pos_embed_2d(D, 64, 8))
    # the grid follows max_frames
    small = AudioEncoder(embed_dim=D, depth=0, num_heads=HEADS, max_frames=256)
    assert small.pos_embed.shape == (1, 1 + 16 * 8, D)
    torch.testing.assert_close(small.pos_embed[0, 1:], sincos_pos_embed_2d(D, 16, 8))


@torch.no_grad()
@pytest.mark.parametrize("frames", [96, 128, 512])
def test_short_clip_uses_first_time_columns(frames):
    enc = make_encoder(depth=0)
    full = fbank(2, 1024)
    short = full[:, :, :frames].clone()
    n = frames // 16 * FREQ_PATCHES
    tok_short = enc.patch_tokens(short)
    assert tok_short.shape == (2, n, D)
    torch.testing.assert_close(tok_short, enc.patch_tokens(full)[:, :n], atol=1e-6, rtol=1e-6)
    # and the position part is exactly the first frames/16 time rows of the table
    pos = enc.patch_tokens(torch.zeros(1, 1, frames, 128)) - enc.patch_embed.bias
    torch.testing.assert_close(pos[0], sincos_pos_embed_2d(D, 64, 8)[:n], atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_imported_position_table_is_honoured():
    enc = make_encoder(depth=1)
    src = fbank(2, 256)
    before = enc.extract_features(src)
    tokens_before = enc.patch_tokens(src)

    sd = enc.state_dict()
    new_table = torch.randn_like(sd["pos_embed"])
    sd["pos_embed"] = new_table
    enc2 = AudioEncoder(embed_dim=D, depth=1, num_heads=HEADS, max_frames=1024).eval()
    enc2.load_state_dict(sd)
    torch.testing.assert_close(enc2.pos_embed, new_table)

    n = 16 * FREQ_PATCHES
    torch.testing.assert_close(
        enc2.patch_tokens(src) - tokens_before,
        (new_table[:, 1 : 1 + n] - enc.pos_embed[:, 1 : 1 + n]).expand(2, -1, -1),
        atol=1e-5,
        rtol=1e-5,
    )
    after = enc2.extract_features(src)
    # cls slot gets the imported row 0 too
    torch.testing.assert_close(after["layer_results"][0][:, 0], (enc2.cls_token[0, 0] + new_table[0, 0]).expand(2, D))
    assert not torch.allclose(after["x"], before["x"], atol=1e-3)


@pytest.mark.parametrize("gamma,expected_masked", [(0.2, 103), (0.4, 205), (0.8, 410)])
def test_random_masking_counts(gamma, expected_masked):
    N, B = 512, 6
    assert N - int(N * (1 - gamma)) == expected_masked
    n_keep = N - expected_masked
    assert num_visible(N, gamma) == n_keep
    torch.manual_seed(0)
    m = random_masking(B, N, gamma)
    assert m.mask.dtype == torch.bool and m.mask.shape == (B, N)
    assert m.ids_keep.shape == (B, n_keep) and m.ids_restore.shape == (B, N)
    assert m.mask.sum(dim=1).tolist() == [expected_masked] * B
    # different positions in different clips
    for a in range(B):
        for b in range(a + 1, B):
            assert not torch.equal(m.mask[a], m.mask[b])
    for b in range(B):
        keep = m.ids_keep[b]
        assert len(set(keep.tolist())) == n_keep
        assert sorted(keep.tolist()) == (~m.mask[b]).nonzero().flatten().tolist()
        # ids_restore is a permutation
        assert sorted(m.ids_restore[b].tolist()) == list(range(N))
    # ids_restore inverts the shuffle: [visible, masked] gathered by ids_restore is grid order
    ids_shuffle = m.ids_restore.argsort(dim=1)
    assert torch.equal(ids_shuffle[:, :n_keep], m.ids_keep)
    grid = torch.arange(N).expand(B, -1)
    shuffled = grid.gather(1, ids_shuffle)
    assert torch.equal(shuffled.gather(1, m.ids_restore), grid)
    # masked exactly where the restored position falls in the "masked" part
    assert torch.equal(m.mask, m.ids_restore >= n_keep)


def test_num_visible_bounds():
    assert num_visible(512, 0.0) == 512
    with pytest.raises(ValueError, match="mask_ratio"):
        num_visible(512, 1.0)
    with pytest.raises(ValueError, match="mask_ratio"):
        num_visible(512, -0.1)


@torch.no_grad()
@pytest.mark.parametrize("gamma", [0.2, 0.4, 0.8])
def test_encoder_output_has_visible_tokens_only(gamma):
    enc = make_encoder(depth=1)
    src = fbank(2, 1024)
    out, masking = enc(src, gamma)
    n_vis = 512 - (512 - int(512 * (1 - gamma)))
    assert out.shape == (2, 1 + n_vis, D)
    assert masking.mask.sum(1).tolist() == [512 - n_vis] * 2
    out0, masking0 = enc(src, 0.0)
    assert masking0 is None and out0.shape == (2, 1 + 512, D)


@torch.no_grad()
def test_encoder_visible_tokens_follow_ids_keep():
    enc = make_encoder(depth=0)
    src = fbank(2, 256)
    torch.manual_seed(3)
    out, m = enc(src, 0.5)
    tokens = gather_tokens(enc.patch_tokens(src), m.ids_keep)
    torch.testing.assert_close(out[:, 1:], enc.norm(tokens))
    torch.testing.assert_close(out[:, 0], enc.norm(enc.cls_token[:, 0] + enc.pos_embed[:, 0]).expand(2, D))


@torch.no_grad()
def test_encoder_ignores_masked_patch_content():
    enc = make_encoder(depth=2)
    src = fbank(2, 256)
    torch.manual_seed(7)
    out1, m1 = enc(src, 0.5)

    masked = m1.mask[0].nonzero().flatten()[:3].tolist()
    visible = (~m1.mask[0]).nonzero().flatten()[0].item()
    src2 = src.clone()
    for k in masked:
        i, j = divmod(k, FREQ_PATCHES)
        src2[0, 0, 16 * i : 16 * (i + 1), 16 * j : 16 * (j + 1)] += 10 * torch.randn(16, 16)
    torch.manual_seed(7)
    out2, m2 = enc(src2, 0.5)
    assert torch.equal(m1.mask, m2.mask)
    torch.testing.assert_close(out2, out1, atol=1e-6, rtol=0)

    # control: changing a visible patch does change the output
    i, j = divmod(visible, FREQ_PATCHES)
    src3 = src.clone()
    src3[0, 0, 16 * i : 16 * (i + 1), 16 * j : 16 * (j + 1)] += 10 * torch.randn(16, 16)
    torch.manual_seed(7)
    out3, _ = enc(src3, 0.5)
    assert (out3[0] - out1[0]).abs().max() > 1e-3
    torch.testing.assert_close(out3[1], out1[1], atol=1e-6, rtol=0)  # other clip untouched


# ----------------------------------------------------------------------------- decoder


def make_decoder(depth=1, shift=(0, 0), grid=(8, 8), seed=0, block="swinv2"):
    torch.manual_seed(seed)
    return WindowDecoder(
        encoder_dim=D, embed_dim=D, depth=depth, num_heads=HEADS, window=(4, 4), shift=shift,
        grid_time=grid[0], grid_freq=grid[1], block=block,
    ).eval()


@torch.no_grad()
def test_decoder_output_shape_and_token_placement():
    dec = make_decoder(depth=1)
    torch.manual_seed(0)
    m = random_masking(3, 64, 0.5)
    visible = torch.randn(3, 32, D)
    out = dec(visible, m.ids_restore, (8, 8))
    assert out.shape == (3, 64, D)

    # depth 0: output = LN(embedded token or mask token + position) in grid order
    dec0 = make_decoder(depth=0)
    out0 = dec0(visible, m.ids_restore, (8, 8))
    pos = dec0.pos_embed[0]  # (64, D)
    for b in range(3):
        for slot, k in enumerate(m.ids_keep[b].tolist()):
            torch.testing.assert_close(out0[b, k], dec0.norm(dec0.embed(visible[b, slot]) + pos[k]))
        for k in m.mask[b].nonzero().flatten().tolist():
            torch.testing.assert_close(out0[b, k], dec0.norm(dec0.mask_token[0, 0] + pos[k]))


def test_decoder_blocks_alternate_shift():
    """Plain and shifted blocks alternate, ending with a shifted one: AudioMAE's 16 blocks start
    plain (then every second one shifts), the paper's single block is a shifted one."""
    dec = make_decoder(depth=3, shift=(2, 0))
    assert [blk.shift for blk in dec.blocks] == [(2, 0), (0, 0), (2, 0)]
    assert [blk.shift for blk in make_decoder(depth=1, shift=(2, 0)).blocks] == [(2, 0)]
    assert [blk.shift for blk in make_decoder(depth=2, shift=(2, 0)).blocks] == [(0, 0), (2, 0)]
    sixteen = [blk.shift for blk in make_decoder(depth=16, shift=(2, 0)).blocks]
    assert sixteen == [(0, 0), (2, 0)] * 8
    with pytest.raises(ValueError, match="shift"):
        WindowBlock(D, HEADS, (4, 4), (4, 0), 4.0)
    with pytest.raises(ValueError, match="decoder block 'swin'"):
        WindowBlock(D, HEADS, (4, 4), (2, 0), 4.0, block="swin")


@pytest.mark.parametrize("block,kind", [("swinv2", SwinV2Block), ("vit", Block)])
def test_decoder_block_choice(block, kind):
    dec = make_decoder(depth=2, shift=(2, 0), block=block)
    assert all(type(b.block) is kind and b.kind == block for b in dec.blocks)
    with torch.no_grad():
        assert dec(torch.randn(2, 32, D), random_masking(2, 64, 0.5).ids_restore, (8, 8)).shape == (2, 64, D)


def test_loading_the_other_decoder_block_names_the_field():
    """A state saved with one decoder block kind loads into a model of that kind, and a model of
    the other kind refuses it with an error naming model.decoder_block (not a key listing)."""
    from mam_clap_plugin.modules.decoder import saved_block_kind

    vit = make_model(decoder_block="vit").state_dict()
    swin = make_model(decoder_block="swinv2").state_dict()
    assert saved_block_kind(vit) == "vit" and saved_block_kind(swin) == "swinv2"
    assert saved_block_kind({k: v for k, v in vit.items() if not k.startswith("decoder.")}) is None
    make_model(seed=1, decoder_block="vit").load_state_dict(vit)
    make_model(seed=1, decoder_block="swinv2").load_state_dict(swin)
    with pytest.raises(ValueError, match=r"built from 'vit' blocks.*model.decoder_block='swinv2'.*"
                                         r"model.decoder_block=vit"):
        make_model(decoder_block="swinv2").load_state_dict(vit)
    with pytest.raises(ValueError, match=r"built from 'swinv2' blocks.*decoder_block': 'swinv2'"):
        make_model(decoder_block="vit").load_state_dict(swin)


def _window_groups(labels):
    """(L,) region labels of one window -> (1, L, L) bool 'same region' matrix."""
    lab = torch.tensor(labels)
    return (lab[:, None] == lab[None, :]).unsqueeze(0)


def test_shifted_window_mask_time_shift():
    # grid 8x4, window 4x4, shift 2 in time: two windows of 16 tokens (row r = k // 4 in the window).
    mask = shifted_window_mask(8, 4, (4, 4), (2, 0))
    assert mask.shape == (2, 1, 16, 16) and mask.dtype == torch.bool
    # window 0 = original rows 2..5, contiguous: everything allowed
    assert mask[0].all()
    # window 1 = rolled rows 4..7 = original rows 6, 7 | 0, 1: two regions that must not mix
    expected = _window_groups([0] * 8 + [1] * 8)
    assert torch.equal(mask[1], expected)
    assert mask[1, 0, 0, 7] and not mask[1, 0, 0, 8] and not mask[1, 0, 15, 7] and mask[1, 0, 15, 8]


def test_shifted_window_mask_both_axes():
    mask = shifted_window_mask(8, 8, (4, 4), (2, 2))
    assert mask.shape == (4, 1, 16, 16)
    # windows row-major: (time 0, freq 0), (time 0, freq 1), (time 1, freq 0), (time 1, freq 1)
    assert mask[0].all()
    col_split = [0, 0, 1, 1] * 4  # only the frequency edge wraps
    row_split = [0] * 8 + [1] * 8  # only the time edge wraps
    both = [0, 0, 1, 1] * 2 + [2, 2, 3, 3] * 2
    assert torch.equal(mask[1], _window_groups(col_split))
    assert torch.equal(mask[2], _window_groups(row_split))
    assert torch.equal(mask[3], _window_groups(both))
    # every token may always attend to itself
    assert mask.diagonal(dim1=-2, dim2=-1).all()


def _influence(dec, t0, f0, grid=(8, 8)):
    """Boolean (t, f) map of decoder outputs changed by perturbing the visible token at (t0, f0)."""
    t, f = grid
    n = t * f
    g = torch.Generator().manual_seed(11)
    visible = torch.randn(1, n, D, generator=g)
    ids = torch.arange(n).unsqueeze(0)
    base = dec(visible, ids, grid)
    pert = visible.clone()
    pert[0, t0 * f + f0] += 5 * torch.randn(D, generator=g)
    diff = (dec(pert, ids, grid) - base)[0].abs().amax(-1).view(t, f)
    return diff > 1e-5


def _region(rows, cols, grid=(8, 8)):
    m = torch.zeros(grid, dtype=torch.bool)
    m[rows[0] : rows[1], cols[0] : cols[1]] = True
    return m


@torch.no_grad()
@pytest.mark.parametrize(
    "t0,f0,rows,cols",
    [(0, 0, (0, 4), (0, 4)), (5, 6, (4, 8), (4, 8)), (3, 4, (0, 4), (4, 8)), (7, 0, (4, 8), (0, 4))],
)
@pytest.mark.parametrize("block", ["swinv2", "vit"])
def test_window_attention_is_local(t0, f0, rows, cols, block):
    dec = make_decoder(depth=1, shift=(0, 0), block=block)
    assert torch.equal(_influence(dec, t0, f0), _region(rows, cols))


@torch.no_grad()
@pytest.mark.parametrize(
    "t0,f0,rows,cols",
    [
        (3, 1, (2, 6), (0, 4)),  # interior shifted window: original rows 2..5
        (2, 5, (2, 6), (4, 8)),
        (0, 2, (0, 2), (0, 4)),  # wrapped window split: rows 0, 1 only
        (1, 6, (0, 2), (4, 8)),
        (7, 3, (6, 8), (0, 4)),  # rows 6, 7 only, never rows 0, 1
        (6, 4, (6, 8), (4, 8)),
    ],
)
@pytest.mark.parametrize("block", ["swinv2", "vit"])
def test_shifted_window_influence_moves_and_never_wraps(t0, f0, rows, cols, block):
    dec = make_decoder(depth=1, shift=(2, 0), block=block)
    assert torch.equal(_influence(dec, t0, f0), _region(rows, cols))


@torch.no_grad()
def test_decoder_rejects_grid_not_divisible_by_window():
    dec = make_decoder(depth=1, shift=(2, 0), grid=(8, 8))
    visible = torch.randn(1, 48, D)
    with pytest.raises(ValueError, match=r"patch grid 6x8 .*not divisible by the decoder window 4x4"):
        dec(visible, torch.arange(48).unsqueeze(0), (6, 8))


# ----------------------------------------------------------------------------- Swin V2 block


def test_log_relative_coordinates():
    """Row-major tokens of a 2x3 window: entry [i, j] = sign(d) log(1 + |d|), d = pos_i - pos_j."""
    rel = log_relative_coordinates((2, 3))
    assert rel.shape == (6, 6, 2)
    for i in range(6):
        for j in range(6):
            dt, df = i // 3 - j // 3, i % 3 - j % 3
            want = [math.copysign(math.log1p(abs(d)), d) if d else 0.0 for d in (dt, df)]
            torch.testing.assert_close(rel[i, j], torch.tensor(want), atol=1e-6, rtol=0)
    # symmetric coordinates: the pair (j, i) has the opposite offset; the diagonal is 0
    torch.testing.assert_close(rel, -rel.transpose(0, 1))
    assert not rel.diagonal(dim1=0, dim2=1).any()
    assert rel[0, 5].tolist() == pytest.approx([-math.log(2), -math.log(3)])


def test_position_bias_placement():
    """The bias MLP's output for the offset of pair (i, j) lands at [h, i, j]: with a linear
    stand-in MLP, B[h, i, j] = w_h . coords(i, j) + b_h."""
    attn = CosineWindowAttention(8, 2, (2, 4))
    lin = torch.nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 10.0], [-3.0, 0.5]]))
        lin.bias.copy_(torch.tensor([0.25, -1.0]))
    attn.cpb_mlp = lin
    bias = attn.position_bias()
    assert bias.shape == (2, 8, 8)
    for i in range(8):
        for j in range(8):
            d = [i // 4 - j // 4, i % 4 - j % 4]
            c = torch.tensor([math.copysign(math.log1p(abs(x)), x) for x in d])
            for h in range(2):
                assert bias[h, i, j].item() == pytest.approx((lin.weight[h] @ c + lin.bias[h]).item(), abs=1e-5)
    # an MLP that only sees |offset| gives a symmetric bias
    attn.cpb_mlp = torch.nn.Sequential(torch.nn.Identity())
    attn.cpb_mlp.forward = lambda c: c.abs().sum(-1, keepdim=True).expand(-1, 2)
    sym = attn.position_bias()
    torch.testing.assert_close(sym, sym.transpose(1, 2))


def test_logit_scale_init_and_clamp():
    attn = CosineWindowAttention(8, 2, (4, 4))
    torch.testing.assert_close(attn.logit_scale.detach(), torch.full((2,), math.log(10.0)))
    torch.testing.assert_close(attn.scale().detach(), torch.full((2,), 10.0))
    with torch.no_grad():
        attn.logit_scale.copy_(torch.tensor([math.log(1000.0), math.log(3.0)]))
    torch.testing.assert_close(attn.scale().detach(), torch.tensor([100.0, 3.0]))
    assert attn.logit_scale.ndim == 1  # so no weight decay (mam_clap_adamw: ndim <= 1)


def reference_cosine_attention(attn, x, shift_mask=None):
    """Explicit softmax: s_h cos(q_i, k_j) + B_h(i, j) (+ mask), softmax over j, times V, proj."""
    BW, L, Dm = x.shape
    H = attn.num_heads
    qkv = attn.qkv(x).reshape(BW, L, 3, H, Dm // H)
    q, k, v = (qkv[:, :, n].transpose(1, 2) for n in range(3))  # (BW, H, L, hd)
    cos = (q / q.norm(dim=-1, keepdim=True)) @ (k / k.norm(dim=-1, keepdim=True)).transpose(-2, -1)
    scale = attn.logit_scale.clamp(max=math.log(100.0)).exp().view(1, H, 1, 1)
    logits = cos * scale + attn.position_bias().unsqueeze(0)
    if shift_mask is not None:
        nW = shift_mask.shape[0]
        logits = (logits.view(BW // nW, nW, H, L, L) + shift_mask.view(1, nW, 1, L, L)).view(BW, H, L, L)
    out = logits.softmax(dim=-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(BW, L, Dm))


@pytest.mark.parametrize("shifted", [False, True])
def test_cosine_attention_matches_explicit_softmax(shifted):
    """The SDPA path (scale folded into q, bias + shift mask as a float attn_mask, windows folded
    into the head axis) equals the explicit softmax, forward and gradients."""
    torch.manual_seed(0)
    attn = CosineWindowAttention(D, HEADS, (4, 4)).double()  # float64: logit scales up to 100 amplify rounding
    with torch.no_grad():
        attn.logit_scale.copy_(torch.tensor([0.5, 1.5, math.log(500.0), 3.0]))  # one above the clamp
    mask = shifted_window_bias(8, 8, (4, 4), (2, 0), torch.device("cpu"), torch.float64) if shifted else None
    x = torch.randn(3 * 4, 16, D, dtype=torch.float64, requires_grad=True)  # 3 clips x 4 windows of 16 tokens
    got = attn(x, mask)
    want = reference_cosine_attention(attn, x, mask)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    params = [x, attn.logit_scale, attn.cpb_mlp[0].weight, attn.qkv.weight]
    g_got = torch.autograd.grad(got.square().sum(), params)
    g_want = torch.autograd.grad(want.square().sum(), params)
    for a, b in zip(g_got, g_want):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_shifted_window_bias_is_the_region_mask():
    bias = shifted_window_bias(8, 4, (4, 4), (2, 0), torch.device("cpu"), torch.float32)
    same = shifted_window_mask(8, 4, (4, 4), (2, 0))
    assert bias.shape == same.shape and bias.dtype == torch.float32
    assert torch.equal(bias == 0, same) and torch.isneginf(bias[~same]).all()
    assert shifted_window_bias(8, 4, (4, 4), (2, 0), torch.device("cpu"), torch.float32) is bias  # cached
    assert shifted_window_bias(8, 4, (4, 4), (2, 0), torch.device("cpu"), torch.bfloat16).dtype == torch.bfloat16


@torch.no_grad()
def test_swinv2_shifted_block_never_attends_across_the_wrap():
    """Attention weights of the shifted block's wrapped window: zero between the two regions
    (grid rows 6, 7 and 0, 1), whatever the position bias says."""
    torch.manual_seed(1)
    attn = CosineWindowAttention(D, HEADS, (4, 4))
    with torch.no_grad():
        attn.cpb_mlp[2].bias.fill_(50.0)  # a large bias everywhere must not open the wrap
    mask = shifted_window_bias(8, 4, (4, 4), (2, 0), torch.device("cpu"), torch.float32)
    x = torch.randn(2, 16, D)  # one clip, 2 windows; window 1 wraps
    H, L = HEADS, 16
    qkv = attn.qkv(x).reshape(2, L, 3, H, D // H)
    q, k = (qkv[:, :, n].transpose(1, 2) for n in range(2))
    cos = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-2, -1)
    logits = cos * attn.scale().view(1, H, 1, 1) + attn.position_bias() + mask
    weights = logits.softmax(-1)
    assert (weights[1, :, :8, 8:] == 0).all() and (weights[1, :, 8:, :8] == 0).all()
    assert (weights[0] > 0).all()
    # and the module's output for the first region ignores the second region's values
    y = attn(x, mask)
    x2 = x.clone()
    x2[1, 8:] += 10.0
    torch.testing.assert_close(attn(x2, mask)[1, :8], y[1, :8])


def test_swinv2_block_is_post_norm():
    """x + LN(attn(x)), then x + LN(mlp(x)): zeroing norm1's affine removes the attention
    branch entirely (a pre-norm block would still add attn(0) = proj.bias)."""
    torch.manual_seed(2)
    blk = SwinV2Block(D, HEADS, (4, 4), mlp_ratio=2.0)
    x = torch.randn(2, 16, D)
    with torch.no_grad():
        y = x + blk.norm1(blk.attn(x))
        want = y + blk.norm2(blk.mlp(y))
        torch.testing.assert_close(blk(x), want)
        blk.norm1.weight.zero_()
        blk.norm1.bias.zero_()
        torch.testing.assert_close(blk(x), x + blk.norm2(blk.mlp(x)))
        # each residual branch ends in its LayerNorm: with the default affine (1, 0) the update
        # the block adds to x has zero mean over channels
        blk2 = SwinV2Block(D, HEADS, (4, 4), mlp_ratio=2.0)
        assert (blk2(x) - x).mean(-1).abs().max() < 1e-5


@torch.no_grad()
def test_swinv2_decoder_shapes_and_position_bias_used():
    dec = make_decoder(depth=2, shift=(2, 0), grid=(8, 8))
    m = random_masking(3, 64, 0.5)
    visible = torch.randn(3, 32, D)
    out = dec(visible, m.ids_restore, (8, 8))
    assert out.shape == (3, 64, D) and torch.isfinite(out).all()
    # a shorter grid (4 time patches) uses the first rows of the position table
    assert dec(torch.randn(3, 16, D), random_masking(3, 32, 0.5).ids_restore, (4, 8)).shape == (3, 32, D)
    # the continuous position bias takes part: changing its MLP changes the output
    dec.blocks[1].block.attn.cpb_mlp[2].bias.add_(torch.arange(HEADS, dtype=torch.float32))
    dec.blocks[1].block.attn.cpb_mlp[2].weight.mul_(5.0)
    assert (dec(visible, m.ids_restore, (8, 8)) - out).abs().max() > 1e-4


# ----------------------------------------------------------------------------- model


@torch.no_grad()
@pytest.mark.parametrize("target", ["pixel", "clap"])
@pytest.mark.parametrize("branch", [False, True])
def test_model_variants(target, branch):
    model = make_model(target=target, target_dim=24 if target == "clap" else 0,
                       classification_branch=branch, num_classes=5 if branch else 0)
    C = 24 if target == "clap" else 256
    for frames, n in [(128, 64), (256, 128)]:
        src = fbank(2, frames)
        out = model(src)
        assert out["pred"].shape == (2, n, C)
        assert out["mask"].shape == (2, n) and out["mask"].dtype == torch.bool
        assert out["mask"].sum(1).tolist() == [n - int(n * 0.5)] * 2
        if branch:
            assert out["logits"].shape == (2, 5)
        else:
            assert out["logits"] is None
        if target == "pixel":
            assert out["patches"].shape == (2, n, 256)
            torch.testing.assert_close(out["patches"], patchify(src))
        else:
            assert "patches" not in out
            # head h = Linear -> LayerNorm: every predicted token is layer-normalised
            torch.testing.assert_close(out["pred"].mean(-1), torch.zeros(2, n), atol=1e-5, rtol=0)
        # mask_ratio override
        out0 = model(src, mask_ratio=0.0)
        assert not out0["mask"].any() and out0["pred"].shape == (2, n, C)


@torch.no_grad()
def test_model_classification_uses_visible_tokens_only():
    model = make_model(target="pixel", classification_branch=True, num_classes=5).eval()
    src = fbank(2, 128)
    torch.manual_seed(5)
    out1 = model(src)
    k = out1["mask"][0].nonzero()[0].item()
    i, j = divmod(k, FREQ_PATCHES)
    src2 = src.clone()
    src2[0, 0, 16 * i : 16 * (i + 1), 16 * j : 16 * (j + 1)] = 100.0
    torch.manual_seed(5)
    out2 = model(src2)
    torch.testing.assert_close(out2["logits"], out1["logits"], atol=1e-6, rtol=0)


def test_model_config_errors():
    with pytest.raises(ValueError, match="target_dim"):
        make_model(target="clap", target_dim=0)
    with pytest.raises(ValueError, match="num_classes"):
        make_model(classification_branch=True, num_classes=0)
    model = make_model()
    with torch.no_grad():
        with pytest.raises(ValueError, match="at most 256"):
            model(fbank(1, 512))
        with pytest.raises(ValueError, match="multiple of 16"):
            model(fbank(1, 120))
        with pytest.raises(ValueError, match="not divisible by the decoder window"):
            model(fbank(1, 96))  # 6 time patches, window 4


@torch.no_grad()
def test_extract_features():
    model = make_model(mask_ratio=0.8).eval()
    src = fbank(2, 256)
    res = model.extract_features(src)
    assert len(res["layer_results"]) == 2 + 1
    for layer in res["layer_results"]:
        assert layer.shape == (2, 1 + 128, D)
    assert res["x"].shape == (2, 1 + 128, D)
    torch.testing.assert_close(res["x"], model.encoder.norm(res["layer_results"][-1]))
    # no masking: deterministic, and the first entry is the full embedded input
    torch.testing.assert_close(model.extract_features(src)["x"], res["x"])
    first = model.encoder.patch_tokens(src)
    torch.testing.assert_close(res["layer_results"][0][:, 1:], first)
    # equal to the unmasked encoder forward
    enc_out, masking = model.encoder(src, 0.0)
    assert masking is None
    torch.testing.assert_close(enc_out, res["x"])
    one = model.extract_features(src, layer=1)
    torch.testing.assert_close(one["x"], res["layer_results"][1])


def test_remove_pretraining_modules():
    model = make_model(target="clap", target_dim=24, classification_branch=True, num_classes=5)
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    assert sum(p.numel() for p in model.parameters()) > n_enc
    model.remove_pretraining_modules()
    assert sum(p.numel() for p in model.parameters()) == n_enc
    assert model.decoder is None and model.head is None and model.classifier is None
    assert all(k.startswith("encoder.") for k in model.state_dict())
    with torch.no_grad():
        assert model.extract_features(fbank(1, 128))["x"].shape == (1, 65, D)


class StubTask(MamClapPretrainingTask):
    """The pretraining task without data: only what build_model reads (class list, store header)."""

    def __init__(self, target_dim=24, num_classes=7, norm_stats="audioset"):
        self.cfg = MamClapPretrainingConfig(data="unused", target_length=64, norm_stats=norm_stats)
        self.norm_mean, self.norm_std = resolve_norm_stats(norm_stats)
        self._class_names = [f"class{i}" for i in range(num_classes)]
        self._target_header = SimpleNamespace(dim=target_dim) if target_dim else None
        self._teacher = None


def _yaml_cfg(**overrides):
    """cfg.model as fairseq hands it to task.build_model (a DictConfig with _name)."""
    cfg = {k: v for k, v in vars(model_cfg(**overrides)).items() if not k.startswith("_")}
    cfg.update(_name="supmam_clap", target=str(overrides.get("target", "pixel")))
    return OmegaConf.create(cfg)


def test_build_model_fills_dims_from_task():
    task = StubTask(target_dim=24, num_classes=7)
    assert task.target_dim == 24 and task.num_classes == 7
    cfg = _yaml_cfg(target="clap", classification_branch=True)
    assert cfg.target_dim == 0 and cfg.num_classes == 0
    model = task.build_model(cfg)
    assert isinstance(model, SupMamClapModel)
    assert model.cfg.target_dim == 24 and model.cfg.num_classes == 7  # saved config is self-contained
    assert model.head[0].out_features == 24
    assert model.classifier.mlp[-1].out_features == 7
    # explicit values win over the task
    model = task.build_model(_yaml_cfg(target="clap", target_dim=12, classification_branch=True, num_classes=3))
    assert model.cfg.target_dim == 12 and model.head[0].out_features == 12
    assert model.classifier.mlp[-1].out_features == 3
    # pixel target without a branch needs nothing from the task
    model = StubTask(target_dim=0, num_classes=0).build_model(_yaml_cfg())
    assert model.cfg.target_dim == 0 and model.head.out_features == 256 and model.classifier is None
    # a clap model with no target store to read the width from fails clearly
    with pytest.raises(ValueError, match="target_dim"):
        StubTask(target_dim=0, num_classes=7).build_model(_yaml_cfg(target="clap"))


def test_build_model_with_structured_config():
    """The same through a structured (dataclass-backed) DictConfig, where target is an enum."""
    cfg = OmegaConf.structured(model_cfg(target="clap", classification_branch=True))
    with open_dict(cfg):
        cfg._name = "supmam_clap"
    model = StubTask(target_dim=24, num_classes=7).build_model(cfg)
    assert model.cfg.target_dim == 24 and model.cfg.num_classes == 7
    with torch.no_grad():
        out = model(fbank(2, 128))
    assert out["pred"].shape == (2, 64, 24) and out["logits"].shape == (2, 7)


# ----------------------------------------------------------------------------- Y_v from the encoder


def test_visible_prediction_encoder_uses_z_v_and_the_decoder_for_masked():
    """visible_prediction=encoder: pred at a visible patch is h(Z_v) (the encoder's token, in grid
    order), at a masked patch h(decoder output)."""
    model = make_model(target="clap", target_dim=24, visible_prediction="encoder").eval()
    src = fbank(2, 128)
    torch.manual_seed(4)
    out = model(src)
    torch.manual_seed(4)
    z, m = model.encoder(src, model.cfg.mask_ratio)
    assert torch.equal(m.mask, out["mask"])
    dec = model.decoder(z[:, 1:], m.ids_restore, (8, 8))
    with torch.no_grad():
        for b in range(2):
            for slot, k in enumerate(m.ids_keep[b].tolist()):
                torch.testing.assert_close(out["pred"][b, k], model.head(z[b, 1 + slot]))
            for k in m.mask[b].nonzero().flatten().tolist():
                torch.testing.assert_close(out["pred"][b, k], model.head(dec[b, k]))
    # without masking every prediction comes from the encoder
    with torch.no_grad():
        out0 = model(src, mask_ratio=0.0)
        torch.testing.assert_close(out0["pred"], model.head(model.encoder(src, 0.0)[0][:, 1:]))


@pytest.mark.parametrize("visible", ["encoder", "decoder"])
def test_visible_loss_gradient_reaches_encoder_not_decoder(visible):
    """With encoder, loss_vis (eq. 1 on the visible tokens) moves the encoder and head, and no
    decoder parameter; with decoder it goes through the decoder."""
    from mam_clap_plugin.criterions.supmam_clap import clap_target_loss

    model = make_model(target="clap", target_dim=24, visible_prediction=visible)
    src = fbank(2, 128)
    torch.manual_seed(3)
    out = model(src)
    target = torch.randn(2, 64, 24, generator=torch.Generator().manual_seed(9))
    loss_vis, loss_mask = clap_target_loss(out["pred"], target, out["mask"])
    dec_params = list(model.decoder.parameters())
    grads = torch.autograd.grad(loss_vis, dec_params + [model.encoder.patch_embed.weight, model.head[0].weight],
                                retain_graph=True, allow_unused=True)
    dec_grads, (enc_grad, head_grad) = grads[:-2], grads[-2:]
    assert enc_grad.abs().sum() > 0 and head_grad.abs().sum() > 0
    reached = [g is not None and g.abs().sum().item() > 0 for g in dec_grads]
    if visible == "encoder":
        assert not any(reached)
    else:
        assert any(reached)
    # the masked term reaches the decoder either way
    assert all(g is not None for g in torch.autograd.grad(loss_mask, [model.decoder.mask_token]))


def test_visible_prediction_config_errors():
    with pytest.raises(ValueError, match=r"model.encoder_embed_dim=32\).*model.decoder_embed_dim=16\).*"
                                         r"set model.decoder_embed_dim=32"):
        make_model(target="clap", target_dim=24, visible_prediction="encoder", decoder_embed_dim=16)
    with pytest.raises(ValueError, match="visible_prediction=encoder needs model.target=clap"):
        make_model(target="pixel", visible_prediction="encoder")
    # decoder mode takes any width (the pixel variants: a 512-wide decoder on the 768-wide ViT-B)
    assert make_model(target="clap", target_dim=24, decoder_embed_dim=16).head[0].in_features == 16


# ----------------------------------------------------------------------------- model.encoder_init


def _export(tmp_path, seed=5, name="enc.safetensors", **kw):
    """An encoder export of the model_cfg() encoder (32 wide, 2 blocks, 256 frames) with random weights."""
    from mam_clap_plugin.checkpoint import save_encoder

    torch.manual_seed(seed)
    config = dict(embed_dim=D, depth=2, num_heads=HEADS, mlp_ratio=4.0, max_frames=256, **kw)
    encoder = AudioEncoder(**config)
    with torch.no_grad():
        encoder.pos_embed.normal_()  # an imported table, not the recomputed sin-cos
    path = str(tmp_path / name)
    save_encoder(path, encoder, config, 0.0, 1.0, "0,1", 256, "test")
    return path, encoder


def test_init_encoder_loads_strictly_and_keeps_fresh_decoder(tmp_path):
    path, encoder = _export(tmp_path)
    fresh = make_model(seed=1, target="clap", target_dim=24, classification_branch=True, num_classes=5)
    model = make_model(seed=1, target="clap", target_dim=24, classification_branch=True, num_classes=5)
    model.init_encoder(path)
    for k, v in encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    for part in ("decoder", "head", "classifier"):
        for (k, a), b in zip(getattr(model, part).state_dict().items(), getattr(fresh, part).state_dict().values()):
            assert torch.equal(a, b), f"{part}.{k}"


def test_init_encoder_refuses_another_architecture(tmp_path):
    path, _ = _export(tmp_path)
    model = make_model(encoder_layers=3, max_frames=128)
    with pytest.raises(ValueError, match=r"model.encoder_init=.*enc.safetensors.*model.encoder_layers=3 but the "
                                         r"file's encoder has 2; model.max_frames=128 but the file's encoder has 256"):
        model.init_encoder(path)
    headless, _ = _export(tmp_path, name="ft.safetensors", final_norm=False)
    with pytest.raises(ValueError, match="no final LayerNorm"):
        make_model().init_encoder(headless)


def test_task_applies_encoder_init_to_new_runs_only(tmp_path):
    """A new run's build_model loads model.encoder_init; a model rebuilt from a checkpoint
    (from_checkpoint=True, as load_model_ensemble_and_task does) never reads the file."""
    path, encoder = _export(tmp_path)  # trained on fbanks normalised with mean 0, std 1
    with pytest.raises(ValueError, match=r"normalised with mean 0.0, std 1.0, but task.norm_stats=audioset gives "
                                         r"mean -4.2677393, std 4.5689974: set task.norm_stats=0.0,1.0"):
        StubTask().build_model(_yaml_cfg(target="clap", encoder_init=path))
    task = StubTask(target_dim=24, num_classes=7, norm_stats="0,1")
    model = task.build_model(_yaml_cfg(target="clap", encoder_init=path))
    assert torch.equal(model.encoder.pos_embed, encoder.pos_embed)
    gone = str(tmp_path / "moved_away.safetensors")
    rebuilt = task.build_model(_yaml_cfg(target="clap", encoder_init=gone), from_checkpoint=True)
    assert not torch.equal(rebuilt.encoder.pos_embed, encoder.pos_embed)
    with pytest.raises(Exception, match="moved_away.safetensors"):
        task.build_model(_yaml_cfg(target="clap", encoder_init=gone))


def test_encoder_fields_map_every_encoder_config_field():
    """The one field -> argument map covers EncoderConfig's fields, in order, and builds the encoder they describe."""
    from mam_clap_plugin.models.encoder_config import ARCHITECTURE
    from mam_clap_plugin.modules.encoder import MODEL_CONFIG_FIELDS

    assert tuple(MODEL_CONFIG_FIELDS) == ARCHITECTURE
    cfg = model_cfg(max_frames=128)
    enc = AudioEncoder.from_model_config(cfg)
    assert {arg: enc.config[arg] for arg in MODEL_CONFIG_FIELDS.values()} == {
        arg: getattr(cfg, name) for name, arg in MODEL_CONFIG_FIELDS.items()}
