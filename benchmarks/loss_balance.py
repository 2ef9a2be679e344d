"""How eq. 1's reduction and lambda_cls share the encoder's gradient, at initialisation.

    python -m benchmarks.loss_balance --out outputs/bench/loss_balance.json
    python -m benchmarks.loss_balance --size tiny --out /tmp/loss_balance.json   # smoke run, seconds

For every pretraining variant, built from its composed config (``base.yaml`` + the variant,
plus ``size/<SIZE>.yaml`` with ``--size``) exactly as ``benchmarks/student_step.py`` builds it,
and for the CLAP variants once per ``criterion.clap_loss`` choice: one forward pass of a
freshly initialised model (train mode, fixed seeds) on a batch of random normalised fbanks
(``--batch-size`` x 1 x ``task.target_length`` x 128), LayerNorm'd random teacher tokens of
LAION-CLAP HTSAT-tiny's width (768) and random multi-hot labels over AudioSet's 527 classes.

Reported per row:

* each term's value: ``loss_vis`` and ``loss_mask`` (eq. 1, CLAP target) or ``loss_rec``
  (pixel target), ``L_target`` (their sum), ``loss_cls`` (eq. 2, unweighted) and
  ``lambda_cls * loss_cls``;
* the L2 norm, over all encoder parameters, of the gradient of each *weighted* term alone
  (``g_vis``, ``g_mask``, ``g_target = g_vis + g_mask`` or ``g_rec``, ``g_cls`` of
  ``lambda_cls * L_cls``);
* ``cls / target``: ``||g_cls|| / ||g_target||``, the classification branch's gradient on the
  shared encoder relative to the target loss's (a ratio, not a share of the total); with
  AdamW the loss's absolute scale does not matter, this ratio does.

The masks and the model's weights are the same for every ``clap_loss`` choice of a variant
(one forward pass, the losses computed from its output). Prints a markdown table and writes
the JSON report (``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from benchmarks.machine import git_commit, machine_info
from benchmarks.measure import log, write_report
from benchmarks.student_step import NUM_CLASSES, TEACHER_DIM, VARIANTS, load_variant, make_batch
from mam_clap_plugin.criterions.supmam_clap import (
    CLAP_LOSSES,
    clap_target_loss,
    reconstruction_loss,
    soft_cross_entropy,
)
from mam_clap_plugin.models.supmam_clap import SupMamClapConfig, SupMamClapModel

REPO = Path(__file__).resolve().parents[1]


def grads(term: torch.Tensor, params: List[torch.Tensor]) -> List[torch.Tensor]:
    """d(term)/d(params), zeros for unused ones (the graph is kept for the next term)."""
    out = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(out, params)]


def norm(vectors: List[torch.Tensor]) -> float:
    return float(torch.sqrt(sum(v.float().pow(2).sum() for v in vectors)))


def balance_variant(name: str, spec: Dict[str, Any], batch_size: int, seed: int) -> List[Dict[str, Any]]:
    """Rows for one variant: one per clap_loss choice (CLAP target) or one (pixel target)."""
    torch.manual_seed(seed)
    model = SupMamClapModel(SupMamClapConfig(**spec["model"])).train()
    crit = spec["criterion"]
    lam, tau = float(crit.get("lambda_cls", 0.0)), float(crit.get("tau", 1.0))
    frames = spec["target_length"]
    t, f = model.encoder.grid(frames)
    sample = make_batch(batch_size, frames, t * f, torch.Generator().manual_seed(seed + 1))
    sample["target"] = F.layer_norm(sample["target"], (TEACHER_DIM,))  # LayerNorm'd teacher tokens
    torch.manual_seed(seed + 2)  # the masks
    out = model(**sample["net_input"])
    params = [p for p in model.encoder.parameters() if p.requires_grad]

    cls_value, g_cls = None, None
    if out["logits"] is not None and lam > 0:
        loss_cls = soft_cross_entropy(out["logits"], sample["label"], tau)
        cls_value = float(loss_cls.detach())
        g_cls = norm(grads(lam * loss_cls, params))

    base = {"variant": name, "lambda_cls": lam, "mask_ratio": float(model.cfg.mask_ratio),
            "visible_prediction": str(model.cfg.visible_prediction), "decoder_block": str(model.cfg.decoder_block),
            "decoder_layers": int(model.cfg.decoder_layers), "decoder_embed_dim": int(model.cfg.decoder_embed_dim),
            "loss_cls": cls_value, "weighted_loss_cls": None if cls_value is None else lam * cls_value,
            "g_cls": g_cls}
    rows = []
    if model.cfg.target == "clap":
        for kind in CLAP_LOSSES:
            loss_vis, loss_mask = clap_target_loss(out["pred"], sample["target"], out["mask"], kind=kind)
            gv, gm = grads(loss_vis, params), grads(loss_mask, params)
            g_target = norm([a + b for a, b in zip(gv, gm)])
            rows.append({**base, "clap_loss": kind, "loss_vis": float(loss_vis.detach()),
                         "loss_mask": float(loss_mask.detach()), "L_target": float((loss_vis + loss_mask).detach()),
                         "g_vis": norm(gv), "g_mask": norm(gm), "g_target": g_target,
                         "cls_over_target": None if g_cls is None else g_cls / g_target,
                         "default": kind == crit.get("clap_loss")})
    else:
        loss_rec = reconstruction_loss(out["pred"], out["patches"], out["mask"], bool(crit.get("norm_pix_loss", True)))
        g_target = norm(grads(loss_rec, params))
        rows.append({**base, "clap_loss": None, "loss_rec": float(loss_rec.detach()),
                     "L_target": float(loss_rec.detach()), "g_target": g_target,
                     "cls_over_target": None if g_cls is None else g_cls / g_target, "default": True})
    return rows


def fmt(value: Optional[float]) -> str:
    """Three significant figures: 1.6e-05, 0.0133, 4.01, 78.3, 3,075."""
    if value is None:
        return "-"
    if value != 0 and abs(value) < 1e-2:
        return f"{value:.1e}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    lines = [
        "| variant | eq. 1 reduction (`criterion.clap_loss`) | lambda_cls | L_target at init (vis + mask) "
        "| L_cls | ‖g_vis‖ / ‖g_mask‖ | cls / target gradient on the encoder |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kind = "pixel MSE (masked patches)" if r["clap_loss"] is None else f"`{r['clap_loss']}`"
        if r["default"] and r["clap_loss"] is not None:
            kind += " (default)"
        target = fmt(r["L_target"])
        if r["clap_loss"] is not None:
            target += f" ({fmt(r['loss_vis'])} + {fmt(r['loss_mask'])})"
        vm = "-" if r["clap_loss"] is None else fmt(r["g_vis"] / r["g_mask"])
        ratio = fmt(r["cls_over_target"])
        if r["cls_over_target"] is not None and r["default"]:
            ratio = f"**{ratio}**"
        lines.append(f"| {r['variant']} | {kind} | {r['lambda_cls']:g} | {target} | {fmt(r['loss_cls'])} "
                     f"| {vm} | {ratio} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--size", default=None, help="apply examples/pretraining/config/size/<SIZE>.yaml (e.g. tiny); "
                                                "default: the paper's ViT-B")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--out", default="outputs/bench/loss_balance.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    for name in args.variants:
        spec = load_variant(name, args.size)
        t0 = time.perf_counter()
        rows += balance_variant(name, spec, args.batch_size, args.seed)
        log(f"[{name}] {time.perf_counter() - t0:.1f} s")
    report = {
        "command": "python -m benchmarks.loss_balance " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "config": {"size": args.size or "paper (ViT-B)", "batch_size": args.batch_size, "seed": args.seed,
                   "teacher_target_dim": TEACHER_DIM, "num_classes": NUM_CLASSES,
                   "ratio": "cls_over_target = ||g_cls|| / ||g_target||: gradient norms over the encoder's "
                            "parameters of lambda_cls * L_cls and of L_target alone, at initialisation"},
        "machine": machine_info(),
        "rows": rows,
        "wall_s": time.perf_counter() - start,
    }
    table = markdown_table(rows)
    report["table"] = table
    print(table, flush=True)
    write_report(report, args.out)
    log(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
