from .. import criterions  # noqa: F401  (fairseq's user-dir import skips criterions/)
from . import clap_teacher, mam_clap_finetuning, mam_clap_pretraining  # noqa: F401
