import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
#: Under pytest-xdist (the README's test command runs ``-n 2``), each worker is one process on one of
#: the 2 cores: one intra-op thread each, else the two workers' thread pools fight over the cores.
#: Run alone, a test process takes at most 2 threads (the tiny models gain nothing from more).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


#: SVG rendering needs Graphviz's `dot` binary, a system package that pip cannot install. The
#: README's test command must pass on a fresh machine without it, so those tests skip with this
#: reason there; .ci/run installs Graphviz, so CI runs them.
needs_dot = pytest.mark.skipif(
    shutil.which("dot") is None,
    reason="Graphviz 'dot' is not installed (apt-get install graphviz); .ci/run installs it",
)
