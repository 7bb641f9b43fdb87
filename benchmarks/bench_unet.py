"""UNet forward: MONAI's DiffusionModelUNet vs pydiffmed's UNet3D (and MONAI + pydiffmed.accelerate()), same
random weights, same input, batch 1.

Configurations (the issue's): "small" channels=(32,64,64), attention_levels=(False,False,True), num_res_blocks=1,
num_head_channels=(0,0,64), norm_num_groups=16; "large" channels=(64,128,256), attention_levels=(False,True,True),
num_res_blocks=2, num_head_channels=64, norm_num_groups=32. Volumes 32³ and 64³; fp32 and bf16 (fp16 too on a GPU).

Each row: median wall time (all variants of a case are timed interleaved, round by round, so machine load hits
them alike), the speed-up over MONAI fp32 eager measured in the same run, the model's FLOPs as
torch.utils.flop_counter counts them on MONAI's forward (the work both models represent; UNet3D executes fewer,
its upsampling convolutions being ~3× cheaper), the achieved GFLOP/s = those FLOPs / time, and that rate as a
fraction of a same-run convolution peak (a 64→64 3×3×3 convolution on a 32³ volume, channels_last, the fastest
path torch offers, in the row's dtype). On a GPU it adds UNet3D replayed from a CUDA graph and
torch.compile(MONAI, mode="max-autotune").

Peers (CPU only; benchmarks/peers.py): the same MONAI model under torch.autocast(bf16), torch.compile fp32 and
bf16, ONNX Runtime fp32 (torch.onnx.export) and OpenVINO fp32 and bf16, timed interleaved with the rows above.
A peer that cannot be built is a row with a note saying why. Columns added for every row: dtype,
speedup_same_dtype (vs MONAI eager at the row's precision: MONAI fp32, or the MONAI copy cast to bf16),
rel_l2_vs_monai_fp32 (‖y − y_MONAI fp32‖ / ‖y_MONAI fp32‖), compile_s (first call of torch.compile, or export +
conversion + compile for ONNX Runtime / OpenVINO); for pydiffmed's rows vs_fastest_peer = the fastest peer's time
at the same precision / ours (> 1: ours is faster), naming that peer in fastest_peer.

Convolution floor (CPU): floor_ms = the model's own convolutions, each timed alone through oneDNN in the row's
dtype, channels_last, summed (vs_floor = ms / floor_ms). For pydiffmed's UNet3D rows the convolutions are UNet3D's
own calls of pydiffmed.models.layers.convolution (its fused upsampling convolutions are ~3× cheaper than MONAI's,
so MONAI's would be a floor it does not have to reach); for MONAI's rows, MONAI+accelerate and the peers, they are
the inputs of MONAI's Conv3d modules, captured with forward pre-hooks. Each distinct convolution is timed once
(and counted as often as the forward calls it), by whichever of three oneDNN calls was fastest in a short probe:
aten.mkldnn_convolution (allocating its output), mkldnn._convolution_pointwise_ adding into a preallocated
output, or mkldnn._convolution_pointwise on a weight packed beforehand (as UNet3D does); 1-channel inputs (and
3-channel ones in bf16/fp16) get the zero channel UNet3D adds (layers.conv_module).

On the CPU the process keeps freed memory for reuse (pydiffmed.host_memory.keep_freed_memory, as the
`pydiffmed sample` command does; every torch-based variant gains alike, OpenVINO and ONNX Runtime have their own
memory pools): a forward then does not page-fault its activations in afresh. `--fresh-pages` keeps glibc's
defaults.

    python benchmarks/bench_unet.py [--quick] [--repeats N] [--threads N] [--no-peers] [--peer-set KEYS]
                                    [--compile-mode MODE] [--no-floor] [--cases small:32,large:64] [--fresh-pages]

--quick (the CPU default for CI-sized runs): 32³ for both configurations and 64³ for the small one.
--peer-set: which peers (default all of peers.PEER_KEYS but eager, which the rows above already are: autocast,
compile, onnxruntime, openvino). --compile-mode: torch.compile's mode ("default"; "max-autotune" compiles for
minutes). --cases: config:size pairs instead of the default list ("tiny" is a test-sized configuration).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import add_fresh_pages_option, interleaved_medians, keep_freed_memory_unless, save  # noqa: E402
import peers as peer_lib  # noqa: E402
import pydiffmed  # noqa: E402
from pydiffmed.models import UNet3D  # noqa: E402
from pydiffmed.models import layers  # noqa: E402

CONFIGS = {
    "small": dict(channels=(32, 64, 64), attention_levels=(False, False, True), num_res_blocks=1,
                  num_head_channels=(0, 0, 64), norm_num_groups=16),
    "large": dict(channels=(64, 128, 256), attention_levels=(False, True, True), num_res_blocks=2,
                  num_head_channels=64, norm_num_groups=32),
    "tiny": dict(channels=(8, 16), attention_levels=(False, True), num_res_blocks=1, num_head_channels=(0, 16),
                 norm_num_groups=8),  # for the tests
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DEFAULT_PEERS = tuple(key for key in peer_lib.PEER_KEYS if key != "eager")  # MONAI eager rows are always there


def randomize_(model, seed=0):
    """Non-zero weights everywhere (MONAI zero-initialises some convolutions)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise / p[0].numel() ** 0.5 if p.ndim >= 2 else 1.0 + 0.1 * noise)
    return model


