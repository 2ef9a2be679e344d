from . import mam_clap_classification, supmam_clap  # noqa: F401
