"""Progress output for long loops: a tqdm bar on a terminal, a few plain lines in a log file.

    with progress(total=len(samples), desc="extract", unit="sample") as bar:
        for chunk in ...:
            bar.update(len(chunk))
            bar.set_postfix(loss=f"{loss:.4f}")

A bar when both stdout and stderr are terminals (tqdm draws on stderr); otherwise one line on stdout
at every further ~10% of the total and at least every ~30 s (done / total, rate, ETA, the postfix),
so a log of a whole run holds a few dozen lines instead of one per update.
"""

from __future__ import annotations

import sys
import time

__all__ = ["PlainProgress", "progress"]


def _interactive() -> bool:
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class PlainProgress:
    """tqdm's update / set_postfix / close for logs: a line every `step` of the total or `interval` seconds."""

    def __init__(self, total: int, desc: str = "", unit: str = "it", initial: int = 0, *, step: float = 0.1,
                 interval: float = 30.0, stream=None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = self.start = int(initial)
        self.step, self.interval = step, interval
        self.stream = stream
        self.postfix = ""
        self.t0 = self.t_last = time.monotonic()
        self._next = self._next_mark(self.n)
        self._printed = self.n
        self.closed = False

    def _next_mark(self, n: int) -> int:
        chunk = max(1, int(round(self.total * self.step)))
        return (n // chunk + 1) * chunk

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = time.monotonic()
        if (self.total > 0 and self.n >= min(self._next, self.total)) or now - self.t_last >= self.interval:
            self._print(now)

    def _print(self, now: float) -> None:
        self.t_last, self._printed = now, self.n
        self._next = self._next_mark(self.n)
        elapsed = now - self.t0
        rate = (self.n - self.start) / elapsed if elapsed > 0 else float("nan")
        parts = [f"{self.n}/{self.total}" + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        if rate == rate and rate > 0:
            parts.append(f"{rate:.2f} {self.unit}/s")
            if self.n < self.total:
                parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.postfix:
            parts.append(self.postfix)
        print(f"{self.desc}: " + "  ".join(parts), file=self.stream or sys.stdout, flush=True)

    def close(self) -> None:
        if not self.closed and self.n != self._printed:
            self._print(time.monotonic())  # a loop that stopped early says where it stopped
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, refresh: bool = True, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(total: int, desc: str, *, unit: str = "it", initial: int = 0, enabled: bool = True, **tqdm_kwargs):
    """A progress reporter with tqdm's update / set_postfix / close (and a context manager):
    a bar on a terminal, plain lines otherwise, nothing when `enabled` is False."""
    if not enabled:
        return _Silent()
    if _interactive():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, **tqdm_kwargs)
    return PlainProgress(total, desc, unit, initial)
