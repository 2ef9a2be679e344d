#!/usr/bin/env python
"""Compare s3prl upstreams on SUPERB keyword spotting (speech_commands): same data, seed and schedule.

For every ``--upstream`` it runs ``upstream/run_downstream.py`` (the s3prl launcher of this
project, as a subprocess) twice: ``-m train``, then ``-m evaluate -e <expdir>/dev-best.ckpt``
(the newest ``states-*.ckpt`` if no dev evaluation ever improved on 0) on the test root,
and reads the test accuracy that s3prl prints (``test acc: X``; it also appends
``test at step 0: X`` to ``<expdir>/log.log``). Writes to ``--out-dir``::

    compare.md      table: test accuracy, best dev accuracy, times, settings
    compare.json    the same, machine-readable (accuracies in %)
    compare.png     bar chart of the test accuracies (matplotlib, Agg)
    runs/<label>/   each run's s3prl expdir, with train.log and evaluate.log

Example (a short CPU schedule on the demo keyword set)::

    python examples/prepare/make_demo_keywords.py outputs/ks_data --seed 0
    python examples/superb/compare_upstreams.py --data outputs/ks_data --out-dir outputs/ks_compare \\
        --upstream supmam_clap_local:outputs/demo/supmam/checkpoints/checkpoint_last.pt \\
        --upstream fbank --upstream fbank_no_cmvn \\
        --device cpu --threads 1 --total-steps 400 --eval-step 100 --lr 1e-3 --num-workers 0

``--upstream`` is ``[LABEL=]NAME[:CKPT]``: an s3prl hub name (``fbank``, ``hubert``, ...
or this project's ``supmam_clap_local``) and, for ``*_local`` entries, the checkpoint
(``-k``). Without schedule options the SUPERB values of ``upstream/config/speech_commands.yaml``
apply (200k steps); the options become ``-o config....`` overrides. During training only
the dev split is evaluated (``config.runner.eval_dataloaders=['dev']``); test once at the end.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(REPO, "upstream", "run_downstream.py")
DEFAULT_CONFIG = os.path.join(REPO, "upstream", "config", "speech_commands.yaml")
NUM_CLASSES = 12

_ACC = re.compile(r"(train|dev|test) acc: ([0-9.eE+-]+)")
_DEV_LOG = re.compile(r"^dev at step (\d+): ([0-9.eE+-]+)")
_LABEL_OK = re.compile(r"^[A-Za-z0-9_.+-]+$")


def parse_upstream(spec: str) -> Dict[str, Optional[str]]:
    """``[LABEL=]NAME[:CKPT]`` -> ``{"label", "name", "ckpt"}`` (ckpt made absolute)."""
    label = None
    if "=" in spec.split(":", 1)[0]:
        label, spec = spec.split("=", 1)
    name, _, ckpt = spec.partition(":")
    if not name:
        raise ValueError(f"bad --upstream {spec!r}: expected [LABEL=]NAME[:CKPT]")
    label = label or name
    if not _LABEL_OK.match(label):
        raise ValueError(f"bad label {label!r}: use letters, digits, '_', '.', '+', '-'")
    if ckpt:
        if not os.path.exists(ckpt):
            raise ValueError(f"checkpoint of --upstream {name} not found: {ckpt}")
        ckpt = os.path.abspath(ckpt)
    return {"label": label, "name": name, "ckpt": ckpt or None}


def schedule_overrides(args) -> List[str]:
    """The ``-o`` items shared by every run (data roots, schedule, batch, lr, workers)."""
    items = [
        f"config.downstream_expert.datarc.speech_commands_root={args.train_root}",
        f"config.downstream_expert.datarc.speech_commands_test_root={args.test_root}",
        "config.runner.eval_dataloaders=['dev']",
    ]
    if args.total_steps is not None:
        items.append(f"config.runner.total_steps={args.total_steps}")
        # keep a final states-N.ckpt (the fallback when no dev evaluation improves)
        items.append(f"config.runner.save_step={args.save_step or args.total_steps}")
    elif args.save_step is not None:
        items.append(f"config.runner.save_step={args.save_step}")
    if args.eval_step is not None:
        items.append(f"config.runner.eval_step={args.eval_step}")
        items.append(f"config.runner.log_step={min(100, args.eval_step)}")
    if args.batch_size is not None:
        items.append(f"config.downstream_expert.datarc.batch_size={args.batch_size}")
    if args.num_workers is not None:
        items.append(f"config.downstream_expert.datarc.num_workers={args.num_workers}")
    if args.lr is not None:
        items.append(f"config.optimizer.lr={args.lr}")
    if args.override:
        items.extend(o for o in args.override.split(",,") if o.strip())
    bad = [o for o in items if o.count("=") != 1 or ",," in o]
    if bad:
        raise ValueError(f"override items must hold exactly one '=' and no ',,' (s3prl's syntax): {bad}")
    return items


def _run(cmd: List[str], log_path: str, env: dict, tag: str, echo: bool) -> tuple:
    """Run ``cmd``; full output to ``log_path``; relay s3prl's accuracy lines. Returns
    (returncode, text, seconds)."""
    start = time.time()
    lines = []
    with open(log_path, "w") as log, subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        log.write("$ " + " ".join(cmd) + "\n")
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            if echo:
                sys.stdout.write(line)
            else:
                for split, value in _ACC.findall(line):
                    print(f"    {tag} {time.time() - start:6.0f}s  {split} acc {100 * float(value):.2f}%", flush=True)
    return proc.returncode, "".join(lines), time.time() - start


def _fail(what: str, log_path: str, text: str) -> str:
    tail = "\n".join(line.rstrip()[-300:] for line in text.splitlines()[-25:])
    return f"{what} failed; log {log_path}:\n{tail}"


def dev_history(expdir: str) -> List[List[float]]:
    """``[[step, dev acc %], ...]`` from ``<expdir>/log.log``."""
    path = os.path.join(expdir, "log.log")
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                m = _DEV_LOG.match(line.strip())
                if m:
                    out.append([int(m.group(1)), round(100 * float(m.group(2)), 2)])
    return out


def eval_checkpoint(expdir: str) -> Optional[str]:
    """``dev-best.ckpt`` if present, else the newest ``states-*.ckpt``."""
    best = os.path.join(expdir, "dev-best.ckpt")
    if os.path.exists(best):
        return best
    states = sorted(glob.glob(os.path.join(expdir, "states-*.ckpt")),
                    key=lambda p: int(re.findall(r"states-(\d+)\.ckpt$", p)[0]))
    return states[-1] if states else None


def run_one(up: Dict, index: int, total: int, args, overrides: List[str], env: dict) -> Dict:
    label = up["label"]
    expdir = os.path.join(args.out_dir, "runs", label)
    if os.path.isdir(expdir):  # never evaluate a stale checkpoint of an earlier run
        shutil.rmtree(expdir)
    os.makedirs(expdir)
    result = {"upstream": up["name"], "ckpt": up["ckpt"], "expdir": expdir}
    tag = f"[{index}/{total}] {label}"

    train_cmd = [sys.executable, LAUNCHER, "-m", "train", "-d", "speech_commands", "-c", args.config,
                 "-u", up["name"], *(["-k", up["ckpt"]] if up["ckpt"] else []), "-p", expdir,
                 "--device", args.device, "--seed", str(args.seed), "-o", ",,".join(overrides)]
    print(f"{tag}: train ({up['name']}{' ' + up['ckpt'] if up['ckpt'] else ''}) -> {expdir}", flush=True)
    code, text, secs = _run(train_cmd, os.path.join(expdir, "train.log"), env, tag, args.verbose)
    result["train_seconds"] = round(secs, 1)
    result["train_cmd"] = train_cmd
    if code != 0:
        result["error"] = _fail(f"{label} training", os.path.join(expdir, "train.log"), text)
        print(result["error"], file=sys.stderr, flush=True)
        return result
    history = dev_history(expdir)
    result["dev_history"] = history
    if history:
        best = max(history, key=lambda h: h[1])  # first step with the best value, as s3prl keeps it
        result["dev_best_acc"], result["dev_best_step"] = best[1], best[0]

    ckpt = eval_checkpoint(expdir)
    if ckpt is None:
        result["error"] = f"{label}: no dev-best.ckpt or states-*.ckpt in {expdir}"
        print(result["error"], file=sys.stderr, flush=True)
        return result
    result["eval_ckpt"] = ckpt
    eval_cmd = [sys.executable, LAUNCHER, "-m", "evaluate", "-e", ckpt, "-t", "test", "--device", args.device]
    print(f"{tag}: evaluate {os.path.basename(ckpt)} on test ({secs:.0f} s of training)", flush=True)
    code, text, secs = _run(eval_cmd, os.path.join(expdir, "evaluate.log"), env, tag, args.verbose)
    result["eval_seconds"] = round(secs, 1)
    result["eval_cmd"] = eval_cmd
    accs = [float(v) for split, v in _ACC.findall(text) if split == "test"]
    if code != 0 or not accs:
        result["error"] = _fail(f"{label} evaluation", os.path.join(expdir, "evaluate.log"), text)
        print(result["error"], file=sys.stderr, flush=True)
        return result
    result["test_acc"] = round(100 * accs[-1], 2)
    print(f"{tag}: test acc {result['test_acc']:.2f}% (best dev {result.get('dev_best_acc', float('nan')):.2f}% "
          f"at step {result.get('dev_best_step')}; train {result['train_seconds']:.0f} s, "
          f"evaluate {result['eval_seconds']:.0f} s)", flush=True)
    return result


def write_markdown(path: str, summary: Dict) -> None:
    s = summary["settings"]
    lines = [
        "# SUPERB keyword spotting (speech_commands): upstream comparison",
        "",
        f"Train root `{s['train_root']}`, test root `{s['test_root']}`; seed {s['seed']}, device {s['device']}; "
        f"overrides `{',,'.join(s['overrides'][2:]) or 'none'}` on `{os.path.relpath(s['config'], REPO)}`.",
        "Test accuracy of the checkpoint with the best dev accuracy (`dev-best.ckpt`; the last `states-*.ckpt` "
        "if no dev evaluation beat 0); 12 classes, uniform chance 8.33%.",
        "",
        "| upstream | checkpoint | test acc (%) | best dev acc (%) | at step | evaluated | train (s) | evaluate (s) |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for label, r in summary["results"].items():
        fmt = lambda v: "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
        test = fmt(r.get("test_acc")) if "error" not in r else "failed"
        lines.append(f"| {label} | {os.path.basename(r['ckpt']) if r.get('ckpt') else '-'} | {test} | "
                     f"{fmt(r.get('dev_best_acc'))} | {fmt(r.get('dev_best_step'))} | "
                     f"{os.path.basename(r['eval_ckpt']) if r.get('eval_ckpt') else '-'} | "
                     f"{fmt(r.get('train_seconds'))} | {fmt(r.get('eval_seconds'))} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_chart(path: str, summary: Dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(summary["results"])
    values = [summary["results"][k].get("test_acc") or 0.0 for k in labels]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(labels) + 1.5), 3.6), dpi=120)
    bars = ax.bar(labels, values, color=[f"C{i}" for i in range(len(labels))])
    for bar, label in zip(bars, labels):
        r = summary["results"][label]
        text = "failed" if "error" in r else f"{r['test_acc']:.1f}"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    xytext=(0, 2), textcoords="offset points", fontsize=9)
    ax.axhline(100.0 / NUM_CLASSES, color="grey", linestyle="--", linewidth=1, label="chance (1/12)")
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("SUPERB KS (speech_commands)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--upstream", action="append", required=True, metavar="[LABEL=]NAME[:CKPT]",
                   help="an upstream to compare (repeat the option)")
    p.add_argument("--data", help="folder with train/ and test/ (make_demo_keywords.py, speech_commands_s3prl.py)")
    p.add_argument("--train-root", help="speech_commands_root (default DATA/train)")
    p.add_argument("--test-root", help="speech_commands_test_root (default DATA/test)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="s3prl downstream config (-c)")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=1337, help="s3prl's --seed (same for every upstream)")
    p.add_argument("--total-steps", type=int, help="config.runner.total_steps")
    p.add_argument("--eval-step", type=int, help="config.runner.eval_step (dev evaluation interval)")
    p.add_argument("--save-step", type=int, help="config.runner.save_step (default: --total-steps)")
    p.add_argument("--batch-size", type=int, help="config.downstream_expert.datarc.batch_size")
    p.add_argument("--num-workers", type=int, help="config.downstream_expert.datarc.num_workers")
    p.add_argument("--lr", type=float, help="config.optimizer.lr")
    p.add_argument("--override", help="more s3prl -o items, ',,'-separated")
    p.add_argument("--threads", type=int, help="OMP/MKL threads of each run (1 is fastest on small CPUs)")
    p.add_argument("--verbose", action="store_true", help="echo the full s3prl output")
    args = p.parse_args(argv)
    if args.data:
        args.train_root = args.train_root or os.path.join(args.data, "train")
        args.test_root = args.test_root or os.path.join(args.data, "test")
    if not (args.train_root and args.test_root):
        p.error("give --data or both --train-root and --test-root")
    for name in ("train_root", "test_root", "out_dir", "config"):
        setattr(args, name, os.path.abspath(getattr(args, name)))
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        args.upstreams = [parse_upstream(s) for s in args.upstream]
    except ValueError as exc:
        p.error(str(exc))
    labels = [u["label"] for u in args.upstreams]
    for i, u in enumerate(args.upstreams):  # fbank, fbank -> fbank, fbank_2
        if labels.count(u["label"]) > 1 and labels.index(u["label"]) != i:
            u["label"] = f"{u['label']}_{labels[:i + 1].count(u['label'])}"
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        overrides = schedule_overrides(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env.update({k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    start = time.time()
    results = {}
    for i, up in enumerate(args.upstreams, 1):
        results[up["label"]] = run_one(up, i, len(args.upstreams), args, overrides, env)
    summary = {
        "task": "SUPERB KS (s3prl speech_commands), test accuracy in %",
        "settings": {"train_root": args.train_root, "test_root": args.test_root, "config": args.config,
                     "device": args.device, "seed": args.seed, "threads": args.threads, "overrides": overrides},
        "results": results,
        "seconds": round(time.time() - start, 1),
    }
    paths = {k: os.path.join(args.out_dir, f"compare.{k}") for k in ("md", "json", "png")}
    summary["files"] = paths
    with open(paths["json"], "w") as f:
        json.dump(summary, f, indent=2)
    write_markdown(paths["md"], summary)
    write_chart(paths["png"], summary)
    print(open(paths["md"]).read())
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']} ({summary['seconds']:.0f} s)")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
