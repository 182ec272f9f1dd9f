"""scripts/slurm/train.sbatch on a real two-node SLURM cluster that the test starts itself.

munged, slurmctld and one slurmd per node (Debian's ``slurm-wlm`` and ``munge``), each
node a network namespace with a host name and an /etc/hosts of its own, as on a
cluster: the batch script finds the first node by name, and torchrun meets there.
The test is skipped where those programs, or namespaces, are missing.
"""
import csv
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from netns import hosts_file, two_hosts

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "nsenter", "unshare")
SCRIPT = os.path.join(ROOT, "scripts", "slurm", "train.sbatch")
TINY = ["--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32"]
EPOCHS = 4
TRAIN = ["-a", "eca_resnet18", "--epochs", EPOCHS, "--lr", "0.01", "-b", "4", "-j", "0", "-p", "1", "--seed", "3",
         *TINY, "--device", "cpu", "--dist-timeout", "1"]

SLURM_CONF = """\
ClusterName=ecatest
SlurmctldHost={head.name}({head.address})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """Daemons started here, stopped by ``close``; commands reach slurmctld from the first node."""

    def __init__(self, hosts, root):
        self.hosts, self.root, self.daemons = hosts, root, []
        self.hosts_file = hosts_file(root / "hosts", hosts)
        nodes = "\n".join(f"NodeName={host.name} NodeAddr={host.address} CPUs=1 State=UNKNOWN" for host in hosts)
        (root / "slurm.conf").write_text(SLURM_CONF.format(head=hosts[0], root=root, nodes=nodes))
        for folder in ("state", "spool"):
            (root / folder).mkdir()
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    def start(self):
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.daemon(["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={self.root}/munge.socket",
                     f"--pid-file={self.root}/munged.pid", f"--seed-file={self.root}/munged.seed",
                     f"--log-file={self.root}/munged.log"], "munged")
        self.wait_for(lambda: (self.root / "munge.socket").exists(), "munged to open its socket")
        self.daemon(self.hosts[0].command_as(self.hosts_file, "slurmctld", "-D", "-i"), "slurmctld")
        for host in self.hosts:
            self.daemon(host.command_as(self.hosts_file, "slurmd", "-D", "-N", host.name), f"slurmd.{host.name}")
        self.wait_for(lambda: self.run("sinfo", "-h", "-o", "%T").stdout.split() == ["idle"], "both nodes idle")

    def daemon(self, command, name):
        log = open(self.root / f"{name}.out", "w")
        self.daemons.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT))
        log.close()

    def run(self, *argv):
        """A SLURM command, run on the first node."""
        return subprocess.run(self.hosts[0].command_as(self.hosts_file, *argv), env=self.env, capture_output=True,
                              text=True, timeout=60)

    def job(self, job_id):
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for(self, condition, what, timeout=120):
        deadline = time.monotonic() + timeout
        while not condition():
            for daemon in self.daemons:
                if daemon.poll() is not None:
                    raise RuntimeError(f"{daemon.args[-1]} exited while waiting for {what}: {self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} within {timeout} s: {self.logs()}")
            time.sleep(1)

    def logs(self):
        return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted(self.root.glob("*.out"))
                         + sorted(self.root.glob("*.log")))

    def close(self):
        self.run("scancel", "--full", "--user", "root")
        for daemon in reversed(self.daemons):
            daemon.terminate()
        for daemon in self.daemons:
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"a SLURM cluster needs {', '.join(missing)} (Debian: apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld, slurmd and munged for a test cluster needs root")
    with two_hosts("s") as hosts:
        cluster = Cluster(hosts, tmp_path_factory.mktemp("slurm"))
        try:
            try:
                cluster.start()
            except (RuntimeError, TimeoutError) as error:
                pytest.skip(f"could not start a SLURM cluster here: {str(error).splitlines()[0]}")
            yield cluster
        finally:
            cluster.close()


def read_log(path):
    return path.read_text() if path.exists() else ""


@pytest.mark.slow
def test_sbatch_trains_on_two_nodes_requeues_when_warned_and_resumes_to_the_end(cluster, tiny_data, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job.out"
    # What this cluster lacks (GPUs, 64 CPUs a node) is overridden on the command line, as users do.
    submitted = cluster.run(
        "env", f"ECA_ROOT={ROOT}", f"PYTHON={sys.executable}", "NPROC_PER_NODE=1", "OMP_NUM_THREADS=1",
        "PYTHONUNBUFFERED=1", "sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", "--gpus-per-node=0",
        f"--output={log}", SCRIPT, *TRAIN, "--output-dir", out, tiny_data)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    cluster.wait_for(lambda: "Epoch: [1][0/3]" in read_log(log), "training in its second epoch", timeout=300)
    # What `#SBATCH --signal=B:USR1@300` makes the scheduler do five minutes before the time limit.
    warned = cluster.run("scancel", "--batch", "--signal=USR1", job)
    assert warned.returncode == 0, warned.stderr
    cluster.wait_for(lambda: cluster.job(job).get("Restarts") == "1" and cluster.job(job)["JobState"] == "PENDING",
                     "the job requeued", timeout=180)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # skip SLURM's hold on requeued jobs
    cluster.wait_for(lambda: cluster.job(job).get("JobState") == "COMPLETED", "the job completed", timeout=300)

    output = read_log(log)
    assert cluster.job(job)["ExitCode"] == "0:0", output
    assert "on 2 node(s) x 1 process(es), rendezvous at node0:" in output
    assert re.search(r"stopped by SIGTERM (at epoch \d+, batch \d+|while validating epoch \d+)", output), output
    assert "eca: requeueing job" in output and "(restart 1)" in output
    assert "=> resumed" in output, output
    assert torch.load(out / "checkpoint.pth.tar", weights_only=True)["epoch"] == EPOCHS
    with open(out / "metrics.csv") as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == list(range(EPOCHS))
