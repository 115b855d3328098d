"""Stand-in for comfy.utils: a ProgressBar that records its updates and checks interruption."""

from . import model_management

UPDATES: list[tuple[int, int, object]] = []


class ProgressBar:
    def __init__(self, total):
        self.total = total
        self.current = 0

    def update_absolute(self, value, total=None, preview=None):
        model_management.throw_exception_if_processing_interrupted()
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        UPDATES.append((self.current, self.total, preview))

    def update(self, value):
        self.update_absolute(self.current + value, self.total)
