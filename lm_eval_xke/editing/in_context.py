"""Where an in-context editor puts its text: at the start of the user turn of a chat-rendered prompt.

Shared by the editors that edit through the prompt (IKE, BMIKE-53's in-context editing, ReMaKE, SERAC's
counterfactual model): each renders its own context and inserts it here, so a chat template's head stays first.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2

#: Placeholders rendered through the tokenizer's chat template to find where a user turn starts.
USER_PROBE = "\u27e6xke-user\u27e7"
SYSTEM_PROBE = "\u27e6xke-system\u27e7"


@dataclass(frozen=True)
class ChatLayout:
    """Where a user turn's content starts in prompts rendered with a chat template.

    ``opener`` is the text that precedes the content. ``anchored``: it is the whole template head (system turn
    included), so it is searched at the very start of the prompt; otherwise it is the turn's own marker (e.g.
    ``"<|im_end|>\\n<|im_start|>user\\n"``), searched as the last such marker (the turn with the question).
    """

    opener: str
    anchored: bool

    def content_start(self, prompt: str) -> int | None:
        if self.anchored:
            return len(self.opener) if prompt.startswith(self.opener) else None
        found = prompt.rfind(self.opener)
        return None if found < 0 else found + len(self.opener)


def chat_layout(tokenizer) -> ChatLayout | None:
    """Find how the tokenizer's chat template opens a user turn; None without a (renderable) template.

    The user-turn marker is what the head before the user content has in common whether or not a system turn
    is given (the system turn differs). Templates that refuse a system turn, or where the common part is only
    whitespace (the system text is merged into the user turn), fall back to the whole head, anchored.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        head = _head(tokenizer, [{"role": "user", "content": USER_PROBE}])
    except (jinja2.TemplateError, ValueError, TypeError, KeyError):
        return None
    if head is None:
        return None
    try:
        with_system = _head(
            tokenizer, [{"role": "system", "content": SYSTEM_PROBE}, {"role": "user", "content": USER_PROBE}]
        )
    except (jinja2.TemplateError, ValueError, TypeError, KeyError):
        with_system = None
    marker = _common_suffix(head, with_system) if with_system is not None else ""
    if marker.strip():
        return ChatLayout(marker, anchored=False)
    return ChatLayout(head, anchored=True) if head else None


def _head(tokenizer, messages: list[dict]) -> str | None:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    found = text.find(USER_PROBE)
    return None if found < 0 else text[:found]


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n :]


def insert_context(prompt: str, context: str, layout: ChatLayout | None) -> str:
    """``context`` at the start of the user turn of a chat-rendered prompt, else in front of the prompt."""
    start = None if layout is None else layout.content_start(prompt)
    if start is None:
        return context + prompt
    return prompt[:start] + context + prompt[start:]
