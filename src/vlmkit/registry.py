"""Name -> builder registries.

Every swappable part (vision towers, connectors, language models, image processors,
benchmarks) is looked up by name, so a recipe is data: a YAML file names the parts and the
registry turns the names into modules.

One discovery mechanism fills every registry: the first lookup imports each public module of
the plugin packages (`PLUGIN_PACKAGES`: the generic image processors and model parts, the
connectors, the model families and the benchmarks), and each module registers what it defines. Nothing lists the
modules, so a new family or benchmark is one new folder or file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


# Imported in this order on first lookup: the generic processors, towers, language models and
# connectors first, then the families that use them, then the benchmarks.
PLUGIN_PACKAGES = ("vlmkit.data.synthetic", "vlmkit.processing", "vlmkit.model", "vlmkit.model.connectors", "vlmkit.families", "vlmkit.eval.benchmarks")

_discovery_started = False


def load_plugins() -> None:
    """Import every public module of the plugin packages, once per process. The flag is set
    first: a module that looks a name up while it is being imported sees what is registered so far."""
    global _discovery_started
    if _discovery_started:
        return
    _discovery_started = True
    for package_name in PLUGIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def add(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._builders[name] = builder
            return builder

        return add

    def get(self, name: str) -> Callable[..., T]:
        load_plugins()
        try:
            return self._builders[name]
        except KeyError:
            known = ", ".join(sorted(self._builders)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def build(self, name: str, *args, **kwargs) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._builders)

    def in_order(self) -> list[str]:
        """Names in the order they were registered (a family's presets in its own order)."""
        load_plugins()
        return list(self._builders)

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._builders


VISION_TOWERS: Registry = Registry("vision tower")
CONNECTORS: Registry = Registry("connector")
LANGUAGE_MODELS: Registry = Registry("language model")
IMAGE_PROCESSORS: Registry = Registry("image processor")
BENCHMARKS: Registry = Registry("benchmark")
PRESETS: Registry = Registry("preset")
FAMILIES: Registry = Registry("model family")
# Generated training and held-out data, by name (`vlmkit ablate --data NAME`). A builder is
# `builder(out_dir, *, seed=0, **sizes) -> {split: path}`: it writes images/ and the splits it
# defines (stage1.json, stage2.json, test.json), every held-out record with its `task`, `kind`
# and `answer` (and `difficulty` where the suite grades one), scored by the `synth-qa` benchmark.
SYNTHETIC_DATA: Registry = Registry("synthetic dataset")
