import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from make_demo_data import make_demo_dataset  # noqa: E402


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small learnable ImageFolder (4 classes, 48 train / 16 val images each), made once per session."""
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(str(root))
    return str(root)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A very small ImageFolder (3 classes, 8 train / 4 val images each) for fast runs of the scripts."""
    root = tmp_path_factory.mktemp("tiny")
    make_demo_dataset(str(root), num_classes=3, train_per_class=8, val_per_class=4)
    return str(root)


def run_script(script, *args, cwd=None, env=None, timeout=600, check=False):
    """Run one of the project's entry scripts as a user would, and return the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "2")
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *map(str, args)],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result
