"""A checkpoint's own chat template (Jinja), rendered the way transformers and mlx-lm do.

Fine-tuned checkpoints may ship a template of their own; it is found where transformers looks
(`chat_template.jinja`, then a processor's `chat_template.json`, then `chat_template` in
`tokenizer_config.json`) and rendered in a sandbox with transformers' settings and helpers
(`raise_exception`, `strftime_now`, `tojson`) and the special tokens as variables.
"""

import json
from datetime import datetime
from pathlib import Path
from typing import List, Optional

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import read_json_object


class ChatTemplateError(ValueError):
    """The chat template cannot be read or rejected the conversation."""


def read_chat_template(path: Path) -> Optional[str]:
    """The template source of the checkpoint directory `path`, or None if it has none."""
    path = Path(path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = read_json_object(path / name).get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str):
            return template
    return None


class ChatTemplate:
    """A compiled template; `render(messages)` -> the prompt text."""

    def __init__(self, source: str, tokens: dict):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the checkpoint's chat template does not compile: {e}") from None
        self.tokens = tokens

    def render(self, messages: List[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens
            )
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the checkpoint's chat template failed: {type(e).__name__}: {e}") from None


def _raise(message: str):
    raise ChatTemplateError(f"the checkpoint's chat template rejected the conversation: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
