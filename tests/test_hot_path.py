"""Per-step work that is built once: the decoder's window masks and the alignment index.

The window masks (boolean for the ViT block, the additive float one for the Swin V2 block, see
tests/test_model.py) and the alignment index on the teacher's device are cached per device,
grid and batch size."""
import pytest
import torch

from mam_clap_plugin.data.alignment import align_tokens, alignment
from mam_clap_plugin.modules.decoder import WindowBlock, batched_window_mask, shifted_window_mask


def test_batched_window_mask_is_built_once_per_batch_size():
    a = batched_window_mask(8, 8, (4, 4), (2, 0), 3, torch.device("cpu"))
    assert a is batched_window_mask(8, 8, (4, 4), (2, 0), 3, torch.device("cpu"))
    base = shifted_window_mask(8, 8, (4, 4), (2, 0), torch.device("cpu"))
    assert a.shape == (3 * base.shape[0], *base.shape[1:])
    for b in range(3):  # window_partition's layout: clip-major
        assert torch.equal(a[b * base.shape[0]:(b + 1) * base.shape[0]], base)


@pytest.mark.parametrize("kind", ["swinv2", "vit"])
def test_window_block_reuses_the_mask(monkeypatch, kind):
    block = WindowBlock(16, 2, (4, 4), (2, 0), 2.0, block=kind)
    x = torch.randn(2, 8, 8, 16)
    y = block(x)
    calls = []
    monkeypatch.setattr(torch.Tensor, "repeat", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(torch.Tensor, "expand", lambda *a, **k: calls.append(1))
    assert torch.equal(block(x), y) and calls == []


def test_align_tokens_copies_the_index_once_per_device(monkeypatch):
    align = alignment(2, 32, 10.0, [50.0, 2229.63, 14000.0], 8)
    cpu_map = torch.randn(3, 2, 32, 5)
    expected = align_tokens(cpu_map, align)
    assert torch.equal(expected[1, 9], cpu_map[1, 0, 0])  # token 9 = time patch 1 (0.24 s: cell 0), row 1 (band 0)
    assert torch.equal(expected[1, 8 * 7 + 7], cpu_map[1, 1, 3])  # time patch 7 (1.2 s: cell 3), row 7 (band 1)
    meta_map = cpu_map.to("meta")  # a second device, without an accelerator
    copies = []
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append(a) or to(self, *a, **k))
    for _ in range(3):
        out = align_tokens(meta_map, align)
        assert out.device.type == "meta" and out.shape == expected.shape
    assert len(copies) <= 1
