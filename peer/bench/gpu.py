"""``loconet bench gpu``: the GPU check anyone with a GPU can run, unattended, in a few minutes.

On one machine, in one invocation:

1. ``diloco``: DiLoCo on the synthetic language model with ``--peers`` real
   ``loconet peer`` processes on CUDA (sharing one GPU, or one per GPU where
   there are several) and a coordinator, checking that every peer ends with
   bit-identical global parameters;
2. ``encode_parity``: the device encoder's bytes against the CPU encoder's,
   for every codec, on a tensor with the awkward cases (all-zero and tiny
   blocks, a partial last block);
3. ``sync_copies``: the time of one sync's copies (the pseudo-gradient to the
   host, the new global parameters back) against the time of one inner step,
   on the same model;
4. ``encode_throughput``: encoding on the device (then copying the encoded
   bytes to the host) against encoding on the CPU (after copying the fp32
   values there), for the quantising codecs.

Without CUDA it exits with a one-line error. ``--device cpu`` runs the same
checks on the CPU (a dry run of the command: the device encoder then runs on
the CPU too).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import torch

from collectives.codecs import CODEC_NAMES, CodecConfig, make_codec
from collectives.codecs.device import encode_raw_on_device, encode_throughput, synchronize
from collectives.errors import ConfigError
from optimizers.globalstate import GlobalState
from optimizers.outer_optim import OuterConfig
from peer.bench.diloco import BenchConfig, run_ours
from peer.bench.fields import Fields, describe_report
from peer.bench.kit import add_bench_options, median_seconds, print_report, require
from peer.bench.progress import Progress, progress_for
from peer.device import check_device_spec, place_model, resolve_device
from peer.options import read_options
from peer.runtime.training import local_run
from peer.tasks.base import TaskConfig
from peer.tasks.registry import DEFAULT_TASK, make_task

# The model of the copy and step timings: large enough that a GPU's step is not all launch overhead.
TIMING_TASK = TaskConfig(d_model=256, n_layers=4, n_heads=8, seq_len=128, batch_size=16, vocab_size=256)
QUANTISING = ("int8", "int4")

FIELDS: Fields = {
    "device": "the device the checks ran on (cuda:N, or cpu for a dry run)",
    "device_name": "what torch calls that device (the GPU's model; the CPU for a dry run)",
    "gpus": "CUDA devices torch sees",
    "torch": "torch's version (and its CUDA version, if any)",
    "diloco": "DiLoCo on the synthetic LM with --peers processes on the device",
    "diloco.peers": "peer processes (on a machine with several GPUs, peer r uses cuda:(r mod GPUs))",
    "diloco.devices": "the --device each peer was given",
    "diloco.steps": "inner steps per peer",
    "diloco.rounds": "rounds committed per peer (mean)",
    "diloco.identical_global_params": "every peer ended with bit-identical global parameters (SHA-256 of each "
    "peer's global state)",
    "diloco.final_eval_loss": "held-out loss of the peers' models after training (mean over peers)",
    "diloco.wall_s": "seconds from the first process started to the last peer finished",
    "encode_parity": "one entry per codec: true when the device encoder's bytes equal the CPU encoder's",
    "encode_parity_numel": "elements of the tensor the parity check encodes",
    "sync_copies": "one sync's host<->device copies against one inner step, on the timing model",
    "sync_copies.parameters": "parameters of the timing model (synthetic LM, d_model 256, 4 layers)",
    "sync_copies.inner_step_s": "median seconds of one inner step (forward, backward, AdamW), synchronised",
    "sync_copies.pseudo_gradient_to_host_s": "median seconds to compute the fp32 pseudo-gradient on the device "
    "and copy it to the host",
    "sync_copies.pseudo_gradient_int8_to_host_s": "median seconds to compute it on the device, encode it "
    "there with int8 and copy the encoded bytes to the host",
    "sync_copies.load_s": "median seconds to copy the new global parameters to the device and cast them",
    "sync_copies.time_sync_copies_over_inner_step": "(pseudo_gradient_to_host_s + load_s) / inner_step_s",
    "sync_copies.time_int8_sync_copies_over_inner_step": "(pseudo_gradient_int8_to_host_s + load_s) / "
    "inner_step_s",
    "encode_throughput": "one entry per quantising codec: encoding a --numel tensor",
    "encode_throughput.*.device_gbps": "fp32 GB/s encoded on the device, the encoded bytes copied to the host "
    "(10^9 bytes/s)",
    "encode_throughput.*.cpu_gbps": "fp32 GB/s copied to the host and encoded there",
    "encode_throughput.*.time_device_over_cpu": "the device path's time / the CPU path's: below 1, encoding "
    "on the device is faster",
    "numel": "fp32 elements of the throughput tensor",
    "repeat": "timed runs per figure; every time is their median",
}


def peer_devices(device: torch.device, peers: int) -> list[str]:
    """The --device of each peer: one per GPU where there are several, else all on the one device."""
    if device.type != "cuda" or device.index is not None:
        return [str(device)] * peers
    count = torch.cuda.device_count()
    return [f"cuda:{r % count}" for r in range(peers)]


def parity_tensor(numel: int, device: torch.device) -> torch.Tensor:
    """N(0, 1) values with an all-zero block, a block of tiny values, a large block and a partial last block."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(7))
    if numel >= 256:
        x[64:128] = 0.0
        x[128:192] *= 2.0**-120  # scales in the subnormal range: the encoders' rare path
        x[192:256] *= 1e4
    return x.to(device)


