"""Test helpers shared by the fault tests: processes found by a marker in their environment."""
import os


def processes_with_marker(marker: str) -> list[int]:
    """Live (non-zombie) processes carrying ``FSD_TEST_MARKER=marker`` in their environment."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"FSD_TEST_MARKER={marker}".encode() not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found
