#!/usr/bin/env python
"""Check that the README's demo section states what `make demo` measured.

    python examples/demo/check_readme.py outputs/demo/report.json README.md

The README shows an abridged ``report.json`` in the JSON block that follows the line naming
``outputs/demo/report.json`` ... ``(abridged)``; there ``...`` stands for omitted entries.
Every value shown there is compared with the report at the same place:

* numbers: the README must show the report's value rounded to the decimals it prints
  (``70.8`` for ``70.8333``);
* ``true`` / ``false`` / ``null``: exactly;
* strings: exactly, or as the end of a path (``outputs/demo/x`` matches
  ``/abs/outputs/demo/x``); a leading ``...`` stands for any prefix;
* keys starting with ``seconds`` are timings, which vary from machine to machine: not compared.

Claims the prose makes about the figures are written next to it as HTML comments, each on a
line of its own, and checked too, e.g.
``<!-- check_readme: evaluate.linear_probe.supmam > evaluate.linear_probe.random_init -->``
(each side a dotted key path of the report or a number; ``<``, ``<=``, ``>``, ``>=``, ``==``).

Exits 0 when all agree; otherwise 1, printing one line per difference (README line, key path,
README value, report value). `make demo` runs it last.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, List, NamedTuple, Tuple

_TOKEN = re.compile(r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)'
                    r'|(?P<literal>true|false|null)|(?P<ellipsis>\.\.\.)|(?P<punct>[{}\[\]:,]))')
_CLAIM = re.compile(r"^[ \t]*<!--\s*check_readme:\s*(?P<left>\S+)\s*(?P<op><=|>=|==|<|>)\s*(?P<right>\S+)\s*-->[ \t]*$",
                    re.MULTILINE)
_OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
        "==": lambda a, b: a == b}
_MISSING = object()


class ReadmeError(ValueError):
    """The README has no parsable demo report block (message says where)."""


class Leaf(NamedTuple):
    path: Tuple[Any, ...]  # keys and list indices from the report's root
    text: str  # the value as the README writes it
    line: int  # README line number (1-based)


def find_block(readme: str, name: str = "README.md") -> Tuple[str, int]:
    """The abridged report's JSON text and the README line number of its first line."""
    lines = readme.splitlines()
    for i, line in enumerate(lines):
        if "outputs/demo/report.json" in line and "abridged" in line:
            for j in range(i + 1, len(lines)):
                if lines[j].strip().startswith("```json"):
                    end = next((k for k in range(j + 1, len(lines)) if lines[k].strip().startswith("```")), None)
                    if end is None:
                        raise ReadmeError(f"{name}:{j + 1}: the ```json block is not closed")
                    return "\n".join(lines[j + 1:end]), j + 2
            break
    raise ReadmeError(f"{name}: no ```json block after a line naming outputs/demo/report.json (abridged)")


def parse_leaves(text: str, first_line: int = 1, name: str = "README.md") -> List[Leaf]:
    """Every scalar shown in the abridged JSON ``text`` (``...`` allowed for entries)."""
    tokens, pos = [], 0
    while pos < len(text):
        if not text[pos:].strip():
            break
        m = _TOKEN.match(text, pos)
        if not m:
            line = first_line + text.count("\n", 0, pos)
            raise ReadmeError(f"{name}:{line}: cannot read the report block at {text[pos:pos + 20].strip()!r}")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind), first_line + text.count("\n", 0, m.start(kind))))
        pos = m.end()
    leaves: List[Leaf] = []
    index = 0

    def peek():
        return tokens[index] if index < len(tokens) else ("end", "", first_line + text.count("\n"))

    def take(kind=None, value=None):
        nonlocal index
        tok = peek()
        if (kind and tok[0] != kind) or (value and tok[1] != value):
            raise ReadmeError(f"{name}:{tok[2]}: expected {value or kind} in the report block, found {tok[1]!r}")
        index += 1
        return tok

    def value(path):
        kind, text_, line = peek()
        if text_ == "{":
            take(value="{")
            while peek()[1] != "}":
                if peek()[0] == "ellipsis":
                    take("ellipsis")
                else:
                    key = json.loads(take("string")[1])
                    take(value=":")
                    value(path + (key,))
                if peek()[1] != ",":
                    break
                take(value=",")
            take(value="}")
        elif text_ == "[":
            take(value="[")
            i = 0
            while peek()[1] != "]":
                if peek()[0] == "ellipsis":
                    take("ellipsis")
                else:
                    value(path + (i,))
                i += 1
                if peek()[1] != ",":
                    break
                take(value=",")
            take(value="]")
        elif kind in ("string", "number", "literal"):
            take()
            leaves.append(Leaf(path, text_, line))
        else:
            raise ReadmeError(f"{name}:{line}: unexpected {text_!r} in the report block")

    value(())
    if index != len(tokens):
        raise ReadmeError(f"{name}:{peek()[2]}: text after the end of the report block")
    return leaves


