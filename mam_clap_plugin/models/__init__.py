from . import mam_clap_classifier, supmam_clap  # noqa: F401
