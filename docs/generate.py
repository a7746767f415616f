"""Generate the reference pages of the documentation site from the code and the committed results.

* ``docs/cli.md``: every ``diprune`` subcommand's ``--help``, from the argparse parser itself
  (:func:`pipeline.cli.build_parser`), so the CLI reference cannot drift from the code;
* ``docs/index.md``: the README (the user's guide's front page), its links into ``docs/`` made site-relative;
* ``docs/results/*.md``: every ``benchmarks/results/*.md`` (what the committed benchmark scripts wrote, with their
  commands and machines), and ``docs/results/index.md`` listing them.

Run by ``make docs`` before ``mkdocs build``; the generated files are not committed (``.gitignore``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"


def _subcommands(parser: argparse.ArgumentParser, prefix: str) -> list[tuple[str, argparse.ArgumentParser]]:
    """``(command line, parser)`` for ``parser`` and every sub-parser below it, depth first, in declaration order."""
    found = [(prefix, parser)]
    for action in parser._actions:  # argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _subcommands(sub, f"{prefix} {name}")
    return found


def cli_page() -> str:
    """The CLI reference: one section per (sub)command with its help text as argparse prints it."""
    sys.path.insert(0, str(ROOT))
    from pipeline.cli import build_parser

    os.environ["COLUMNS"] = "110"  # the same line width on every machine
    lines = ["# CLI reference", "", "Generated from the argparse parser (`python docs/generate.py`); the same text as "
             "`diprune COMMAND --help`.", ""]
    for command, parser in _subcommands(build_parser(), "diprune"):
        parser.prog = command
        lines += [f"## `{command}`", "", "```text", parser.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


def _title(text: str, fallback: str) -> str:
    match = re.search(r"^#\s+(.+)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else fallback


def results_pages(out: Path) -> list[tuple[str, str]]:
    """Copy every committed results page into ``out``; ``(file name, title)`` of each, sorted by name."""
    out.mkdir(parents=True, exist_ok=True)
    pages = []
    for source in sorted(RESULTS.glob("*.md")):
        text = source.read_text(encoding="utf-8")
        # pictures beside the results are referenced relative to the results folder
        for picture in re.findall(r"\]\(([^)\s]+\.png)\)", text):
            if (RESULTS / picture).is_file():
                shutil.copyfile(RESULTS / picture, out / Path(picture).name)
        (out / source.name).write_text(text, encoding="utf-8")
        pages.append((source.name, _title(text, source.stem)))
    return pages


def index_page() -> str:
    """The README with its links made relative to the site: ``docs/x.md`` -> ``x.md``; links to files of the
    repository outside ``docs/`` -> ``../x`` (the repository root, one level above the site's pages)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"\]\(docs/([^)]+)\)", r"](\1)", text)
    return re.sub(r"\]\((?!https?:|#|[\w/.-]+\.md\))([^)]+)\)", r"](../\1)", text)


def main() -> None:
    (DOCS / "index.md").write_text(index_page(), encoding="utf-8")
    cli = cli_page()
    (DOCS / "cli.md").write_text(cli + "\n", encoding="utf-8")
    pages = results_pages(DOCS / "results")
    index = ["# Measured results", "", "Every page below is written by a committed script under `benchmarks/` "
             "(its command and machine are on the page); `python docs/generate.py` copies them here.", ""]
    index += [f"- [{title}]({name})" for name, title in pages]
    (DOCS / "results" / "index.md").write_text("\n".join(index) + "\n", encoding="utf-8")
    print(f"docs: cli.md ({cli.count(chr(10) + '## `diprune')} commands), {len(pages)} results pages")


if __name__ == "__main__":
    main()
