"""Outer optimizers: the config, the registry, and their whole state through a real state-sync round trip."""

from __future__ import annotations

import io
import json

import pytest
import torch

from collectives.errors import ConfigError
from collectives.net.transport import Transport
from collectives.net.transportconfig import TransportConfig
from collectives.statesync import StateServer, StateSnapshot, StateSyncConfig, fetch_state
from collectives.statesync.format import state_digest
from optimizers import outer_optim
from optimizers.outer_optim import (
    OUTER_OPTIMIZERS,
    OuterConfig,
    load_optimizer_state,
    make_outer_optimizer,
    optimizer_state,
    register_outer_optimizer,
)
from optimizers.yogi import Yogi

pytestmark = pytest.mark.timeout(120)

BUILT_IN = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "yogi": Yogi,
}
NAMES = ["embed.weight", "block.0.weight", "block.0.bias", "head.weight", "scale"]
RUN = "outer-run"


def make_params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [
        torch.randn(6, 4, generator=g),
        torch.randn(4, 4, generator=g),
        torch.randn(4, generator=g),
        torch.randn(2, 4, generator=g),
        torch.randn((), generator=g),  # a 0-dim parameter: its state tensors are 0-dim too
    ]


def grads_for(step: int, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Pseudo-gradients of one round; in round 1 the bias gets none (a fragment not synced this round),
    and head.weight gets none before round 3 (absent state must stay absent)."""
    g = torch.Generator().manual_seed(100 + step)
    grads: list[torch.Tensor | None] = [torch.randn(p.shape, generator=g) * 0.1 for p in params]
    if step == 1:
        grads[2] = None
    if step < 3:
        grads[3] = None
    return grads


def outer_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], step: int) -> None:
    for p, grad in zip(params, grads_for(step, params)):
        p.grad = grad
    opt.step()
    for p in params:
        p.grad = None


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sorted(sa["state"]) == sorted(sb["state"])
    for i, entry in sa["state"].items():
        assert sorted(entry) == sorted(sb["state"][i]), i
        for key, value in entry.items():
            other = sb["state"][i][key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and value.shape == other.shape, (i, key)
                assert torch.equal(value, other), (i, key)
            else:
                assert value == other, (i, key)


# -- a real state-sync round trip over 127.0.0.1 ----------------------------------------------------------


@pytest.fixture(scope="module")
def sync_round_trip():
    """round_trip(snapshot) -> the snapshot as a joiner receives it from a StateServer (real gRPC, loopback)."""
    served: dict[str, StateSnapshot] = {}
    server, client = Transport(TransportConfig()), Transport(TransportConfig())
    address = server.start(StateServer(server, RUN, lambda: served["snapshot"], StateSyncConfig()).handlers())
    client.start(())

    def round_trip(snapshot: StateSnapshot) -> StateSnapshot:
        served["snapshot"] = snapshot
        return fetch_state(client, address, RUN, peer_id="joiner", config=StateSyncConfig(timeout_s=30))

    yield round_trip
    client.close()
    server.close()


def through_torch_save(tensors: dict[str, torch.Tensor], meta: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """What a checkpoint does: tensors through torch.save / torch.load(weights_only=True), meta through JSON."""
    buf = io.BytesIO()
    torch.save(tensors, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True), json.loads(json.dumps(meta, allow_nan=False))


def stepped_three_rounds(name: str) -> tuple[list[torch.Tensor], OuterConfig, torch.optim.Optimizer]:
    """Parameters, config and the built-in outer optimizer ``name`` after three rounds of outer_step."""
    params = make_params()
    config = OuterConfig(name=name, lr=0.05)
    opt = make_outer_optimizer(params, config)
    for step in range(3):
        outer_step(opt, params, step)
    return params, config, opt


@pytest.mark.parametrize("name", sorted(BUILT_IN))
@pytest.mark.parametrize("transport", ["state-sync", "checkpoint"])
def test_state_round_trip_then_three_more_steps_are_bit_identical(name, transport, sync_round_trip):
    params, config, opt = stepped_three_rounds(name)
    tensors, meta = optimizer_state(opt, NAMES)
    assert all(k.startswith("outer/") for k in tensors)
    if name != "adagrad":  # adagrad creates every parameter's state up front
        assert not any(k.endswith("/head.weight") for k in tensors), "a never-stepped parameter has no state"
    if transport == "state-sync":
        globals_ = {f"global/{n}": p.clone() for n, p in zip(NAMES, params)}
        got = sync_round_trip(StateSnapshot(round_id=7, tensors={**globals_, **tensors}, meta={"outer": meta}))
        received, meta_back = got.tensors, got.meta["outer"]
        fresh = [received[f"global/{n}"].clone() for n in NAMES]
    else:
        received, meta_back = through_torch_save(tensors, meta)
        fresh = [p.clone() for p in params]
    for key, t in tensors.items():
        assert received[key].shape == t.shape and received[key].dtype == t.dtype, key  # 0-dim steps stay 0-dim
    joiner = make_outer_optimizer(fresh, config)
    load_optimizer_state(joiner, NAMES, received, meta_back)
    assert_same_state(opt, joiner)
    for step in range(3, 6):
        outer_step(opt, params, step)
        outer_step(joiner, fresh, step)
    for a, b in zip(params, fresh):
        assert torch.equal(a, b)
    assert_same_state(opt, joiner)


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_a_loaded_state_gives_the_snapshot_and_digest_of_the_state_it_came_from(name):
    # The digest a peer reports follows its snapshot's tensor order: a joiner must not differ from its source.
    params, config, opt = stepped_three_rounds(name)
    tensors, meta = optimizer_state(opt, NAMES)
    joiner = make_outer_optimizer([p.clone() for p in params], config)
    load_optimizer_state(joiner, NAMES, {k: t.clone() for k, t in tensors.items()}, json.loads(json.dumps(meta)))
    again, _ = optimizer_state(joiner, NAMES)
    assert list(again) == list(tensors)
    assert state_digest(StateSnapshot(round_id=3, tensors=again, meta={})) == state_digest(
        StateSnapshot(round_id=3, tensors=tensors, meta={})
    )


def test_loaded_state_does_not_alias_the_snapshot():
    params = make_params()
    opt = make_outer_optimizer(params, OuterConfig(name="adam"))
    outer_step(opt, params, 0)
    tensors, meta = optimizer_state(opt, NAMES)
    joiner = make_outer_optimizer([p.clone() for p in params], OuterConfig(name="adam"))
    load_optimizer_state(joiner, NAMES, tensors, meta)
    before = {k: t.clone() for k, t in tensors.items()}
    outer_step(joiner, joiner.param_groups[0]["params"], 1)
    assert all(torch.equal(before[k], tensors[k]) for k in tensors)
    outer_step(opt, params, 1)
    assert all(torch.equal(before[k], tensors[k]) for k in tensors), "snapshot tensors are copies"


def test_meta_is_json_and_names_the_optimizer():
    params = make_params()
    opt = make_outer_optimizer(params, OuterConfig(name="yogi", lr=0.01, betas=(0.8, 0.9)))
    outer_step(opt, params, 0)
    tensors, meta = optimizer_state(opt, NAMES)
    json.dumps(meta, allow_nan=False)
    assert meta["name"] == "yogi" and meta["class"] == "optimizers.yogi.Yogi"
    assert meta["groups"][0]["hyperparameters"]["betas"] == [0.8, 0.9]
    assert meta["tensor_keys"] == ["exp_avg", "exp_avg_sq", "step"]
    assert tensors["outer/step/scale"].shape == () and tensors["outer/step/scale"].dtype == torch.float32
    assert tensors["outer/exp_avg/embed.weight"].is_contiguous()


def test_hyperparameters_travel_with_the_state():
    params = make_params()
    opt = make_outer_optimizer(params, OuterConfig(name="adam", lr=0.05, betas=(0.8, 0.95), eps=1e-6))
    outer_step(opt, params, 0)
    tensors, meta = optimizer_state(opt, NAMES)
    tensors, meta = through_torch_save(tensors, meta)
    joiner = make_outer_optimizer([p.clone() for p in params], OuterConfig(name="adam", lr=0.5))
    load_optimizer_state(joiner, NAMES, tensors, meta)
    group = joiner.param_groups[0]
    assert group["lr"] == 0.05 and group["eps"] == 1e-6
    assert group["betas"] == (0.8, 0.95) and isinstance(group["betas"], tuple)


def test_a_fresh_state_loads_as_a_fresh_state():
    params = make_params()
    opt = make_outer_optimizer(params, OuterConfig(name="adam"))
    tensors, meta = optimizer_state(opt, NAMES)
    assert tensors == {}
    joiner = make_outer_optimizer([p.clone() for p in params], OuterConfig(name="adam"))
    outer_step(joiner, joiner.param_groups[0]["params"], 0)
    load_optimizer_state(joiner, NAMES, tensors, meta)
    assert len(joiner.state) == 0


def test_any_torch_optimizer_with_groups_and_empty_entries_round_trips():
    params = make_params()
    groups = [{"params": params[:2], "lr": 0.1}, {"params": params[2:], "lr": 0.01, "momentum": 0.5}]
    opt = torch.optim.SGD(groups, lr=0.2, momentum=0.9, dampening=0.1)
    for step in range(2):
        outer_step(opt, params, step)
    opt.state[params[3]]  # an empty entry (defaultdict access), which must survive as one
    tensors, meta = optimizer_state(opt, NAMES)
    assert meta["name"] is None and meta["empty"] == [3]
    fresh = [p.clone() for p in params]
    joiner = torch.optim.SGD([{"params": fresh[:2]}, {"params": fresh[2:]}], lr=1.0, momentum=0.9)
    load_optimizer_state(joiner, NAMES, *through_torch_save(tensors, meta))
    assert_same_state(opt, joiner)
    for step in range(2, 4):
        outer_step(opt, params, step)
        outer_step(joiner, fresh, step)
    assert all(torch.equal(a, b) for a, b in zip(params, fresh))


# -- refusals ---------------------------------------------------------------------------------------------


def adam_state() -> tuple[list[torch.Tensor], dict[str, torch.Tensor], dict]:
    params = make_params()
    opt = make_outer_optimizer(params, OuterConfig(name="adam"))
    outer_step(opt, params, 0)
    return params, *optimizer_state(opt, NAMES)


def test_adam_state_into_sgd_is_refused():
    params, tensors, meta = adam_state()
    sgd = make_outer_optimizer([p.clone() for p in params], OuterConfig())
    with pytest.raises(ConfigError, match="another outer optimizer.*'adam'.*OuterConfig.name"):
        load_optimizer_state(sgd, NAMES, tensors, meta)
    assert len(sgd.state) == 0


def test_adam_state_into_adamw_is_refused_although_adamw_subclasses_adam():
    params, tensors, meta = adam_state()
    adamw = make_outer_optimizer([p.clone() for p in params], OuterConfig(name="adamw"))
    with pytest.raises(ConfigError, match="another outer optimizer"):
        load_optimizer_state(adamw, NAMES, tensors, meta)


def test_state_of_other_parameters_is_refused():
    params, tensors, meta = adam_state()
    opt = make_outer_optimizer([p.clone() for p in params], OuterConfig(name="adam"))
    renamed = [*NAMES[:-1], "other"]
    with pytest.raises(ConfigError, match="other parameters"):
        load_optimizer_state(opt, renamed, tensors, meta)
    with pytest.raises(ConfigError, match="other parameters"):
        load_optimizer_state(opt, NAMES[::-1], tensors, meta)
    stray = {**tensors, "outer/exp_avg/ghost.weight": torch.zeros(1)}
    with pytest.raises(ConfigError, match="ghost.weight"):
        load_optimizer_state(opt, NAMES, stray, meta)
    with pytest.raises(ConfigError, match="format"):
        load_optimizer_state(opt, NAMES, tensors, {**meta, "format": 99})


def test_names_must_match_the_parameters():
    params = make_params()
    opt = make_outer_optimizer(params, OuterConfig(name="adam"))
    with pytest.raises(ConfigError, match="one distinct name per parameter"):
        optimizer_state(opt, NAMES[:-1])
    with pytest.raises(ConfigError, match="one distinct name per parameter"):
        optimizer_state(opt, [*NAMES[:-1], NAMES[0]])


def test_state_a_snapshot_cannot_carry_is_refused():
    p = torch.zeros(2)
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p]["history"] = [torch.zeros(1)]
    with pytest.raises(ConfigError, match="'history'"):
        optimizer_state(opt, ["p"])
    opt.state[p] = {"buf": torch.zeros(2, dtype=torch.complex64)}
    with pytest.raises(ConfigError, match="complex64"):
        optimizer_state(opt, ["p"])


# -- registry and config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_every_built_in_optimizer_is_built_from_config_and_steps(name):
    assert name in OUTER_OPTIMIZERS
    params = make_params()
    before = [p.clone() for p in params]
    opt = make_outer_optimizer(params, OuterConfig(name=name, lr=0.1, weight_decay=0.01))
    assert type(opt) is BUILT_IN[name] and opt.param_groups[0]["lr"] == 0.1
    outer_step(opt, params, 0)
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(params[0], before[0]) and torch.equal(params[3], before[3])


def test_sgd_is_nesterov_only_with_momentum():
    params = make_params()
    assert make_outer_optimizer(params, OuterConfig()).param_groups[0]["nesterov"] is True
    plain = make_outer_optimizer(params, OuterConfig(momentum=0.0)).param_groups[0]
    assert plain["nesterov"] is False and plain["momentum"] == 0.0


def test_defaults_are_diloco_sgd():
    c = OuterConfig()
    assert (c.name, c.resolved_lr, c.momentum, c.nesterov, c.betas, c.eps, c.weight_decay) == (
        "sgd", 0.7, 0.7, True, (0.9, 0.99), 1e-8, 0.0
    )
    assert all(f.metadata.get("help") for f in OuterConfig.__dataclass_fields__.values())


@pytest.mark.parametrize(
    "name, lr",
    [
        ("sgd", 0.7),
        ("adam", outer_optim.ADAPTIVE_LR),
        ("adamw", outer_optim.ADAPTIVE_LR),
        ("adagrad", outer_optim.ADAPTIVE_LR),
        ("yogi", outer_optim.ADAPTIVE_LR),
        ("fedadam", 0.1),  # Flower's eta
        ("fedyogi", 0.01),
        ("fedadagrad", 0.1),
        ("fedavgm", 1.0),  # Flower's server_learning_rate
    ],
)
def test_a_config_without_lr_takes_its_optimizers_own(name, lr):
    # DiLoCo's 0.7 moves every coordinate of an adaptive optimizer by ~0.7 a round: Adam diverged with it.
    config = OuterConfig(name=name)
    assert config.lr is None and config.resolved_lr == lr
    group = make_outer_optimizer(make_params(), config).param_groups[0]
    assert group[next(k for k in ("lr", "eta", "server_learning_rate") if k in group)] == lr
    assert OuterConfig(name=name, lr=0.05).resolved_lr == 0.05


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "name",
            "lamb",
            r"unknown outer optimizer 'lamb'; registered: "
            r"adagrad, adam, adamw, fedadagrad, fedadam, fedavgm, fedyogi, sgd, yogi",
        ),
        ("lr", 0.0, "outer lr must be a positive"),
        ("lr", float("inf"), "outer lr must be a positive"),
        ("momentum", 1.0, r"outer momentum must be in \[0, 1\)"),
        ("momentum", -0.1, r"outer momentum must be in \[0, 1\)"),
        ("nesterov", "yes", "outer nesterov must be true or false"),
        ("betas", (0.9, 1.0), r"outer betas must be two numbers in \[0, 1\)"),
        ("betas", (0.9,), r"outer betas must be two numbers in \[0, 1\)"),
        ("eps", 0.0, "outer eps must be a positive"),
        ("weight_decay", -1e-4, "outer weight_decay must be a finite number >= 0"),
        ("weight_decay", float("nan"), "outer weight_decay must be a finite number >= 0"),
    ],
)
def test_config_validation_names_the_field_and_the_allowed_range(field, value, message):
    with pytest.raises(ConfigError, match=message):
        OuterConfig(**{field: value})


def test_betas_from_json_become_a_tuple():
    assert OuterConfig(name="adam", betas=[0.5, 0.75]).betas == (0.5, 0.75)


def sign_sgd(params: list[torch.Tensor], config: OuterConfig) -> torch.optim.Optimizer:
    """A toy outer optimizer: signSGD, as Adam with beta1 = beta2 = 0 and a negligible eps."""
    return torch.optim.Adam(params, lr=config.lr, betas=(0.0, 0.0), eps=1e-30)


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for one test, so plugins registered by a test do not leak into others."""
    monkeypatch.setattr(outer_optim, "OUTER_OPTIMIZERS", dict(OUTER_OPTIMIZERS))
    monkeypatch.setattr(outer_optim, "OUTER_LR", dict(outer_optim.OUTER_LR))
    return outer_optim.OUTER_OPTIMIZERS


def test_a_registered_optimizer_takes_the_default_lr_it_was_registered_with_else_sgds(registry):
    register_outer_optimizer("signsgd", sign_sgd, lr=0.001)
    register_outer_optimizer("plain", sign_sgd)
    assert OuterConfig(name="signsgd").resolved_lr == 0.001
    assert OuterConfig(name="plain").resolved_lr == OuterConfig().resolved_lr == 0.7
    with pytest.raises(ConfigError, match="default lr of outer optimizer 'bad' must be a positive"):
        register_outer_optimizer("bad", sign_sgd, lr=0.0)


def test_a_registered_toy_optimizer_is_built_from_config(registry):
    with pytest.raises(ConfigError, match="unknown outer optimizer 'signsgd'"):
        OuterConfig(name="signsgd")
    register_outer_optimizer("signsgd", sign_sgd)
    register_outer_optimizer("signsgd", sign_sgd)  # the same factory again is a no-op
    p = torch.tensor([1.0, 1.0, 1.0])
    opt = make_outer_optimizer([p], OuterConfig(name="signsgd", lr=0.5))
    p.grad = torch.tensor([3.0, -1e-3, 0.0])
    opt.step()
    assert torch.equal(p, torch.tensor([0.5, 1.5, 1.0]))
    tensors, meta = optimizer_state(opt, ["p"])
    assert meta["name"] == "signsgd"
    adam = make_outer_optimizer([p.clone()], OuterConfig(name="adam"))
    with pytest.raises(ConfigError, match="'signsgd'"):
        load_optimizer_state(adam, ["p"], tensors, meta)
    assert "signsgd" in registry and "signsgd" not in OUTER_OPTIMIZERS  # the real registry is untouched


def test_registering_a_taken_name_with_another_factory_is_refused(registry):
    with pytest.raises(ConfigError, match="'sgd' is already registered"):
        register_outer_optimizer("sgd", sign_sgd)
    with pytest.raises(ConfigError, match="non-empty string"):
        register_outer_optimizer("", sign_sgd)
    with pytest.raises(ConfigError, match="must be callable"):
        register_outer_optimizer("broken", "not a factory")


def test_a_factory_that_returns_no_optimizer_is_refused(registry):
    register_outer_optimizer("broken", lambda params, config: params)
    with pytest.raises(ConfigError, match="returned list, not a torch.optim.Optimizer"):
        make_outer_optimizer([torch.zeros(1)], OuterConfig(name="broken"))
