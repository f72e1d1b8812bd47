"""How to load what `export-hf` wrote: the transformers model class and its `from_pretrained`
line, the processor, and, where transformers' processor needs torchvision (a video processor, or a
processor class that declares it: Qwen2-VL / Qwen2.5-VL, InternVL, LLaVA-OneVision, SmolVLM2,
Pixtral, Mistral3), the PIL image processor and tokenizer that load without it. Read from the
written folder's own files, so it says what transformers will find there."""

from __future__ import annotations

import json
from pathlib import Path


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def processor_needs_torchvision(name: str) -> bool:
    """Whether transformers' processor class `name` cannot load without torchvision: it holds a
    video processor (transformers' video processors resize with torchvision), or it declares the
    backend. Asked of the class itself, so the answer is the same with torchvision installed."""
    import transformers  # heavy optional dependency: only when an export is described

    try:
        cls = getattr(transformers, name)
        attributes = cls.get_attributes()
    except ImportError as e:  # a placeholder class: transformers names the missing backend
        return "torchvision" in str(e).lower()
    except AttributeError:
        return False
    backends = cls.__dict__.get("__backends", ())
    return "video_processor" in attributes or any("torchvision" in str(b) for b in backends)


def load_instructions(out: Path, adapter: Path | None = None, checkpoint: Path | None = None) -> str:
    """Python lines that load the export at `out` (and its PEFT adapter folder), as text to print;
    `checkpoint`: the vlmkit checkpoint it came from, which vlmkit serves without torchvision."""
    out = Path(out).resolve()
    model_class = (_read(out / "config.json").get("architectures") or ["AutoModelForImageTextToText"])[0]
    processor = _read(out / "processor_config.json").get("processor_class")
    lines = ["load it with transformers:",
             f"  from transformers import AutoProcessor, {model_class}",
             f'  model = {model_class}.from_pretrained("{out}")']
    if adapter is not None:
        lines += ["  from peft import PeftModel", f'  model = PeftModel.from_pretrained(model, "{adapter}")']
    lines.append(f'  processor = AutoProcessor.from_pretrained("{out}")' + (f"  # {processor}" if processor else ""))
    if processor and processor_needs_torchvision(processor):
        image_type = _read(out / "preprocessor_config.json").get("image_processor_type")
        pil = f"{image_type}Pil" if image_type and not image_type.endswith("Pil") else image_type
        image_line = (f'  image_processor = {pil}.from_pretrained("{out}")' if pil
                      else f'  image_processor = AutoImageProcessor.from_pretrained("{out}", backend="pil")')
        serve = (f"`vlmkit serve --checkpoint {checkpoint}`" if checkpoint
                 else f"`vlmkit import-hf {out} CKPT`, then `vlmkit serve --checkpoint CKPT`")
        lines += [f"without torchvision ({processor} needs it; pip install torchvision), the PIL image processor and the tokenizer:",
                  f"  from transformers import AutoTokenizer, {pil or 'AutoImageProcessor'}",
                  image_line,
                  f'  tokenizer = AutoTokenizer.from_pretrained("{out}")',
                  f"  # then repeat the image token as often as the image processor's grid says, as {processor} does,",
                  f"  # or let vlmkit process the images: {serve}"]
    return "\n".join(lines)
