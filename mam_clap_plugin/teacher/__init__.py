"""Frozen CLAP (HTS-AT) audio towers as teachers producing token maps; see :mod:`.clap`."""
from .clap import ClapCheckpointError, ClapTeacher, file_sha256, load_clap_teacher  # noqa: F401

__all__ = ["ClapCheckpointError", "ClapTeacher", "file_sha256", "load_clap_teacher"]
