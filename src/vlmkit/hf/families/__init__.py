"""One module per Hugging Face family: its import (folder -> vlmkit checkpoint), its export (vlmkit
model -> the family's transformers folder) and its reference class for the export check. Each
module registers its `HFFamily` with `vlmkit.hf.registry.register_family`; the registry finds
the modules by walking this package."""
