"""English Wikipedia prose from a MediaWiki XML dump: the articles, and the paragraphs of prose
in each (what the ``wiki`` corpus of ``calib.corpora`` is made of).

Only articles (namespace 0, not redirects) are read. Templates, references, comments, tables,
galleries, formulas, file and category links, headings and the reference / link sections are
dropped (mwparserfromhell); links keep their text; of what is left an article keeps its
paragraphs and list items of prose (at least ``_MIN_PROSE_WORDS`` words, ending a sentence, no
markup left), joined by blank lines.
"""

from __future__ import annotations

import bz2
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["WIKI_PARSER_VERSION", "wiki_articles", "wiki_prose"]

# Part of the corpus cache key: raise it whenever the parsing below changes what it keeps.
WIKI_PARSER_VERSION = 1

def wiki_articles(dump: Path) -> Iterator[str]:
    """Wikitext of each article page (namespace 0, not a redirect) of a MediaWiki XML dump."""
    with bz2.open(dump) as handle:
        for _, element in ET.iterparse(handle):
            if not element.tag.endswith("}page"):
                continue
            namespace = element.findtext("{*}ns")
            text = element.findtext("{*}revision/{*}text") or ""
            redirect = element.find("{*}redirect") is not None
            redirect = redirect or text.lstrip()[:9].upper() == "#REDIRECT"
            if namespace == "0" and not redirect:
                yield text
            element.clear()


# Sections that hold lists of links or citations, not prose.
_SKIPPED_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "references and notes",
    "works cited", "gallery", "discography", "filmography",
}  # fmt: skip
# Tags whose content is never prose: references, tables, galleries, formulas, code, ...
_DROPPED_TAGS = {
    "ref", "references", "table", "gallery", "math", "chem", "timeline", "imagemap", "score",
    "syntaxhighlight", "source", "pre", "code", "graph", "mapframe", "templatedata", "hiero",
}  # fmt: skip
_NON_TEXT_LINKS = ("file:", "image:", "media:", "category:")
_MIN_PROSE_WORDS = 8
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*$")
_INTERWIKI = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)?:")
# Removed before parsing: references and comments (the parser leaves a few unbalanced ones as text).
_REFS_AND_COMMENTS = re.compile(r"<ref[^>]*?/>|<ref[^>]*>.*?</ref\s*>|<!--.*?-->", re.S | re.I)
# Parentheses emptied by removed pronunciation templates: "Alabama ( ; )" -> "Alabama".
_EMPTY_PARENS = re.compile(r"\s*\([\s,;:]*\)")
# Markup that means a paragraph was not parsed cleanly: such a paragraph is dropped.
_MARKUP = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "</", "/>", "&nbsp;")


def wiki_prose(wikitext: str) -> str:
    """The paragraphs of prose in an article's wikitext, separated by blank lines ("" if none)."""
    import mwparserfromhell

    wikitext = _REFS_AND_COMMENTS.sub("", wikitext)
    rendered = _render(mwparserfromhell.parse(wikitext).nodes, top=True)
    paragraphs = [_EMPTY_PARENS.sub("", " ".join(line.split())) for line in rendered.split("\n")]
    return "\n\n".join(p for p in paragraphs if _is_prose(p))


def _is_prose(line: str) -> bool:
    return (
        len(line.split()) >= _MIN_PROSE_WORDS
        and _SENTENCE_END.search(line) is not None
        and not line.startswith(("|", "!"))
        and not any(mark in line for mark in _MARKUP)
    )


def _render(nodes: Iterable, top: bool = False) -> str:
    """Text of parsed wikicode nodes; at the top level, sections in _SKIPPED_SECTIONS vanish."""
    from mwparserfromhell import nodes as kinds

    parts: list[str] = []
    skip_level = 0  # > 0 while inside a skipped section of this level
    for node in nodes:
        if isinstance(node, kinds.Heading):
            title = str(node.title.strip_code()).strip().lower()
            if skip_level and node.level > skip_level:
                continue
            skip_level = node.level if top and title in _SKIPPED_SECTIONS else 0
            parts.append("\n")  # headings are not prose; they end the paragraph before them
        elif not skip_level:
            parts.append(_render_node(node, kinds))
    return "".join(parts)


def _render_node(node, kinds) -> str:
    if isinstance(node, kinds.Text):
        return node.value
    if isinstance(node, kinds.Wikilink):
        title = str(node.title).strip()
        if title.lower().startswith(_NON_TEXT_LINKS) or _INTERWIKI.match(title):
            return ""
        return _render((node.text or node.title).nodes)
    if isinstance(node, kinds.ExternalLink):
        return _render(node.title.nodes) if node.title else ""
    if isinstance(node, kinds.HTMLEntity):
        return node.normalize()
    if isinstance(node, kinds.Tag):
        return _render_tag(node)
    return ""  # templates, template arguments, comments


def _render_tag(tag) -> str:
    name = str(tag.tag).strip().lower()
    if name in _DROPPED_TAGS:
        return ""
    if name in ("li", "dt", "dd"):  # list and indent markers *, #, ;, : start a line
        return "\n"
    if name == "br":
        return "\n"
    if tag.self_closing or tag.contents is None:
        return ""
    return _render(tag.contents.nodes)
