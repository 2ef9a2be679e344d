"""Fine-tuning throughput: the ViT-B classifier's training step and evaluate.py's scoring.

    .venv/bin/python -m benchmarks.bench_finetune --out outputs/bench/finetune.json
    .venv/bin/python -m benchmarks.bench_finetune --quick --out /tmp/f.json   # tiny model, for tests

(from the repository root). The model is ``examples/finetuning/config/as20k.yaml``'s
``mam_clap_classifier`` (ViT-B, 527 classes, random weights): a training step on a batch of
8 random 10.24 s fbanks (1024 frames) with the recipe's token masking (0.2 / 0.2), drop_path
and layer-decay groups: forward, BCE on soft targets, backward, and a ``mam_clap_adamw``
step. FLOPs are counted with ``FlopCounterMode`` (CPU flash attention included) and the
achieved rate is compared with the fp32 ``torch.mm`` rate sampled next to the steps.

``evaluate``: ``mam_clap_plugin.inference.evaluate_split`` (what ``evaluate.py`` runs) on
generated 10 s 16 kHz wavs: decode, fbank, normalise, one 1024-frame window per clip,
eval-mode forward, metrics; clips per second.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any, Dict, List, Optional

import fairseq  # noqa: F401  (before the plugin's fairseq components)
import numpy as np
import soundfile as sf
import torch
from omegaconf import OmegaConf

from benchmarks.machine import machine_info
from benchmarks.matmul import step_report, time_step
from benchmarks.measure import log, peak_rss_mib, write_report
from mam_clap_plugin.criterions.mam_clap_classification import classification_loss
from mam_clap_plugin.data.manifest import write_class_list, write_labels, write_manifest
from mam_clap_plugin.hydra_runs import compose_config
from mam_clap_plugin.inference import Classifier, evaluate_split
from mam_clap_plugin.models.mam_clap_classifier import MamClapClassifier, MamClapClassifierConfig
from mam_clap_plugin.modules.encoder import AudioEncoder
from mam_clap_plugin.optim.mam_clap_adamw import MamClapAdamW, MamClapAdamWConfig
from mam_clap_plugin.tasks.mam_clap_finetuning import MamClapFinetuningConfig, MamClapFinetuningTask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "examples", "finetuning", "config")
QUICK = dict(encoder_embed_dim=32, encoder_layers=2, encoder_attention_heads=4)


def recipe(quick: bool) -> Dict[str, Any]:
    """as20k's composed config (model, optimizer, task), tiny sizes with ``quick``."""
    cfg = compose_config(CONFIG_DIR, "as20k", ["task.data=unused"])
    model = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k != "_name"}
    model.update(QUICK if quick else {})
    model["num_classes"] = 527
    return {"model": model, "weight_decay": float(cfg.optimizer.weight_decay), "target_length": cfg.task.target_length,
            "norm_stats": cfg.task.norm_stats}


def build_model(spec: Dict[str, Any]) -> MamClapClassifier:
    torch.manual_seed(0)
    cfg = MamClapClassifierConfig(**spec["model"])
    return MamClapClassifier(cfg, AudioEncoder.from_model_config(cfg))


def bench_step(spec: Dict[str, Any], args) -> Dict[str, Any]:
    model = build_model(spec).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cfg = MamClapAdamWConfig(weight_decay=spec["weight_decay"], adam_betas="(0.9,0.999)", lr=[1e-4])
    opt = MamClapAdamW(opt_cfg, params)
    opt.set_lr(1e-4)
    g = torch.Generator().manual_seed(1)
    source = torch.randn(args.batch_size, 1, spec["target_length"], 128, generator=g)
    target = torch.rand(args.batch_size, spec["model"]["num_classes"], generator=g)

    def step() -> None:
        torch.manual_seed(2)  # the same token masks and drop_path draws every step
        loss = classification_loss(model(source)["logits"], target, "bce")
        opt.zero_grad()
        loss.backward()
        opt.step()

    timed = time_step(step, warmup=args.warmup, steps=args.steps, matmul_size=args.matmul_size,
                      matmul_reps=args.matmul_reps, tag="step")
    t, f = model.encoder.grid(spec["target_length"])
    return {
        "params_m": sum(p.numel() for p in params) / 1e6,
        "batch_size": args.batch_size,
        "tokens": t * f,
        "visible_tokens": int(t * (1 - spec["model"]["mask_t_prob"])) * int(f * (1 - spec["model"]["mask_f_prob"])),
        "param_groups": len(opt.param_groups),
        **step_report(timed, args.batch_size),
    }


def bench_evaluate(spec: Dict[str, Any], args) -> Dict[str, Any]:
    """evaluate_split on ``args.eval_clips`` generated 10 s clips, after one untimed clip."""
    model = build_model(spec).eval()
    names = [f"class{i}" for i in range(spec["model"]["num_classes"])]
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        n = 160000
        wavs = []
        for i in range(args.eval_clips + 1):
            wavs.append(f"clip{i}.wav")
            sf.write(os.path.join(root, wavs[-1]), (0.1 * rng.standard_normal(n)).astype(np.float32), 16000)
        for split, files in (("warm", wavs[:1]), ("eval", wavs[1:])):
            write_manifest(os.path.join(root, f"{split}.tsv"), root, files, [n] * len(files))
            write_labels(os.path.join(root, f"{split}.lbl"), [[i % len(names)] for i in range(len(files))])
        write_class_list(os.path.join(root, "classes.txt"), names)
        task = MamClapFinetuningTask(OmegaConf.structured(MamClapFinetuningConfig(
            data=root, target_length=spec["target_length"], norm_stats=spec["norm_stats"])), from_checkpoint=True)
        task.state.merge_state_dict({"class_names": names})
        clf = Classifier(model, task, "bce")
        evaluate_split(clf, root, "warm", progress=False)
        t0 = time.perf_counter()
        report = evaluate_split(clf, root, "eval", progress=False)
        seconds = time.perf_counter() - t0
    return {"clips": report["num_clips"], "clip_seconds": 10.0, "seconds": seconds,
            "clips_per_s": report["num_clips"] / seconds}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/bench/finetune.json")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps (tests)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--eval-clips", type=int, default=32)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--matmul-reps", type=int, default=6)
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.steps, args.eval_clips, args.matmul_size, args.matmul_reps = 1, 2, 3, 256, 2
    spec = recipe(args.quick)
    log(f"fine-tuning benchmark: {'quick' if args.quick else 'ViT-B'}, batch {args.batch_size}, "
        f"{spec['target_length']} frames, {torch.get_num_threads()} threads")
    report = {"machine": machine_info(), "model": spec["model"], "step": bench_step(spec, args),
              "evaluate": bench_evaluate(spec, args), "peak_rss_mib": peak_rss_mib()}
    s, e = report["step"], report["evaluate"]
    log(f"training step (batch {s['batch_size']}, {s['visible_tokens']}/{s['tokens']} tokens): {s['step_ms']:.0f} ms, "
        f"{s['clips_per_s']:.2f} clips/s, {s['gflop_per_step']:.0f} GFLOP, {s['achieved_gflops']:.0f} GFLOP/s = "
        f"{s['pct_of_matmul']:.0f}% of torch.mm ({s['matmul_gflops']:.0f} GFLOP/s)")
    log(f"evaluate.py scoring: {e['clips_per_s']:.2f} clips/s (10 s clips, {e['clips']} clips)")
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
