from . import clap_infonce, mam_clap_classification, supmam_clap  # noqa: F401
