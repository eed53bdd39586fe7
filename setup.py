"""Build hook for the one native module: the tunnel fast path (vna_agent/dataplane/_fastpath.c).

Everything else is in pyproject.toml. The extension is optional: without a C
compiler or OpenSSL headers the package still installs and the tunnels run
their pure-Python data path (``vna_agent.dataplane.fastpath.available()`` says which).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vna_agent.dataplane._fastpath",
            # _fastpath_core.c: the sans-IO parsers, also built alone by the fuzz harnesses (tests/fuzz/native)
            sources=["vna_agent/dataplane/_fastpath.c", "vna_agent/dataplane/_fastpath_core.c"],
            depends=["vna_agent/dataplane/_fastpath_core.h"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-missing-braces"],
            optional=True,
        )
    ]
)
