"""Markdown to the HTML subset QTextBrowser draws, with highlighted code blocks.

Each code block gets a header with its language and a "Copy" link whose href
is `copy:<index>`; the view looks the block's text up in `Rendered.code_blocks`.
"""

from __future__ import annotations

import html
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

from app.qt import theme

# Rendered messages kept for reuse (a chat reopened, a view rebuilt).
CACHE_SIZE = 256
# Code blocks are dark in both themes; their Copy link keeps the dark theme's accent.
DARK_LINK = theme.DARK.accent


@dataclass
class Rendered:
    """HTML for one message and the raw text of its code blocks, in order."""

    html: str
    code_blocks: list[str] = field(default_factory=list)


class MarkdownRenderer:
    """Renders message text; raw HTML in the text is shown as text, never interpreted."""

    def __init__(self, palette: theme.Palette = theme.DARK) -> None:
        self.palette = self._p = palette
        style = palette.pygments_style
        self._md = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable(
            ["table", "strikethrough"]
        )
        self._formatter = HtmlFormatter(style=style, noclasses=True, nowrap=True)

        # markdown-it binds rules to its renderer, so they reach us through closures.
        def fence(_renderer: Any, tokens: Any, idx: int, _options: Any, _env: Any) -> str:
            return self._fence(tokens[idx])

        def code_inline(_renderer: Any, tokens: Any, idx: int, _options: Any, _env: Any) -> str:
            return self._code_inline(tokens[idx])

        def image(_renderer: Any, tokens: Any, idx: int, _options: Any, _env: Any) -> str:
            return self._image(tokens[idx])

        self._md.add_render_rule("fence", fence)
        self._md.add_render_rule("code_block", fence)
        self._md.add_render_rule("code_inline", code_inline)
        self._md.add_render_rule("image", image)
        self._blocks: list[str] = []
        self._cache: OrderedDict[str, Rendered] = OrderedDict()

    def render(self, text: str) -> Rendered:
        """HTML for `text`; finished messages come from a small cache (reopening a chat)."""
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            return cached
        rendered = self._render(text)
        self._cache[text] = rendered
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return rendered

    def _render(self, text: str) -> Rendered:
        self._blocks = []
        body = self._md.render(text)
        css = (
            f"<style>p {{ margin: 0 0 8px 0; line-height: 140%; }}"
            f" a {{ color: {self._p.accent}; }}"
            f" h1, h2, h3 {{ margin: 10px 0 6px 0; }}"
            f" li {{ margin-bottom: 3px; }}"
            f" table.md {{ border-collapse: collapse; }}"
            f" th, td {{ padding: 3px 8px; }}</style>"
        )
        return Rendered(css + body, list(self._blocks))

    def _fence(self, token: Any) -> str:
        code = token.content.rstrip("\n")
        lang = (token.info or "").strip().split(" ")[0]
        index = len(self._blocks)
        self._blocks.append(code)
        try:
            # No guess_lexer: it imports every lexer module, a stall of seconds on
            # the GUI thread (caught by the GUI watchdog test).
            lexer = get_lexer_by_name(lang or "text")
        except ClassNotFound:
            lexer = get_lexer_by_name("text")
        body = highlight(code, lexer, self._formatter) if code else ""
        label = html.escape(lang or "code")
        p = self._p
        # Tables are the one way QTextDocument draws a filled box around a block.
        return (
            f'<table width="100%" border="0" cellspacing="0" cellpadding="8"'
            f' bgcolor="{p.code_bg}" style="margin: 4px 0 10px 0;">'
            f'<tr><td bgcolor="{p.code_head}" style="padding: 4px 10px;">'
            f'<span style="color: {p.code_muted}; font-size: 9pt;">{label}</span></td>'
            f'<td bgcolor="{p.code_head}" align="right" style="padding: 4px 10px;">'
            f'<a href="copy:{index}" style="color: {DARK_LINK}; text-decoration: none;'
            f' font-size: 9pt;">Copy</a></td></tr>'
            f'<tr><td colspan="2"><pre style="font-family: {theme.MONO_FAMILY};'
            f' font-size: 9.5pt; margin: 0; color: {p.code_text};">{body}</pre></td></tr></table>'
        )

    def _image(self, token: Any) -> str:
        """An image becomes a link with its description: never loaded.

        The text comes from a model or a remote server; an <img> would make
        Qt read that path on the GUI thread (a FIFO hangs it, /dev/zero
        exhausts memory) or fetch a URL.
        """
        src = str(token.attrs.get("src", ""))
        alt = token.content or src or "image"
        return f'<a href="{html.escape(src, quote=True)}">[image: {html.escape(alt)}]</a>'

    def _code_inline(self, token: Any) -> str:
        return (
            f'<code style="font-family: {theme.MONO_FAMILY}; background: {self._p.surface_hi};">'
            f"&nbsp;{html.escape(token.content)}&nbsp;</code>"
        )
