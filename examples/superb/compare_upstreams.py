#!/usr/bin/env python
"""Compare s3prl upstreams on SUPERB keyword spotting (speech_commands): same data, seed and
schedule, with a learning-rate sweep.

For every ``--upstream`` and every learning rate of ``--lrs`` it trains one downstream with
``upstream/run_downstream.py`` (the s3prl launcher of this project, as a subprocess,
``-m train``; only the dev split is evaluated during training) and reads the dev history
s3prl logs (``dev at step N: X`` in ``<expdir>/log.log``). The lr with the best dev accuracy
is chosen (a tie goes to the lr listed first); only that run is evaluated on test
(``-m evaluate -e <expdir>/dev-best.ckpt``, the newest ``states-*.ckpt`` if no dev
evaluation ever improved on 0), so the test set never influences the choice. Writes to
``--out-dir``::

    compare.md      table: chosen lr, test accuracy at the best dev point, best dev accuracy;
                    then every run's best dev accuracy (same seed, same table)
    compare.json    the same, machine-readable (accuracies in %), with times and commands
    compare.png     bar chart of the test accuracies, labelled with the chosen lr
    runs/<label>/lr_<lr>/   each run's s3prl expdir, with train.log (and evaluate.log)

Example (a short CPU schedule on the demo keyword set)::

    python examples/prepare/make_demo_keywords.py outputs/ks_data --seed 0
    python examples/superb/compare_upstreams.py --data outputs/ks_data --out-dir outputs/ks_compare \\
        --upstream supmam_clap_local:outputs/demo/supmam/checkpoints/checkpoint_last.pt \\
        --upstream audiomae=supmam_clap_local:audiomae.safetensors \\
        --upstream fbank --upstream fbank_no_cmvn --lrs 1e-2,1e-3,1e-4 \\
        --device cpu --threads 1 --total-steps 400 --eval-step 100 --num-workers 0

``--upstream`` is ``[LABEL=]NAME[:CKPT]``: an s3prl hub name (``fbank``, ``hubert``, ...
or this project's ``supmam_clap_local``) and, for ``*_local`` entries, the checkpoint
(``-k``: a checkpoint of this plugin, an encoder export or a converted AudioMAE file).
Without ``--lrs``/``--lr`` the config's lr is the only one. Without schedule options the
SUPERB values of ``upstream/config/speech_commands.yaml`` apply (200k steps); the options
become ``-o config....`` overrides.
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
    """The ``-o`` items shared by every run (data roots, schedule, batch, workers); each run
    adds its ``config.optimizer.lr``."""
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


def parse_lrs(text: str) -> List[str]:
    """``"1e-2,1e-3"`` -> ``["1e-2", "1e-3"]`` (positive numbers, no repeats)."""
    lrs = [t.strip() for t in text.split(",") if t.strip()]
    values = []
    for lr in lrs:
        try:
            value = float(lr)
        except ValueError:
            raise ValueError(f"bad learning rate {lr!r} in --lrs {text!r}") from None
        if not value > 0:
            raise ValueError(f"learning rates must be positive, got {lr!r}")
        if value in values:
            raise ValueError(f"learning rate {lr!r} is listed twice in --lrs {text!r}")
        values.append(value)
    if not lrs:
        raise ValueError("--lrs is empty")
    return lrs


def config_lr(config: str) -> str:
    """The ``optimizer.lr`` of an s3prl downstream config, as written there."""
    import yaml

    with open(config) as f:
        lr = (yaml.safe_load(f) or {}).get("optimizer", {}).get("lr")
    if lr is None:
        raise ValueError(f"{config}: no optimizer.lr; pass --lrs")
    return str(lr)


def train_run(up: Dict, lr: str, tag: str, args, overrides: List[str], env: dict) -> Dict:
    """Train one downstream at ``lr``; returns its figures (dev history, best dev point)."""
    expdir = os.path.join(args.out_dir, "runs", up["label"], f"lr_{lr}")
    if os.path.isdir(expdir):  # never evaluate a stale checkpoint of an earlier run
        shutil.rmtree(expdir)
    os.makedirs(expdir)
    run = {"lr": lr, "expdir": expdir}
    train_cmd = [sys.executable, LAUNCHER, "-m", "train", "-d", "speech_commands", "-c", args.config,
                 "-u", up["name"], *(["-k", up["ckpt"]] if up["ckpt"] else []), "-p", expdir,
                 "--device", args.device, "--seed", str(args.seed),
                 "-o", ",,".join(overrides + [f"config.optimizer.lr={float(lr)!r}"])]
    print(f"{tag}: train ({up['name']}{' ' + up['ckpt'] if up['ckpt'] else ''}, lr {lr}) -> {expdir}", flush=True)
    code, text, secs = _run(train_cmd, os.path.join(expdir, "train.log"), env, tag, args.verbose)
    run["train_seconds"] = round(secs, 1)
    run["train_cmd"] = train_cmd
    if code != 0:
        run["error"] = _fail(f"{tag} training", os.path.join(expdir, "train.log"), text)
        print(run["error"], file=sys.stderr, flush=True)
        return run
    history = dev_history(expdir)
    run["dev_history"] = history
    if history:
        best = max(history, key=lambda h: h[1])  # first step with the best value, as s3prl keeps it
        run["dev_best_acc"], run["dev_best_step"] = best[1], best[0]
    return run


def choose(runs: List[Dict]) -> Optional[Dict]:
    """The run with the best dev accuracy (ties: the lr listed first); None if no run has a
    dev evaluation."""
    scored = [r for r in runs if "error" not in r and "dev_best_acc" in r]
    return max(scored, key=lambda r: r["dev_best_acc"]) if scored else None  # max keeps the first of ties


def evaluate_run(run: Dict, tag: str, args, env: dict) -> None:
    """Evaluate a run's dev-best checkpoint on test; adds ``test_acc`` (or ``error``)."""
    expdir = run["expdir"]
    ckpt = eval_checkpoint(expdir)
    if ckpt is None:
        run["error"] = f"{tag}: no dev-best.ckpt or states-*.ckpt in {expdir}"
        print(run["error"], file=sys.stderr, flush=True)
        return
    run["eval_ckpt"] = ckpt
    eval_cmd = [sys.executable, LAUNCHER, "-m", "evaluate", "-e", ckpt, "-t", "test", "--device", args.device]
    print(f"{tag}: evaluate {os.path.basename(ckpt)} of lr {run['lr']} on test", flush=True)
    code, text, secs = _run(eval_cmd, os.path.join(expdir, "evaluate.log"), env, tag, args.verbose)
    run["eval_seconds"] = round(secs, 1)
    run["eval_cmd"] = eval_cmd
    accs = [float(v) for split, v in _ACC.findall(text) if split == "test"]
    if code != 0 or not accs:
        run["error"] = _fail(f"{tag} evaluation", os.path.join(expdir, "evaluate.log"), text)
        print(run["error"], file=sys.stderr, flush=True)
        return
    run["test_acc"] = round(100 * accs[-1], 2)


