import json
import os
import select
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from background import Run  # noqa: E402
from engine.errors import run_cli  # noqa: E402
from make_demo_data import make_demo_dataset  # noqa: E402

# The architectures of the original release, in its order: the six with ECA layers and released weights.
RELEASED_ARCHS = ("eca_resnet18", "eca_resnet34", "eca_resnet50", "eca_resnet101", "eca_resnet152", "eca_mobilenet_v2")


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


def run_main(script_main, capsys, *argv):
    """An entry point in this process, as its command line runs it: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as stop:
        run_cli(script_main, [str(arg) for arg in argv])
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


# --- entry scripts in a fresh process, forked from one that has imported torch already -------------
# The child runs the script from its first line, with its own argv, environment, working folder, stdout,
# stderr and exit status. Importing torch costs seconds a process on a small machine; a fork a fraction
# of one. (The child leaves by os._exit, so atexit handlers do not run: exit itself needs run_script.)

_LAUNCHER = r"""
import json, os, runpy, sys, traceback, warnings
import torch, torchvision, engine.runner, engine.checkpoint, engine.complexity  # the slow imports, paid once
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # thop's version check
    import thop

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.chdir(job["cwd"])
        os.environ.update(job["env"])
        sys.argv = [job["script"], *job["args"]]
        sys.path.insert(0, os.path.dirname(job["script"]))
        code = 0
        try:
            runpy.run_path(job["script"], run_name="__main__")
        except SystemExit as stop:
            if isinstance(stop.code, int) or stop.code is None:
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


class Launcher:
    """Runs an entry script in a child of a process that has torch imported already."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.count = 0
        env = {k: v for k, v in os.environ.items() if k != "ECA_DEBUG"}
        env.setdefault("OMP_NUM_THREADS", "1")
        self.process = subprocess.Popen([sys.executable, "-c", _LAUNCHER], cwd=ROOT, env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, script, *args, env=None, timeout=120) -> subprocess.CompletedProcess:
        self.count += 1
        out, err = (os.path.join(self.workdir, f"{self.count}.{name}") for name in ("out", "err"))
        job = dict(script=os.path.join(ROOT, script), args=[str(a) for a in args], cwd=ROOT, env=env or {},
                   stdout=out, stderr=err)
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, f"{script} {args} did not finish within {timeout}s"
        returncode = json.loads(self.process.stdout.readline())
        with open(out) as stdout, open(err) as stderr:
            return subprocess.CompletedProcess([script, *args], returncode, stdout.read(), stderr.read())

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="session")
def launch(tmp_path_factory):
    """``launch(script, *args, env=None)``: what run_script returns, from a fork of a process with torch imported."""
    launcher = Launcher(str(tmp_path_factory.mktemp("launcher")))
    yield launcher.run
    launcher.close()


@pytest.fixture
def runs():
    """Background runs of a test; whatever is still running at its end is killed."""
    started = []

    def start(*args, command=None, env=None):
        run = Run(command, env=env) if command else Run.script(*args)
        started.append(run)
        return run

    yield start
    for run in started:
        if run.process.poll() is None:
            run.kill_all()
