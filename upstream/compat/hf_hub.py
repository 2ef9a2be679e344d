"""Shim: ``huggingface_hub.HfFolder`` and ``huggingface_hub.Repository`` (removed in huggingface_hub 1.0)."""
from __future__ import annotations

import os
from typing import Optional

from ._patch import mark, set_attr


class HfFolder:
    """The removed ``huggingface_hub.HfFolder`` token helper, on the current token API."""

    @staticmethod
    def get_token() -> Optional[str]:
        import huggingface_hub

        return huggingface_hub.get_token()

    @staticmethod
    def save_token(token: str) -> None:
        from huggingface_hub import constants

        os.makedirs(os.path.dirname(constants.HF_TOKEN_PATH), exist_ok=True)
        with open(constants.HF_TOKEN_PATH, "w") as f:
            f.write(token)

    @staticmethod
    def delete_token() -> None:
        from huggingface_hub import constants

        try:
            os.remove(constants.HF_TOKEN_PATH)
        except FileNotFoundError:
            pass


class Repository:
    """Stand-in for the git-based ``huggingface_hub.Repository`` (removed in 1.0).

    s3prl uses it only to push a fine-tuned model (``--hub huggingface``); constructing it
    raises a RuntimeError that says so.
    """

    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            "huggingface_hub.Repository was removed in huggingface_hub 1.0; s3prl's "
            "push-to-hub (--hub huggingface) is not supported here (upstream.compat)"
        )


def shim_huggingface_hub() -> bool:
    """Add ``huggingface_hub.HfFolder`` and ``huggingface_hub.Repository``.

    Prevents ``ImportError: cannot import name 'HfFolder' from 'huggingface_hub'`` (then the
    same for ``'Repository'``) at ``from huggingface_hub import HfApi, HfFolder, Repository``
    in ``s3prl/downstream/runner.py`` and ``s3prl/run_downstream.py``.
    """
    import huggingface_hub

    changed = False
    for name, obj in (("HfFolder", HfFolder), ("Repository", Repository)):
        if not hasattr(huggingface_hub, name):
            set_attr(huggingface_hub, name, mark(obj))
            changed = True
    return changed
