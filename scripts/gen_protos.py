"""Generate the Python gRPC stubs under sartiq_grpc/sartiq/ from protos/, or check them for drift.

Usage::

    python scripts/gen_protos.py          # regenerate sartiq_grpc/sartiq/
    python scripts/gen_protos.py --check  # exit 1 and list the files that differ

The generated tree is owned entirely by this script: it is deleted and written anew
on every run, so never edit it by hand. Everything else in sartiq_grpc/ (the package
``__init__.py``, ``py.typed``, the client and the CLI) is hand-written and left alone.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.resources
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PACKAGE = "sartiq_grpc"
# The top-level proto package; its generated tree is nested under PACKAGE.
PROTO_ROOT_PACKAGE = "sartiq"
GENERATED_DIR = ROOT / PACKAGE / PROTO_ROOT_PACKAGE
# Byproducts of importing or type-checking the stubs, never part of the tree.
IGNORED_NAMES = frozenset({"__pycache__", ".mypy_cache"})

# Generated code imports sibling modules by their proto package
# (``from sartiq.generation.v1 import enums_pb2 as ...``); the stubs live inside PACKAGE,
# so those imports are re-rooted there.
_FROM_IMPORT_RE = re.compile(rf"^(?P<indent>[ \t]*)from[ \t]+{PROTO_ROOT_PACKAGE}\.", re.MULTILINE)
# ``import sartiq.x.y_pb2`` would also need every use of ``sartiq.x.y_pb2`` rewritten;
# the generators do not emit it today, so meeting it fails loudly instead.
_PLAIN_IMPORT_RE = re.compile(rf"^[ \t]*import[ \t]+{PROTO_ROOT_PACKAGE}\.", re.MULTILINE)


def proto_files() -> list[str]:
    """Return every .proto file under PROTO_DIR, relative to it, in sorted order.

    Returns:
        POSIX-style paths such as ``sartiq/generation/v1/enums.proto``.

    Raises:
        SystemExit: If no .proto file is found.
    """
    # Vendored third-party protos have Python modules of their own (googleapis-common-protos,
    # grpcio-health-checking); only ours are generated here.
    files = sorted(
        p.relative_to(PROTO_DIR).as_posix()
        for p in PROTO_DIR.rglob("*.proto")
        if p.relative_to(PROTO_DIR).parts[0] != "third_party"
    )
    if not files:
        raise SystemExit(f"no .proto files under {PROTO_DIR}")
    return files


def _plugin(name: str) -> Path:
    """Locate a protoc plugin installed next to the running interpreter.

    Args:
        name: The plugin executable name, e.g. ``protoc-gen-mypy``.

    Returns:
        The plugin's path.

    Raises:
        SystemExit: If the plugin is not installed there.
    """
    # Not resolve()d: in a venv, sys.executable is a symlink inside .venv/bin.
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise SystemExit(f"{name} not found next to {sys.executable}; install mypy-protobuf")
    return path


def run_protoc(out_dir: Path) -> None:
    """Run grpcio-tools' bundled protoc over every proto file, writing into out_dir.

    Args:
        out_dir: An existing directory that receives the raw generated tree.

    Raises:
        SystemExit: If protoc fails.
    """
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    out = str(out_dir)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_DIR}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *proto_files(),
    ]
    result = subprocess.run(cmd, cwd=PROTO_DIR, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"protoc failed with exit code {result.returncode}")


def rewrite_imports(source: str) -> str:
    """Re-root imports of the proto package under the Python package.

    Args:
        source: The text of a generated .py or .pyi file.

    Returns:
        The text with ``from sartiq.x import y`` turned into
        ``from sartiq_grpc.sartiq.x import y``.

    Raises:
        SystemExit: If the text holds an ``import sartiq.x`` statement, which a
            plain rewrite cannot fix.
    """
    if _PLAIN_IMPORT_RE.search(source):
        raise SystemExit(f"unsupported 'import {PROTO_ROOT_PACKAGE}.' in generated code")
    return _FROM_IMPORT_RE.sub(rf"\g<indent>from {PACKAGE}.{PROTO_ROOT_PACKAGE}.", source)


def _write_init(directory: Path, package_root: Path) -> None:
    """Write a docstring-only ``__init__.py`` naming the proto package it holds.

    Args:
        directory: The generated directory that needs an ``__init__.py``.
        package_root: The directory that corresponds to the proto root.
    """
    proto_package = ".".join(directory.relative_to(package_root).parts)
    text = f'"""Generated stubs for the {proto_package} proto package; do not edit."""\n'
    (directory / "__init__.py").write_text(text, encoding="utf-8")


def generate(dest: Path) -> None:
    """Generate the finished stub tree (imports rewritten, ``__init__.py`` added).

    Args:
        dest: A directory that must not exist yet; it becomes the equivalent of
            ``sartiq_grpc/sartiq``.
    """
    with tempfile.TemporaryDirectory(prefix="gen_protos_") as raw:
        raw_dir = Path(raw)
        run_protoc(raw_dir)
        for path in sorted(raw_dir.rglob("*")):
            if path.suffix in {".py", ".pyi"}:
                text = path.read_text(encoding="utf-8")
                path.write_text(rewrite_imports(text), encoding="utf-8")
        generated_root = raw_dir / PROTO_ROOT_PACKAGE
        for directory in sorted([generated_root, *generated_root.rglob("*")]):
            if directory.is_dir():
                _write_init(directory, raw_dir)
        shutil.copytree(generated_root, dest)


def _tree_files(root: Path) -> set[str]:
    """Return the files under root, relative to it, skipping caches.

    Args:
        root: The directory to walk; a missing directory has no files.

    Returns:
        POSIX-style relative paths.
    """
    if not root.is_dir():
        return set()
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not IGNORED_NAMES.intersection(p.relative_to(root).parts)
    }


def diff_trees(expected: Path, actual: Path) -> list[tuple[str, str]]:
    """List the differences between a fresh tree and the committed one.

    Args:
        expected: The freshly generated tree.
        actual: The committed tree.

    Returns:
        ``(relative path, "missing" | "extra" | "changed")`` pairs sorted by path; empty
        when the trees match.
    """
    want, have = _tree_files(expected), _tree_files(actual)
    drift = [(name, "missing") for name in want - have]
    drift += [(name, "extra") for name in have - want]
    drift += [
        (name, "changed")
        for name in want & have
        if not filecmp.cmp(expected / name, actual / name, shallow=False)
    ]
    return sorted(drift)


def main(argv: list[str] | None = None) -> int:
    """Regenerate the stubs or check them for drift.

    Args:
        argv: Command-line arguments without the program name; defaults to sys.argv.

    Returns:
        The process exit code: 0 on success, 1 when ``--check`` finds drift.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temporary directory and fail if the committed tree differs",
    )
    args = parser.parse_args(argv)
    rel = GENERATED_DIR.relative_to(ROOT).as_posix()
    with tempfile.TemporaryDirectory(prefix="gen_protos_out_") as tmp:
        fresh = Path(tmp) / PROTO_ROOT_PACKAGE
        generate(fresh)
        if args.check:
            drift = diff_trees(fresh, GENERATED_DIR)
            if drift:
                print(f"{rel}/ is out of date with protos/:", file=sys.stderr)
                for name, kind in drift:
                    print(f"  {kind}: {rel}/{name}", file=sys.stderr)
                print("run: python scripts/gen_protos.py", file=sys.stderr)
                return 1
            print(f"{rel}/ is up to date")
            return 0
        if GENERATED_DIR.exists():
            shutil.rmtree(GENERATED_DIR)
        shutil.copytree(fresh, GENERATED_DIR)
    print(f"generated {rel}/ from {len(proto_files())} proto files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
