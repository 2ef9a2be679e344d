"""The README's shell commands, read from README.md itself, so that the tests run exactly
what it shows (README and tests cannot drift apart)."""
import os
import re
import shlex
import subprocess

from .conftest import REPO

README = os.path.join(REPO, "README.md")


def section(heading: str) -> str:
    """Text under the README heading ``heading`` (e.g. ``"## Pretraining"``), up to the next
    heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = open(README, encoding="utf-8").read().splitlines()
    start = lines.index(heading) + 1
    out, in_code = [], False
    for line in lines[start:]:
        if line.lstrip().startswith("```"):
            in_code = not in_code
        m = re.match(r"(#+) ", line)
        if m and not in_code and len(m.group(1)) <= level:
            break
        out.append(line)
    return "\n".join(out)


def commands(text: str, program: str = "fairseq-hydra-train") -> list:
    """Every ``program`` command of the ```bash blocks in ``text``: continuation lines
    joined, comments and a trailing ``&`` removed."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line.endswith("&"):
                line = line[:-1].strip()
            if line.startswith(program + " "):
                found.append(re.sub(r"\s+", " ", line))
    return found


def command_lines(text: str) -> list:
    """Every command line of the ```bash blocks in ``text`` as ``(command, comment)``:
    continuation lines joined, a trailing ``&`` removed; ``comment`` is the text after ``#``
    (empty if none). Comment-only and blank lines are left out."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            match = re.search(r"(^|\s)#(.*)$", line)
            comment = match.group(2).strip() if match else ""
            command = line[:match.start()].strip() if match else line.strip()
            if command.endswith("&"):
                command = command[:-1].strip()
            if command:
                found.append((re.sub(r"\s+", " ", command), comment))
    return found


def words(command: str, env: dict) -> list:
    """``command``'s words as bash expands them with ``env`` (variables, ``${X:-default}``)."""
    out = subprocess.run(["bash", "-c", f'set -- {command}; printf "%s\\0" "$@"'], env=env, check=True,
                         capture_output=True, text=True).stdout
    return out.split("\0")[:-1]


def config_name(command: str) -> str:
    words = shlex.split(command)
    return words[words.index("--config-name") + 1]


def override_keys(command: str) -> set:
    """Keys of the ``key=value`` overrides in ``command`` (``+`` / ``++`` stripped)."""
    return {w.split("=", 1)[0].lstrip("+") for w in shlex.split(command) if "=" in w and not w.startswith("-")}
