import pytest

from megatron_bloom.distributed import detect_launch_env, expand_hostlist


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[001-004,007],login-a1", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu007", "login-a1"]),
        ("jean-zay-iam[01-02]", ["jean-zay-iam01", "jean-zay-iam02"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
        ("r1n[0-1],r2n[5]", ["r1n0", "r1n1", "r2n5"]),
        ("host.example.org,other", ["host.example.org", "other"]),
        ("c[09-11]", ["c09", "c10", "c11"]),
    ],
)
def test_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["", "gpu[1-", "gpu]1[", "gpu[3-1]", "gpu[a-b]"])
def test_bad_hostlist(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_torchrun_env():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "6000"}
    e = detect_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (
        5, 8, 1, "n1", 6000, "torchrun")


def test_slurm_env():
    env = {
        "SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[003-010]", "SLURM_JOB_ID": "1234",
    }
    e = detect_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == (9, 16, 1, "gpu003", "slurm")
    assert e.master_port == 10000 + 1234


def test_torchrun_inside_srun_wins():
    """srun starts one torchrun per node; the process rank is torchrun's, not SLURM_PROCID."""
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3"}
    e = detect_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (11, 16, 3, "torchrun")


def test_single_process():
    e = detect_launch_env({})
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "single") and e.master_port > 0


def test_world_size_without_rank():
    """`WORLD_SIZE=3 python launch/pretrain.py ...` (README) validates for 3 ranks, then refuses to start."""
    from megatron_bloom.distributed import world_size_from_env
    from megatron_bloom.errors import UserError

    assert world_size_from_env({"WORLD_SIZE": "3"}) == 3
    with pytest.raises(UserError, match="WORLD_SIZE=3 is set but RANK is not"):
        detect_launch_env({"WORLD_SIZE": "3"})
    assert detect_launch_env({"WORLD_SIZE": "1"}).world_size == 1
