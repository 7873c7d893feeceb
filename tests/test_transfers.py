"""The run's fp32 host state against models on other devices and dtypes (optimizers/transfers.py, globalstate.py).

Without a GPU, the device paths run on the ``meta`` device (shapes, dtypes, placement) and the mixed-precision
paths on two CPU dtypes (values, exactly); the same checks run on CUDA under the ``cuda`` marker.
"""

from __future__ import annotations

import pytest
import torch

from optimizers.diloco import DiLoCo, DiLoCoConfig
from optimizers.globalstate import GlobalState
from optimizers.outer_optim import OuterConfig
from optimizers.peers import LocalPeer
from optimizers.transfers import DeviceTransfers

pytestmark = pytest.mark.timeout(60)

NESTEROV = OuterConfig(lr=0.7, momentum=0.9, nesterov=True)


def model(dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return m.to(device=device, dtype=dtype)


def train(opt: DiLoCo, m: torch.nn.Module, steps: int) -> None:
    p = next(m.parameters())
    for t in range(steps):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
        x, y = x.to(device=p.device, dtype=p.dtype), y.to(device=p.device, dtype=p.dtype)
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step(samples=5)
        opt.zero_grad()


def diloco(m: torch.nn.Module) -> DiLoCo:
    inner = torch.optim.AdamW(m.parameters(), lr=1e-2)
    return DiLoCo(m, inner, LocalPeer(), DiLoCoConfig(sync_every=3, codec="none", outer=NESTEROV))


def named(m: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return list(m.named_parameters())


# -- one model on the CPU: nothing changes ----------------------------------------------------------


def test_a_cpu_model_takes_no_transfers_and_its_pseudo_gradient_is_global_minus_local() -> None:
    m = model()
    state = GlobalState(named(m), NESTEROV)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.25)
    assert state.transfers.devices == [] and not state.transfers.uses_cuda  # every parameter on the host
    for pg, g, p in zip(state.pseudo_gradients(range(4)), state.globals, m.parameters()):
        assert pg.device.type == "cpu" and pg.dtype == torch.float32
        assert torch.equal(pg, g - p.detach())


def test_loading_with_alpha_mixes_local_and_global_on_the_cpu() -> None:
    m = model()
    state = GlobalState(named(m), NESTEROV)
    local = [p.detach().clone() + 1.0 for p in m.parameters()]
    with torch.no_grad():
        for p, v in zip(m.parameters(), local):
            p.copy_(v)
    state.load_into_model(range(4), alpha=0.25)
    for p, v, g in zip(m.parameters(), local, state.globals):
        assert torch.equal(p.detach(), v.mul(0.25).add(g, alpha=0.75))


def test_a_cpu_model_never_encodes_on_a_device() -> None:
    assert not diloco(model()).encodes_on_device()


# -- mixed precision: a bf16 model keeps fp32 globals ---------------------------------------------------


def test_a_bf16_model_keeps_fp32_globals_equal_to_its_initial_weights() -> None:
    m = model(torch.bfloat16)
    state = GlobalState(named(m), NESTEROV)
    for g, p in zip(state.globals, m.parameters()):
        assert g.dtype == torch.float32 and torch.equal(g, p.detach().float())


def test_a_bf16_model_s_pseudo_gradient_is_exact_in_fp32() -> None:
    m = model(torch.bfloat16)
    state = GlobalState(named(m), NESTEROV)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(0.5)
    for pg, g, p in zip(state.pseudo_gradients(range(4)), state.globals, m.parameters()):
        assert pg.dtype == torch.float32
        assert torch.equal(pg, g - p.detach().float())


def test_new_globals_are_rounded_once_to_the_model_s_dtype_when_loaded() -> None:
    m = model(torch.bfloat16)
    state = GlobalState(named(m), NESTEROV)
    with torch.no_grad():
        for g in state.globals:
            g.add_(1e-3)  # not representable in bf16 next to the weights
    state.load_into_model(range(4))
    for g, p in zip(state.globals, m.parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), g.to(torch.bfloat16))
        assert g.dtype == torch.float32  # the global side is never rounded


# -- checkpoints and joiner states cross dtypes (and devices, below) -------------------------------------


@pytest.mark.parametrize(("source", "target"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                (torch.float16, torch.float32)])
def test_a_checkpoint_written_by_one_dtype_s_model_loads_into_another_s(source, target) -> None:
    a = model(source)
    opt_a = diloco(a)
    train(opt_a, a, 7)  # two committed rounds, momentum in the outer state, AdamW moments
    saved = opt_a.state_dict()

    b = model(target, seed=1)
    opt_b = diloco(b)
    opt_b.load_state_dict(saved)
    for ga, gb in zip(opt_a.state.globals, opt_b.state.globals):
        assert torch.equal(ga, gb)
    assert opt_b.state.digest() == opt_a.state.digest()
    assert opt_b.inner_steps == 7 and opt_b.state.round_id == opt_a.state.round_id
    # The inner optimizer's moments take the new model's dtype and device (torch casts them).
    moments = [s["exp_avg"] for s in opt_b.inner.state.values()]
    assert moments and all(t.dtype == target for t in moments)
    train(opt_b, b, 2)  # and training goes on from there


