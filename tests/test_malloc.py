"""keep_freed_memory: a large block comes from the heap, not from its own mmap, and once freed it
stays in the process for the next request instead of going back to the system (glibc's mallinfo2).
release_freed_memory: what the heap kept goes back to the system when asked (the process's RSS)."""

import json
import subprocess
import sys

PROGRAM = """
import ctypes, json, sys, torch
from samoe.malloc import keep_freed_memory, release_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

def rss_mib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
t = torch.ones(64 * 2**20 // 4)  # 64 MiB: above glibc's largest mmap threshold
live = libc.mallinfo2()
del t
freed = libc.mallinfo2()
rss_kept = rss_mib()
released = release_freed_memory()
print(json.dumps({"mmapped_live": live.hblkhd, "heap_free_after": freed.fordblks, "released": released,
                  "rss_kept_mib": rss_kept, "rss_released_mib": rss_mib()}))
"""

MIB64 = 64 * 2**20


def info(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_large_block_is_mapped_and_unmapped_by_default():
    i = info("default")
    assert i["mmapped_live"] >= MIB64  # its own mmap, unmapped on free: page faults again next time
    assert i["heap_free_after"] < MIB64


def test_kept_memory_comes_from_the_heap_and_stays_there_when_freed():
    i = info("keep")
    assert i["mmapped_live"] < MIB64  # no mmap of its own
    assert i["heap_free_after"] >= MIB64  # freed into the heap, kept for the next step's buffers


def test_kept_memory_goes_back_to_the_system_when_released():
    i = info("keep")
    assert i["released"]
    assert i["rss_kept_mib"] - i["rss_released_mib"] >= 60  # the freed 64 MiB block leaves the RSS
