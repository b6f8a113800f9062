"""Compares the installed distributions with the pins of requirements-lock.txt.

Usage: python scripts/check_lock.py [--quiet] [--skip NAME] [NAME ...]
Checks every pinned package (but those skipped), or only the NAMEs given. Prints each package whose installed version
differs from its pin (or that is missing) and exits 1 if there is any; exits 0 otherwise.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "requirements-lock.txt"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def canonical(name: str) -> str:
    """PEP 503 normalised project name: runs of '-', '_' and '.' become '-', lower case."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(lock: Path = LOCK) -> dict[str, str]:
    """{canonical name: pinned version} for every `name==version` line of the lock."""
    pins = {}
    for line in lock.read_text().splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def installed_versions() -> dict[str, str]:
    """{canonical name: version} of the distributions importable by this interpreter."""
    return {canonical(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="packages to check (default: every pin)")
    parser.add_argument("--quiet", action="store_true", help="print nothing, only set the exit code")
    parser.add_argument("--skip", action="append", default=[], metavar="NAME",
                        help="a pinned package not to check (e.g. a torch build the user installed)")
    args = parser.parse_args(argv)
    pins = read_pins()
    skipped = {canonical(n) for n in args.skip}
    wanted = [canonical(n) for n in args.names] or [n for n in sorted(pins) if n not in skipped]
    unknown = [n for n in wanted if n not in pins]
    if unknown:
        parser.error(f"not pinned in {LOCK.name}: {', '.join(unknown)}")
    have = installed_versions()
    wrong = [(n, pins[n], have.get(n)) for n in wanted if have.get(n) != pins[n]]
    if not args.quiet:
        for name, pinned, installed in wrong:
            print(f"{name}: locked {pinned}, installed {installed or 'nothing'}", file=sys.stderr)
        if not wrong:
            print(f"lock: {len(wanted)} packages installed at the versions of {LOCK.name}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
