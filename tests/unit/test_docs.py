"""The documentation site's generated pages: every subcommand in the CLI reference, every results page copied, and
every page the site's navigation names exists once generated (the site itself is built by ``make docs``)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generate_module():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_has_every_subcommand_with_its_options() -> None:
    from pipeline.cli import build_parser

    page = _generate_module().cli_page()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"## `diprune {name}`" in page, name
    assert "## `diprune latency fit`" in page  # nested sub-commands too
    assert "--target-macs" in page and "--labels" in page


def test_results_pages_are_copied_with_their_titles(tmp_path: Path) -> None:
    pages = _generate_module().results_pages(tmp_path)
    committed = sorted(p.name for p in (ROOT / "benchmarks" / "results").glob("*.md"))
    assert [name for name, _ in pages] == committed
    assert all(title for _, title in pages)
    assert (tmp_path / committed[0]).read_text() == (ROOT / "benchmarks" / "results" / committed[0]).read_text()


def test_every_page_in_the_site_navigation_exists_or_is_generated() -> None:
    nav = re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    assert nav
    generated = {"cli.md", "results/index.md", "index.md"}
    missing = [page for page in nav if page not in generated and not (ROOT / "docs" / page).is_file()]
    assert not missing
