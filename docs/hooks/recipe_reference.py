"""mkdocs hook: the recipe reference page is vlmkit's own generated reference, rendered at build
time, so the site cannot show a stale copy (docs/recipes.md is the same text, kept current by
tests/cli/test_recipe_reference.py for readers of the repository)."""

from __future__ import annotations

PAGE = "recipes.md"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    from vlmkit.recipe_reference import reference_markdown

    return reference_markdown()