def conv_peak(dtype, device, repeats=10) -> float:
    """GFLOP/s of a 64→64 3×3×3 convolution on 1×64×32³, channels_last (oneDNN directly on CPU)."""
    from pydiffmed.models.layers import convolution, to_channels_last

    x = to_channels_last(torch.randn(1, 64, 32, 32, 32, device=device).to(dtype))
    w = to_channels_last(torch.randn(64, 64, 3, 3, 3, device=device).to(dtype) / 40)
    b = torch.zeros(64, device=device, dtype=dtype)
    flops = 2 * 64 * 64 * 27 * 32 ** 3
    with torch.no_grad():
        t = interleaved_medians({"conv": lambda: convolution(x, w, b, 1, 1)}, device, repeats)["conv"][0]
    return flops / t / 1e9


def model_flops(model, x, t) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return counter.get_total_flops()


# --- the convolution floor (CPU) ----------------------------------------------------------------------------

def _conv_key(x_shape, w_shape, bias, stride, padding):
    dims = len(w_shape) - 2
    pads = tuple(padding) if isinstance(padding, (tuple, list)) else (padding,) * dims
    stride = stride[0] if isinstance(stride, (tuple, list)) else stride
    return tuple(x_shape), tuple(w_shape), bias, int(stride), tuple(int(p) for p in pads)


@contextmanager
def _recording_convolutions(calls):
    """Record every call of pydiffmed.models.layers.convolution (UNet3D's convolutions, upsampling ones included,
    all go through it: conv_module and upsample_conv look it up in the module at call time)."""
    original = layers.convolution

    def record(x, weight, bias=None, stride=1, padding=0, add=None, out=None):
        calls.append(_conv_key(x.shape, weight.shape, bias is not None, stride, padding))
        return original(x, weight, bias, stride, padding, add, out)

    layers.convolution = record
    try:
        yield
    finally:
        layers.convolution = original


def unet3d_conv_calls(model, x, t) -> list:
    """UNet3D's convolutions in one forward, as executed (input channels already padded where it pads them)."""
    calls = []
    with torch.no_grad(), _recording_convolutions(calls):
        model(x, t)
    return calls


