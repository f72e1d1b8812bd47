"""The shared Hugging Face machinery every family folder's import and export is built from; the
folders (`vlmkit.families.<family>/hf.py`) hold each family's own mapping.

* `folder`: reading and checking a folder (JSON files, config, safetensors headers and weights,
  tokenizer, processor settings, loading a part);
* `templates`: chat templates; `writing`: staged checkpoints and exports;
* `output_folder`: writing OUT without ever losing what was there;
* `registry`: the `HFFamily` registry and `import_hf` / `export_hf` / `verify_hf_export`;
* `reference`: the pieces transformers reference models are built from (export checks, parity);
* `peft`: LoRA adapters as a PEFT folder.
"""
