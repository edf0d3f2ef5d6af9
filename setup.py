"""Build script for the optional compiled core; all metadata stays in pyproject.toml.

The per-request path has a compiled core (issue 24): ``virtio_blk._fastpath_core`` (the fast
path of a split or packed ring on io_uring, which fills the Python engine's own ring) and
``vhost.queue._split_core`` (the used side of a split ring and the in-flight area's records)
and ``vhost.queue._packed_core`` (the same for a packed ring).
Both are optional in the way msgpack's and aiohttp's extensions are: the package must install
and run the pure-Python core with the same ``pip install -e .`` / ``pip install .`` on a
machine without Cython or without a working C compiler.  So a missing
tool or a failed build of one extension is a warning that names it and says why, never an
error; which core a server runs is decided at import time (``VHOST_USER_BLK_CORE``) and logged
by the server, so a fallback is visible where it matters.  CI checks that the compiled core
did build (.ci/run) so that it does not test the fallback alone without noticing.

pip shows a build's output only with ``-v``: ``pip install -v -e .`` prints these warnings.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# The compiled modules and their Cython sources.  A tree that does not hold a source (a branch
# from before the compiled core) simply has no extension to build.
CORE_MODULES = (
    ("vhost.queue._split_core", "vhost/queue/_split_core.pyx"),
    ("vhost.queue._packed_core", "vhost/queue/_packed_core.pyx"),
    ("virtio_blk._fastpath_core", "virtio_blk/_fastpath_core.pyx"),
)

# Declarations every module cimports (a change to one rebuilds them all).
SHARED_DECLARATIONS = ("vhost/queue/_le.pxd",)

# Cython directives for every module: Python 3 semantics (str is unicode, true division),
# whatever a source file's own header says or forgets to say.
CYTHON_DIRECTIVES = {"language_level": "3"}

# What a build needs, said once for every warning.
NEEDS = (
    "the compiled core needs Cython>=3.0, a C compiler and the Python headers (python3-dev)"
)

ROOT = Path(__file__).resolve().parent


def _warn(message: str) -> None:
    """Print a build warning where pip -v and a plain setup.py run show it (stderr)."""
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _have_cython() -> bool:
    """Whether Cython>=3.0 imports here; an older one would compile the sources differently."""
    try:
        import Cython
    except ImportError:
        return False
    major = Cython.__version__.split(".", 1)[0]
    return major.isdigit() and int(major) >= 3


def core_extensions() -> list[Extension]:
    """The extensions to try to build: none without Cython (the pure-Python core installs).

    Sources are paths relative to the project root, as setuptools wants them for sdists.
    No library is linked: the fast path enters the io_uring the Python engine set up (one
    syscall), so the build needs no liburing.  Each depends on every .pxd (the shared
    ``vhost/queue/_le.pxd`` included), so that a changed declaration rebuilds it.
    """
    present = [(name, pyx) for name, pyx in CORE_MODULES if (ROOT / pyx).is_file()]
    if not present:
        return []
    if not _have_cython():
        _warn(f"Cython>=3.0 is not installed: installing the pure-Python core only ({NEEDS})")
        return []
    declarations = [pxd for _, pyx in present if (ROOT / (pxd := pyx[:-4] + ".pxd")).is_file()]
    declarations += [pxd for pxd in SHARED_DECLARATIONS if (ROOT / pxd).is_file()]
    return [
        Extension(
            name,
            [pyx],
            extra_compile_args=["-O2"],
            depends=declarations,
        )
        for name, pyx in present
    ]


class OptionalBuildExt(build_ext):
    """build_ext whose failures are warnings: the module is left out, the rest installs.

    An extension that failed is removed from ``self.extensions``, so the later steps
    (copying into the source tree for an editable install, listing the outputs for the wheel)
    do not look for a file that was never built.
    """

    def run(self) -> None:
        """Build what can be built; no compiler at all (DistutilsPlatformError) is a warning."""
        # setuptools clears ``inplace`` while it builds and copies into the source tree after;
        # an editable install (PEP 660) is an in-place build too.
        self._in_source = bool(self.inplace or getattr(self, "editable_mode", False))
        try:
            super().run()
        except Exception as exc:  # any failure means the pure core, not no install
            _warn(f"compiled core not built ({type(exc).__name__}: {exc}); {NEEDS}")
            for ext in self.extensions:
                self._remove_stale(ext)
            self.extensions: list[Extension] = []

    def build_extensions(self) -> None:
        """Build each extension on its own so that one failure does not hide another's."""
        self.check_extensions_list(self.extensions)
        built: list[Extension] = []
        for ext in self.extensions:
            if self._build_optional(ext):
                built.append(ext)
        self.extensions = built

    def _build_optional(self, ext: Extension) -> bool:
        """Cythonize and compile ``ext``; on any failure warn, naming the module, and say False."""
        try:
            from Cython.Build import cythonize

            # cythonize skips a .pyx whose .c is newer than it and its .pxd dependencies.
            (generated,) = cythonize(
                [ext],
                compiler_directives=CYTHON_DIRECTIVES,
                include_path=[str(ROOT)],
                quiet=True,
                force=bool(self.force),
            )
            ext.sources = generated.sources
            self.build_extension(ext)
        except Exception as exc:  # see run()
            _warn(
                f"{ext.name} not built, the pure-Python core is used instead "
                f"({type(exc).__name__}: {exc}); {NEEDS}"
            )
            self._remove_stale(ext)
            return False
        return True

    def _remove_stale(self, ext: Extension) -> None:
        """Delete a module an earlier in-place build left in the source tree.

        Otherwise a failed rebuild (a .pyx that no longer compiles) would leave the old
        compiled module to be imported, and its source would silently not be what runs.
        """
        if not getattr(self, "_in_source", False):
            return
        *package, _ = ext.name.split(".")
        package_dir = self.get_finalized_command("build_py").get_package_dir(".".join(package))
        stale = Path(package_dir) / Path(self.get_ext_filename(ext.name)).name
        if stale.is_file():
            stale.unlink()
            _warn(f"removed {stale}, an earlier build of {ext.name} that no longer builds")


def main() -> None:
    """Declare the extensions (metadata, packages and scripts come from pyproject.toml)."""
    kwargs: dict[str, Any] = {}
    extensions = core_extensions()
    if extensions:
        kwargs["ext_modules"] = extensions
        kwargs["cmdclass"] = {"build_ext": OptionalBuildExt}
    setup(**kwargs)


main()
