"""Write the docs' tables from the declarations in the code, so they are generated rather than pasted.

    .venv/bin/python scripts/gen_docs_tables.py          # rewrite the tables in docs/
    .venv/bin/python scripts/gen_docs_tables.py --check  # exit 1 if a committed table is stale (tests run this)

Each table sits in its page between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``:

- ``api-fields`` (docs/api.md): every request field, from the contract's declaration, with the shipped settings
  of the tiny SD 1 model;
- ``settings`` (docs/configuration.md): every ``handler:`` setting of model-config.yaml, its default from the
  ``HandlerSettings`` dataclass and its meaning from the docstring under it;
- ``openai-fields`` (docs/openai.md): every OpenAI field the OpenAI door knows and what it does with it.

This script is build tooling: it lives outside ``handler/`` so that no archive ships it.
"""

import argparse
import ast
import re
import sys
from dataclasses import fields
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from handler.core.contract import Contract  # noqa: E402  (the repository root must be on sys.path first)
from handler.core.settings import HandlerSettings  # noqa: E402
from handler.protocols import openai as openai_api  # noqa: E402

DOCS = REPO_ROOT / "docs"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n).*?(<!-- end generated -->)", re.DOTALL)


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def api_fields_table() -> str:
    rows = [(f"`{name}`", default, allowed, meaning)
            for name, default, allowed, meaning in Contract(HandlerSettings()).field_table()]
    return markdown_table(("field", "default", "allowed", "meaning"), rows)


def setting_meanings() -> dict[str, str]:
    """The docstring under each field of ``HandlerSettings``, read from its source."""
    source = (REPO_ROOT / "handler" / "core" / "settings.py").read_text()
    body = next(node for node in ast.parse(source).body
                if isinstance(node, ast.ClassDef) and node.name == "HandlerSettings").body
    meanings = {}
    for field, after in zip(body, body[1:]):
        if (isinstance(field, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            meanings[field.target.id] = " ".join(after.value.value.split())
    return meanings


def yaml_text(value) -> str:
    """A default as it is written in model-config.yaml."""
    if value == "":
        return ""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{list(value)}`" if isinstance(value, tuple) else f"`{value}`"


def settings_table() -> str:
    meanings = setting_meanings()
    missing = [field.name for field in fields(HandlerSettings) if field.name not in meanings]
    if missing:
        raise SystemExit(f"gen_docs_tables: settings without a docstring in handler/core/settings.py: {missing}")
    rows = [(f"`{field.name}`", yaml_text(field.default),
             re.sub(r"docs/([\w-]+\.md)", r"[\1](\1)", meanings[field.name]))
            for field in fields(HandlerSettings)]
    return markdown_table(("setting", "default", "meaning"), rows)


def openai_fields_table() -> str:
    routes = {openai_api.GENERATIONS: "generations", openai_api.EDITS: "edits"}
    rows = [(f"`{spec.name}`", ", ".join(routes[route] for route in spec.routes), spec.handling)
            for spec in openai_api.OPENAI_FIELDS]
    return markdown_table(("OpenAI field", "endpoints", "what this server does"), rows)


TABLES = {"api-fields": api_fields_table, "settings": settings_table, "openai-fields": openai_fields_table}


def generated_pages() -> dict[Path, str]:
    """Every docs page holding a generated table, as it should read now."""
    pages = {}
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        names = [match["name"] for match in BLOCK.finditer(text)]
        unknown = set(names) - set(TABLES)
        if unknown:
            raise SystemExit(f"gen_docs_tables: {page.name} asks for unknown table(s) {sorted(unknown)}")
        if names:
            pages[page] = BLOCK.sub(lambda match: match[1] + "\n" + TABLES[match["name"]]() + "\n" + match[3], text)
    return pages


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page's table differs from the code's")
    arguments = parser.parse_args(argv)
    pages = generated_pages()
    stale = [page for page, text in pages.items() if page.read_text() != text]
    if arguments.check:
        for page in stale:
            print(f"stale: {page.relative_to(REPO_ROOT)} (run: .venv/bin/python scripts/gen_docs_tables.py)")
        return 1 if stale else 0
    for page in stale:
        page.write_text(pages[page])
        print(f"wrote {page.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
