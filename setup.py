"""The C part of the package; everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # The relay's per-message loops (framing.py and masking/plan.py hold the Python reference).
        Extension(
            "wardgate.engines.postgres._wire",
            sources=["wardgate/engines/postgres/_wire.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror=implicit-function-declaration"],
        )
    ]
)
