"""Hugging Face folders: import a supported family into a vlmkit checkpoint, export it back, check
the export against transformers, and write PEFT adapters.

* `importer`: reading and checking a folder (config, safetensors headers and weights, tokenizer,
  chat template), the family registry, `import_hf` / `export_hf`, and the Qwen2-VL, LLaVA-NeXT,
  Idefics3 and InternVL mappings;
* `llava`: LLaVA-1.5 import and export, and the chat-template helpers the families share;
* `families/`: one module per further family (Pixtral, Mllama, PaliGemma, Gemma 3, SmolVLM2,
  LLaVA-OneVision, Idefics2, BLIP-2, Fuyu);
* `reference`: transformers reference models built from a vlmkit model (export and parity);
* `peft`: LoRA adapters as a PEFT folder;
* `output_folder`: writing OUT without ever losing what was there.
"""
