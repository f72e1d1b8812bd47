"""Only the native extension lives here; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vlmkit.processing._pixels",
            ["src/vlmkit/processing/_pixels.c"],
            # Bit-identical to the torch path needs separate multiply and subtract roundings.
            extra_compile_args=["-O3", "-ffp-contract=off"],
            # No compiler: the package still installs and preprocessing uses torch ops instead.
            optional=True,
        )
    ]
)
