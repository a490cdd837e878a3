"""MkDocs hooks for the docs site (mkdocs.yml ``hooks:``).

The docstrings use Sphinx's cross-reference roles (``:class:`X```, ``:mod:`.upkeep```), which
mkdocstrings renders as the role's name followed by the code: drop the role's name, keep the code.
"""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:class|mod|func|meth|attr|data|exc|obj):(?=<code)")


def on_page_content(html: str, **kwargs: Any) -> str:
    return ROLE.sub("", html)
