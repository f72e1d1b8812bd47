"""Image preprocessing families and the chat processor.

The two builders import their modules when called: this package's `__init__` runs whenever any
of its modules is imported (by the model, the data pipeline, the registries' discovery), and
importing the chat processor and video decoding from here would load them all every time."""

from __future__ import annotations


def build_image_processor(model_config, tokens_per_image: int | None = None):
    """The model's image processor, from the registry (the first lookup finds every family's)."""
    from vlmkit.registry import IMAGE_PROCESSORS

    cfg = model_config.processor
    return IMAGE_PROCESSORS.build(cfg.name, cfg, tokens_per_image=tokens_per_image)


def build_chat_processor(model, max_length: int):
    """`processor.options.video` (a dict of `VideoOptions` fields) sets frame sampling and temporal
    compression; `processor.options.sentinels` (auto / always / never) the `<image_k>` tags."""
    from vlmkit.processing.prompt import ChatProcessor
    from vlmkit.processing.video import VideoOptions

    cfg = model.config
    image_processor = model.image_processor or build_image_processor(cfg, tokens_per_image=model.tokens_per_image)
    options = cfg.processor.options
    # A connector that reads the instruction tokenizes it its own way (None for the others).
    instructions = model.connector.instruction_encoder(cfg)
    return ChatProcessor(model.tokenizer, image_processor, cfg.image_token, max_length, cfg.processor.max_image_pixels,
                         video=VideoOptions.from_options(options.get("video")), sentinels=options.get("sentinels", "auto"),
                         position_rule=model.position_rule, image_formats=cfg.processor.image_formats,
                         system_prompt=cfg.system_prompt, video_token=cfg.video_token,
                         instruction_encoder=instructions)
