"""mam-clap: SupMAM-CLAP pretraining as a fairseq user-dir plugin.

Pass this directory to fairseq as ``common.user_dir``. fairseq's
``import_user_module`` imports ``tasks/`` and ``models/`` itself but not
``criterions/`` or ``optim/``, so the package registers its tasks, models,
criterions and the ``mam_clap_adamw`` optimizer here when it is imported under
fairseq. Without fairseq loaded (the s3prl upstream, the data tools), importing the
package stays light: only the encoder and data modules are used.
"""
import sys

__version__ = "0.1.0"

if "fairseq" in sys.modules:
    from . import criterions, models, tasks  # noqa: F401,E402
    from .optim import mam_clap_adamw  # noqa: F401,E402
