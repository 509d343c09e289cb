"""Renders chat messages to a prompt with the model's own Jinja chat template.

Templates come from the GGUF (`tokenizer.chat_template`), i.e. from files we
did not write, so they run in Jinja's immutable sandbox.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import PeregrineError

# Used when a GGUF carries no template: ChatML is what most instruct models expect.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Private-use code points frame placeholders for message contents.
_MARK = re.compile("(\ue000[0-9]+\ue001)")


class TemplateError(PeregrineError):
    """The chat template could not render these messages."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the model's chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template plus the special tokens it may reference."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source or CHATML_TEMPLATE
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template is invalid: {exc}") from exc
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=list(tools) if tools else None,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template failed: {exc}") from exc
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            raise TemplateError(f"the model's chat template failed: {exc}") from exc

    def render_segments(
        self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[tuple[str, bool]] | None:
        """The prompt as (text, is_message_content) pieces, in order.

        Lets the caller tokenize what users wrote without turning text such as
        "<|im_end|>" into control tokens, while the template's own markup still
        becomes them. None when the template transforms contents (a placeholder
        does not come out exactly once): the caller renders plainly then.
        """
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        masked = [{**m, "content": marks[i]} for i, m in enumerate(messages)]
        text = self.render(masked, add_generation_prompt=add_generation_prompt)
        if any(text.count(mark) != 1 for mark in marks):
            return None
        pieces: list[tuple[str, bool]] = []
        for part in _MARK.split(text):
            if _MARK.fullmatch(part):
                content = messages[int(part[1:-1])].get("content")
                pieces.append((content if isinstance(content, str) else "", True))
            elif part:
                pieces.append((part, False))
        return pieces
