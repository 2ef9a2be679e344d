"""Frozen CLAP (HTS-AT) audio towers as teachers producing token maps; see :mod:`.clap`."""
from .clap import ClapCheckpointError, ClapTeacher, load_clap_teacher

__all__ = ["ClapCheckpointError", "ClapTeacher", "load_clap_teacher"]
