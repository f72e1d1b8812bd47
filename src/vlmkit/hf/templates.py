"""Chat templates of imported folders: where the folder keeps its template, whether it is usable
with vlmkit's prompt layout (rendered under a time budget), and the wrappers that let a
template written for content lists or plain strings take vlmkit's `<image>` placeholders."""

from __future__ import annotations

import json
from pathlib import Path

from vlmkit.hf.folder import ExportError, check_in_vocab, load_tokenizer, read_json
from vlmkit.processing.prompt import IMAGE_PART_MARK, IMAGE_PARTS_FLAG

# Chat template prefix: turns OpenAI / processor-style content lists into the plain strings the
# LM's own template expects, with "<image>" where each image goes (vlmkit's prompt layout).
CONTENT_LIST_PREAMBLE = (
    "{%- set _ns = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set _ns.msgs = _ns.msgs + [m] -%}"
    "{%- else -%}{%- set _p = namespace(t=[]) -%}"
    "{%- for part in m['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url'] -%}{%- set _p.t = _p.t + ['<image>'] -%}"
    "{%- elif part['type'] == 'text' -%}{%- set _p.t = _p.t + [part['text']] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set _ns.msgs = _ns.msgs + [{'role': m['role'], 'content': _p.t | join('\\n')}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = _ns.msgs -%}"
)


def chat_template(folder: Path, tokenizer) -> str | None:
    """The processor's chat template if the folder has one (LLaVA folders keep it there)."""
    jinja, packed = folder / "chat_template.jinja", folder / "chat_template.json"
    if jinja.is_file():
        try:
            return jinja.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ExportError(f"{jinja} is not UTF-8 text (byte {e.start})") from None
    if packed.is_file():
        template = read_json(packed).get("chat_template")
        if not isinstance(template, str):
            raise ExportError(f"{packed}: chat_template must be a string, not {json.dumps(template)[:80]}")
        return template
    return tokenizer.chat_template


def template_source(folder: Path) -> str:
    """The file the folder's chat template comes from, for error messages."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if (folder / name).is_file():
            return str(folder / name)
    return f"{folder / 'tokenizer_config.json'} (chat_template)"


class TemplateTimeout(ExportError):
    """A chat template that renders a two-turn probe for longer than any real one needs."""


# Rendering a real chat template takes milliseconds; a template with nested huge loops would hold
# import-hf forever.
TEMPLATE_SECONDS = 5.0


class _TemplateClock:
    """A time budget shared by every probe render of one template. Rendering runs jinja's compiled
    Python, so a trace function can stop it in any thread (a signal could not): each traced event
    checks the deadline and raises TemplateTimeout inside the render."""

    def __init__(self, source: str, seconds: float = TEMPLATE_SECONDS):
        import time

        self.source, self.seconds, self.deadline = source, seconds, time.monotonic() + seconds

    def render(self, tokenizer, messages, template: str) -> str:
        import sys
        import time

        def trace(frame, event, arg):
            if time.monotonic() > self.deadline:
                raise TemplateTimeout(f"{self.source}: the chat template did not render a two-turn probe in {self.seconds:g} s "
                                      "(runaway loops?); fix or remove it")
            return trace

        previous = sys.gettrace()
        sys.settrace(trace)
        try:
            return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
        finally:
            sys.settrace(previous)


# LLaVA processor templates iterate over content parts; vlmkit renders plain-string contents
# (with "<image>" inline). Wrapping each string as one text part lets such a template render it.
STRING_TO_PARTS_PREAMBLE = (
    "{%- set _ns = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}"
    "{%- set _ns.msgs = _ns.msgs + [{'role': m['role'], 'content': [{'type': 'text', 'text': m['content']}]}] -%}"
    "{%- else -%}{%- set _ns.msgs = _ns.msgs + [m] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = _ns.msgs -%}"
)


def image_parts_template(template: str, image_token: str) -> str:
    """`template` reading each string turn as content parts: a turn that starts with
    IMAGE_PART_MARK (the chat processor writes it before a turn that opens with an image) as an
    image part then its text, any other as one text part. The image part renders as
    `image_token`; the text after it is tagged so the wrapper removes that rendering, leaving the
    expanded image text in place."""
    tag, token, mark = (json.dumps(x, ensure_ascii=False) for x in ("\ue001", image_token, IMAGE_PART_MARK))
    return (
        "{#- " + IMAGE_PARTS_FLAG + " -#}"
        "{%- set _ns = namespace(msgs=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if m['content'] is string -%}"
        "{%- set _p = namespace(items=[]) -%}"
        "{%- for piece in m['content'].split(" + mark + ") -%}"
        "{%- if not loop.first -%}{%- set _p.items = _p.items + [{'type': 'image'}, {'type': 'text', 'text': " + tag + " + piece}]"
        " -%}{%- elif piece or loop.length == 1 -%}{%- set _p.items = _p.items + [{'type': 'text', 'text': piece}] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set _ns.msgs = _ns.msgs + [{'role': m['role'], 'content': _p.items}] -%}"
        "{%- else -%}{%- set _ns.msgs = _ns.msgs + [m] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = _ns.msgs -%}"
        "{% set _vlmkit_out %}" + template + "{% endset %}{{ _vlmkit_out | replace(" + token + " + " + tag + ", '') }}"
    )


def plain_of_image_parts(template: str) -> str | None:
    """The folder's template inside an `image_parts_template` wrapper (None for any other)."""
    head, tail = "{% set _vlmkit_out %}", "{% endset %}{{ _vlmkit_out | replace("
    if not template.startswith("{#- " + IMAGE_PARTS_FLAG) or head not in template:
        return None
    return template.split(head, 1)[1].rsplit(tail, 1)[0]


