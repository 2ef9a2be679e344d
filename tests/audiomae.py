"""Random state dicts in AudioMAE's released key layout (encoder, pretraining decoder, the
fine-tuned head, the training script's saved dict) and a reference forward pass written from a
checkpoint's tensors alone with plain torch ops (conv patch embedding, + positions, cls, pre-norm
blocks with qkv attention and a GELU MLP, final norm). No AudioMAE code is used (its code is
CC BY-NC)."""
import argparse

import torch
import torch.nn.functional as F

BLOCK_KEYS = [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
              for p in ("weight", "bias")]


def audiomae_encoder(dim, depth, positions=513, seed=0):
    """An encoder state dict in AudioMAE's key layout with random values (LayerNorm
    weights near 1; a random, non-sin-cos position table so that a recomputed one shows)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, mean=0.0, std=0.02):
        return mean + std * torch.randn(*shape, generator=g)

    sd = {"cls_token": rnd(1, 1, dim), "pos_embed": rnd(1, positions, dim, std=0.5),
          "patch_embed.proj.weight": rnd(dim, 1, 16, 16, std=0.05), "patch_embed.proj.bias": rnd(dim)}
    hidden = 4 * dim
    shapes = {"norm1": (dim,), "attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim), "norm2": (dim,),
              "mlp.fc1": (hidden, dim), "mlp.fc2": (dim, hidden)}
    for i in range(depth):
        for key in BLOCK_KEYS:
            module, param = key.rsplit(".", 1)
            shape = shapes[module] if param == "weight" else shapes[module][:1]
            if module.startswith("norm"):
                sd[f"blocks.{i}.{key}"] = rnd(*shape, mean=1.0 if param == "weight" else 0.0, std=0.1)
            else:
                sd[f"blocks.{i}.{key}"] = rnd(*shape)
    sd["norm.weight"], sd["norm.bias"] = rnd(dim, mean=1.0, std=0.1), rnd(dim, std=0.1)
    return sd


def decoder_keys(dim, dec=512, positions=513):
    """AudioMAE's pretraining-only tensors (mask token, decoder embedding, one decoder block,
    norm and pixel prediction), zeros: they are dropped."""
    sd = {"mask_token": torch.zeros(1, 1, dec), "decoder_pos_embed": torch.zeros(1, positions, dec),
          "decoder_embed.weight": torch.zeros(dec, dim), "decoder_embed.bias": torch.zeros(dec),
          "decoder_norm.weight": torch.ones(dec), "decoder_norm.bias": torch.zeros(dec),
          "decoder_pred.weight": torch.zeros(256, dec), "decoder_pred.bias": torch.zeros(256)}
    for key in BLOCK_KEYS:
        sd[f"decoder_blocks.0.{key}"] = torch.zeros(1)
    return sd


def finetuned(encoder_sd, classes=527, seed=1):
    """The fine-tuned layout: no norm.*, plus fc_norm.* and head.*."""
    g = torch.Generator().manual_seed(seed)
    dim = encoder_sd["cls_token"].shape[-1]
    sd = {k: v for k, v in encoder_sd.items() if not k.startswith("norm.")}
    sd.update({"fc_norm.weight": 1 + 0.1 * torch.randn(dim, generator=g),
               "fc_norm.bias": 0.1 * torch.randn(dim, generator=g),
               "head.weight": 0.02 * torch.randn(classes, dim, generator=g), "head.bias": torch.zeros(classes)})
    return sd


def released(model, **extra):
    """What AudioMAE's training script saves: {'model', 'optimizer', 'epoch', 'scaler', 'args'}."""
    return {"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "epoch": 32,
            "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mae_vit_base_patch16", norm_pix_loss=False),
            **extra}


def reference_forward(sd, fbank, num_heads):
    """Tokens of every layer from the checkpoint's tensors: (B, 1, T, 128) -> list of
    depth + 1 (B, 1 + N, D) tensors and the final output (norm.* if present)."""
    dim = sd["cls_token"].shape[-1]
    x = F.conv2d(fbank, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)  # (B, t * 8, D), time-major
    b, n, _ = x.shape
    x = x + sd["pos_embed"][:, 1:1 + n]
    x = torch.cat([(sd["cls_token"] + sd["pos_embed"][:, :1]).expand(b, -1, -1), x], dim=1)
    layers = [x]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    hd = dim // num_heads
    for i in range(depth):
        p = {k: sd[f"blocks.{i}.{k}"] for k in BLOCK_KEYS}
        h = F.layer_norm(x, (dim,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        qkv = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(b, n + 1, 3, num_heads, hd)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # (B, heads, N+1, hd)
        att = ((q @ k.transpose(-2, -1)) / hd ** 0.5).softmax(dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, n + 1, dim)
        x = x + F.linear(o, p["attn.proj.weight"], p["attn.proj.bias"])
        h = F.layer_norm(x, (dim,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])),
                         p["mlp.fc2.weight"], p["mlp.fc2.bias"])
        layers.append(x)
    out = F.layer_norm(x, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6) if "norm.weight" in sd else x
    return layers, out
