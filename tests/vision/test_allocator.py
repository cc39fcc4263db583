"""glibc malloc settings (vision/allocator.py): taken by glibc, inherited by nothing else, and
what they are for: a training step's tensors reused instead of page-faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from cassava_pipeline.vision import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _measured(setup: str, warm: int, steps: int) -> str:
    """A child script: the malloc mode (argv[1]) applied and printed, ``setup`` (which defines
    ``step()``), ``warm`` steps, then the minor page faults of ``steps`` more."""
    return "\n".join([
        "import resource, sys, torch",
        "from cassava_pipeline.vision import allocator",
        "print(allocator.apply(sys.argv[1]))",
        textwrap.dedent(setup).strip(),
        f"for _ in range({warm}):",
        "    step()",
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt",
        f"for _ in range({steps}):",
        "    step()",
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)",
    ])  # fmt: skip


# Thirty training steps of a small conv net whose activations (16 MiB) lie between glibc's default
# mmap threshold (128 KiB, raised only as far as the largest block freed) and the tuned one
# (32 MiB); the minor page faults of those steps, after three steps have warmed everything up.
# Tuned, up to three or four 16 MiB blocks are still faulted in (4,096 faults each; from where
# was not found), and no more over more steps: 8,193 to 16,386 faults in ten steps after one,
# 0 to 12,289 in thirty after three. As glibc comes, the faults grow with the steps.
STEPS = _measured(
    """
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(64, 10),
    )
    x = torch.randn(16, 3, 64, 64)
    def step():
        net(x).logsumexp(1).sum().backward()
    """,
    warm=3,
    steps=30,
)

# One 40 MiB block (over glibc's largest mmap threshold, 32 MiB) taken and freed per step, with
# nothing else growing the heap: unless it lies in the heap, each step maps it and faults it in.
# Twenty steps first: PyTorch's 64-byte aligned requests walk the heap for a few steps before
# the freed blocks merge and fit.
BIG_BLOCKS = _measured(
    """
    def step():
        torch.empty(10 * 2**20).fill_(1.0)
    """,
    warm=20,
    steps=10,
)


def _faults(mode: str, script: str = STEPS) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", script, mode], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    return out[0], int(out[1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_tuned_malloc_reuses_a_training_steps_memory_instead_of_faulting_it_in():
    settings, default = _faults("default")
    assert settings == "{}"
    settings, tuned = _faults("tuned")
    assert settings == str({k: v for k, (_, v) in allocator.SETTINGS.items()})
    # measured (12 pairs, 2 threads): 244,801 to 784,768 faults as glibc comes, 0 to 12,289
    # tuned. With ten steps after one, as glibc comes took 44,897 faults in 2 runs of 23 (its
    # lowest, 4,500 a step, which these 30 steps put at 135,000) and tuned up to 16,386.
    assert default > 60_000
    assert tuned * 4 < default, (tuned, default)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_blocks_over_the_mmap_threshold_come_from_the_heap_and_are_reused():
    # measured: 102,410 faults as glibc comes, and as many with the mmap threshold raised but
    # mmap left on (the heap's top never grows while every such block is mapped); 0 tuned
    _, default = _faults("default", BIG_BLOCKS)
    _, tuned = _faults("tuned", BIG_BLOCKS)
    assert default > 50_000  # 10 steps x 10,240 pages
    assert tuned < 2_000, (tuned, default)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_glibc_takes_every_setting():
    assert allocator.apply("tuned") == {k: v for k, (_, v) in allocator.SETTINGS.items()}
    assert allocator.apply("default") == {}


def test_other_c_libraries_are_left_as_they_are(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    allocator.tune_malloc.cache_clear()
    try:
        assert allocator.apply("tuned") == {}
    finally:
        allocator.tune_malloc.cache_clear()


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match=r"runtime.malloc: .jemalloc. is not one of tuned, def"):
        allocator.apply("jemalloc")
