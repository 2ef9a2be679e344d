"""mam-clap: SupMAM-CLAP pretraining as a fairseq user-dir plugin, plus an s3prl upstream.

fairseq itself is deliberately NOT listed in install_requires: on Python 3.11 the
distribution that works is ``ve-fairseq`` (it installs the ``fairseq`` package), and
a user who built fairseq from source already has it.  See README "Installation".
"""
from setuptools import find_packages, setup

setup(
    name="mam-clap",
    version="0.1.0",
    description="SupMAM-CLAP: masked audio modeling with CLAP targets and a supervised branch (fairseq plugin)",
    packages=find_packages(include=["mam_clap_plugin", "mam_clap_plugin.*", "mam_clap_fixtures"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "torchaudio>=2.1",
        "numpy>=1.24",
        "soundfile>=0.12",
        "scikit-learn>=1.2",
        "tqdm>=4.60",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3,<2.4",
    ],
    extras_require={
        "fairseq": ["ve-fairseq>=0.12.3"],
        "s3prl": ["s3prl>=0.4.17", "sentencepiece", "matplotlib>=3.7"],
        "demo": ["espeakng-loader>=0.2", "matplotlib>=3.7"],
        "test": ["pytest>=7"],
    },
)