def monai_conv_calls(model, x, t) -> list:
    """The inputs of MONAI's Conv2d/Conv3d modules in one forward (forward pre-hooks)."""
    calls = []

    def hook(module, inputs):
        calls.append(_conv_key(inputs[0].shape, module.weight.shape, module.bias is not None, module.stride,
                               module.padding))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    try:
        with torch.no_grad():
            model(x, t)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def conv_floor_fns(calls, dtype, tag, pad_thin=False):
    """{name: fn} timing each distinct convolution of `calls` alone (oneDNN, channels_last, dtype) and {name: how
    many times the forward calls it}. pad_thin: give 1-channel inputs (3-channel ones below fp32) the zero
    channel UNet3D gives them (oneDNN is 2-10× slower on them). Each fn is the fastest, in a short probe, of
    aten.mkldnn_convolution (allocates its output), mkldnn._convolution_pointwise_ adding into a preallocated
    output, and mkldnn._convolution_pointwise on a weight packed beforehand (as UNet3D's layers.packed_weight)."""
    import statistics

    from pydiffmed.models.layers import to_channels_last

    fns, counts = {}, {}
    unique = {}
    for key in calls:
        unique[key] = unique.get(key, 0) + 1
    for i, ((x_shape, w_shape, has_bias, stride, pads), count) in enumerate(unique.items()):
        x_shape, w_shape = list(x_shape), list(w_shape)
        if pad_thin and (x_shape[1] == 1 or (x_shape[1] == 3 and dtype != torch.float32)):
            x_shape[1] += 1
            w_shape[1] += 1
        fan_in = w_shape[1] * int(torch.tensor(w_shape[2:]).prod())
        x = to_channels_last(torch.randn(x_shape).to(dtype))
        w = to_channels_last((torch.randn(w_shape) / fan_in ** 0.5).to(dtype))
        b = torch.zeros(w_shape[0], dtype=dtype) if has_bias else None
        dims = len(pads)
        args = (list(pads), [stride] * dims, [1] * dims, 1)
        with torch.no_grad():
            out = torch.zeros_like(torch.ops.aten.mkldnn_convolution(x, w, b, *args))

            def alloc(x=x, w=w, b=b, args=args):
                return torch.ops.aten.mkldnn_convolution(x, w, b, *args)

            def prealloc(x=x, w=w, b=b, args=args, out=out):
                return torch.ops.mkldnn._convolution_pointwise_.binary(out, x, w, b, *args, "add", None, None, [],
                                                                       None)

            candidates = [alloc, prealloc]
            if layers._HAS_WEIGHT_PACKING:
                packed_w = torch.ops.mkldnn._reorder_convolution_weight(w, *args, list(x.shape))

                def packed(x=x, w=packed_w, b=b, args=args):
                    return torch.ops.mkldnn._convolution_pointwise(x, w, b, *args, "none", [], "")

                candidates.append(packed)
            probes = {}
            for fn in candidates:
                try:
                    fn()
                except RuntimeError:
                    continue
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                probes[fn] = statistics.median(times)
        if not probes:
            raise RuntimeError(f"oneDNN cannot run a {DTYPE_NAMES[dtype]} convolution of {x_shape}")
        name = f"floor {tag} {DTYPE_NAMES[dtype]} #{i}"
        fns[name], counts[name] = min(probes, key=probes.get), count
    return fns, counts


# --- one configuration and volume ----------------------------------------------------------------------------

def _output_error(fn, reference):
    y = fn()
    return peer_lib.rel_l2(y, reference) if isinstance(y, torch.Tensor) else None


