"""Build the compiled parts of relay: the fan-out core and the load-test crowd."""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# RELAY_DEBUG=1 builds without optimisation and with debug info, for gdb and
# the sanitizer runs; RELAY_SANITIZE=1 adds ASan and UBSan (Makefile `sanitize`).
# The core counts its allocations in every build (it allocates only when a
# Core is made), so tests can check they balance.
DEBUG = os.environ.get("RELAY_DEBUG") == "1"
cflags = ["-O0", "-g"] if DEBUG else ["-O2"]
cflags += ["-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
macros = [("_GNU_SOURCE", None)]
if DEBUG:
    macros.append(("RELAY_DEBUG", "1"))
extra_link = []
if os.environ.get("RELAY_SANITIZE") == "1":
    cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    extra_link += ["-fsanitize=address,undefined"]


def ext(name: str) -> Extension:
    return Extension(
        f"relay.{name}",
        [f"relay/{name}.pyx"],
        define_macros=macros,
        extra_compile_args=cflags,
        extra_link_args=extra_link,
    )


setup(
    ext_modules=cythonize(
        [ext("_core"), ext("_crowd")],
        language_level=3,
        compile_time_env={"RELAY_DEBUG": DEBUG},
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
