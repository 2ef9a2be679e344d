from . import clap_teacher, mam_clap_classifier, supmam_clap  # noqa: F401
