"""Ahead-of-time build of ``fsd_kernels._native`` with numba.pycc, and the glibc check of binaries.

Why pycc: it turns the very functions the JIT runs (``EXPORTS`` of every module
in ``_backend.CORE_MODULES``) into one CPython extension module that needs only
numpy at run time - no numba, no llvmlite (172 MB) and no JIT on a cold start.
It is built per (architecture, Python version), inside a root with that
architecture's Python (numba cannot cross-compile).

Target CPU: never the build host's (it may have AVX-512); the baseline of every
Lambda machine of the architecture instead (see ``TARGET_CPU``).

usage:  python -m fsd_kernels._build --out DIR [--cpu NAME]     build the module
        python -m fsd_kernels._build --check-glibc FILE...  fail on symbols newer than AL2023
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings

from fsd_kernels._backend import core_modules

MODULE_NAME = "_native"
#: machine -> LLVM CPU name. x86_64: AWS documents AVX2 on every Lambda x86_64 machine and
#: recommends -march=haswell; arm64: Lambda's arm64 is Graviton2 (Neoverse N1) or newer.
TARGET_CPU = {"x86_64": "haswell", "aarch64": "neoverse-n1"}
#: Newest symbol versions on Amazon Linux 2023 (glibc 2.34, GCC 11 libstdc++).
MAX_VERSIONS = {"GLIBC": (2, 34), "GLIBCXX": (3, 4, 29), "CXXABI": (1, 3, 13)}


class BuildError(RuntimeError):
    """The native module cannot be built or would not load on the target."""


def exported_kernels() -> dict[str, tuple[object, str]]:
    """name -> (pure Python function, numba signature) for every kernel to export."""
    kernels: dict[str, tuple[object, str]] = {}
    for module in core_modules():
        for name, signature in module.EXPORTS.items():
            if name in kernels:
                raise BuildError(f"kernel {name!r} is exported by two modules")
            kernels[name] = (getattr(module, name).py_func, signature)
    return kernels


def default_cpu() -> str:
    machine = platform.machine()
    if machine not in TARGET_CPU:
        raise BuildError(f"no Lambda target CPU known for machine {machine!r}")
    return TARGET_CPU[machine]


def _compiler(out_dir: str, cpu: str, keep_dir: str):
    """A pycc compiler whose LLVM object (the slow part) is kept in ``keep_dir`` and reused,
    so a second link with extra C sources (``cc.extra_sources``) costs seconds, not minutes."""
    with warnings.catch_warnings():
        # pycc is "pending deprecation" with no replacement yet; it is the proven AOT path.
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        from numba.pycc import CC

    class _RelinkableCC(CC):
        extra_sources: list[str] = []
        _kept = None

        def _get_mixin_sources(self):
            return super()._get_mixin_sources() + self.extra_sources

        def _compile_object_files(self, build_dir):
            if self._kept is None:
                objects, exports = super()._compile_object_files(build_dir)
                self._kept = ([shutil.copy(obj, keep_dir) for obj in objects], exports)
            kept, exports = self._kept
            return list(kept), exports  # compile() appends the mixin objects to this list

    cc = _RelinkableCC(MODULE_NAME, source_module=__name__)
    cc.output_dir = out_dir
    cc.target_cpu = cpu
    for name, (func, signature) in exported_kernels().items():
        cc.export(name, signature)(func)
    return cc


def build(out_dir: str, cpu: str) -> str:
    """Compile every exported kernel into ``out_dir/_native<EXT_SUFFIX>``; return its path.

    If the build root's libc binds a symbol to a version Amazon Linux 2023 lacks
    (e.g. glibc 2.38's new ``fmod``), it links again with those symbols pinned
    to their older versions (``compat_source``).
    """
    path = os.path.join(out_dir, MODULE_NAME + sysconfig.get_config_var("EXT_SUFFIX"))
    with tempfile.TemporaryDirectory(prefix="fsd-pycc-") as keep_dir:
        # numba's probe of the C compiler (pycc.platform.external_compiler_works) never removes
        # its two mkdtemp() directories: have them made in here, which is removed
        saved, tempfile.tempdir = tempfile.tempdir, keep_dir
        try:
            cc = _compiler(out_dir, cpu, keep_dir)
            cc.compile()
            pins = compat_pins(path)
            if pins:
                shim = os.path.join(keep_dir, "glibc_compat.c")
                with open(shim, "w") as f:
                    f.write(compat_source(pins, platform.machine()))
                cc.extra_sources = [shim]
                cc.compile()
        finally:
            tempfile.tempdir = saved
    if not os.path.exists(path):
        raise BuildError(f"pycc reported success but {path} is missing")
    return path


def _readelf(*args: str) -> str:
    try:
        return subprocess.run(["readelf", "--wide", *args], capture_output=True, text=True,
                              check=True).stdout
    except FileNotFoundError as exc:
        raise BuildError("readelf not found: install binutils") from exc
    except subprocess.CalledProcessError as exc:
        raise BuildError(f"readelf {' '.join(args)} failed: {exc.stderr.strip()}") from exc


def _library_path(soname: str) -> str:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    for directory in (f"/lib/{multiarch}", f"/usr/lib/{multiarch}", "/lib64", "/usr/lib64", "/lib"):
        candidate = os.path.join(directory, soname)
        if os.path.exists(candidate):
            return candidate
    raise BuildError(f"cannot find {soname} to look up older symbol versions")


def compat_pins(path: str) -> dict[str, str]:
    """symbol -> the newest version of it that Amazon Linux 2023 has, for each too-new import."""
    listing = _readelf("--dyn-syms", path)
    wanted = {name: version for name, version in
              re.findall(r"\sUND\s+(\w+)@(\w+_[\d.]+)", listing) if too_new({version})}
    if not wanted:
        return {}
    libraries = re.findall(r"File: (\S+)\s+Cnt", _readelf("--version-info", path))
    pins = {}
    for soname in libraries:
        exported = _readelf("--dyn-syms", _library_path(soname))
        for name in wanted:
            # "name@V" (one @) is an older, non-default version still exported.
            older = [v for v in re.findall(rf"\s{name}@(GLIBC_[\d.]+)", exported) if not too_new({v})]
            if older:
                pins[name] = max(older, key=lambda v: tuple(int(p) for p in v.split("_")[1].split(".")))
    missing = sorted(set(wanted) - set(pins))
    if missing:
        raise BuildError(f"{path}: no version old enough for Amazon Linux 2023 of: {', '.join(missing)}")
    return pins


#: How a stub jumps to the real function, per machine (arguments stay in place).
_TAIL_JUMP = {"x86_64": "jmp {target}@PLT", "aarch64": "b {target}"}


def compat_source(pins: dict[str, str], machine: str) -> str:
    """C source defining a hidden stub per pinned symbol that jumps to the old version.

    The compiled kernels' references bind to the stub at link time; the stub's
    own reference is bound to ``symbol@version`` by ``.symver``.
    """
    if machine not in _TAIL_JUMP:
        raise BuildError(f"no symbol-version stubs for machine {machine!r}")
    lines = [".text"]
    for name, version in sorted(pins.items()):
        target = f"__fsd_compat_{name}"
        lines += [f".globl {name}", f".hidden {name}", f".type {name}, %function", f"{name}:",
                  "    " + _TAIL_JUMP[machine].format(target=target),
                  f".symver {target}, {name}@{version}"]
    body = "".join(f'    "{line}\\n"\n' for line in lines)
    return ("/* Generated by fsd_kernels._build: pin symbols to versions Amazon Linux 2023 has. */\n"
            f"__asm__(\n{body});\n")


def symbol_versions(path: str) -> set[str]:
    """Every versioned symbol requirement (e.g. ``GLIBC_2.14``) of an ELF file, via readelf."""
    # Only the "Version needs" section lists requirements; definitions are the file's own.
    needs = _readelf("--version-info", path).split("Version needs section", 1)
    return set(re.findall(r"Name: (\w+_[\d.]+)", needs[1])) if len(needs) == 2 else set()


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def too_new(versions: set[str]) -> list[str]:
    """The symbol versions newer than ``MAX_VERSIONS`` allows, sorted."""
    bad = []
    for version in versions:
        prefix, _, number = version.partition("_")
        if prefix in MAX_VERSIONS:
            if tuple(int(part) for part in number.split(".")) > MAX_VERSIONS[prefix]:
                bad.append(version)
    return sorted(bad)


def check_glibc(paths: list[str]) -> dict[str, str]:
    """Raise BuildError if any file needs a symbol newer than Amazon Linux 2023 has.

    Returns path -> newest GLIBC version it needs (for the build log).
    """
    newest = {}
    for path in paths:
        versions = symbol_versions(path)
        bad = too_new(versions)
        if bad:
            limits = ", ".join(f"{k}_{_dotted(v)}" for k, v in MAX_VERSIONS.items())
            raise BuildError(f"{path} needs {', '.join(bad)}: newer than Amazon Linux 2023 ({limits})")
        glibc = [tuple(int(p) for p in v.split("_")[1].split(".")) for v in versions
                 if v.startswith("GLIBC_")]
        newest[path] = f"GLIBC_{_dotted(max(glibc))}" if glibc else "no GLIBC symbols"
    return newest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsd_kernels._build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="directory to write the native module into")
    parser.add_argument("--cpu", help="LLVM target CPU (default: the Lambda baseline for this machine)")
    parser.add_argument("--check-glibc", nargs="+", metavar="FILE",
                        help="check these ELF files against Amazon Linux 2023's symbol versions")
    args = parser.parse_args(argv)
    try:
        if args.check_glibc:
            for path, newest in check_glibc(args.check_glibc).items():
                print(f"ok {newest} {path}")
            return 0
        if not args.out:
            parser.error("--out or --check-glibc is required")
        path = build(args.out, args.cpu or default_cpu())
        print(path)
        return 0
    except BuildError as exc:
        print(f"fsd_kernels._build: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
