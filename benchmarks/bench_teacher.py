"""Training step of the caption CLAP teacher (``examples/teacher``) at the paper size and ``+size=tiny``.

    .venv/bin/python -m benchmarks.bench_teacher --out outputs/bench/teacher.json
    .venv/bin/python -m benchmarks.bench_teacher --quick --out /tmp/t.json   # tiny size only, 1 step (tests)

(from the repository root). Each size's model is ``examples/teacher/config/clap.yaml`` composed
as ``fairseq-hydra-train`` composes it (``paper``: HTSAT-tiny, 48 kHz, 10 s clips, a 6-block
512-wide text transformer; ``tiny``: ``+size=tiny``), with a sentencepiece tokenizer trained on
generated captions. One step on a batch of random 10 s waveforms (``model.clip_seconds``) and
generated captions: ``clap_infonce`` forward (both towers, tokenising included) + backward +
a fused AdamW step with the config's settings. FLOPs are counted with ``FlopCounterMode`` on
the first warm-up step (the frozen STFT and mel projection included); the achieved rate is
compared with the fp32 ``torch.mm`` rate sampled before and between the timed steps, as
``benchmarks/student_step.py`` does. Reports clips/s and % of that matmul rate per size.
"""
from __future__ import annotations

import argparse
import ast
import os
import tempfile
from typing import Any, Dict, List, Optional

import fairseq  # noqa: F401  (before the plugin's fairseq components)
import sentencepiece
import torch
from omegaconf import OmegaConf

from benchmarks.machine import machine_info
from benchmarks.matmul import step_report, time_step
from benchmarks.measure import log, peak_rss_mib, write_report
from mam_clap_plugin.criterions.clap_infonce import ClapInfoNceConfig, ClapInfoNceCriterion
from mam_clap_plugin.hydra_runs import compose_config
from mam_clap_plugin.models.clap_teacher import ClapTeacherModel
from mam_clap_plugin.optim import param_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "examples", "teacher", "config")
SIZES = {"paper": [], "tiny": ["+size=tiny"]}
WORDS = ("dog", "cat", "rain", "engine", "speech", "music", "bird", "siren", "water", "wind", "door", "bell")


def captions(n: int) -> List[str]:
    """Generated captions of a few words each (label sets through templates)."""
    return [f"the sound of {WORDS[i % len(WORDS)]} and {WORDS[(3 * i + 1) % len(WORDS)]} near a "
            f"{WORDS[(5 * i + 2) % len(WORDS)]}" for i in range(n)]


def tokenizer(vocab_size: int) -> bytes:
    """A sentencepiece model trained on :func:`captions` (the vocabulary they give, at most ``vocab_size``)."""
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "c.txt")
        with open(text, "w") as f:
            f.writelines(c + "\n" for c in captions(500))
        sentencepiece.SentencePieceTrainer.train(input=text, model_prefix=os.path.join(tmp, "spm"),
                                                 vocab_size=vocab_size, hard_vocab_limit=False, minloglevel=2)
        with open(os.path.join(tmp, "spm.model"), "rb") as f:
            return f.read()


def recipe(size: str) -> Dict[str, Any]:
    cfg = compose_config(CONFIG_DIR, "clap", [*SIZES[size], "task.data=unused"])
    betas = cfg.optimizer.adam_betas
    return {"model": OmegaConf.to_container(cfg.model), "lr": float(cfg.optimization.lr[0]),
            "betas": tuple(ast.literal_eval(betas) if isinstance(betas, str) else betas),
            "eps": float(cfg.optimizer.adam_eps), "weight_decay": float(cfg.optimizer.weight_decay)}


def bench_size(size: str, args, spm: bytes) -> Dict[str, Any]:
    spec = recipe(size)
    cfg = {**spec["model"], "vocab_size": sentencepiece.SentencePieceProcessor(model_proto=spm).get_piece_size()}
    torch.manual_seed(0)
    model = ClapTeacherModel.from_config_dict(cfg, spm).train()
    criterion = ClapInfoNceCriterion(ClapInfoNceConfig(), task=None).train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{k: v for k, v in g.items() if k not in ("indices", "lr_scale")} for g in
              param_groups(params, spec["weight_decay"])]
    opt = torch.optim.AdamW(groups, lr=spec["lr"], betas=spec["betas"], eps=spec["eps"], fused=True)
    g = torch.Generator().manual_seed(1)
    wav = 0.1 * torch.randn(args.batch_size, model.num_samples, generator=g)
    sample = {"id": torch.arange(args.batch_size), "nsentences": args.batch_size,
              "net_input": {"wav": wav, "captions": captions(args.batch_size)}}

    def step() -> None:
        loss, _, _ = criterion(model, sample)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    timed = time_step(step, warmup=args.warmup, steps=args.steps, matmul_size=args.matmul_size,
                      matmul_reps=args.matmul_reps, tag=size)
    return {
        "config": f"examples/teacher/config/clap.yaml {' '.join(SIZES[size])}".strip(),
        "audio": {k: cfg[k] for k in ("audio_embed_dim", "audio_depths", "audio_num_heads", "audio_patch_size",
                                      "sample_rate", "clip_seconds")},
        "text": {k: cfg[k] for k in ("text_embed_dim", "text_layers", "vocab_size", "max_text_tokens")},
        "params_m": sum(p.numel() for p in params) / 1e6,
        "batch_size": args.batch_size,
        **step_report(timed, args.batch_size),
    }


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/bench/teacher.json")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--quick", action="store_true", help="tiny size, batch 4, one step (tests)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first; the first counts FLOPs")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=1000, help="tokenizer vocabulary (at most; generated captions)")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--matmul-reps", type=int, default=6)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.batch_size, args.steps, args.matmul_size, args.matmul_reps = ["tiny"], 4, 1, 256, 2
    spm = tokenizer(args.vocab_size)
    log(f"caption teacher training step: sizes {args.sizes}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads")
    report = {"machine": machine_info(), "sizes": {}}
    for size in args.sizes:
        report["sizes"][size] = r = bench_size(size, args, spm)
        log(f"[{size}] {r['params_m']:.1f} M params: {r['step_ms']:.0f} ms/step, {r['clips_per_s']:.2f} clips/s, "
            f"{r['gflop_per_clip']:.2f} GFLOP/clip, {r['achieved_gflops']:.1f} GFLOP/s = {r['pct_of_matmul']:.0f}% of "
            f"torch.mm ({r['matmul_gflops']:.0f} GFLOP/s)")
    report["peak_rss_mib"] = peak_rss_mib()
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
