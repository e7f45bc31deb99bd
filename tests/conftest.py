"""Shared fixtures: tiny HF checkpoints written once per session, and small-engine settings for CPU."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

if "--gpu" in sys.argv or os.environ.get("QWENJAX_GPU_TESTS") == "1":
    os.environ["QWENJAX_GPU_TESTS"] = "1"  # pytest-xdist's workers, whose argv lacks --gpu, inherit it
    # GPU tests start engines in this process and in subprocesses: without preallocation each process takes what
    # it uses, not 75% of the GPU, so a subprocess's engine is not left out of memory by this one's.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
else:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", help="run the GPU-only tests (tests/gpu) on an NVIDIA GPU")
    parser.addoption("--no-skips", action="store_true",
                     help="fail the run if any test skips (CI on CPU: GPU tests are deselected, never skipped)")


def pytest_collection_modifyitems(config, items):
    """GPU tests are deselected (not skipped) unless --gpu is given; with --gpu only they run."""
    gpu = config.getoption("--gpu")
    keep = [i for i in items if ("gpu" in i.keywords) == gpu]
    dropped = [i for i in items if ("gpu" in i.keywords) != gpu]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    """With --gpu, each test's time and outcome, and a failure's traceback, are written as they happen: the GPU
    campaign's time limit may stop the run before pytest's summary, and its device time is too short to run the
    tests again to see why (or which test was running)."""
    if _CONFIG is None or not _CONFIG.getoption("--gpu"):
        return
    tr = _CONFIG.pluginmanager.get_plugin("terminalreporter")
    if tr is None:
        return
    if report.when == "call" or report.failed:
        tr.write_line(f"[gpu] {report.nodeid} {report.when} {report.outcome} {report.duration:.1f}s")
    if report.failed:
        tr.write_line(f"\n=== FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Always says how many tests skipped, and which: a skip is a check that did not run."""
    skipped = terminalreporter.stats.get("skipped", [])
    terminalreporter.write_line(f"skipped tests: {len(skipped)}" + (" (--no-skips: the run fails)" if skipped and
                                                                    config.getoption("--no-skips") else ""))
    for report in skipped:
        terminalreporter.write_line(f"  skipped: {report.nodeid}")


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if session.config.getoption("--no-skips") and reporter is not None and reporter.stats.get("skipped"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_CONFIG = None


def pytest_configure(config):
    global _CONFIG
    _CONFIG = config
    # The run's own cache directory (the built-in model, JAX's persistent compilation cache), inherited by every
    # subprocess: nothing is read from a previous run's cache, and tests that read compiled programs see them compiled.
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="qwenjax-test-cache-")


def pytest_unconfigure(config):
    cache = os.environ.get("XDG_CACHE_HOME", "")
    if "qwenjax-test-cache-" in cache:
        shutil.rmtree(cache, ignore_errors=True)


from tests.checkpoints import write_checkpoint  # noqa: E402

def pythonpath_with(root) -> str:
    """PYTHONPATH for a test's subprocess: the repository first, then whatever the caller had (site dirs)."""
    return os.pathsep.join([str(root)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))


# Small static shapes keep CPU compile time down: every engine in the tests compiles these buckets only.
SMALL_ENGINE = dict(dtype="float32", max_model_len=128, max_num_seqs=8, max_num_batched_tokens=256, block_size=16,
                    decode_buckets=(8,), prefill_token_buckets=(32, 128), num_kv_pages=64)


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def untied_gqa2(ckpt_dir):
    return write_checkpoint(ckpt_dir / "untied_gqa2", num_heads=4, num_kv_heads=2, tie=False, seed=1)


@pytest.fixture(scope="session")
def tied_mha(ckpt_dir):
    return write_checkpoint(ckpt_dir / "tied_mha", num_heads=4, num_kv_heads=4, tie=True, seed=2)


@pytest.fixture(scope="session")
def gqa7_odd(ckpt_dir):
    # 7 query heads over 1 kv head, head_dim 10: hidden 70, ffn 97 (nothing a power of two)
    return write_checkpoint(ckpt_dir / "gqa7_odd", hidden_size=70, intermediate_size=97, num_heads=7,
                            num_kv_heads=1, tie=False, seed=3, num_layers=3)


@pytest.fixture(scope="session")
def sharded(ckpt_dir):
    return write_checkpoint(ckpt_dir / "sharded", num_heads=4, num_kv_heads=2, tie=False, seed=4, shards=3)


@pytest.fixture(scope="session")
def real_vocab(ckpt_dir):
    """Qwen2's real vocabulary and tokenizer, for text prompts, chat templates and stop strings."""
    from tests.checkpoints import REAL_VOCAB

    return write_checkpoint(ckpt_dir / "real_vocab", vocab_size=REAL_VOCAB, hidden_size=32, intermediate_size=64,
                            num_heads=2, num_kv_heads=1, tie=True, seed=5, with_tokenizer=True, embed_std=0.15)


@pytest.fixture(scope="session")
def eos_chain(ckpt_dir):
    """(checkpoint, chain token ids): greedy output of any prompt is exactly the chain's tokens, then EOS."""
    from tests.checkpoints import write_eos_chain_checkpoint

    return write_eos_chain_checkpoint(ckpt_dir / "eos_chain")
