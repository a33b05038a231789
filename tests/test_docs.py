"""The committed Markdown renders as written: every code block closes where it is meant to,
every in-page link names a heading that exists, every relative link a file that exists.

A closing fence with text after it (three backticks, then a sentence) is no closing fence in
CommonMark or on GitHub: the block ran on to the next fence and turned the README's second
half inside out, code shown as prose and prose as code, for many sessions before this test.
"""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


def problems_in(text: str, where: Path) -> tuple[list[str], int]:
    """(problems as 'line: what', links checked) of one Markdown text at path ``where``."""
    found, prose, opened = [], [], None
    for i, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if opened is None:
            if m:
                opened = (i, m.group(1))
            else:
                prose.append((i, line))
        elif m and m.group(1)[0] == opened[1][0] and len(m.group(1)) >= len(opened[1]):
            if m.group(2).strip():  # CommonMark: a closing fence holds nothing but spaces
                found.append(f"{i}: text after a closing fence, so the block opened at line {opened[0]} "
                             "runs on to the next fence")
            else:
                opened = None
    if opened:
        found.append(f"{opened[0]}: a code block that never closes")

    anchors, seen = set(), {}
    for _, line in prose:
        h = re.match(r"^#{1,6} +(.*?) *#*$", line)
        if h:  # GitHub's anchors: the heading's text, lower case, punctuation dropped, spaces as '-'
            title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", h.group(1)).replace("`", "")
            slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    checked = 0
    for i, line in prose:
        for link in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto: ...
                continue
            if link.startswith("#"):
                checked += 1
                if link[1:] not in anchors:
                    found.append(f"{i}: a link to no heading: {link}")
                continue
            target = (where.parent / link.split("#")[0]).resolve()
            if not target.is_relative_to(REPO):  # ../shared and the like: not part of a clone
                continue
            checked += 1
            if not target.exists():
                found.append(f"{i}: a link to no file: {link}")
    return found, checked


def test_the_check_finds_what_it_looks_for():
    bad = ("# Title\n\nSee [a](#title), [b](#nowhere) and [c](missing.md).\n\n"
           "```bash\nigkd demo\n``` and then text\n\nmore\n```\n\n```python\nx = 1\n")
    sample = REPO / "sample.md"  # never written: where relative links resolve from
    found, checked = problems_in(bad, sample)
    assert checked == 3
    assert [f.split(":")[0] for f in found] == ["7", "12", "3", "3"], found
    assert "runs on to the next fence" in found[0] and "never closes" in found[1]
    assert "#nowhere" in found[2] and "missing.md" in found[3]
    good = "# Title\n\n```bash\nigkd demo\n```\n\n[a](#title)\n"
    assert problems_in(good, sample) == ([], 1)


MARKDOWN = sorted(subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.split()) or ["README.md"]


@pytest.mark.parametrize("name", MARKDOWN)
def test_committed_markdown_renders_as_written(name):
    path = REPO / name
    found, _ = problems_in(path.read_text(), path)
    assert not found, f"{name}:\n" + "\n".join(found)


def test_the_readme_links_are_checked():
    found, checked = problems_in((REPO / "README.md").read_text(), REPO / "README.md")
    assert not found and checked >= 10, (found, checked)  # the README's own table of contents at least
