"""Two real network hosts: network namespaces joined by a veth pair, one training process in each.

Each namespace has its own loopback, its own address and nothing else, while the host
name still resolves to 127.0.0.1 in both: exactly the machine on which gloo, left to
itself, binds to loopback and the job fails on one side and hangs on the other.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from netns import two_hosts

PORT = 29500  # each namespace has its own ports
TINY = ["--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32"]
# 2 epochs, 24 images, a global batch of 8: 3 steps an epoch. The lr keeps this tiny run from diverging.
TRAIN = ["-a", "eca_resnet18", "--epochs", "2", "--lr", "0.01", "-j", "0", "-p", "1", "--seed", "3", *TINY,
         "--device", "cpu", "--dist-timeout", "1"]
# Intra-op threads change the order of floating-point sums in the CPU kernels, so runs compare exactly only
# at one thread count; torchrun sets OMP_NUM_THREADS=1 itself only for several processes per host.
THREADS = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def hosts():
    with two_hosts("m") as pair:
        yield pair


def run_together(commands, timeout=300, env=None):
    """Start every command at once, wait for all; a command still running at ``timeout`` fails the test."""
    full_env = {**os.environ, **THREADS, **(env or {})}
    full_env.pop("GLOO_SOCKET_IFNAME", None)
    processes = [subprocess.Popen(list(map(str, command)), cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True) for command in commands]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the job hung:\n" + "\n".join(process.communicate()[0] for process in processes))
    return [(process.returncode, output) for process, output in zip(processes, outputs)]


def torchrun(*argv):
    return [sys.executable, "-m", "torch.distributed.run", *map(str, argv)]


def launches(mode, hosts):
    """Per host, the command line that starts its share of a two-machine job, one process each."""
    master = hosts[0].address
    script = os.path.join(ROOT, "main.py")
    for rank, host in enumerate(hosts):
        if mode == "torchrun":
            launcher = torchrun("--nnodes", 2, "--nproc-per-node", 1, "--node-rank", rank, "--master-addr", master,
                                "--master-port", PORT, script)
        elif mode == "c10d rendezvous":
            # The host name resolves to loopback here, so torchrun cannot tell by itself which node hosts the
            # rendezvous or which address the others reach it at: the first node says both.
            first = ["--rdzv-conf", "is_host=1", "--local-addr", master] if rank == 0 else []
            launcher = torchrun("--nnodes", 2, "--nproc-per-node", 1, "--rdzv-backend", "c10d", "--rdzv-endpoint",
                                f"{master}:{PORT}", *first, script)
        else:  # the original's flags
            launcher = [sys.executable, script, "--world-size", 2, "--rank", rank, "--dist-url", f"tcp://{master}:{PORT}"]
        yield host.command(*launcher)


def prec_lines(output):
    return [line for line in output.splitlines() if line.startswith(" * Prec@1")]


def weights(out):
    state = torch.load(out / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    return {name: tensor for name, tensor in state.items() if tensor.is_floating_point()}


def largest_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[name].double() - b[name].double()).abs().max().item() for name in a)


@pytest.fixture(scope="module")
def one_host_two_processes(tiny_data, tmp_path_factory):
    """The reference: one machine, two processes under torchrun, the same global batch of 8."""
    out = tmp_path_factory.mktemp("one-host") / "out"
    [(returncode, output)] = run_together([torchrun("--standalone", "--nproc-per-node", 2, "main.py", *TRAIN, "-b", 8,
                                                    "--output-dir", out, tiny_data)])
    assert returncode == 0, output
    assert len(prec_lines(output)) == 2, output
    return weights(out), prec_lines(output)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["torchrun", "c10d rendezvous", "the original's flags"])
def test_two_hosts_train_exactly_like_one_host_with_two_processes(hosts, one_host_two_processes, tiny_data,
                                                                   tmp_path, mode):
    outs = [tmp_path / f"host{rank}" for rank in range(2)]
    # -b is one machine's batch: 4 on each of two machines is the reference's 8 on one.
    results = run_together([[*command, *TRAIN, "-b", 4, "--output-dir", out, tiny_data]
                            for command, out in zip(launches(mode, hosts), outs)])
    for returncode, output in results:
        assert returncode == 0, output
    reference_weights, reference_lines = one_host_two_processes
    assert "2 process(es); batch 4 per process, 8 in all" in results[0][1]
    assert prec_lines(results[0][1]) == reference_lines
    assert largest_difference(weights(outs[0]), reference_weights) <= 1e-6
    assert not outs[1].exists()  # only rank 0 writes


def probe(host, master, machines=2):
    """Run the engine's interface choice inside ``host``'s namespace; (returncode, output)."""
    code = ("import sys; from engine.network import choose_gloo_interface; from engine.errors import report_and_exit;"
            f"report_and_exit(lambda: print(choose_gloo_interface({master!r}, {PORT}, {machines})))")
    env = {key: value for key, value in os.environ.items() if key != "GLOO_SOCKET_IFNAME"}
    result = subprocess.run(host.command(sys.executable, "-c", code), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr


def test_gloo_talks_on_the_interface_that_routes_to_the_master(hosts):
    master = hosts[0].address
    assert probe(hosts[1], master) == (0, f"{hosts[1].interface}\n")
    assert probe(hosts[0], master) == (0, f"{hosts[0].interface}\n")  # the master itself: its own address


def test_a_master_with_no_route_stops_at_once_naming_the_variable(hosts):
    returncode, output = probe(hosts[1], "10.99.0.1")  # no route out of the namespace
    assert returncode == 2
    assert output.startswith("-c: error: no network route from this machine to the master 10.99.0.1")
    assert "GLOO_SOCKET_IFNAME" in output and len(output.splitlines()) == 1


@pytest.mark.slow
def test_a_rank_that_cannot_reach_the_master_fails_in_one_line_within_the_timeout(hosts, tiny_data, tmp_path):
    # Nobody listens at the master's address: the lone rank 1 must give up after --dist-timeout, not hang.
    started = time.monotonic()
    [(returncode, output)] = run_together([hosts[1].command(
        sys.executable, "main.py", *TRAIN, "-b", 4, "--dist-timeout", "0.1", "--world-size", 2, "--rank", 1,
        "--dist-url", f"tcp://{hosts[0].address}:{PORT}", "--output-dir", tmp_path / "out", tiny_data)], timeout=180)
    assert returncode == 1, output
    assert time.monotonic() - started < 120
    assert f"main.py: error: rank 1 could not join the job through the master at {hosts[0].address}:{PORT}" in output
    assert "Traceback" not in output and not (tmp_path / "out").exists()


def test_a_loopback_master_for_a_job_of_several_machines_stops_at_once(launch, tiny_data, tmp_path):
    result = launch("main.py", *TRAIN, "-b", 4, "--world-size", 2, "--rank", 1, "--dist-url", "tcp://localhost:29500",
                    "--output-dir", tmp_path / "out", tiny_data, env={"GLOO_SOCKET_IFNAME": ""})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("main.py: error: the master address 'localhost' is this machine's loopback")
    assert "GLOO_SOCKET_IFNAME=lo" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()