def check_parity(device: torch.device, numel: int) -> dict[str, bool]:
    """Per codec: do the device encoder's raw bytes equal the CPU encoder's for the same tensor?"""
    x = parity_tensor(numel, device)
    host = x.cpu()
    result = {}
    # The built-in dense codecs only, not codec_names(): the device encoder (collectives/codecs/device.py) has
    # exactly these five formats and refuses any other name, so a sparse or a plugin's codec has no device
    # encoding to compare with its CPU one.
    for name in CODEC_NAMES:
        config = CodecConfig(name=name)
        on_device = encode_raw_on_device(config, x).cpu().numpy().tobytes()
        result[name] = on_device == bytes(make_codec(config).encode(host))
    return result


def _median_s(fn, device: torch.device, repeat: int) -> float:
    """kit.median_seconds of fn, each call waiting for the device's queued work (so the next starts idle)."""

    def finished() -> None:
        fn()
        synchronize(device)

    synchronize(device)
    return median_seconds(finished, repeat)


def time_sync_copies(device: torch.device, repeat: int) -> dict:
    """One inner step against one sync's copies, on the timing model placed on device."""
    task = make_task(DEFAULT_TASK, TIMING_TASK)
    model = place_model(task.build_model(), device)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = GlobalState(list(model.named_parameters()), OuterConfig())
    batch = [t.to(device) for t in next(iter(task.batches(0, 1)))]
    everything = range(len(state.params))
    int8 = CodecConfig(name="int8")

    def inner_step() -> None:
        inner.zero_grad(set_to_none=True)
        task.loss(model, batch).backward()
        inner.step()

    def int8_to_host() -> None:
        for t in state.pseudo_gradients(everything, on_device=True):
            encode_raw_on_device(int8, t.reshape(-1)).cpu()

    step_s = _median_s(inner_step, device, repeat)
    to_host_s = _median_s(lambda: state.pseudo_gradients(everything), device, repeat)
    int8_s = _median_s(int8_to_host, device, repeat)
    load_s = _median_s(lambda: state.load_into_model(everything), device, repeat)
    return {
        "parameters": sum(p.numel() for p in state.params),
        "inner_step_s": step_s,
        "pseudo_gradient_to_host_s": to_host_s,
        "pseudo_gradient_int8_to_host_s": int8_s,
        "load_s": load_s,
        "time_sync_copies_over_inner_step": (to_host_s + load_s) / step_s,
        "time_int8_sync_copies_over_inner_step": (int8_s + load_s) / step_s,
    }


