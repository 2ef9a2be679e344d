"""The documentation's shell commands, read from the pages themselves (README.md and
docs/*.md), so that the tests run exactly what the docs show (docs and tests cannot drift
apart). A heading is looked up in every page; a test names the heading, not the page, so a
section can move between pages without a test change."""
import glob
import os
import re
import shlex
import subprocess

from .conftest import REPO

README = os.path.join(REPO, "README.md")


def pages() -> list:
    """Every documentation page, relative to the repository: README.md, then docs/*.md."""
    found = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
    return ["README.md", *found]


def page(name: str) -> str:
    """The text of the page ``name`` (e.g. ``"docs/pretraining.md"``)."""
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


def headings(text: str) -> list:
    """(line index, level, title) of every markdown heading of ``text`` outside code blocks."""
    out, in_code = [], False
    for i, line in enumerate(text.splitlines()):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        m = re.match(r"(#+) (.*\S)\s*$", line)
        if m and not in_code:
            out.append((i, len(m.group(1)), m.group(2)))
    return out


def section(heading: str) -> str:
    """Text under the heading ``heading`` (e.g. ``"# Pretraining"``, ``"## Optimizer"``), up
    to the next heading of the same or a higher level, from whichever page holds it. Fails,
    naming the pages, unless exactly one page holds that heading exactly once."""
    level = len(heading) - len(heading.lstrip("#"))
    title = heading.lstrip("#").strip()
    hits = [(name, i) for name in pages() for i, lvl, t in headings(page(name)) if (lvl, t) == (level, title)]
    if len(hits) != 1:
        where = ", ".join(f"{name}:{i + 1}" for name, i in hits) or "none of " + ", ".join(pages())
        raise LookupError(f"heading {heading!r} must be in exactly one page, found in {where}")
    name, start = hits[0]
    lines = page(name).splitlines()
    end = next((i for i, lvl, _ in headings(page(name)) if i > start and lvl <= level), len(lines))
    return "\n".join(lines[start + 1:end])


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


def page_commands(name: str, program: str = "fairseq-hydra-train") -> list:
    """Every ``program`` command of the page ``name`` (see :func:`commands`)."""
    return commands(page(name), program)


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
