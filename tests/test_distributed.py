"""How a process learns its place in the job: torchrun, SLURM, the original's flags, our own spawn."""
import datetime
import os

import pytest
from torch.distributed import TCPStore

from engine.config import parse_args
from engine.distributed import (
    LaunchPlan, attempt_store, is_lost_peer, join_advice, master_address, plan_from_environment,
)
from engine.errors import UsageError
from engine.network import choose_gloo_interface, interface_with_address

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
                    "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT",
                    "TORCHELASTIC_MAX_RESTARTS")


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


# --- which interface gloo talks on (two real hosts: test_multinode.py) ------------------------------


@pytest.fixture
def no_gloo_interface(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    return monkeypatch


def test_a_gloo_interface_the_user_set_is_kept(no_gloo_interface):
    no_gloo_interface.setenv("GLOO_SOCKET_IFNAME", "eth7")
    assert choose_gloo_interface("no-such-host.invalid", 29500, machines_in_job=4) == "eth7"


def test_a_loopback_master_on_one_machine_leaves_gloo_alone(no_gloo_interface):
    assert choose_gloo_interface("127.0.0.1", 29500, machines_in_job=1) is None
    assert "GLOO_SOCKET_IFNAME" not in os.environ


def test_a_loopback_master_for_several_machines_names_the_variables_to_set(no_gloo_interface):
    with pytest.raises(UsageError, match=r"'localhost' is this machine's loopback .* spans 2 machines.*"
                                         r"--local-addr.*GLOO_SOCKET_IFNAME=lo"):
        choose_gloo_interface("localhost", 29500, machines_in_job=2)


def test_a_master_that_does_not_resolve_is_one_line(no_gloo_interface):
    with pytest.raises(UsageError, match="the master address 'no-such-host.invalid' does not resolve"):
        choose_gloo_interface("no-such-host.invalid", 29500, machines_in_job=2)


def test_the_loopback_address_belongs_to_an_interface():
    assert interface_with_address("127.0.0.1") is not None
    assert interface_with_address("192.0.2.254") is None  # TEST-NET-1: on no interface of a test machine


@pytest.mark.parametrize("init_method, master", [
    ("tcp://10.1.1.20:23456", ("10.1.1.20", 23456)),
    ("tcp://node0", ("node0", 29500)),
    ("file:///shared/rendezvous", None),
    (None, None),
])
def test_the_master_address_comes_from_the_init_method(clean_env, init_method, master):
    assert master_address(init_method) == master


def test_the_master_address_of_env_init_is_master_addr_and_port(clean_env):
    assert master_address("env://") is None
    clean_env.setenv("MASTER_ADDR", "node3")
    clean_env.setenv("MASTER_PORT", "4000")
    assert master_address("env://") == ("node3", 4000)


def test_machines_in_a_job_are_its_ranks_over_those_of_one_machine():
    assert LaunchPlan(0, 16, 0, 8, "env://").machines == 2
    assert LaunchPlan(1, 2, 0, 1, "tcp://node0:1").machines == 2  # the original's flags: one process a node
    assert LaunchPlan(0, 8, 0, 8, "env://").machines == 1


def test_each_start_of_a_one_machine_group_keeps_its_own_keys_in_torchruns_store(clean_env):
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(server.port), TORCHELASTIC_USE_AGENT_STORE="True",
                            TORCHELASTIC_RESTART_COUNT="2").items():
        clean_env.setenv(name, value)
    store = attempt_store(LaunchPlan(0, 2, 0, 2, "env://"), datetime.timedelta(seconds=10))
    store.set("rank_1", "address")
    assert server.get("/eca/attempt_2/rank_1") == b"address"
    assert not server.check(["rank_1"])


def test_groups_without_torchruns_store_or_across_machines_join_as_torch_does(clean_env):
    timeout = datetime.timedelta(seconds=10)
    assert attempt_store(LaunchPlan(0, 2, 0, 2, "env://"), timeout) is None  # no agent store
    clean_env.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert attempt_store(LaunchPlan(0, 2, 0, 2, "tcp://127.0.0.1:1234"), timeout) is None
    assert attempt_store(LaunchPlan(0, 4, 0, 2, "env://"), timeout) is None  # each machine counts its restarts


def test_a_restartable_group_across_machines_that_cannot_join_is_told_how_to_get_a_store_per_start(clean_env):
    two_machines = LaunchPlan(1, 4, 1, 2, "env://")
    plain = "check that every node was started within --dist-timeout (0.5 min) and that the address is one they all reach"
    assert join_advice(two_machines, 0.5) == plain
    clean_env.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    clean_env.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    advice = join_advice(two_machines, 0.5)
    assert advice.startswith(plain + "; ") and "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun" in advice
    assert join_advice(LaunchPlan(1, 2, 1, 2, "env://"), 0.5) == plain  # one machine: attempt_store keeps them apart
