"""Hugging Face families beyond the first ones: each module registers its `HFFamily` with
`vlmkit.hf.importer.register_family` and is listed in `importer.FAMILY_MODULES`."""
