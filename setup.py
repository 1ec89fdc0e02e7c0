"""The one thing pyproject.toml cannot declare: the merge engine's optional C kernels.

`optional=True`: where no C compiler or Python headers are found, the install goes on without
them and worker/engine.py does the same arithmetic with torch ops (slower, same bytes).
"""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "worker._kernels",
            sources=["worker/_kernels.c"],
            # MSVC (Windows) optimises with /O2, which Python's own build flags already give.
            extra_compile_args=[] if sys.platform == "win32" else ["-O3"],
            optional=True,
        )
    ]
)
