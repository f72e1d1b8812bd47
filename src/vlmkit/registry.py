"""Name -> builder registries.

Every swappable part (vision towers, connectors, language models, image processors,
benchmarks) is looked up by name, so a recipe is data: a YAML file names the parts and the
registry turns the names into modules.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


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
        try:
            return self._builders[name]
        except KeyError:
            known = ", ".join(sorted(self._builders)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def build(self, name: str, *args, **kwargs) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders


VISION_TOWERS: Registry = Registry("vision tower")
CONNECTORS: Registry = Registry("connector")
LANGUAGE_MODELS: Registry = Registry("language model")
IMAGE_PROCESSORS: Registry = Registry("image processor")
BENCHMARKS: Registry = Registry("benchmark")
PRESETS: Registry = Registry("preset")
