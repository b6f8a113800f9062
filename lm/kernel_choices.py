"""The decode kernels chosen by measurement at load, kept on disk per machine.

`lm.quantize` times lm.matvec.int8_matvec against the other CPU path for every projection shape and the
LM head (Int8DynamicLinear.choose_matvec_rows): ~1 s for the 270M, ~5 s for the 1.5B, and on a noisy
machine a choice near the margin can come out differently at the next load, and with it the last bits
of the logits. As autotuners keep their results (Triton's cache, torch.compile's), the choices are kept
in a JSON file and read back at the next load on the same machine, so that loads are faster and give
the same kernels. The file holds one section per machine fingerprint: the CPU model and flags, the
core and thread counts, the transparent-huge-page mode, the PyTorch and numba versions and the source
of lm.matvec and lm.quantize (a change to a kernel or to the measurement measures again).

The file: $TESSERA_KERNEL_CACHE, or ~/.cache/tessera/kernel-choices.json when that is unset; "off"
(or empty) keeps nothing and measures at every load. A file that cannot be read or parsed is measured
over and replaced; one that cannot be written is left alone (a warning is logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from pathlib import Path

log = logging.getLogger(__name__)

ENVIRONMENT = "TESSERA_KERNEL_CACHE"


def cache_path() -> Path | None:
    """The choices file, read from the environment when called (None: keep nothing)."""
    value = os.environ.get(ENVIRONMENT)
    if value is None:
        return Path.home() / ".cache" / "tessera" / "kernel-choices.json"
    if value.strip().lower() in ("", "off"):
        return None
    return Path(value)


def machine_fingerprint() -> dict[str, str]:
    """What a measurement depends on, as strings (see the module docstring)."""
    import numba
    import torch

    from lm.matvec import thread_parts

    cpu = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "flags") and key.strip() not in cpu:
                cpu[key.strip()] = value.strip()
    except OSError:
        pass
    try:
        huge_pages = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        huge_pages = "unknown"
    here = Path(__file__).parent
    sources = hashlib.sha256(b"".join((here / name).read_bytes() for name in ("matvec.py", "quantize.py")))
    return {
        "machine": platform.machine(),
        "cpu": cpu.get("model name", platform.processor()),
        "flags": hashlib.sha256(cpu.get("flags", "").encode()).hexdigest()[:16],
        "cores": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "threads": f"{torch.get_num_threads()}/{thread_parts()}",
        "huge_pages": huge_pages,
        "torch": torch.__version__,
        "numba": numba.__version__,
        "sources": sources.hexdigest()[:16],
    }


class KernelChoices:
    """The choices of this machine (its section of the file): `get` and `put` by a layer's key (a
    string naming the kind, shape and what precedes it), `save` to write the section back."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.fingerprint = machine_fingerprint() if path is not None else {}
        self.machine = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        self._choices: dict[str, int] = {}
        self._changed = False
        if path is not None:
            section = _read(path).get(self.machine, {})
            choices = section.get("choices", {}) if isinstance(section, dict) else {}
            self._choices = {key: rows for key, rows in choices.items()
                             if isinstance(key, str) and type(rows) is int and rows >= 0} \
                if isinstance(choices, dict) else {}

    @classmethod
    def load(cls) -> KernelChoices:
        """This machine's choices from `cache_path()` (none kept where that is None)."""
        return cls(cache_path())

    def get(self, key: str) -> int | None:
        """The rows up to which int8_matvec was chosen for `key`, or None if not measured here yet."""
        return self._choices.get(key)

    def put(self, key: str, rows: int) -> None:
        self._changed |= self._choices.get(key) != rows
        self._choices[key] = rows

    def save(self) -> None:
        """Write this machine's section back (the file re-read first, so other machines' sections and
        another process's entries survive; written to a temporary name, then renamed)."""
        if self.path is None or not self._changed:
            return
        data = _read(self.path)
        section = data.get(self.machine)
        merged = dict(section.get("choices", {})) if isinstance(section, dict) and isinstance(
            section.get("choices"), dict) else {}
        merged.update(self._choices)
        data[self.machine] = {"fingerprint": self.fingerprint, "choices": merged}
        temporary = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(temporary, self.path)
            self._changed = False
        except OSError as error:
            log.warning("could not keep the kernel choices in %s (%s); they are measured again at the next load",
                        self.path, error)
            temporary.unlink(missing_ok=True)


def _read(path: Path) -> dict:
    """The file's sections, or {} where it is missing or unreadable (then measured and replaced)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        log.warning("ignoring the kernel choices in %s (%s): measuring again", path, error)
        return {}
    return data if isinstance(data, dict) else {}
