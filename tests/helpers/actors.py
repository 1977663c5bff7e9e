"""Small actor classes used by the tests (imported by workers by module path)."""

from __future__ import annotations

import time


class Pinged:
    """Answers ``ping`` at once, or (``hang``) only after a minute."""

    def __init__(self, hang: bool = False):
        self.hang = hang

    def ping(self) -> int:
        if self.hang:
            time.sleep(60)
        return 0
