"""Writing what an import or export produces: the staged LLM folder, the imported vlmkit
checkpoint, a family's transformers folder with its processor and generation config, all built
beside OUT and swapped in (`output_folder`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vlmkit.checkpoint import save_checkpoint
from vlmkit.generate import extra_stop_ids
from vlmkit.hf.folder import ExportError, read_json
from vlmkit.hf.output_folder import publish, staging_folder
from vlmkit.hf.templates import plain_template
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.utils import respect_umask

IMPORT_COMMAND, EXPORT_COMMAND = "import-hf", "export-hf"


def stage_llm(tmp: Path, causal, tokenizer) -> Path:
    """Write the converted LLM and its tokenizer into the staging folder; returns their folder."""
    staged = tmp / "llm"
    causal.save_pretrained(staged, safe_serialization=True)
    tokenizer.save_pretrained(staged)
    return staged


def build_imported(config, image_token: str | None = None, expected_id: int | None = None):
    """The vlmkit model an imported recipe describes, vision tower and connector left trainable so
    `load_part` can fill and check them. The image token's id is checked against the one
    config.json gives: a tokenizer that maps it elsewhere would put image features on the wrong
    positions."""
    model = VisionLanguageModel.build(config.model)
    if expected_id is not None and model.image_token_id != expected_id:
        raise ExportError(f"the tokenizer maps {image_token!r} to {model.image_token_id}, config.json says {expected_id}")
    model.set_trainable(["vision", "connector"])
    return model


def keep_saved_tokenizer_class(model, staged_llm: Path) -> None:
    """Give the model the tokenizer class its source folder's tokenizer loaded as (the class the
    staged folder's tokenizer_config.json records). AutoTokenizer on the staged LLM folder reads
    config.json's model type and, for some types (qwen2), swaps the saved class for that type's
    own, which rebuilds the pre-tokenizer and decoder from the vocabulary instead of taking
    tokenizer.json's: a word-level tokenizer would then decode without the spaces transformers'
    decode puts between its words."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    saved = read_json(staged_llm / "tokenizer_config.json").get("tokenizer_class")
    cls = tokenizer_class_from_name(saved) if isinstance(saved, str) else None
    if cls is not None and type(model.tokenizer) is not cls:
        model.tokenizer = cls.from_pretrained(staged_llm, local_files_only=True)


def write_checkpoint(model, config, folder: Path, out: Path, staged_llm: Path, tmp: Path, max_length: int) -> Path:
    """Save the imported model under `out` (built in the staging folder `tmp`, then swapped in; see
    `vlmkit.hf.output_folder`), its LLM folder inside it, and the recipe pointing at that folder with
    `max_length` as `train.max_length`. The LLM folder is recorded relative to the checkpoint
    (`llm`), so the import loads wherever it is moved."""
    config.train.max_length = max_length
    keep_saved_tokenizer_class(model, staged_llm)
    ckpt = save_checkpoint(tmp / "ckpt", model, config, meta={"imported_from": str(folder.resolve())}, inside=("llm",))
    shutil.move(str(staged_llm), ckpt / "llm")
    respect_umask(ckpt)
    return publish(ckpt, out, command=IMPORT_COMMAND, source=folder.resolve())


def atomic_folder(out: Path, write) -> Path:
    """Have `write` fill a staging folder beside `out`, then swap it in (`vlmkit.hf.output_folder`)."""
    tmp = staging_folder(out)
    try:
        write(tmp)
        respect_umask(tmp)
        return publish(tmp, out, command=EXPORT_COMMAND)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap: the previous export


def write_export(out: str | Path, ref, tokenizer, processor_config: dict, image_processor=None,
                 json_files: dict[str, dict] | None = None) -> Path:
    """The transformers folder of an export: the model, its image processor (when it has one), the
    tokenizer with its plain chat template, `processor_config.json` and any further JSON settings
    files (name -> settings), swapped into place at `out`."""

    def write(tmp: Path) -> None:
        ref.save_pretrained(tmp, safe_serialization=True)
        if image_processor is not None:
            image_processor.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        template = plain_template(tokenizer)
        if template:
            (tmp / "chat_template.jinja").write_text(template)
        for name, settings in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(settings, indent=2))
        (tmp / "processor_config.json").write_text(json.dumps(processor_config, indent=2))

    return atomic_folder(Path(out), write)


def hf_generation_config(tokenizer, **kw):
    from transformers import GenerationConfig

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(eos_token_id=stop_ids(tokenizer), pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id,
                            do_sample=False, **kw)


def stop_ids(tokenizer) -> list[int]:
    return sorted({i for i in [tokenizer.eos_token_id, *extra_stop_ids(tokenizer)] if i is not None})


def load_reference(ref, state: dict, family: str) -> None:
    """Put vlmkit's weights into the transformers model; only rotary buffers may be left unset."""
    missing, unexpected = ref.load_state_dict(state, strict=False)
    if [m for m in missing if "rotary" not in m] or unexpected:
        raise ExportError(f"weights do not map onto {family} (missing {missing[:5]}, unexpected {unexpected[:5]})")


def save_with_processor(ref, processor, out: str | Path) -> Path:
    """The model and its processor files, written into one folder swapped into place."""

    def write(tmp: Path) -> None:
        ref.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    return atomic_folder(Path(out), write)


def model_sources(model) -> tuple[Path, ...]:
    """Local folders a loaded model still reads from (its LLM folder): an export may not replace them."""
    path = model.config.llm.path
    return (Path(path),) if path and Path(path).exists() else ()
