"""mam-clap: SupMAM-CLAP pretraining as a fairseq user-dir plugin, plus an s3prl upstream.

Installs ``mam_clap_plugin`` (the fairseq plugin), ``mam_clap_fixtures`` (test and demo fixtures)
and ``upstream`` (the s3prl upstream: ``from upstream.hubconf import register`` works from any
directory, and its ``config/*.yaml`` are installed with it).

fairseq itself is deliberately NOT listed in install_requires: on Python 3.11 the
distribution that works is ``ve-fairseq`` (it installs the ``fairseq`` package, cp311 and
cp312 wheels only), and a user who built fairseq from source already has it.  See README
"Installation".

The bounds below are what the code needs: Python 3.11/3.12 (ve-fairseq's wheels; the code
also evaluates ``float | None`` annotations at run time), torch 2.5 (``torch.serialization.safe_globals``),
hydra-core 1.3 / omegaconf 2.3 (fairseq's config system).  The tested set is exactly
``constraints.txt`` (Python 3.11, x86_64, CPU), which ``make env`` installs.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

# The version's one source is mam_clap_plugin/__init__.py (read as text: setup.py imports no torch).
INIT = (Path(__file__).parent / "mam_clap_plugin" / "__init__.py").read_text()
VERSION = re.search(r'^__version__ = "([^"]+)"', INIT, re.M).group(1)

setup(
    name="mam-clap",
    version=VERSION,
    description="SupMAM-CLAP: masked audio modeling with CLAP targets and a supervised branch (fairseq plugin)",
    packages=find_packages(
        include=["mam_clap_plugin", "mam_clap_plugin.*", "mam_clap_fixtures", "upstream", "upstream.*"]),
    package_data={"upstream": ["config/*.yaml"]},
    python_requires=">=3.11,<3.13",
    install_requires=[
        "torch>=2.5",
        "torchaudio>=2.5",
        "numpy>=1.24",
        "soundfile>=0.12",
        "scikit-learn>=1.2",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "sentencepiece>=0.2",  # the caption teacher's tokenizer (examples/teacher)
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3,<2.4",
    ],
    extras_require={
        "fairseq": ["ve-fairseq>=0.12.3"],
        "s3prl": ["s3prl>=0.4.17", "sentencepiece", "pyyaml>=5.4", "matplotlib>=3.7"],
        "demo": ["espeakng-loader>=0.2", "matplotlib>=3.7"],
        # mam_clap_plugin.hub (MamClapEncoder: save_pretrained / from_pretrained / push_to_hub) and
        # examples/export_encoder.py --hub; reading a Hugging Face folder (load_encoder, hear) needs none
        "hub": ["huggingface_hub>=0.23"],
        "test": ["pytest>=7"],
    },
)
