"""Regenerate the committed gRPC stubs from proto/**/*.proto with grpcio-tools.

    python -m service.protogen            # rewrite the stubs next to the .proto files
    python -m service.protogen --out DIR  # write them under DIR instead
    python -m service.protogen --check    # exit 1 if a committed stub differs from the .proto files

The check ignores the generator's version stamps (`# Protobuf Python Version`, the arguments of
`ValidateProtobufRuntimeVersion`, `GRPC_GENERATED_VERSION`), so a new grpcio-tools release that only
restamps the files does not fail it, while any change of a .proto file's content still does. The
stamps do matter at run time: they are the oldest protobuf / grpcio the stubs accept, which
pyproject.toml declares as its lower bounds.

Protos are compiled with the repository root as the include path, so a file's import name is its
path (`proto/tessera/lm/v1/lm.proto`) and the generated modules import each other as
`proto.tessera....` - the package `proto` ships with Tessera.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"


def proto_files(root: Path = REPO_ROOT) -> list[Path]:
    return sorted((root / "proto").rglob("*.proto"))


def generate(out_dir: Path = REPO_ROOT, root: Path = REPO_ROOT) -> list[Path]:
    """Compile every .proto under `root`/proto into `out_dir` (same relative layout); adds the
    `__init__.py` files that make the stubs importable. Returns the files written."""
    from grpc_tools import protoc
    import grpc_tools

    out_dir.mkdir(parents=True, exist_ok=True)
    files = [str(p.relative_to(root)) for p in proto_files(root)]
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{root}", f"-I{well_known}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *files]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {files}")
    written = []
    for proto in files:
        package_dir = out_dir / Path(proto).parent
        for directory in [package_dir, *package_dir.relative_to(out_dir).parents]:
            init = out_dir / directory / "__init__.py"
            if directory != Path(".") and not init.exists():
                init.write_text("")
        stem = Path(proto).stem
        written += [package_dir / f"{stem}_pb2.py", package_dir / f"{stem}_pb2.pyi", package_dir / f"{stem}_pb2_grpc.py"]
    return written


_VERSION_STAMPS = (
    re.compile(r"^(# Protobuf Python Version: ).*$", re.MULTILINE),
    re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,"),
    re.compile(r"^(GRPC_GENERATED_VERSION = ).*$", re.MULTILINE),
)


def without_version_stamps(text: str) -> str:
    """Generated stub text with the generator's version numbers replaced by a placeholder."""
    for stamp in _VERSION_STAMPS:
        text = stamp.sub(r"\1<version>", text)
    return text


def stale_stubs(committed_root: Path = REPO_ROOT, proto_root: Path = REPO_ROOT) -> list[str]:
    """Stub files under `committed_root` that are missing or differ (version stamps aside) from what
    grpcio-tools generates from the .proto files under `proto_root`; [] when all are current."""
    with tempfile.TemporaryDirectory() as scratch:
        fresh_root = Path(scratch)
        stale = []
        for fresh in generate(fresh_root, root=proto_root):
            relative = fresh.relative_to(fresh_root)
            committed = committed_root / relative
            if not committed.exists() or without_version_stamps(committed.read_text()) != without_version_stamps(
                fresh.read_text()
            ):
                stale.append(str(relative))
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repository)")
    parser.add_argument("--check", action="store_true", help="only report stale stubs (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs(args.out)
        for path in stale:
            print(f"stale: {path} (run scripts/gen_proto.sh)", file=sys.stderr)
        return 1 if stale else 0
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
