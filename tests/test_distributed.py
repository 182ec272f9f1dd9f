"""How a process learns its place in the job: torchrun, SLURM, the original's flags, our own spawn."""
import pytest

from engine.config import parse_args
from engine.distributed import LaunchPlan, is_lost_peer, plan_from_environment
from engine.errors import UsageError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
                    "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def args_for(*flags):
    return parse_args("resnet", [*flags, "DATA"])


def test_a_plain_run_is_one_process(clean_env):
    assert plan_from_environment(args_for()) == LaunchPlan(0, 1, 0, 1, None)


def test_torchrun_variables_give_rank_world_and_local_share(clean_env):
    for name, value in dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4").items():
        clean_env.setenv(name, value)
    assert plan_from_environment(args_for()) == LaunchPlan(5, 8, 1, 4, "env://")


def test_slurm_tasks_give_rank_world_and_tasks_per_node(clean_env):
    for name, value in dict(SLURM_PROCID="9", SLURM_NTASKS="16", SLURM_LOCALID="1",
                            SLURM_NTASKS_PER_NODE="8(x2)").items():
        clean_env.setenv(name, value)
    plan = plan_from_environment(args_for("--dist-url", "tcp://node0:23456"))
    assert plan == LaunchPlan(9, 16, 1, 8, "tcp://node0:23456")


def test_slurm_without_a_rendezvous_address_is_a_clear_error(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "2")
    with pytest.raises(UsageError, match="MASTER_ADDR"):
        plan_from_environment(args_for())


def test_the_originals_world_size_and_dist_url_with_a_rank(clean_env):
    plan = plan_from_environment(args_for("--world-size", "2", "--rank", "1", "--dist-url", "tcp://10.1.1.20:23456"))
    assert plan == LaunchPlan(1, 2, 0, 1, "tcp://10.1.1.20:23456")


def test_world_size_without_rank_is_a_clear_error(clean_env):
    with pytest.raises(UsageError, match="--rank"):
        plan_from_environment(args_for("--world-size", "2", "--dist-url", "tcp://10.1.1.20:23456"))


def test_spawned_processes_number_the_gpus_of_every_node(clean_env, monkeypatch):
    monkeypatch.setattr("engine.distributed.visible_gpus", lambda: 4)
    args = args_for("--world-size", "2", "--rank", "1", "--dist-url", "tcp://node0:23456")
    assert plan_from_environment(args, spawned_index=3) == LaunchPlan(7, 8, 3, 4, "tcp://node0:23456")


@pytest.mark.parametrize(
    "message, lost",
    [
        ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234", True),
        ("Application timeout caused pair closure", True),  # seen when the timeout hits DDP's broadcast
        ("Connection reset by peer", True),
        ("CUDA out of memory", False),
        ("mat1 and mat2 shapes cannot be multiplied", False),
    ],
)
def test_lost_peers_are_told_from_bugs(message, lost):
    assert is_lost_peer(RuntimeError(message)) is lost
    assert not is_lost_peer(ValueError(message))
