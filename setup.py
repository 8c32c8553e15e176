"""Build the compiled parts of relay: the fan-out core and the load-test crowd.

Everything the extensions are compiled with lives here, once: Cython's
directives, the C flags and the debug and sanitizer variants.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# RELAY_DEBUG=1 builds without optimisation and with debug info, for gdb and
# the sanitizer runs; RELAY_SANITIZE=address (or 1) adds ASan and UBSan,
# RELAY_SANITIZE=thread adds ThreadSanitizer (Makefile `sanitize`, `tsan`).
# The core counts its allocations in every build (it allocates only when a
# Core is made), so tests can check they balance.
DEBUG = os.environ.get("RELAY_DEBUG") == "1"
SANITIZE = os.environ.get("RELAY_SANITIZE", "")
# The fan-out's per-listener step (fanout.pxi write_slot, with the ring's
# bookkeeping) must inline into the loop over listeners: callgrind counts
# 288 instructions per listener-packet when GCC's default limit for `inline`
# functions leaves it a call, 255 when it is inlined.
cflags = ["-O0", "-g"] if DEBUG else ["-O2", "--param", "max-inline-insns-single=200"]
# Our code is held to -Wall -Wextra -Wconversion. The exceptions are warnings
# that fire only inside Cython's own generated boilerplate (unused module
# helpers and parameters of its wrapper functions, its struct initialisers).
cflags += ["-Wall", "-Wextra", "-Wconversion", "-Wno-sign-conversion",
           "-Wno-unused-function", "-Wno-unreachable-code", "-Wno-unused-parameter",
           "-Wno-missing-field-initializers"]
macros = [("_GNU_SOURCE", None)]
if DEBUG:
    macros.append(("RELAY_DEBUG", "1"))
extra_link = []
if SANITIZE in ("1", "address"):
    # float-cast-overflow is not part of GCC's "undefined": a rate or a time
    # cast to an integer it does not fit is exactly the bug it finds
    cflags += ["-fsanitize=address,undefined,float-cast-overflow", "-fno-omit-frame-pointer"]
    extra_link += ["-fsanitize=address,undefined,float-cast-overflow"]
elif SANITIZE == "thread":
    cflags += ["-fsanitize=thread", "-fno-omit-frame-pointer"]
    extra_link += ["-fsanitize=thread"]

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,     # hot loops index preallocated C arrays only
    "wraparound": False,
    "cdivision": True,        # C division: no Python ZeroDivisionError checks per packet
}


def ext(module: str, libraries: tuple[str, ...] = ()) -> Extension:
    return Extension(
        module,
        [module.replace(".", "/") + ".pyx"],
        define_macros=macros,
        extra_compile_args=cflags,
        extra_link_args=extra_link,
        libraries=list(libraries),
    )


setup(
    ext_modules=cythonize(
        # the core seals QUIC packets with OpenSSL's libcrypto (Debian: libssl-dev to build)
        [ext("relay._core", ("crypto",)), ext("relay.testing._crowd")],
        compile_time_env={"RELAY_DEBUG": DEBUG},
        annotate=os.environ.get("RELAY_ANNOTATE") == "1",   # make annotate: relay/_core.html
        compiler_directives=DIRECTIVES,
    ),
)
