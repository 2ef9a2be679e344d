"""The documentation holds together: links, the tour's commands and the README's demo block.

Every relative link of README.md and docs/*.md points to a file that exists (and an
``#anchor`` to a heading of that page), every command of the README's tour is a command of
the page it links to, and the README's demo block agrees with a report holding the figures it
shows."""
import os
import re

import pytest

from . import readme
from .conftest import REPO, load_script

check_readme = load_script("examples/demo/check_readme.py")

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    title = re.sub(r"`", "", title.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", title))


def anchors(name: str) -> set:
    seen, out = {}, set()
    for _, _, title in readme.headings(readme.page(name)):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links() -> list:
    """(page, target) for every relative link of every page."""
    out = []
    for name in readme.pages():
        for target in LINK.findall(_prose(readme.page(name))):
            if not re.match(r"[a-z]+:", target):
                out.append((name, target))
    return out


def test_slug_follows_github():
    assert slug("Start from AudioMAE's weights") == "start-from-audiomaes-weights"
    assert slug("The fbank on the device (`task.fbank_on_device`)") == "the-fbank-on-the-device-taskfbank_on_device"
    assert slug("ESC-50, 5 folds") == "esc-50-5-folds"


def test_every_page_is_linked_and_found():
    pages = readme.pages()
    assert pages[0] == "README.md" and len(pages) > 1
    linked = {os.path.normpath(os.path.join(os.path.dirname(name), t.split("#")[0])) for name, t in links()
              if t.split("#")[0]}
    assert set(pages[1:]) <= linked, set(pages[1:]) - linked  # no page is unreachable


@pytest.mark.parametrize("name,target", links())
def test_relative_link_resolves(name, target):
    path, _, anchor = target.partition("#")
    page = os.path.normpath(os.path.join(os.path.dirname(name), path)) if path else name
    assert os.path.exists(os.path.join(REPO, page)), f"{name}: link to {target}: {page} does not exist"
    if anchor:
        assert page.endswith(".md"), f"{name}: anchor on a non-markdown target {target}"
        assert anchor in anchors(page), f"{name}: link to {target}: no heading of {page} has the anchor #{anchor}"


def test_section_lookup_names_the_pages():
    assert "fairseq-hydra-train" in readme.section("# Pretraining")
    with pytest.raises(LookupError, match="none of README.md"):
        readme.section("## No such heading anywhere")


def test_tour_commands_are_their_pages_commands():
    """Each job of the README's tour shows a command that its linked page shows too, so the
    tests that run that page's commands cover the tour."""
    items = re.split(r"\n(?=\* \*\*)", readme.section("## Tour"))
    jobs = [item for item in items if item.startswith("* **")]
    assert len(jobs) >= 9
    for item in jobs:
        target = LINK.search(item).group(1).split("#")[0]
        shown = [(p, c) for p in ("python", "fairseq-hydra-train") for c in readme.commands(item, p)]
        assert len(shown) == 1, item
        program, command = shown[0]
        assert command in readme.page_commands(target, program), f"tour command not in {target}: {command}"


def test_readme_demo_block_checks_against_a_report_of_its_figures():
    """check_readme accepts the README against a report holding exactly the figures the demo
    block shows, and names the line when one of them differs."""
    text = readme.page("README.md")
    report = check_readme.shown_report(*check_readme.find_block(text))
    differences, compared = check_readme.check(report, text)
    assert differences == [] and compared >= 30
    report["evaluate"]["linear_probe"]["supmam"] += 1.0
    differences, _ = check_readme.check(report, text)
    assert len(differences) == 1 and "evaluate.linear_probe.supmam: README shows" in differences[0]
