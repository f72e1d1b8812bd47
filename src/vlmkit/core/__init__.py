"""The lowest layer: leaf types and constants every other layer shares, with no vlmkit imports
above it (`lint-imports` checks the layers; see `docs/design.md`)."""
