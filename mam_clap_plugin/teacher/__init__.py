"""Frozen teachers producing token maps: the contract (:mod:`.base`), the formats a checkpoint may
have (:mod:`.registry`: LAION-CLAP / MS-CLAP HTS-AT towers in :mod:`.clap`, caption-trained CLAP
teachers in :mod:`.caption`) and :func:`load_teacher`, which picks the format that reads a file."""
from .base import Teacher, check_teacher
from .clap import ClapCheckpointError, ClapTeacher, load_clap_teacher
from .registry import TEACHER_FORMATS, TeacherFormat, load_teacher, register_teacher_format

__all__ = ["ClapCheckpointError", "ClapTeacher", "TEACHER_FORMATS", "Teacher", "TeacherFormat", "check_teacher",
           "load_clap_teacher", "load_teacher", "register_teacher_format"]
