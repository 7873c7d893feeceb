"""The outer (server) optimizer of DiLoCo: chosen by name from a registry, its whole state made snapshot-ready.

Every peer runs the outer optimizer on the same fp32 CPU global parameters
with the same averaged pseudo-gradients, so every peer holds the same
optimizer state; a joiner fetches it (and a checkpoint keeps it) as part of a
``StateSnapshot``. ``optimizer_state`` / ``load_optimizer_state`` turn any
torch optimizer's ``state_dict()`` into snapshot tensors plus JSON meta and
back, bit for bit.

Built-in optimizers use torch's defaults for ``foreach``/``fused``: on CPU
tensors torch picks its single-tensor loop, which gives the same bits on every
peer running the same code. (torch's fused elementwise kernels, e.g. Adam's
addcdiv and lerp, may round differently on CPUs of another instruction set;
Yogi avoids them.)
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from collectives.errors import ConfigError
from collectives.statesync import ALLOWED_DTYPES
from optimizers.fedopt import FLOWER_DEFAULTS, FedAdagrad, FedAdam, FedAvgM, FedYogi
from optimizers.yogi import Yogi

OuterFactory = Callable[[list[torch.Tensor], "OuterConfig"], torch.optim.Optimizer]

# Snapshot tensor names are f"{TENSOR_PREFIX}{state key}/{param name}".
TENSOR_PREFIX = "outer/"
# Bumped when the meta layout changes, so an old peer refuses a state it would misread.
STATE_FORMAT = 1


def _sgd(params: list[torch.Tensor], c: OuterConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0, weight_decay=c.weight_decay
    )


def _adam(params: list[torch.Tensor], c: OuterConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)


def _adamw(params: list[torch.Tensor], c: OuterConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)


def _adagrad(params: list[torch.Tensor], c: OuterConfig) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(params, lr=c.lr, eps=c.eps, weight_decay=c.weight_decay, initial_accumulator_value=0.0)


def _yogi(params: list[torch.Tensor], c: OuterConfig) -> torch.optim.Optimizer:
    return Yogi(params, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)


# Flower's server optimizers (optimizers/fedopt.py): lr is Flower's eta (fedavgm: server_learning_rate),
# betas are (beta_1, beta_2), eps is tau, momentum is fedavgm's server_momentum.
def _fedadam(params: list[torch.Tensor], c: OuterConfig) -> torch.optim.Optimizer:
    return FedAdam(params, eta=c.lr, beta_1=c.betas[0], beta_2=c.betas[1], tau=c.eps)


def _fedyogi(params: list[torch.Tensor], c: OuterConfig) -> torch.optim.Optimizer:
    return FedYogi(params, eta=c.lr, beta_1=c.betas[0], beta_2=c.betas[1], tau=c.eps)


def _fedadagrad(params: list[torch.Tensor], c: OuterConfig) -> torch.optim.Optimizer:
    return FedAdagrad(params, eta=c.lr, beta_1=c.betas[0], tau=c.eps)


def _fedavgm(params: list[torch.Tensor], c: OuterConfig) -> torch.optim.Optimizer:
    return FedAvgM(params, server_learning_rate=c.lr, server_momentum=c.momentum)


OUTER_OPTIMIZERS: dict[str, OuterFactory] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
    "adagrad": _adagrad,
    "yogi": _yogi,
    "fedadam": _fedadam,
    "fedyogi": _fedyogi,
    "fedadagrad": _fedadagrad,
    "fedavgm": _fedavgm,
}
# Each optimizer's learning rate when the config names none. 0.7 is DiLoCo's for SGD with Nesterov momentum. An
# adaptive optimizer moves every coordinate by about lr per step whatever the pseudo-gradient's size, so it needs a
# far smaller one: Adam at 0.7 took the synthetic LM's eval loss from 4.2 to 164 (BENCHMARKS.md). Flower's server
# optimizers take Flower's defaults.
# Adam's outer lr measured best of 0.003-0.1 (`loconet bench diloco --outer-optimizer adam --outer-lr X`: eval loss
# 1.806, 1.766, 1.857, 2.743 at 0.003, 0.01, 0.03, 0.1; SGD's default 1.763).
ADAPTIVE_LR = 0.01
OUTER_LR: dict[str, float] = {
    "sgd": 0.7,
    "adam": ADAPTIVE_LR,
    "adamw": ADAPTIVE_LR,
    "adagrad": ADAPTIVE_LR,
    "yogi": ADAPTIVE_LR,
    "fedadam": FLOWER_DEFAULTS["fedadam"]["eta"],
    "fedyogi": FLOWER_DEFAULTS["fedyogi"]["eta"],
    "fedadagrad": FLOWER_DEFAULTS["fedadagrad"]["eta"],
    "fedavgm": FLOWER_DEFAULTS["fedavgm"]["server_learning_rate"],
}
# The config fields each built-in optimizer reads: its round settings (OuterConfig.settings) name these only, so
# peers differing in a field their optimizer ignores are not refused. A plugin's: every field.
OUTER_FIELDS: dict[str, tuple[str, ...]] = {
    "sgd": ("lr", "momentum", "nesterov", "weight_decay"),
    "adam": ("lr", "betas", "eps", "weight_decay"),
    "adamw": ("lr", "betas", "eps", "weight_decay"),
    "adagrad": ("lr", "eps", "weight_decay"),
    "yogi": ("lr", "betas", "eps", "weight_decay"),
    "fedadam": ("lr", "betas", "eps"),
    "fedyogi": ("lr", "betas", "eps"),
    "fedadagrad": ("lr", "betas", "eps"),
    "fedavgm": ("lr", "momentum"),
}
ALL_OUTER_FIELDS = ("lr", "momentum", "nesterov", "betas", "eps", "weight_decay")
# Flower's server optimizers have no weight decay; a config asking for one is refused, not ignored.
WITHOUT_WEIGHT_DECAY = frozenset({"fedadam", "fedyogi", "fedadagrad", "fedavgm"})

# The registry name each optimizer was built under (recorded in its state so that peers can compare).
_BUILT_AS: weakref.WeakKeyDictionary[torch.optim.Optimizer, str] = weakref.WeakKeyDictionary()


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class OuterConfig:
    """The outer (server) optimizer that runs on the global parameters.

    The default is DiLoCo's: SGD with Nesterov momentum on the averaged
    pseudo-gradients. The DiLoCo paper uses lr 0.7 and momentum 0.9; at our
    scale momentum 0.7 was as good or better in every run we measured
    (BENCHMARKS.md), so it is the default.
    """

    name: str = field(
        default="sgd",
        metadata={
            "help": "outer optimizer: sgd, adam, adamw, adagrad, yogi, or Flower's server optimizers fedadam, "
            "fedyogi, fedadagrad, fedavgm (or a registered plugin)",
            "flag": "optimizer",
        },
    )
    lr: float | None = field(
        default=None,
        metadata={
            "help": "outer learning rate (Flower's eta; fedavgm: server_learning_rate); default: the algorithm's "
            "(diloco, streaming, async-diloco: the optimizer's own, sgd 0.7, adam, adamw, adagrad, yogi 0.01; "
            "coded-sgd, sync-sgd, seq-sgc 0.1; noloco, fedavg, fedprox, client-momentum 1.0; Flower's for "
            "fedadam, fedyogi, fedadagrad, fedavgm)"
        },
    )
    momentum: float = field(default=0.7, metadata={"help": "outer momentum in [0, 1) (sgd; fedavgm: server_momentum)"})
    nesterov: bool = field(default=True, metadata={"help": "Nesterov momentum (sgd only; ignored when momentum is 0)"})
    betas: tuple[float, float] = field(
        default=(0.9, 0.99),
        metadata={
            "help": "decay rates of the first and second moments (adam, adamw, yogi; Flower's beta_1, beta_2 "
            "for fedadam, fedyogi, fedadagrad, which uses beta_1 only)"
        },
    )
    eps: float = field(
        default=1e-8, metadata={"help": "denominator guard, > 0 (adam, adamw, adagrad, yogi; Flower's tau for fed*)"}
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "weight decay, >= 0 (adamw: decoupled; others: L2; Flower's fed* have none)"}
    )

    def __post_init__(self) -> None:
        if self.name not in OUTER_OPTIMIZERS:
            raise ConfigError(
                f"unknown outer optimizer {self.name!r}; registered: {', '.join(sorted(OUTER_OPTIMIZERS))} "
                "(plugins register theirs with register_outer_optimizer before building the config)"
            )
        if self.lr is not None and (not _is_number(self.lr) or self.lr <= 0):
            raise ConfigError(f"outer lr must be a positive finite number, got {self.lr!r}")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise ConfigError(f"outer momentum must be in [0, 1), got {self.momentum!r}")
        if not isinstance(self.nesterov, bool):
            raise ConfigError(f"outer nesterov must be true or false, got {self.nesterov!r}")
        betas = self.betas
        pair = isinstance(betas, (tuple, list)) and len(betas) == 2
        if not pair or not all(_is_number(b) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"outer betas must be two numbers in [0, 1), got {betas!r}")
        # A list (from JSON or a CLI) is kept as a tuple, so configs compare and hash alike.
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        # eps = 0 would divide by zero wherever a pseudo-gradient stays 0 (frozen rows), putting NaN in the run.
        if not _is_number(self.eps) or self.eps <= 0:
            raise ConfigError(f"outer eps must be a positive finite number, got {self.eps!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"outer weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.weight_decay and self.name in WITHOUT_WEIGHT_DECAY:
            raise ConfigError(
                f"outer optimizer {self.name!r} has no weight decay (Flower's has none); set outer weight_decay to 0"
            )


    @property
    def resolved_lr(self) -> float:
        """The learning rate: the config's, else the optimizer's own (OUTER_LR)."""
        return self.lr if self.lr is not None else OUTER_LR.get(self.name, OUTER_LR["sgd"])

    def settings(self) -> tuple[str, ...]:
        """What the optimizer does with a round's result, in parts every member of a run must agree on:
        ("outer sgd", "outer lr 0.7", ...), the fields it reads only, numbers exact."""
        values = {
            "lr": repr(float(self.resolved_lr)),
            "momentum": repr(float(self.momentum)),
            # Nesterov without momentum is plain SGD: two such peers agree.
            "nesterov": "on" if self.nesterov and self.momentum > 0 else "off",
            "betas": f"{self.betas[0]!r}/{self.betas[1]!r}",
            "eps": repr(float(self.eps)),
            "weight_decay": repr(float(self.weight_decay)),
        }
        fields = OUTER_FIELDS.get(self.name, ALL_OUTER_FIELDS)
        return (f"outer {self.name}", *(f"outer {f.replace('_', ' ')} {values[f]}" for f in fields))


def register_outer_optimizer(name: str, factory: OuterFactory, lr: float | None = None) -> None:
    """Make ``factory(params, config)`` available as ``OuterConfig(name=name)``; re-registering it is a no-op.

    ``lr``: its learning rate when a config names none (None: SGD's). The factory always gets a config with one."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ConfigError(f"an outer optimizer's name must be a non-empty string without outer spaces, got {name!r}")
    if not callable(factory):
        raise ConfigError(f"the factory of outer optimizer {name!r} must be callable, got {type(factory).__name__}")
    known = OUTER_OPTIMIZERS.get(name)
    if known is not None and known is not factory:
        raise ConfigError(f"outer optimizer {name!r} is already registered with another factory; pick another name")
    if lr is not None:
        if not _is_number(lr) or lr <= 0:
            raise ConfigError(
                f"the default lr of outer optimizer {name!r} must be a positive finite number, got {lr!r}"
            )
        OUTER_LR[name] = float(lr)
    OUTER_OPTIMIZERS[name] = factory


def make_outer_optimizer(params: Sequence[torch.Tensor], config: OuterConfig) -> torch.optim.Optimizer:
    """Build the configured outer optimizer over params (the global parameters, in their fixed order)."""
    factory = OUTER_OPTIMIZERS.get(config.name)
    if factory is None:
        raise ConfigError(
            f"outer optimizer {config.name!r} is no longer registered; "
            f"registered: {', '.join(sorted(OUTER_OPTIMIZERS))}"
        )
    opt = factory(list(params), replace(config, lr=config.resolved_lr))
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(
            f"the factory of outer optimizer {config.name!r} returned {type(opt).__name__}, not a torch.optim.Optimizer"
        )
    _BUILT_AS[opt] = config.name
    return opt


# -- state (de)serialisation -----------------------------------------------------------------------


def _class_path(opt: torch.optim.Optimizer) -> str:
    return f"{type(opt).__module__}.{type(opt).__qualname__}"


def _names_digest(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def _jsonable(value: Any, what: str) -> Any:
    """value as JSON (tuples become lists); ConfigError for what a snapshot's meta cannot carry."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{what} is {value}, which the state's JSON meta cannot carry")
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v, what) for v in value]
    raise ConfigError(f"{what} is a {type(value).__name__}; outer optimizer states can hold tensors, numbers, strings")


def _restore_tuples(saved: Any, current: Any) -> Any:
    """Saved (JSON) hyperparameter value, with lists turned back into tuples where the optimizer keeps tuples."""
    if isinstance(current, tuple) and isinstance(saved, list):
        return tuple(saved)
    return saved


def optimizer_state(opt: torch.optim.Optimizer, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's whole state as snapshot tensors (``outer/<state key>/<param name>``) and JSON-able meta
    (hyperparameters, non-tensor state such as step counts kept as numbers).

    ``names`` names opt's parameters in order (over all param groups). Call it under
    the lock that guards the optimizer: the tensors are copies, taken now.
    """
    names = list(names)
    sd = opt.state_dict()
    sizes = [len(g["params"]) for g in sd["param_groups"]]
    if sum(sizes) != len(names) or len(set(names)) != len(names):
        raise ConfigError(
            f"optimizer_state needs one distinct name per parameter: the optimizer has {sum(sizes)}, "
            f"got {len(names)} names ({len(set(names))} distinct)"
        )
    groups = []
    for g, size in zip(sd["param_groups"], sizes):
        hyper = {k: _jsonable(v, f"hyperparameter {k!r}") for k, v in g.items() if k not in ("params", "param_names")}
        groups.append({"size": size, "hyperparameters": hyper})
    tensors: dict[str, torch.Tensor] = {}
    keys: set[str] = set()
    values: dict[str, dict[str, Any]] = {}
    empty: list[int] = []
    for index, entry in sorted(sd["state"].items()):
        name = names[index]
        if not entry:
            empty.append(index)  # a state entry without content still round-trips as one
        # In key order, not the state's: an optimizer that loaded its state holds its keys in another order than
        # one that made them (Adam: exp_avg, exp_avg_sq, step against step, exp_avg, exp_avg_sq), and the
        # snapshot's digest follows its tensors' order.
        for key, value in sorted(entry.items(), key=lambda item: str(item[0])):
            if not isinstance(key, str) or "/" in key:
                raise ConfigError(f"state key {key!r} of parameter {name!r} cannot name a snapshot tensor")
            if isinstance(value, torch.Tensor):
                if value.dtype not in ALLOWED_DTYPES:
                    raise ConfigError(
                        f"state {key!r} of parameter {name!r} is {value.dtype}; snapshots carry only "
                        f"{', '.join(str(d).removeprefix('torch.') for d in ALLOWED_DTYPES)}"
                    )
                # 0-dim tensors (step) travel as they are: the state-sync manifest accepts shape [].
                copy = value.detach().cpu().clone(memory_format=torch.contiguous_format)
                tensors[f"{TENSOR_PREFIX}{key}/{name}"] = copy
                keys.add(key)
            else:
                values.setdefault(name, {})[key] = _jsonable(value, f"state {key!r} of parameter {name!r}")
    meta = {
        "format": STATE_FORMAT,
        "class": _class_path(opt),
        "name": _BUILT_AS.get(opt),
        "params": len(names),
        "names_sha256": _names_digest(names),
        "groups": groups,
        "tensor_keys": sorted(keys),
        "values": values,
        "empty": empty,
    }
    return tensors, meta


def _describe(class_path: Any, name: Any) -> str:
    return f"{name!r} ({class_path})" if name else str(class_path)


def _check_meta(opt: torch.optim.Optimizer, names: list[str], meta: Any) -> None:
    """Refuse a state that is malformed, of another optimizer kind or over other parameters."""
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ConfigError(
            f"the outer optimizer state has format {got!r}, this peer reads format {STATE_FORMAT}; "
            "every peer of a run must run the same loconet version"
        )
    mine, my_name = _class_path(opt), _BUILT_AS.get(opt)
    theirs, their_name = meta.get("class"), meta.get("name")
    if theirs != mine or (my_name and their_name and my_name != their_name):
        fix = f" (set OuterConfig.name to {their_name!r})" if their_name else ""
        raise ConfigError(
            f"the run uses another outer optimizer: {_describe(theirs, their_name)}, while this peer built "
            f"{_describe(mine, my_name)}; configure the same outer optimizer as the rest of the run{fix}"
        )
    if meta.get("params") != len(names) or meta.get("names_sha256") != _names_digest(names):
        raise ConfigError(
            f"the outer optimizer state is over other parameters ({meta.get('params')!r} of them, this peer has "
            f"{len(names)} or names them differently); every peer of a run must train the same model"
        )
    groups = meta.get("groups")
    mine_sizes = [len(g["params"]) for g in opt.param_groups]
    if not isinstance(groups, list) or [g.get("size") if isinstance(g, dict) else None for g in groups] != mine_sizes:
        raise ConfigError(
            f"the outer optimizer state has parameter groups {groups!r:.200} while this optimizer's groups hold "
            f"{mine_sizes} parameters; build the outer optimizer as the rest of the run does"
        )
    for field_name, kind in (("tensor_keys", list), ("values", dict), ("empty", list)):
        if not isinstance(meta.get(field_name), kind):
            raise ConfigError(f"the outer optimizer state is malformed: {field_name!r} is not a {kind.__name__}")


def load_optimizer_state(
    opt: torch.optim.Optimizer, names: Sequence[str], tensors: Mapping[str, torch.Tensor], meta: dict
) -> None:
    """Replace opt's state and hyperparameters with what optimizer_state produced
    (ConfigError if it names other parameters or another optimizer kind).

    ``tensors`` may hold other entries too (a whole snapshot's); the state's tensors are copied.
    """
    names = list(names)
    _check_meta(opt, names, meta)
    index_of = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, Any]] = {i: {} for i in meta["empty"] if isinstance(i, int) and 0 <= i < len(names)}
    for key in meta["tensor_keys"]:
        for i, name in enumerate(names):
            t = tensors.get(f"{TENSOR_PREFIX}{key}/{name}")
            if t is not None:
                state.setdefault(i, {})[key] = t.detach().clone()  # never alias the caller's (received) buffer
    for name, entry in meta["values"].items():
        if name not in index_of or not isinstance(entry, dict):
            raise ConfigError(f"the outer optimizer state names parameter {name!r}, which this model lacks")
        state.setdefault(index_of[name], {}).update(entry)
    expected = {f"{TENSOR_PREFIX}{key}/{name}" for key in meta["tensor_keys"] for name in names}
    stray = [k for k in tensors if k.startswith(TENSOR_PREFIX) and k not in expected]
    if stray:
        raise ConfigError(
            f"the outer optimizer state holds {stray[0]!r}, which names no state of this model's parameters; "
            "every peer of a run must train the same model"
        )
    param_groups = []
    start = 0
    for current, saved in zip(opt.param_groups, meta["groups"]):
        hyper = saved.get("hyperparameters")
        if not isinstance(hyper, dict):
            raise ConfigError("the outer optimizer state is malformed: a group carries no hyperparameters")
        group = {k: v for k, v in current.items() if k not in ("params", "param_names")}
        group.update({k: _restore_tuples(v, current.get(k)) for k, v in hyper.items()})
        size = len(current["params"])
        group["params"] = list(range(start, start + size))
        start += size
        param_groups.append(group)
    opt.load_state_dict({"state": state, "param_groups": param_groups})