def run_case(config_name, size, dtypes, device, repeats, peaks, peer_keys=(), compile_mode="default", floor=True):
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(0)
    config = CONFIGS[config_name]
    monai = randomize_(DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, **config)).eval()
    monai = monai.to(device)
    x = torch.randn(1, 1, size, size, size, device=device)
    t = torch.tensor([500], device=device)
    flops = model_flops(monai, x, t)
    case = f"{config_name} {size}³"
    with torch.no_grad():
        reference = monai(x, t).float()
    peers = []
    if peer_keys and device == "cpu":
        peers = peer_lib.build_peers(monai, x, t, include=peer_keys, dtypes=[DTYPE_NAMES[d] for d in dtypes],
                                     compile_mode=compile_mode, reference=reference,
                                     log=lambda line: print(f"{case} {line}", flush=True))
    # name -> {fn, dtype, kind: "peer" (MONAI's model, however run) or "ours" (pydiffmed), ...}; rows in this order
    entries = {}
    unets = {}
    for dtype in dtypes:
        name = DTYPE_NAMES[dtype]
        model = monai if dtype == torch.float32 else copy.deepcopy(monai).to(dtype)
        xi = x.to(dtype)
        entries[f"MONAI {name}"] = dict(fn=lambda m=model, xi=xi: m(xi, t), dtype=name, kind="peer")
        for peer in peers:
            if peer.dtype == name:
                entries[peer.name] = dict(fn=peer.fn, dtype=name, kind="peer", compile_s=peer.compile_s,
                                          note=peer.note, rel_l2=peer.rel_l2)
        if dtype == torch.float32:
            accelerated = pydiffmed.accelerate(copy.deepcopy(monai))
            entries["MONAI+accelerate fp32"] = dict(fn=lambda m=accelerated: m(x, t), dtype=name, kind="ours",
                                                    floor="MONAI")
        unets[dtype] = UNet3D.from_monai(monai).eval().to(dtype)
        entries[f"UNet3D {name}"] = dict(fn=lambda m=unets[dtype], xi=xi: m(xi, t), dtype=name, kind="ours",
                                         floor="UNet3D")
    fns = {}
    floors = {}  # (whose convolutions, dtype name) -> ({timed name: count}, note)
    with torch.no_grad():
        if device == "cuda":
            for name, fn in _gpu_variants(monai, x, t).items():
                entries[name] = dict(fn=fn, dtype=name.split()[-1], kind="ours" if "UNet3D" in name else "peer",
                                     floor=None)
        for name, e in entries.items():
            if e["fn"] is not None:
                fns[name] = e["fn"]
                if "rel_l2" not in e:
                    e["rel_l2"] = _output_error(e["fn"], reference)
        if floor and device == "cpu":
            monai_calls = monai_conv_calls(monai, x, t)
            for dtype in dtypes:
                for whose, calls, pad in (("UNet3D", unet3d_conv_calls(unets[dtype], x.to(dtype), t), False),
                                          ("MONAI", monai_calls, True)):
                    try:
                        conv_fns, counts = conv_floor_fns(calls, dtype, whose, pad_thin=pad)
                    except Exception as exc:  # noqa: BLE001 - no floor for this dtype, said in the row
                        floors[(whose, DTYPE_NAMES[dtype])] = (None, f"no floor: {peer_lib.why(exc)}")
                        continue
                    fns.update(conv_fns)
                    floors[(whose, DTYPE_NAMES[dtype])] = (counts, f"{len(calls)} convolutions, {len(counts)} distinct")
        medians = interleaved_medians(fns, device, repeats)
    floor_ms = {}
    for key, (counts, note) in floors.items():
        floor_ms[key] = (None if counts is None else sum(medians[n][0] * c for n, c in counts.items()) * 1e3, note)
        value = f"{floor_ms[key][0]:.1f} ms" if floor_ms[key][0] is not None else ""
        print(f"{case} convolution floor, {key[0]}'s convolutions, {key[1]}: {value} ({note})", flush=True)
    base, base_cpu = medians["MONAI fp32"]
    rows = []
    for name, e in entries.items():
        row = {"config": config_name, "volume": f"{size}³", "variant": name, "dtype": e["dtype"]}
        rows.append(row)
        if name not in medians:
            row["note"] = e.get("note", "")
            print(f"{case} {name:40s} {row['note']}", flush=True)
            continue
        seconds, cpu_seconds = medians[name]
        rate = flops / seconds / 1e9
        peak = peaks.get(e["dtype"])
        same = medians.get(f"MONAI {e['dtype']}")
        row.update({"ms": seconds * 1e3, "MONAI_fp32_ms": base * 1e3, "speedup": base / seconds,
                    "speedup_same_dtype": same[0] / seconds if same else None,
                    "rel_l2_vs_monai_fp32": e.get("rel_l2"), "compile_s": e.get("compile_s")})
        if e["kind"] == "ours":
            timed_peers = {n: medians[n][0] for n, p in entries.items()
                           if p["kind"] == "peer" and p["dtype"] == e["dtype"] and n in medians}
            if timed_peers:
                fastest = min(timed_peers, key=timed_peers.get)
                row.update({"vs_fastest_peer": timed_peers[fastest] / seconds, "fastest_peer": fastest})
        whose = e.get("floor", "MONAI")
        floor_value, floor_note = floor_ms.get((whose, e["dtype"]), (None, None))
        if floor_value:
            row.update({"floor_ms": floor_value, "vs_floor": seconds * 1e3 / floor_value, "floor_of": whose})
        elif floor_note:
            row["floor_of"] = floor_note
        row.update({"cpu_ms": cpu_seconds * 1e3, "cpu_speedup": base_cpu / cpu_seconds, "GFLOP": flops / 1e9,
                    "GFLOP/s": rate, "conv_peak_GFLOP/s": peak, "of_peak": rate / peak if peak else None})
        if e.get("note"):
            row["note"] = e["note"]
        extras = "".join(f"  {label} {row[key]:.2f}" for key, label in (
            ("speedup_same_dtype", "×same-dtype MONAI"), ("vs_fastest_peer", "vs fastest peer"),
            ("vs_floor", "vs floor")) if row.get(key) is not None)
        print(f"{case} {name:40s} {seconds * 1e3:9.1f} ms  ×{base / seconds:5.2f} vs MONAI fp32 "
              f"(CPU time ×{base_cpu / cpu_seconds:5.2f})  {rate:7.1f} GFLOP/s"
              + (f"  {rate / peak:5.1%} of conv peak" if peak else "") + extras, flush=True)
    return rows


