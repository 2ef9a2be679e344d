"""Speech Commands v0.01 as SUPERB keyword spotting (s3prl's ``speech_commands``) uses it.

Shared by the data scripts (``examples/prepare/speech_commands.py``,
``examples/prepare/speech_commands_s3prl.py``), the generated demo keyword set
(``examples/prepare/make_demo_keywords.py``) and the SUPERB runner (``upstream/run_downstream.py``).
Imports nothing heavy (no torch, no fairseq).
"""
from __future__ import annotations

import hashlib
import re

#: The 10 SUPERB keywords (s3prl's ``CLASSES`` without ``_unknown_`` / ``_silence_``).
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
#: SPC-1's 12 classes in s3prl's order: the keywords, ``_unknown_`` (every other word) and
#: ``_silence_`` (background noise). The one list: the data scripts and the upstream read it here.
CLASSES = KEYWORDS + ("_unknown_", "_silence_")

#: Speech Commands v0.02's 35 words (SPC-2's classes; v0.01 has 30 of them, without the last five
#: words of v0.02: backward, follow, forward, learn, visual).
SPC2_WORDS = ("backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward", "four", "go",
              "happy", "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one", "right", "seven",
              "sheila", "six", "stop", "three", "tree", "two", "up", "visual", "wow", "yes", "zero")

#: s3prl's ``split_dataset``: ``max_uttr_per_class`` and the dev / dropped percentages.
_MAX_UTTR = 2 ** 27 - 1


def s3prl_bucket(filename: str) -> str:
    """``"dev"``, ``"test"`` (dropped by s3prl) or ``"train"``: s3prl's hash split of a file name.

    The SHA-1 of the name before ``_nohash_`` (the speaker) picks the bucket, so all clips of
    a speaker share one: about 10 % dev, 10 % dropped, the rest train.
    """
    speaker = re.sub(r"_nohash_.*$", "", filename)
    percent = (int(hashlib.sha1(speaker.encode("utf-8")).hexdigest(), 16) % (_MAX_UTTR + 1)) * (100.0 / _MAX_UTTR)
    return "dev" if percent < 10 else "test" if percent < 20 else "train"
