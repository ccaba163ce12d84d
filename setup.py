"""Build of the C core (zcached._core); everything else is in pyproject.toml.

The core links the system liblz4, libzstd and libxxhash (Debian's -dev packages, installed by
`make deps`); warnings are errors.  ZCACHED_CFLAGS adds flags (the sanitizer build uses it).
"""

import os

from setuptools import Extension, setup

SOURCES = [
    "arena.c", "backing.c", "codec.c", "xcfmalloc.c", "store.c", "fuse_loop.c", "fuse_uring.c",
    "pymod.c",
]  # fmt: skip
CFLAGS = ["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-O2", "-g"]
CFLAGS += os.environ.get("ZCACHED_CFLAGS", "").split()

setup(
    ext_modules=[
        Extension(
            "zcached._core",
            sources=[f"csrc/{name}" for name in SOURCES],
            depends=[f"csrc/{h}" for h in os.listdir("csrc") if h.endswith(".h")],
            libraries=["lz4", "zstd", "xxhash", "pthread"],
            extra_compile_args=CFLAGS,
            extra_link_args=os.environ.get("ZCACHED_LDFLAGS", "").split(),
        )
    ]
)