def time_encoding(device: torch.device, numel: int, repeat: int) -> dict:
    """Per quantising codec: device encoding (and the copy of its bytes) against copying to the CPU and encoding."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(11)).to(device)
    fp32_bytes = 4 * numel
    out = {}
    for name in QUANTISING:
        config = CodecConfig(name=name)
        device_rate = encode_throughput(config, x, repeat)
        codec = make_codec(config)
        cpu_s = _median_s(lambda: codec.encode(x.cpu()), device, repeat)  # noqa: B023 - timed in this iteration
        device_s = fp32_bytes / device_rate
        out[name] = {
            "device_gbps": device_rate / 1e9,
            "cpu_gbps": fp32_bytes / cpu_s / 1e9,
            "time_device_over_cpu": device_s / cpu_s,
        }
    return out


def run_diloco(device: torch.device, peers: int, steps: int, progress: Progress) -> dict:
    """DiLoCo with real peer processes on the device; are their global parameters identical at the end?"""
    devices = peer_devices(device, peers)
    train = local_run("diloco", steps=steps)
    config = BenchConfig(peers=peers, task=DEFAULT_TASK, runs=(train,), baselines=())
    result = run_ours(config, train, progress, label="diloco", devices=devices)
    return {
        "peers": peers,
        "devices": devices,
        "steps": steps,
        "rounds": result["rounds"],
        "identical_global_params": result["identical_global_params"],
        "final_eval_loss": result["final_eval_loss"],
        "wall_s": result["wall_s"],
    }


def check_arguments(device: str, peers: int, steps: int, numel: int, repeat: int) -> torch.device:
    """The device to check (DeviceUnavailable without CUDA); ConfigError for a size the check cannot run with."""
    check_device_spec(device)
    require(device != "auto", "bench gpu checks a named device: give --device cuda, cuda:N, or cpu for a dry run")
    require(peers >= 2, f"--peers must be at least 2 (the peers must agree), got {peers}")
    require(steps >= 1 and numel >= 256 and repeat >= 1,
            f"--steps and --repeat must be >= 1 and --numel >= 256, got {steps}, {repeat} and {numel}")
    return resolve_device(device)


@dataclass(frozen=True)
class GpuBenchConfig:
    """What ``bench gpu`` checks: its options' defaults are these fields'."""

    device: str = field(default="cuda", metadata={"help": "the GPU to check (cuda, cuda:N), or cpu for a dry run"})
    peers: int = field(
        default=2,
        metadata={"help": "DiLoCo peer processes (they share the GPU, or take one GPU each where there are several)"},
    )
    steps: int = field(default=200, metadata={"help": "inner steps per DiLoCo peer"})
    numel: int = field(default=16_000_000, metadata={"help": "fp32 elements of the encoded tensors"})
    repeat: int = field(default=5, metadata={"help": "timed runs per figure; the median is reported"})


def run(config: GpuBenchConfig | None = None, progress: Progress | None = None) -> dict:
    """Every check on the device; a JSON-serialisable report."""
    config = config or GpuBenchConfig()
    peers, steps, numel, repeat = config.peers, config.steps, config.numel, config.repeat
    dev = check_arguments(config.device, peers, steps, numel, repeat)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    progress = progress or Progress("gpu", enabled=False)
    report: dict = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""),
    }
    progress.begin("encode parity")
    report["encode_parity_numel"] = numel
    report["encode_parity"] = check_parity(dev, numel)
    progress.end("equal" if all(report["encode_parity"].values()) else "DIFFERENT")
    progress.begin("sync copies")
    report["sync_copies"] = time_sync_copies(dev, repeat)
    progress.end(f"{report['sync_copies']['time_sync_copies_over_inner_step']:.2f} inner steps")
    progress.begin("encode throughput")
    report["numel"], report["repeat"] = numel, repeat
    report["encode_throughput"] = time_encoding(dev, numel, repeat)
    progress.end(f"int8 on the device takes {report['encode_throughput']['int8']['time_device_over_cpu']:.2f}x "
                 "the CPU's time")
    report["diloco"] = run_diloco(dev, peers, steps, progress)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of this benchmark."""
    add_bench_options(parser, GpuBenchConfig)
    describe_report(parser, FIELDS)


def main(ns: argparse.Namespace) -> int:
    """Run from parsed options; print the report (one JSON object with --json)."""
    config = read_options(GpuBenchConfig, ns)
    check_arguments(config.device, config.peers, config.steps, config.numel, config.repeat)  # before anything runs
    with progress_for("gpu", getattr(ns, "quiet", 0)) as progress:
        report = run(config, progress)
    print_report(report, as_json=ns.json)
    ok = report["diloco"]["identical_global_params"] and all(report["encode_parity"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="loconet bench gpu", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        sys.exit(main(parser.parse_args()))
    except ConfigError as exc:
        parser.error(str(exc))
