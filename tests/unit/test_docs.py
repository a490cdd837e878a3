"""The documentation cannot drift from the code: parameter tables, code samples, API pages, links.

No database. The rules are written up in docs/development.md ("The documentation").
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import fault_tolerant_pool
import fault_tolerant_pool.testing
from fault_tolerant_pool import FaultTolerantNullPool, FaultTolerantQueuePool

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

#: Parameters of the pools' ``__init__`` that are not the pools' own keywords: SQLAlchemy's
#: ``creator``, the internal ``_fault_tolerance`` (recreate()), and ``**kw``, which carries
#: SQLAlchemy's own pool arguments (pool_size, max_overflow, pool_timeout, ...) unchanged.
NOT_OURS = {"self", "creator", "kw"}

#: The line before a ```python block that is a fragment on purpose (not compiled).
FRAGMENT = "<!-- docs: fragment -->"

#: asyncio REPL rules: the recipes show ``await drain(engine)`` on their own.
ALLOW_TOP_LEVEL_AWAIT = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT


def pool_keywords(poolclass: type) -> dict[str, object]:
    """The pool's own keyword arguments and their defaults, from its signature."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(poolclass.__init__).parameters.items()
        if name not in NOT_OURS
        and not name.startswith("_")
        and parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


def parameter_table(path: Path) -> dict[str, str]:
    """``parameter -> default`` cell of the table headed ``| parameter | default | meaning |``."""
    lines = path.read_text().splitlines()
    start = lines.index("| parameter | default | meaning |")
    rows: dict[str, str] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        name, default = cells[0].strip("`"), cells[1].strip("`")
        assert name not in rows, f"{path.name}: {name} is listed twice"
        rows[name] = default
    return rows


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(line, code, is a marked fragment) of every ```python block in a Markdown file."""
    lines = path.read_text().splitlines()
    blocks: list[tuple[int, str, bool]] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            fragment = i > 0 and lines[i - 1].strip() == FRAGMENT
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append((i + 1, "\n".join(lines[i + 1 : end]) + "\n", fragment))
            i = end
        i += 1
    return blocks


def test_both_pools_take_the_same_keywords_with_the_same_defaults() -> None:
    assert pool_keywords(FaultTolerantQueuePool) == pool_keywords(FaultTolerantNullPool)
    assert len(pool_keywords(FaultTolerantQueuePool)) >= 20  # the introspection found them


@pytest.mark.parametrize("page", [README, DOCS / "parameters.md"], ids=lambda p: p.name)
def test_every_keyword_is_in_the_parameter_table_with_its_real_default(page: Path) -> None:
    keywords = pool_keywords(FaultTolerantQueuePool)
    table = parameter_table(page)
    assert sorted(set(keywords) - set(table)) == [], f"missing from {page.name}'s table"
    assert sorted(set(table) - set(keywords)) == [], f"{page.name} lists keywords that are gone"
    wrong = {
        name: (cell, keywords[name])
        for name, cell in table.items()
        if ast.literal_eval(cell) != keywords[name]
        or type(ast.literal_eval(cell)) is not type(keywords[name])
    }
    assert wrong == {}, "(table, signature) defaults differ"


def test_the_parameter_table_is_the_settings_declaration() -> None:
    """The table's rows (meaning included) are rendered from fault_tolerant_pool.settings:
    edit the declaration, then paste ``python -m fault_tolerant_pool.settings``'s output."""
    from fault_tolerant_pool.settings import parameter_table

    lines = (DOCS / "parameters.md").read_text().splitlines()
    start = lines.index("| parameter | default | meaning |")
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    assert "\n".join(lines[start:end]) == parameter_table()


def test_the_two_parameter_tables_say_the_same() -> None:
    def rows(path: Path) -> list[str]:
        lines = path.read_text().splitlines()
        start = lines.index("| parameter | default | meaning |")
        end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
        # the README links into docs/, the docs page links to its neighbours
        return [re.sub(r"\]\(docs/", "](", line) for line in lines[start:end]]

    assert rows(README) == rows(DOCS / "parameters.md")


def test_the_table_parser_sees_a_wrong_default(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "| parameter | default | meaning |\n|---|---|---|\n| `retry_deadline` | `5.0` | x |\n"
    )
    table = parameter_table(page)
    assert ast.literal_eval(table["retry_deadline"]) != pool_keywords(FaultTolerantQueuePool)[
        "retry_deadline"
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_compiles(page: Path) -> None:
    for line, code, fragment in python_blocks(page):
        if fragment:
            with pytest.raises(SyntaxError):  # a marker on a block that compiles is stale
                compile(code, f"{page.name}:{line}", "exec", flags=ALLOW_TOP_LEVEL_AWAIT)
            continue
        compile(code, f"{page.name}:{line}", "exec", flags=ALLOW_TOP_LEVEL_AWAIT)


def test_the_fragment_markers_are_few_and_the_blocks_are_many() -> None:
    blocks = [block for page in PAGES for block in python_blocks(page)]
    assert len(blocks) >= 20
    assert sum(fragment for _, _, fragment in blocks) <= 3


def test_the_block_finder_sees_a_syntax_error(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nengine = create_engine(\n```\n")
    [(line, code, fragment)] = python_blocks(page)
    assert (line, fragment) == (3, False)
    with pytest.raises(SyntaxError):
        compile(code, "page.md", "exec", flags=ALLOW_TOP_LEVEL_AWAIT)


def api_page_names(page: Path, module: str) -> set[str]:
    return set(re.findall(rf"^::: {re.escape(module)}\.(\w+)$", page.read_text(), re.M))


def test_the_api_pages_list_exactly_the_public_names() -> None:
    assert api_page_names(DOCS / "api.md", "fault_tolerant_pool") == set(
        fault_tolerant_pool.__all__
    )
    assert api_page_names(DOCS / "api-testing.md", "fault_tolerant_pool.testing") == set(
        fault_tolerant_pool.testing.__all__
    )


def test_the_readme_is_a_front_page() -> None:
    assert len(README.read_text().splitlines()) <= 250


def test_the_readme_links_point_at_files_that_exist() -> None:
    """GitHub renders relative links; mkdocs --strict checks the docs pages' own links."""
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [target for target in targets if not re.match(r"[a-z]+://", target)]
    assert local, "no relative links found"
    missing = [target for target in local if not (ROOT / target).exists()]
    assert missing == []
    for target in local:
        if target.endswith(".md") and target.startswith("docs/"):
            anchors = re.findall(rf"\]\({re.escape(target)}#([^)]+)\)", README.read_text())
            slugs = {slug(h) for h in re.findall(r"^#+ (.+)$", (ROOT / target).read_text(), re.M)}
            assert set(anchors) <= slugs, f"{target}: anchors {set(anchors) - slugs} not found"


def slug(heading: str) -> str:
    """Python-Markdown's toc slug, which GitHub's agrees with for these headings."""
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)
