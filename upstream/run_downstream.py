#!/usr/bin/env python
"""s3prl's ``run_downstream.py`` with this project's upstream registered.

Takes exactly the arguments of ``s3prl/run_downstream.py`` (the installed one: its own
argument parser and ``main`` are used, nothing is copied).  Before handing over it

1. installs the compatibility shims of :mod:`upstream.compat` (s3prl 0.4.18 on
   torchaudio 2.11 / torch 2.14 / huggingface_hub 2);
2. registers ``supmam_clap_local`` (:mod:`upstream.hubconf`) in ``s3prl.hub`` (an
   attribute set on the imported module; no installed file is edited), so
   ``-u supmam_clap_local -k CKPT`` works like any s3prl upstream;
3. checks the speech_commands data before the runner starts: the roots exist, the test
   root holds only s3prl's 12 class folders, noise files are at least 1 s long, dev is not
   empty and the train set holds at least one batch (with fewer clips than
   ``datarc.batch_size`` s3prl's training loop, whose loader drops the last partial batch,
   never finishes);
4. picks the device when ``--device`` is not given: s3prl's default ``cuda`` if CUDA is
   available, else ``cpu`` (said on stderr), so the same command works on a CPU machine
   (``-m evaluate -e dev-best.ckpt`` included: s3prl never takes the device from a checkpoint).

After ``-m evaluate`` it says on stderr that s3prl's ``test acc: X`` is a fraction of 1
(0.9735 = 97.35 %), while this project's tables and README give percent.

The ``upstream`` package is installed with this project (``pip install -e .``), so
``python -m upstream.run_downstream ...`` works from any directory as well.

s3prl's wheel ships no downstream ``config.yaml``: pass ``-c upstream/config/speech_commands.yaml``.
Overrides (``-o``) are ``,,``-separated ``config.<path>=<python literal>`` or
``args.<name>=<value>`` items (``s3prl.utility.helper.override``), e.g. a short CPU run::

    python upstream/run_downstream.py -m train -d speech_commands -u fbank \\
        -c upstream/config/speech_commands.yaml -p outputs/ks/fbank --device cpu \\
        -o "config.downstream_expert.datarc.speech_commands_root=/data/sc/train,,\\
    config.downstream_expert.datarc.speech_commands_test_root=/data/sc/test,,\\
    config.downstream_expert.datarc.num_workers=0,,config.runner.total_steps=200,,\\
    config.runner.eval_step=100,,config.runner.save_step=100,,\\
    config.runner.eval_dataloaders=['dev']"
    python upstream/run_downstream.py -m evaluate -e outputs/ks/fbank/dev-best.ckpt
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

from mam_clap_plugin.data.speech_commands import CLASSES as SC_CLASSES  # the 12 folders s3prl's test set reads

HERE = os.path.dirname(os.path.abspath(__file__))

#: What s3prl's ``test acc: X`` means (the project's tables and the README give percent).
ACCURACY_NOTE = "s3prl prints accuracy as a fraction of 1: 0.9735 there is 97.35 %"

#: The hub entry this launcher adds to ``s3prl.hub``.
ENTRY = "supmam_clap_local"


def _fix_sys_path() -> None:
    """``python upstream/run_downstream.py`` puts ``upstream/`` first on ``sys.path``: its
    ``config/`` folder and module names (``expert``, ``hubconf``) would shadow top-level
    imports, so drop it (``upstream`` itself is imported from the installed package)."""
    if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == HERE:
        sys.path.pop(0)


def with_device(argv: List[str], cuda_available: bool) -> List[str]:
    """``argv`` (without the program name) plus ``--device cpu`` when it gives no ``--device``
    (in any form s3prl's parser accepts: ``--device X``, ``--device=X``, a unique prefix) and
    CUDA is not available; otherwise ``argv`` unchanged."""
    probe = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    probe.add_argument("--device")
    try:
        given, _ = probe.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit):  # e.g. a bare --device: s3prl's parser reports it
        return list(argv)
    if given.device is not None or cuda_available:
        return list(argv)
    return [*argv, "--device", "cpu"]


def prepare():
    """Shims + registration; returns the imported ``s3prl.run_downstream`` module."""
    _fix_sys_path()
    from upstream.compat import install_shims

    install_shims()
    # s3prl's hub imports every upstream; one that needs ESPnet warns that it is missing, at every start
    logging.getLogger("s3prl.upstream.espnet_hubert.expert").setLevel(logging.ERROR)
    from s3prl import hub

    register(hub)
    import s3prl.run_downstream as s3prl_run_downstream

    return s3prl_run_downstream


def register(hub_module=None) -> None:
    """Set ``s3prl.hub.supmam_clap_local`` to this project's entry (idempotent)."""
    if hub_module is None:
        from s3prl import hub as hub_module
    from upstream import hubconf

    hubconf.register(hub_module)
    if not callable(getattr(hub_module, ENTRY, None)):
        raise RuntimeError(f"upstream.hubconf did not register {ENTRY!r} into s3prl.hub")


class DataError(Exception):
    """The downstream data cannot work with s3prl (message says why)."""


def _wavs(folder: Path) -> List[Path]:
    return sorted(folder.glob("*.wav"))


def speech_commands_sizes(datarc: Dict, check_test: bool = True) -> Dict[str, int]:
    """Validate a speech_commands ``datarc`` as s3prl will read it; returns
    ``{"train", "dev", "test"}`` item counts (the ``_background_noise_`` files are
    ``_silence_`` items of both train and dev, as in s3prl). Raises :class:`DataError`."""
    import soundfile
    from s3prl.downstream.speech_commands.expert import split_dataset

    sizes = {}
    root = datarc.get("speech_commands_root")
    if not root or not os.path.isdir(root):
        raise DataError(f"speech_commands_root {root!r} is not a directory; set it with "
                        "-o config.downstream_expert.datarc.speech_commands_root=/path/to/train "
                        "(see examples/prepare/speech_commands_s3prl.py)")
    noise = _wavs(Path(root, "_background_noise_"))
    for path in noise:
        if soundfile.info(str(path)).duration < 1.0:
            raise DataError(f"{path} is shorter than 1 s: s3prl crops 1 s of every _background_noise_ file")
    train_list, valid_list = split_dataset(root)
    sizes["train"] = len(train_list) + len(noise)
    sizes["dev"] = len(valid_list) + len(noise)
    if sizes["dev"] == 0:
        raise DataError(f"the dev split of {root} is empty (no speaker hashes into s3prl's 10 % dev share "
                        "and no _background_noise_): s3prl's dev evaluation would divide by zero")
    if check_test:
        test_root = datarc.get("speech_commands_test_root")
        if not test_root or not os.path.isdir(test_root):
            raise DataError(f"speech_commands_test_root {test_root!r} is not a directory; set it with "
                            "-o config.downstream_expert.datarc.speech_commands_test_root=/path/to/test")
        folders = [p for p in Path(test_root).iterdir() if p.is_dir()]
        unknown = sorted(p.name for p in folders if p.name not in SC_CLASSES)
        if unknown:
            raise DataError(f"{test_root} has folders that are not s3prl speech_commands classes: {unknown} "
                            f"(allowed: {list(SC_CLASSES)})")
        sizes["test"] = sum(len(_wavs(p)) for p in folders)
        if sizes["test"] == 0:
            raise DataError(f"{test_root} holds no .wav files in its class folders")
    return sizes


def check_downstream(args: argparse.Namespace, config: Dict) -> None:
    """Refuse, before the runner starts, speech_commands data that s3prl cannot use."""
    if args.downstream != "speech_commands":
        return
    datarc = config.get("downstream_expert", {}).get("datarc", {})
    try:
        sizes = speech_commands_sizes(datarc, check_test=args.mode == "evaluate" or
                                      "test" in config.get("runner", {}).get("eval_dataloaders", []))
    except DataError as exc:
        raise SystemExit(f"run_downstream.py: error: {exc}") from None
    if args.mode == "train":
        batch_size = int(datarc.get("batch_size", 1))
        world = int(os.environ.get("WORLD_SIZE", "1")) if args.local_rank is not None else 1
        if sizes["train"] // world < batch_size:
            raise SystemExit(
                f"run_downstream.py: error: the speech_commands train set of "
                f"{datarc['speech_commands_root']} has {sizes['train']} items (clips of train speakers + "
                f"_background_noise_ files){f' over {world} processes' if world > 1 else ''}, fewer than "
                f"datarc.batch_size={batch_size}. s3prl's train loader drops the last partial batch, so it "
                "would yield no batch and training would loop forever. Use more data or a smaller "
                "batch (-o config.downstream_expert.datarc.batch_size=N)."
            )
    print(f"[run_downstream] speech_commands items: {sizes}", file=sys.stderr)


class _ParserCaptured(Exception):
    pass


def s3prl_argument_parser() -> argparse.ArgumentParser:
    """The parser s3prl's ``get_downstream_args`` builds (captured at ``parse_args``)."""
    rd = prepare()
    original = argparse.ArgumentParser.parse_args

    def capture(self, *a, **k):
        raise _ParserCaptured(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        rd.get_downstream_args()
    except _ParserCaptured as captured:
        return captured.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise RuntimeError("s3prl's get_downstream_args did not call parse_args")


def main() -> None:
    rd = prepare()
    import torch

    argv = with_device(sys.argv[1:], torch.cuda.is_available())
    if argv != sys.argv[1:] and not {"-h", "--help"} & set(argv):
        print("[run_downstream] no CUDA device: running on the CPU (--device cpu)", file=sys.stderr)
    sys.argv[1:] = argv
    original = rd.get_downstream_args

    def get_downstream_args() -> Tuple:
        args, config, backup_files = original()
        check_downstream(args, config)
        return args, config, backup_files

    rd.get_downstream_args = get_downstream_args  # main() looks it up at call time
    try:
        rd.main()
    finally:
        rd.get_downstream_args = original
    if "evaluate" in argv and not {"-h", "--help"} & set(argv):
        print(f"[run_downstream] {ACCURACY_NOTE}", file=sys.stderr)


if __name__ == "__main__":
    main()