def shown_report(text: str, first_line: int = 1, name: str = "README.md") -> dict:
    """The report that holds exactly the figures the abridged block ``text`` shows (lists as dicts by index)."""
    report: dict = {}
    for leaf in parse_leaves(text, first_line, name):
        node = report
        for key in leaf.path[:-1]:
            node = node.setdefault(key, {})
        node[leaf.path[-1]] = json.loads(leaf.text)
    return report


def _lookup(report: Any, path: Tuple[Any, ...]) -> Any:
    for key in path:
        if isinstance(key, int) and isinstance(report, list) and key < len(report):
            report = report[key]
        elif isinstance(key, str) and isinstance(report, dict) and key in report:
            report = report[key]
        else:
            return _MISSING
    return report


def _agrees(shown: str, actual: Any) -> bool:
    expected = json.loads(shown)
    if isinstance(expected, bool) or expected is None:
        return actual is expected
    if isinstance(expected, (int, float)):
        if isinstance(actual, bool) or not isinstance(actual, (int, float)):
            return False
        decimals = len(shown.split(".")[1]) if "." in shown and "e" not in shown.lower() else 0
        return abs(actual - expected) <= 0.5 * 10 ** -decimals + 1e-9 * max(1.0, abs(expected))
    if not isinstance(actual, str):
        return False
    if expected.startswith("..."):
        return actual.endswith(expected[3:])
    return actual == expected or actual.endswith("/" + expected)


def _operand(report: Any, text: str) -> Any:
    """A claim's side: a number, or the report's value at a dotted key path (list indices allowed)."""
    try:
        return float(text)
    except ValueError:
        return _lookup(report, tuple(int(k) if k.isdigit() else k for k in text.split(".")))


def check_claims(report: dict, readme: str, name: str = "README.md",
                 report_name: str = "report.json") -> Tuple[List[str], int]:
    """(failed claims, number of claims) of the README's ``<!-- check_readme: A op B -->`` comments."""
    failed, claims = [], 0
    for m in _CLAIM.finditer(readme):
        claims += 1
        line = readme.count("\n", 0, m.start()) + 1
        left, right = _operand(report, m.group("left")), _operand(report, m.group("right"))
        claim = f"{m.group('left')} {m.group('op')} {m.group('right')}"
        missing = [text for text, v in ((m.group("left"), left), (m.group("right"), right))
                   if isinstance(v, bool) or not isinstance(v, (int, float))]
        if missing:
            failed.append(f"{name}:{line}: claim {claim}: {report_name} has no number at {missing[0]}")
        elif not _OPS[m.group("op")](left, right):
            failed.append(f"{name}:{line}: claim {claim} does not hold in {report_name} "
                          f"({json.dumps(left)} {m.group('op')} {json.dumps(right)} is false): update the text")
    return failed, claims


def check(report: dict, readme: str, name: str = "README.md",
          report_name: str = "report.json") -> Tuple[List[str], int]:
    """(differences, number of values and claims compared) between the README's demo section and
    ``report``: the abridged block, then the claims."""
    text, first_line = find_block(readme, name)
    differences, compared = check_claims(report, readme, name, report_name)
    for leaf in parse_leaves(text, first_line, name):
        key = ".".join(str(k) for k in leaf.path)
        if any(isinstance(k, str) and k.startswith("seconds") for k in leaf.path):
            continue
        actual = _lookup(report, leaf.path)
        compared += 1
        if actual is _MISSING:
            differences.append(f"{name}:{leaf.line}: {key}: README shows {leaf.text}, {report_name} has no such entry")
        elif not _agrees(leaf.text, actual):
            differences.append(f"{name}:{leaf.line}: {key}: README shows {leaf.text}, {report_name} has "
                               f"{json.dumps(actual)}")
    return sorted(differences, key=lambda d: int(d.split(":")[1])), compared


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("report", help="outputs/demo/report.json written by `make demo`")
    p.add_argument("readme", nargs="?", default="README.md", help="the README to check (default README.md)")
    args = p.parse_args(argv)
    try:
        with open(args.report) as f:
            report = json.load(f)
        with open(args.readme, encoding="utf-8") as f:
            readme = f.read()
        differences, compared = check(report, readme, args.readme, args.report)
    except (OSError, json.JSONDecodeError, ReadmeError) as err:
        print(f"check_readme: error: {err}", file=sys.stderr)
        return 2
    if differences:
        print("\n".join(differences), file=sys.stderr)
        print(f"check_readme: {len(differences)} of {compared} values in the demo section of {args.readme} differ "
              f"from {args.report}: update the README with the measured values.", file=sys.stderr)
        return 1
    print(f"check_readme: the demo section of {args.readme} matches {args.report} ({compared} values)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
