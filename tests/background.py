"""Entry scripts running in the background, their output read as it comes; torchrun command lines."""
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Run:
    """An entry script running in the background, its output lines readable as they come."""

    def __init__(self, command, cwd=ROOT, env=None):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
        env.pop("ECA_DEBUG", None)
        self.process = subprocess.Popen(command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.lines = []
        self._new = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def script(cls, script, *args):
        return cls([sys.executable, os.path.join(ROOT, script), *map(str, args)])

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)

    @property
    def output(self):
        return "".join(self.lines)

    def wait_for_line(self, fragment, timeout=180):
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._new.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no line with {fragment!r} within {timeout}s:\n{self.output}") from None
            if line is None:
                raise AssertionError(f"exited ({self.process.wait()}) before printing {fragment!r}:\n{self.output}")
            if fragment in line:
                return

    def wait_for(self, condition, what, timeout=180, poll=0.001):
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"exited ({self.process.returncode}) before {what}:\n{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout}s:\n{self.output}")
            time.sleep(poll)

    def send(self, signum):
        self.process.send_signal(signum)
        return time.monotonic()

    def finish(self, timeout=180):
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"still running {timeout}s later:\n{self.output}") from None
        self._reader.join(timeout=30)  # the last lines
        return self.process.returncode

    def kill_all(self):
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_command(*args, launcher=()):
    """main.py under torchrun, two processes on this machine; ``launcher`` adds torchrun's own flags."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), *launcher, os.path.join(ROOT, "main.py"), *map(str, args)]


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]
