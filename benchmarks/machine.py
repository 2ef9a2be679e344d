"""Machine description shared by the benchmarks' JSON reports."""
from __future__ import annotations

import datetime
import os
import platform
from typing import Any, Dict, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(repo: str = REPO) -> Optional[str]:
    """The checkout's commit (12 hex digits), read from its ``.git`` without running git (a
    worktree's ``.git`` file and packed refs included); None outside a git checkout."""
    git = os.path.join(repo, ".git")
    try:
        if os.path.isfile(git):  # a worktree: "gitdir: PATH"
            with open(git) as fh:
                git = os.path.join(repo, fh.read().split(":", 1)[1].strip())
        with open(os.path.join(git, "HEAD")) as fh:
            head = fh.read().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        common = git
        if os.path.isfile(os.path.join(git, "commondir")):
            with open(os.path.join(git, "commondir")) as fh:
                common = os.path.join(git, fh.read().strip())
        for root in (git, common):
            if os.path.isfile(os.path.join(root, ref)):
                with open(os.path.join(root, ref)) as fh:
                    return fh.read().strip()[:12]
        with open(os.path.join(common, "packed-refs")) as fh:
            for line in fh:
                if line.rstrip().endswith(" " + ref):
                    return line.split()[0][:12]
    except (OSError, IndexError):
        pass
    return None


def machine_info() -> Dict[str, Any]:
    model_name = None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model_name = model_name or platform.processor() or "unknown"  # platform.processor() may run uname
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_model": model_name,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "loadavg_at_start": list(os.getloadavg()),
    }