def _gpu_variants(monai, x, t):
    """UNet3D fp16 replayed from a CUDA graph, and torch.compile(MONAI fp16, max-autotune)."""
    model = UNet3D.from_monai(monai).eval().half()
    static_x = x.half().clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            model(static_x, t)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        model(static_x, t)
    compiled = torch.compile(copy.deepcopy(monai).half(), mode="max-autotune")
    with torch.no_grad():
        compiled(static_x, t)  # compile + autotune outside the timed region
    return {"UNet3D+CUDA graph fp16": graph.replay,
            "torch.compile(MONAI) max-autotune fp16": lambda: compiled(static_x, t)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized run: 32³ both configs, 64³ small only")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cases", default=None,
                        help=f"config:size pairs, comma-separated (configs: {', '.join(CONFIGS)}), e.g. small:32")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                        help="time the peers of benchmarks/peers.py (default: on, on the CPU; a peer that cannot "
                             "be built is a row with a note)")
    parser.add_argument("--peer-set", default=",".join(DEFAULT_PEERS),
                        help=f"which peers, comma-separated (default: %(default)s; known: {', '.join(DEFAULT_PEERS)})")
    parser.add_argument("--compile-mode", default="default",
                        help='torch.compile mode of the compile peers (default: %(default)s; "max-autotune" '
                             "compiles for minutes)")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                        help="time the convolution floor (CPU; default: on)")
    add_fresh_pages_option(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory_note = keep_freed_memory_unless(args.fresh_pages, device)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
    cases = [("small", 32), ("large", 32), ("small", 64), ("large", 64)]
    if args.quick:
        cases = cases[:3]
    if args.cases:
        cases = [(c.split(":")[0].strip(), int(c.split(":")[1])) for c in args.cases.split(",") if c.strip()]
        unknown = [c for c, _ in cases if c not in CONFIGS]
        if unknown:
            parser.error(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    peer_keys = [k.strip() for k in args.peer_set.split(",") if k.strip() and k.strip() != "eager"]
    unknown = set(peer_keys) - set(DEFAULT_PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; known: {', '.join(DEFAULT_PEERS)}")
    use_peers = (device == "cpu") if args.peers is None else args.peers
    if use_peers and device != "cpu":
        print("peers are CPU-only: not timed on", device, flush=True)
    if not use_peers or device != "cpu":
        peer_keys = []
    repeats = args.repeats or (5 if device == "cpu" else 20)
    peaks = {DTYPE_NAMES[d]: conv_peak(d, device) for d in dtypes}
    print("same-run conv peak (GFLOP/s):", {k: round(v, 1) for k, v in peaks.items()}, flush=True)
    rows = []
    for config_name, size in cases:
        rows += run_case(config_name, size, dtypes, device, repeats, peaks, peer_keys, args.compile_mode,
                         args.floor and device == "cpu")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    command = " ".join(["python benchmarks/bench_unet.py", *sys.argv[1:]])
    notes = (f"`{command}`: repeats={repeats}, batch 1, torch threads {torch.get_num_threads()}, 1-min load "
             f"average at the end {load:.2f}. ms = median wall time, "
             "cpu_ms = median process CPU time (all threads; less disturbed by other processes), speed-ups vs "
             "MONAI fp32 eager timed interleaved in the same run. GFLOP = MONAI's forward as counted by "
             "torch.utils.flop_counter; conv peak = same-run 64→64 3×3×3 conv on 32³, channels_last.")
    notes += memory_note
    if peer_keys:
        notes += (f" Peers ({', '.join(peer_keys)}; torch.compile mode {args.compile_mode!r}): the same MONAI "
                  "model, timed interleaved with the rows above, ONNX Runtime and OpenVINO on torch's thread count; "
                  "speedup_same_dtype = vs MONAI eager at the row's precision (the bf16 one: the model cast to "
                  "bf16); vs_fastest_peer = fastest peer at the row's precision / this row (> 1: pydiffmed faster); "
                  "compile_s = torch.compile's first call, or export + conversion + compile; "
                  "rel_l2_vs_monai_fp32 = ‖y − y_MONAI fp32‖ / ‖y_MONAI fp32‖; note = how a peer was built or why "
                  "it failed.")
    if args.floor and device == "cpu":
        notes += (" floor_ms = the forward's convolutions, each distinct one timed alone through oneDNN "
                  "(channels_last, the row's dtype, the fastest of an allocating, a preallocated-output and a "
                  "packed-weight call), "
                  "summed over the calls; floor_of = whose convolutions: UNet3D's own calls of "
                  "layers.convolution for the UNet3D rows (its upsampling convolutions are ~3× cheaper than "
                  "MONAI's), MONAI's Conv3d inputs (forward pre-hooks) for the others; vs_floor = ms / floor_ms.")
    columns = ["config", "volume", "variant", "dtype", "ms", "MONAI_fp32_ms", "speedup", "speedup_same_dtype",
               "vs_fastest_peer", "fastest_peer", "floor_ms", "vs_floor", "floor_of", "rel_l2_vs_monai_fp32",
               "compile_s", "cpu_ms", "cpu_speedup", "GFLOP", "GFLOP/s", "conv_peak_GFLOP/s", "of_peak", "note"]
    print(save("bench_unet", rows, columns, notes))


if __name__ == "__main__":
    main()
