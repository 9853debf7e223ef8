"""keep_freed_memory: a large block freed and allocated again is reused, not faulted in anew."""

import subprocess
import sys

PROGRAM = """
import resource, sys, torch
from samoe.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults_of_one_alloc():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20 // 4)  # 64 MiB: above glibc's largest mmap threshold
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_alloc()
print(min(faults_of_one_alloc() for _ in range(3)))
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_freed_blocks_are_reused_without_page_faults():
    pages = 64 * 2**20 // 4096
    assert faults("default") > pages // 2  # glibc maps and unmaps it every time
    assert faults("keep") < pages // 20  # the heap keeps it: the second time costs (almost) nothing
