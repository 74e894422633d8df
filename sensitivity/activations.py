"""Hidden states a profile holds, in RAM up to a budget and in files beyond it.

    budget = SpillBudget(ram_bytes=8 << 30, directory="/scratch")
    streams = SpillDict(budget)
    streams["gain/3/experts"] = [h0, h1, ...]    # a list of per-batch tensors: kept, or written out
    for h in streams["gain/3/experts"]: ...     # read back one batch at a time when it was written

The layer-streaming profiler advances every stream through every layer, so its hidden states grow
with the number of streams (about four per layer, plus two per format) times the calibration tokens
times the hidden size: for DeepSeek-V3 at 4096 tokens that is about 117 MB per stream. An entry that
would take the RAM in use past the budget is written to a file instead and read back batch by batch
(the next layer reads one stream at a time, so what is in RAM stays the budget plus one stream).

The files live in a private directory (mode 0700, created here) under `directory`; each is opened
with O_EXCL | O_NOFOLLOW and unlinked at once, so no file is left behind however the process ends,
and its space returns to the disk when the entry is replaced or dropped. Values round-trip bit for bit.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import MutableMapping
from pathlib import Path
from typing import Iterator, Sequence

import torch


def available_ram() -> int:
    """Bytes of memory the system can give without swapping (MemAvailable; 0 where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def default_ram_budget() -> int:
    """Half of the memory available now (the layer's weights and its work need the rest); 8 GiB
    where the system does not say."""
    avail = available_ram()
    return avail // 2 if avail else 8 << 30


class SpillBudget:
    """RAM allowed for the entries of the SpillDicts that share it, and where the rest goes."""

    def __init__(self, ram_bytes: int | None = None, directory: str | os.PathLike | None = None):
        self.ram_bytes = default_ram_budget() if ram_bytes is None else int(ram_bytes)
        if self.ram_bytes < 0:
            raise ValueError(f"activation RAM budget {ram_bytes}: give a number of bytes >= 0")
        self.directory = Path(directory) if directory is not None else Path(tempfile.gettempdir())
        self.in_ram = 0
        self.on_disk = 0
        self.peak_on_disk = 0
        self.files = 0
        self._dir: Path | None = None

    def where(self) -> Path:
        """The private directory the files go to (created on first use)."""
        if self._dir is None:
            if not self.directory.is_dir():
                raise ValueError(f"activations directory {self.directory} does not exist or is not a directory: "
                                 "create it or give another (--activations-dir)")
            self._dir = Path(tempfile.mkdtemp(prefix="moeplan-activations-", dir=self.directory))
        return self._dir

    def close(self) -> None:
        if self._dir is not None:
            try:
                self._dir.rmdir()  # the files in it are unlinked already
            except OSError:
                pass
            self._dir = None


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class OnDisk(Sequence):
    """A list of per-batch tensors written to one unlinked file; item b is read back on access."""

    def __init__(self, tensors: Sequence[torch.Tensor], budget: SpillBudget):
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        while True:  # a name taken (by anything, a symlink too) is never opened: the next one is tried
            budget.files += 1
            path = budget.where() / f"stream-{os.getpid()}-{budget.files:x}.bin"
            try:
                fd = os.open(path, flags, 0o600)
                break
            except FileExistsError:
                continue
        os.unlink(path)
        self._fd = fd
        self._closer = weakref.finalize(self, os.close, fd)
        self._meta: list[tuple[int, int, torch.dtype, tuple[int, ...], torch.device]] = []
        offset = 0
        try:
            for t in tensors:
                raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                done = 0
                while done < len(raw):
                    done += os.pwrite(fd, raw[done:], offset + done)
                self._meta.append((offset, len(raw), t.dtype, tuple(t.shape), t.device))
                offset += len(raw)
        except OSError as exc:
            self._closer()
            raise OSError(f"writing activations to {budget.where()} failed ({exc}): free space there or give "
                          "another directory (--activations-dir) or more RAM (--activations-ram)") from None
        self.nbytes = offset

    def __len__(self) -> int:
        return len(self._meta)

    def __getitem__(self, b):
        if isinstance(b, slice):
            return [self[i] for i in range(*b.indices(len(self)))]
        offset, n, dtype, shape, device = self._meta[b]
        buf = bytearray(n)
        view, done = memoryview(buf), 0
        while done < n:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"activations file ended early ({done} of {n} bytes)")
            done += got
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape).to(device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for b in range(len(self)):
            yield self[b]

    def close(self) -> None:
        self._closer()


class SpillDict(MutableMapping):
    """name -> per-batch tensors; an entry that does not fit the shared budget's RAM goes to a file."""

    def __init__(self, budget: SpillBudget, items=()):
        self.budget = budget
        self._d: dict[str, Sequence[torch.Tensor]] = {}
        for k, v in dict(items).items():
            self[k] = v

    def _drop(self, v) -> None:
        if isinstance(v, OnDisk):
            self.budget.on_disk -= v.nbytes
            v.close()
        else:
            self.budget.in_ram -= _nbytes(v)

    def __setitem__(self, key: str, value: Sequence[torch.Tensor]) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self._drop(old)
        if not isinstance(value, OnDisk):
            value = list(value)
            n = _nbytes(value)
            on_cpu = all(t.device.type == "cpu" for t in value)
            if on_cpu and self.budget.in_ram + n > self.budget.ram_bytes:
                value = OnDisk(value, self.budget)
        if isinstance(value, OnDisk):
            self.budget.on_disk += value.nbytes
            self.budget.peak_on_disk = max(self.budget.peak_on_disk, self.budget.on_disk)
        else:
            self.budget.in_ram += _nbytes(value)
        self._d[key] = value

    def __getitem__(self, key: str) -> Sequence[torch.Tensor]:
        return self._d[key]

    def __delitem__(self, key: str) -> None:
        self._drop(self._d.pop(key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)
