"""Hugging Face families beyond the first ones: each module registers its `HFFamily` with
`vlmkit.hf_import.register_family` and is listed in `hf_import.FAMILY_MODULES`."""
