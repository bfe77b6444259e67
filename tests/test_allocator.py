"""retain_freed_memory: applies on glibc Linux, and large allocations keep working afterwards."""

from __future__ import annotations

import subprocess
import sys


def test_retain_freed_memory_applies_and_allocations_still_work():
    code = ("import sys, torch; from openbagel.inference.allocator import retain_freed_memory; "
            "applied = retain_freed_memory(); x = torch.ones(3, 1026, 3584); "
            "y = [(x * 2).sum().item() for _ in range(3)]; "
            "assert y == [2.0 * x.numel()] * 3, y; print(applied)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    expected = sys.platform.startswith("linux")  # glibc here; other platforms report False and change nothing
    assert out == str(expected)