def test_a_joiner_whose_model_has_another_dtype_adopts_the_run_s_state() -> None:
    donor = model(torch.bfloat16)
    opt = diloco(donor)
    train(opt, donor, 6)
    joiner = model(torch.float32, seed=3)
    opt_j = diloco(joiner)
    opt_j.load_snapshot(opt.snapshot())
    assert opt_j.state.digest() == opt.state.digest()
    for g, p in zip(opt_j.state.globals, joiner.parameters()):
        assert torch.equal(p.detach(), g)  # an fp32 model holds the globals exactly


# -- the device paths, on the meta device ----------------------------------------------------------------


def test_pseudo_gradients_kept_on_the_device_are_fp32_and_stay_where_the_model_is() -> None:
    m = model(torch.bfloat16, device="meta")
    params = list(m.parameters())
    transfers = DeviceTransfers(params)
    host = [torch.zeros(p.shape) for p in params]
    assert transfers.devices == [torch.device("meta")] and not transfers.uses_cuda
    out = transfers.pseudo_gradients(host, params, [0, 2], on_device=True)
    assert [t.device.type for t in out] == ["meta", "meta"]
    assert [t.dtype for t in out] == [torch.float32, torch.float32]
    assert [t.shape for t in out] == [params[0].shape, params[2].shape]


def test_loading_into_a_device_model_keeps_its_placement_and_dtype() -> None:
    m = model(torch.float16, device="meta")
    params = list(m.parameters())
    transfers = DeviceTransfers(params)
    transfers.load([torch.ones(p.shape) for p in params], params, range(4), alpha=0.5)
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in m.parameters())


# -- CUDA, where present ----------------------------------------------------------------------------------


@pytest.mark.cuda
def test_on_cuda_globals_are_pinned_host_fp32_and_pseudo_gradients_match_the_cpu() -> None:
    cpu, gpu = model(), model(device="cuda")
    state = GlobalState(named(gpu), NESTEROV)
    assert state.transfers.uses_cuda and all(g.is_pinned() and g.device.type == "cpu" for g in state.globals)
    with torch.no_grad():
        for p, q in zip(cpu.parameters(), gpu.parameters()):
            p.add_(0.125)
            q.add_(0.125)
    expected = [g - p.detach() for g, p in zip(state.globals, cpu.parameters())]
    on_host = state.pseudo_gradients(range(4))
    on_device = state.pseudo_gradients(range(4), on_device=True)
    for e, h, d in zip(expected, on_host, on_device):
        assert h.device.type == "cpu" and d.device.type == "cuda"
        assert torch.equal(h, e) and torch.equal(d.cpu(), e)


@pytest.mark.cuda
def test_on_cuda_diloco_encodes_on_the_device_unless_the_codec_is_none() -> None:
    m = model(device="cuda")
    inner = torch.optim.AdamW(m.parameters(), lr=1e-2)
    assert DiLoCo(m, inner, LocalPeer(), DiLoCoConfig(codec="int8")).encodes_on_device()
    assert not DiLoCo(m, inner, LocalPeer(), DiLoCoConfig(codec="none")).encodes_on_device()


@pytest.mark.cuda
@pytest.mark.parametrize(("source", "target"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_crosses_between_a_gpu_and_a_cpu_model(source, target) -> None:
    a = model(device=source)
    opt_a = diloco(a)
    train(opt_a, a, 7)
    b = model(device=target, seed=1)
    opt_b = diloco(b)
    opt_b.load_state_dict(opt_a.state_dict())
    assert opt_b.state.digest() == opt_a.state.digest()
    opt_b.state.load_into_model(range(4))
    for g, p in zip(opt_b.state.globals, b.parameters()):
        assert p.device.type == target and torch.equal(p.detach().cpu(), g)


# -- a real round of GPU contributions --------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("codec", ["int8", "int4", "bf16"])
def test_a_round_of_gpu_contributions_gives_the_bits_of_the_same_round_on_the_cpu(endpoints, codec) -> None:
    from collectives.allreduce import AllReduceConfig
    from collectives.codecs import CodecConfig

    config = AllReduceConfig(codec=CodecConfig.parse(codec))
    xs = [torch.randn(70_001, generator=torch.Generator().manual_seed(r)) for r in range(3)]

    def run(e, inputs):
        groups = e.groups()
        futures = [c.allreduce_async(g, x, config=config) for c, g, x in zip(e.collectives, groups, inputs)]
        return [f.result(timeout=30).value for f in futures]

    on_cpu = run(endpoints(3), xs)
    on_gpu = run(endpoints(3), [x.cuda() for x in xs])
    for a, b in zip(on_cpu, on_gpu):
        assert torch.equal(a, b.cpu())
