"""mam-clap: SupMAM-CLAP pretraining as a fairseq user-dir plugin.

Pass this directory to fairseq as ``common.user_dir``. fairseq's
``import_user_module`` imports ``tasks/`` and ``models/`` itself but not
``criterions/`` or ``optim/``, so the package registers its tasks, models,
criterions and the ``mam_clap_adamw`` optimizer here when it is imported under
fairseq. Without fairseq loaded (the s3prl upstream, the data tools), importing the
package stays light: only the encoder and data modules are used.

Torch-only API (no fairseq, no s3prl)::

    from mam_clap_plugin import load_encoder, load_encoder_with_stats
    encoder = load_encoder("encoder.safetensors")   # an AudioEncoder in eval mode

Both accept an encoder export, a Hugging Face folder, a converted AudioMAE file and a
pretraining or fine-tuning checkpoint (see :mod:`mam_clap_plugin.checkpoint`); they are
imported on first use. :mod:`mam_clap_plugin.hear` is the HEAR 2021 API and
:mod:`mam_clap_plugin.hub` the Hugging Face layout (``MamClapEncoder``).
"""
import logging
import sys
import warnings

__version__ = "0.1.0"

# What importing fairseq prints that is not the user's business, silenced before any module of
# this package imports it: torch's deprecation of torch.jit.script (fairseq decorates functions
# with it at import time) and fairseq's "Please install tensorboardX" from its text_to_speech task.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script(_method)?` is deprecated", category=FutureWarning)
logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)

#: Names served lazily from :mod:`mam_clap_plugin.checkpoint` (PEP 562).
_CHECKPOINT_API = ("load_encoder", "load_encoder_with_stats", "EncoderBundle", "CheckpointError")
__all__ = list(_CHECKPOINT_API)


def __getattr__(name):
    if name in _CHECKPOINT_API:
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "fairseq" in sys.modules:
    from . import criterions, models, tasks  # noqa: F401
    from .optim import mam_clap_adamw  # noqa: F401