def run_one(up: Dict, index: int, total: int, args, overrides: List[str], env: dict) -> Dict:
    """Sweep ``args.lrs`` for one upstream, choose by dev, evaluate the choice on test.

    Returns the chosen run's figures at the top level (``test_acc``, ``dev_best_acc``,
    ``expdir``, ...), ``chosen_lr``, and every run under ``runs``.
    """
    label = up["label"]
    runs = [train_run(up, lr, f"[{index}/{total}] {label} lr {lr}", args, overrides, env) for lr in args.lrs]
    result = {"upstream": up["name"], "ckpt": up["ckpt"], "lrs": list(args.lrs), "runs": runs}
    chosen = choose(runs)
    if chosen is None:
        failed = [r for r in runs if "error" in r]
        result["error"] = failed[0]["error"] if failed else (
            f"{label}: no run has a dev evaluation (set --eval-step <= --total-steps)")
        return result
    tag = f"[{index}/{total}] {label}"
    evaluate_run(chosen, tag, args, env)
    result["chosen_lr"] = chosen["lr"]
    result.update({k: v for k, v in chosen.items() if k != "lr"})
    if "error" not in result:
        dev = ", ".join(f"{r['lr']}: {r.get('dev_best_acc', float('nan')):.2f}%" for r in runs)
        print(f"{tag}: test acc {result['test_acc']:.2f}% at the chosen lr {chosen['lr']} (best dev "
              f"{chosen['dev_best_acc']:.2f}% at step {chosen['dev_best_step']}; best dev by lr: {dev}; "
              f"train {chosen['train_seconds']:.0f} s, evaluate {chosen['eval_seconds']:.0f} s)", flush=True)
    return result


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def write_markdown(path: str, summary: Dict) -> None:
    """The table (no times: the same seed gives the same file)."""
    s = summary["settings"]
    lines = [
        "# SUPERB keyword spotting (speech_commands): upstream comparison",
        "",
        f"Train root `{s['train_root']}`, test root `{s['test_root']}`; seed {s['seed']}, device {s['device']}; "
        f"overrides `{',,'.join(s['overrides'][2:]) or 'none'}` on `{os.path.relpath(s['config'], REPO)}`; "
        f"learning rates {', '.join(s['lrs'])}.",
        "Per upstream, the lr with the best dev accuracy is chosen (ties: the first listed); its test accuracy is "
        "that of the best dev checkpoint (`dev-best.ckpt`; the last `states-*.ckpt` if no dev evaluation beat 0); "
        "12 classes, uniform chance 8.33%.",
        "",
        "| upstream | checkpoint | chosen lr | test acc (%) | best dev acc (%) | at step | evaluated |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for label, r in summary["results"].items():
        test = _fmt(r.get("test_acc")) if "error" not in r else "failed"
        lines.append(f"| {label} | {os.path.basename(r['ckpt']) if r.get('ckpt') else '-'} | "
                     f"{r.get('chosen_lr', '-')} | {test} | {_fmt(r.get('dev_best_acc'))} | "
                     f"{_fmt(r.get('dev_best_step'))} | "
                     f"{os.path.basename(r['eval_ckpt']) if r.get('eval_ckpt') else '-'} |")
    lines += ["", "Every run (dev accuracy, %):", "",
              "| upstream | lr | best dev acc (%) | at step | dev history (step: acc) | chosen |",
              "|---|---:|---:|---:|---|---|"]
    for label, r in summary["results"].items():
        for run in r.get("runs", []):
            history = ", ".join(f"{step}: {acc:.2f}" for step, acc in run.get("dev_history", [])) or "-"
            state = "failed" if "error" in run and "dev_best_acc" not in run else (
                "yes" if run["lr"] == r.get("chosen_lr") else "")
            lines.append(f"| {label} | {run['lr']} | {_fmt(run.get('dev_best_acc'))} | "
                         f"{_fmt(run.get('dev_best_step'))} | {history} | {state} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_chart(path: str, summary: Dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(summary["results"])
    values = [summary["results"][k].get("test_acc") or 0.0 for k in labels]
    ticks = [f"{k}\nlr {summary['results'][k].get('chosen_lr', '-')}" for k in labels]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(labels) + 1.5), 3.8), dpi=120)
    bars = ax.bar(ticks, values, color=[f"C{i}" for i in range(len(labels))])
    for bar, label in zip(bars, labels):
        r = summary["results"][label]
        text = "failed" if "error" in r else f"{r['test_acc']:.1f}"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    xytext=(0, 2), textcoords="offset points", fontsize=9)
    ax.axhline(100.0 / NUM_CLASSES, color="grey", linestyle="--", linewidth=1, label="chance (1/12)")
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"SUPERB KS (speech_commands), lr chosen on dev from {', '.join(summary['settings']['lrs'])}",
                 fontsize=9)
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
    p.add_argument("--lrs", help="learning rates to sweep, comma-separated (e.g. 1e-2,1e-3,1e-4); "
                                 "default the config's optimizer.lr")
    p.add_argument("--lr", help="a single learning rate (the same as --lrs LR)")
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
    if args.lr and args.lrs:
        p.error("give --lrs or --lr, not both")
    try:
        args.upstreams = [parse_upstream(s) for s in args.upstream]
        args.lrs = parse_lrs(args.lrs or args.lr or config_lr(args.config))
    except (ValueError, OSError) as exc:
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
                     "device": args.device, "seed": args.seed, "threads": args.threads, "overrides": overrides,
                     "lrs": args.lrs},
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