def _needs_image_parts(template: str, chosen: str | None, tokenizer, image_token: str, clock: _TemplateClock) -> str | None:
    """The image-parts wrapper, where the template renders a turn that starts with an image
    differently from the same turn as one string (and the wrapper reproduces the parts exactly)."""
    def render(messages, candidate):
        try:
            return clock.render(tokenizer, messages, candidate)
        except TemplateTimeout:
            raise
        except Exception:  # a template that cannot render the input raises inside jinja
            return None

    listed = render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "B"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "C"}]},
                     {"role": "user", "content": [{"type": "text", "text": "D"}, {"type": "image"}]}], template)
    if listed is None or f"{image_token}B" not in listed:
        return None
    if chosen and render([{"role": "user", "content": f"{image_token}B"}, {"role": "assistant", "content": "C"},
                          {"role": "user", "content": f"D{image_token}"}], chosen) == listed:
        return None  # the string form already renders what the processor does
    candidate = image_parts_template(template, image_token)
    marked = render([{"role": "user", "content": f"{IMAGE_PART_MARK}{image_token}B"}, {"role": "assistant", "content": "C"},
                     {"role": "user", "content": f"D{image_token}"}], candidate)
    return candidate if marked == listed else None


def usable_template(template: str | None, tokenizer, image_token: str, source: str = "the folder's chat template") -> str | None:
    """The template as is if it renders string contents, else wrapped so that it does; wrapped to
    read images as content parts where a turn's leading image changes the rendering. `source`
    (the file it came from) names it in errors; rendering is bounded in time (TEMPLATE_SECONDS)."""
    if not template:
        return None
    if not isinstance(template, str):
        raise ExportError(f"{source}: several named chat templates; vlmkit imports one")
    clock = _TemplateClock(source)
    try:
        chosen = _string_template(template, tokenizer, image_token, clock)
    except TemplateTimeout:
        raise
    except ExportError:
        chosen = None
    parts = _needs_image_parts(template, chosen, tokenizer, image_token, clock)
    if parts:
        return parts
    if chosen is None:
        raise ExportError(f"{source}: the chat template renders neither plain-string nor content-list messages with text intact")
    return chosen


def _string_template(template: str, tokenizer, image_token: str, clock: _TemplateClock | None = None) -> str:
    """The template as is if it renders string contents, else wrapped so that it does."""
    clock = clock or _TemplateClock("the folder's chat template")
    probe = [{"role": "user", "content": f"A{image_token}B"}]
    for candidate in (template, STRING_TO_PARTS_PREAMBLE + template):
        try:
            text = clock.render(tokenizer, probe, candidate)
        except TemplateTimeout:
            raise
        except Exception:  # a template that cannot render strings raises inside jinja
            continue
        if f"A{image_token}B" in text:
            return candidate
    raise ExportError(f"{clock.source}: the chat template renders neither plain-string nor content-list messages with text intact")


def folder_tokenizer(folder: Path, image_token: str):
    tokenizer = load_tokenizer(folder)
    check_in_vocab(tokenizer, image_token, f"{folder} (processor_config.json / config.json)")
    template = usable_template(chat_template(folder, tokenizer), tokenizer, image_token, template_source(folder))
    if template:
        tokenizer.chat_template = template
    return tokenizer


def plain_template(tokenizer) -> str | None:
    """The chat template as the source folder had it (import may have wrapped it)."""
    template = tokenizer.chat_template
    if isinstance(template, str) and template.startswith(STRING_TO_PARTS_PREAMBLE):
        return template[len(STRING_TO_PARTS_PREAMBLE):]
    if isinstance(template, str) and (inner := plain_of_image_parts(template)) is not None:
        return inner
    return template
