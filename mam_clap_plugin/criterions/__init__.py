from . import supmam_clap  # noqa: F401
