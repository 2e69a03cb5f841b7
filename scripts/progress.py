"""Progress labels for the long-running scripts (reproduce, benchmarks,
data-prep): where a run is, the minutes spent and an estimate of the minutes
left (the mean pace so far, applied to what is still to do)."""
import time


class Progress:
    def __init__(self, total: float):
        self.total, self.start = total, time.time()

    def step(self, k: int) -> str:
        """'[k/n, M min, about N min left]' for step k (1-based), the steps before it done."""
        return self._label(f"{k}/{self.total}", k - 1)

    def after(self, k: int) -> str:
        """'[k/n, M min, about N min left]' once step k is done."""
        return self._label(f"{k}/{self.total}", k)

    def share(self, done: float) -> str:
        """'[37%, M min, about N min left]' after `done` of `total` units (bytes, lines)."""
        return self._label(f"{100 * done / self.total:.0f}%", done)

    def _label(self, where: str, done: float) -> str:
        spent = (time.time() - self.start) / 60
        left = f", about {spent / done * (self.total - done):.0f} min left" if done > 0 else ""
        return f"[{where}, {spent:.0f} min{left}]"
