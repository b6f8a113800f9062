"""Regenerate the committed gRPC stubs from proto/**/*.proto with grpcio-tools.

    python -m service.protogen            # rewrite the stubs next to the .proto files
    python -m service.protogen --out DIR  # write them under DIR instead (the staleness test does this)

Protos are compiled with the repository root as the include path, so a file's import name is its
path (`proto/tessera/lm/v1/lm.proto`) and the generated modules import each other as
`proto.tessera....` - the package `proto` ships with Tessera.
"""

from __future__ import annotations

import argparse
import sys
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
