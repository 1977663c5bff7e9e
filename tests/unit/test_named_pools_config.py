"""Named pools (``pools:``): the one role table, the topology they make, bad input named by
key at check-config, and how a named reward pool's scores combine with the default's."""

from __future__ import annotations

import pytest
import torch

from rlalign_ray.config import config_from_dict
from rlalign_ray.data.batch import NONFINITE, ScoredShard
from rlalign_ray.errors import ConfigError
from rlalign_ray.roles import ROLES, pool_class, roles_of
from rlalign_ray.topology import Pool, Topology
from rlalign_ray.trainers.judges import combine

REWARD = [{"type": "function", "path": "rlalign_ray.rewards.builtin:arithmetic_exact"}]
JUDGE = {"kind": "reward", "rewards": REWARD, "weight": 0.1, "resources": {"num_cpus": 0.25}}


def _cfg(pools=None, **sections):
    return config_from_dict({"reward": {"rewards": REWARD}, "pools": pools or {}, **sections})


def _problems(pools) -> list[str]:
    with pytest.raises(ConfigError) as err:
        _cfg(pools)
    return err.value.problems


@pytest.mark.parametrize(
    "pools, key",
    [
        ({"judge": {"kind": "judge"}}, "pools.judge.kind: unknown kind 'judge'"),
        ({"reward": JUDGE}, "pools.reward: 'reward' names the reward role's"),
        ({"ref2": {"kind": "reference"}}, "pools.ref2.kind: the built-in Trainer runs one"),
        ({"judge": {**JUDGE, "weight": 0}}, "pools.judge.weight: 0 leaves its scores out"),
        ({"judge": {**JUDGE, "rewards": []}}, "pools.judge.rewards: a reward pool needs"),
        ({"gen_b": {"kind": "generator", "rewards": REWARD}}, "pools.gen_b.rewards: only"),
        ({"gen_b": {"kind": "generator", "num_actors": 0}}, "pools.gen_b.num_actors: needs"),
        ({"a.b": {"kind": "generator"}}, "pools.a.b: a pool's name takes letters"),
        (
            {"judge": {**JUDGE, "rewards": [{"type": "magic"}]}},
            "pools.judge.rewards[0].type: use one of",
        ),
        ({"judge": {**JUDGE, "kindd": "x"}}, "pools.judge.kindd: unknown key"),
    ],
)
def test_bad_named_pools_are_refused_naming_the_key(pools, key):
    assert any(p.startswith(key) for p in _problems(pools)), _problems(pools)


def test_named_reward_pools_with_dispatchers_are_accepted():
    """One path for scores: the dispatchers score for the default pool, the named pools
    score what lands like any other chunk (test_named_pools runs it)."""
    cfg = _cfg({"judge": JUDGE}, rollout={"dispatch_group": 2})
    assert cfg.rollout.dispatch_group == 2 and "judge" in cfg.pools


def test_one_role_table_drives_the_default_roles_and_the_pool_classes():
    assert roles_of(_cfg()) == ["generator", "reward", "learner"]
    cfg = _cfg(algorithm={"kl_coef": 0.01})
    assert roles_of(cfg) == ["generator", "reward", "learner", "reference"]
    env = _cfg(env={"path": "helpers.envs:EchoEnv", "num_actors": 1})
    assert roles_of(env)[-1] == "env"  # a role like the others
    assert pool_class("env").__name__ == "EnvPool"
    assert {r for r, role in ROLES.items() if role.many} == {"generator", "reward"}


def test_named_pools_join_the_topology_and_a_python_pool_needs_a_kind():
    cfg = _cfg({"judge": JUDGE, "gen_b": {"kind": "generator"}})
    topo = Topology.from_config(cfg)
    assert topo.of_kind("reward") == ["reward", "judge"]
    assert topo.of_kind("generator") == ["generator", "gen_b"]
    assert topo.pools["judge"].weight == 0.1
    topo.validate(cfg)
    pools = topo.build_pools(cfg)
    assert pools["judge"].weight == 0.1 and pools["judge"].name == "judge"
    assert [s.path for s in pools["judge"].reward.rewards] == [REWARD[0]["path"]]
    topo.pools["critic2"] = Pool(1)
    topo.pools["ref2"] = Pool(1, kind="reference")
    with pytest.raises(ConfigError) as err:
        topo.validate(cfg)
    assert any("pool 'critic2' is no role" in p for p in err.value.problems)
    assert any(
        "pool 'ref2': the built-in Trainer runs one reference" in p for p in err.value.problems
    )


def _shard(scores, **breakdown):
    n = len(scores)
    z = torch.zeros(n, 2)
    t = torch.tensor(scores)
    return ScoredShard(t, breakdown, torch.arange(n), torch.ones(n), z, z)


def test_a_named_reward_pool_adds_its_weighted_total_and_logs_under_its_name():
    main = _shard([1.0, 0.0], digits=torch.tensor([1.0, 0.0]))
    judge = _shard([0.5, 2.0], brevity=torch.tensor([0.5, 2.0]))
    out = combine(main, {"judge": (0.1, judge)})
    assert out.scores.tolist() == pytest.approx([1.05, 0.2])
    assert set(out.breakdown) == {"digits", "judge/brevity"}
    flagged = _shard([float("nan"), 1.0], **{NONFINITE: torch.tensor([1.0, 0.0])})
    out = combine(main, {"judge": (0.1, flagged)})
    assert out.breakdown[NONFINITE].tolist() == [1.0, 0.0] and out.scores[0].isnan()
