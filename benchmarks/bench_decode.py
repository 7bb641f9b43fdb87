"""Decoding a latent to a large volume (issue 14): whole decode, MONAI's sliding window, pydiffmed's exact slabs.

Networks: a MONAI-like AutoencoderKL (channels 32, 64, 64; latent_channels 4; num_res_blocks 1; no attention;
4× downsampling), MONAI's module with random non-zero weights (bench_unet.randomize_) and pydiffmed's
AutoencoderKL.from_monai of it; and the same layout as MAISI's AutoencoderKlMaisi (trilinear upsampling), random
weights, with pydiffmed's AutoencoderKL.from_maisi of it. One latent batch 1×4×(S/4)³ decoded to 1×1×S³ (S = 64
with --quick, the default; 128 with --full; --size 256 for the 256³ table, written to bench_decode_256_<device>.json
next to the --full one). Rows per network and dtype (fp32, bf16; GPU: fp16 too):
* MONAI whole: MONAI AutoencoderKL.decode on the whole latent (the baseline of the MONAI network's ratios);
* MONAI sliding window: monai.inferers.SlidingWindowInferer(roi = latent side / 2, overlap 0.25 and 0.4,
  constant blend) over MONAI's decode, windows taken on the latent (the output is ×4 larger: MONAI infers the
  zoom);
* MAISI whole: AutoencoderKlMaisi.decode with num_splits=1 (the baseline of the MAISI network's ratios);
* MAISI num_splits: the same weights with MAISI's memory saving, num_splits=8 along dim_split=1 and save_mem
  (norm_float16 off, so that fp32 is comparable; MAISI's bundle turns it on);
* pydiffmed whole: pydiffmed AutoencoderKL.decode(z);
* pydiffmed tiled: decode(z, tile=T): every layer by depth slabs of T rows (--tile T, default 2), exact
  (whole-volume GroupNorm statistics, no seams), upsampled activations recomputed rather than stored.

ms: median wall time, all variants of a network and dtype timed in turn within every round
(common.interleaved_medians). time_ratio / memory_ratio: against the network's baseline in the same dtype.
max_abs_diff: max |output - the baseline in fp32| (for bf16 rows it includes bf16 rounding; the baseline's bf16 row
shows how much). peak_MB: memory one more decode
adds above what is in use before it, each variant in a fresh subprocess after one warm-up decode (CPU: VmHWM after
clear_refs with malloc's mmap threshold at 64 KiB, as bench_scaling.py; GPU: max_memory_allocated). On the CPU from
256³ on (minutes per decode) no warm-up decode or round precedes the timed one.

--architecture maisi is the GPU row of issue 14: MAISI's released autoencoder architecture (channels 64, 128,
256; two res blocks per level; random weights) decoding a 128³ latent to 512³ (--size 512, the default in this
mode), MAISI's own memory-saving path (num_splits, the baseline) against pydiffmed's slabs, bf16 and fp16 under
autocast for MAISI, max_abs_diff against MAISI's output in the same dtype; written to bench_decode_maisi_<device>.json.
Targets: peak ≤ 16 GB and time_ratio ≤ 1.

    python benchmarks/bench_decode.py [--quick | --full | --smoke] [--size S] [--repeats R] [--threads N]
                                      [--architecture small|maisi]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import command_line, interleaved_medians, run_worker, save, sync  # noqa: E402
from bench_unet import DTYPE_NAMES, randomize_  # noqa: E402

CONFIG = dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(32, 64, 64), latent_channels=4,
              num_res_blocks=1, attention_levels=(False, False, False), norm_num_groups=32,
              with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
# MAISI's released autoencoder (its bundle's autoencoder_def): the GPU row of --architecture maisi
MAISI_CONFIG = dict(CONFIG, channels=(64, 128, 256), num_res_blocks=2)
ARCHITECTURES = {"small": CONFIG, "maisi": MAISI_CONFIG}
FACTOR = 2 ** (len(CONFIG["channels"]) - 1)  # spatial downsampling of both autoencoders
OVERLAPS = (0.25, 0.4)
MAISI_SPLITS = 8
TILE = 2  # slab rows of "pydiffmed tiled" (the default of --tile)
VARIANTS = {"MONAI": ("MONAI whole", *(f"MONAI sliding window {o}" for o in OVERLAPS), "pydiffmed whole",
                      "pydiffmed tiled"),
            "MAISI": ("MAISI whole", "MAISI num_splits", "pydiffmed whole", "pydiffmed tiled")}
# --architecture maisi: MAISI's own memory-saving path is the baseline (a whole 512³ decode does not fit a GPU)
MAISI_SCALE_VARIANTS = {"MAISI": ("MAISI num_splits", "pydiffmed tiled")}
MIB = 2.0 ** 20
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
# On the CPU a decode to 256³ or more takes minutes; its one-time costs (oneDNN primitives, libraries: milliseconds,
# megabytes) vanish in it, so those sizes skip the warm-up decodes, which would double the run (hours on 2 cores).
# A GPU keeps them: its first call compiles Triton kernels.
NO_WARM_UP_FROM = 256


def warm_ups(size: int, device: str, smoke: bool = False) -> int:
    return 0 if smoke or (device == "cpu" and size >= NO_WARM_UP_FROM) else 1


def maisi_arguments(num_splits, config=CONFIG):
    return dict(spatial_dims=3, in_channels=1, out_channels=1, num_channels=config["channels"],
                latent_channels=config["latent_channels"], num_res_blocks=(config["num_res_blocks"],) * 3,
                attention_levels=config["attention_levels"], norm_num_groups=config["norm_num_groups"],
                with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, norm_float16=False,
                num_splits=num_splits, dim_split=1, save_mem=num_splits > 1)


def maisi_splits(size):
    """MAISI's num_splits, fewer for small latents: each split must hold at least 4 latent rows (MAISI's
    overlap is 3)."""
    return max(1, min(MAISI_SPLITS, size // FACTOR // 4))


def build(network, device, size, config=CONFIG):
    """[whole-decode module, other reference modules..., pydiffmed AutoencoderKL] of `network` with the same
    random weights, fp32, eval mode: MONAI: [MONAI AutoencoderKL, ours]; MAISI: [AutoencoderKlMaisi, the same with
    num_splits (for an output of side `size`), ours]."""
    from pydiffmed.models import AutoencoderKL

    torch.manual_seed(0)
    if network == "MONAI":
        from monai.networks.nets import AutoencoderKL as MonaiAutoencoderKL

        monai = randomize_(MonaiAutoencoderKL(**config)).eval().to(device)
        return [monai, AutoencoderKL.from_monai(monai).eval().to(device)]
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    maisi = randomize_(AutoencoderKlMaisi(**maisi_arguments(1, config))).eval().to(device)
    split = AutoencoderKlMaisi(**maisi_arguments(maisi_splits(size), config)).eval().to(device)
    split.load_state_dict(maisi.state_dict())
    return [maisi, split, AutoencoderKL.from_maisi(maisi).eval().to(device)]


def latent(size, device):
    gen = torch.Generator().manual_seed(1)
    side = size // FACTOR
    return torch.randn(1, CONFIG["latent_channels"], side, side, side, generator=gen).to(device)


def decoders(network, device, size, dtype, tile, config=CONFIG):
    """{variant: decode(z)} of `network` in `dtype`: MONAI's module and ours cast to it; MAISI's modules (which
    mix fp32 into their forward and fail cast to bf16) stay fp32 under torch.autocast, as MAISI's scripts run."""
    from monai.inferers import SlidingWindowInferer

    *reference, mine = build(network, device, size, config)
    mine = mine.to(dtype)
    if network == "MONAI":
        monai = reference[0].to(dtype)
        roi = max(1, size // FACTOR // 2)
        fns = {"MONAI whole": monai.decode}
        for overlap in OVERLAPS:
            inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=1, overlap=overlap, mode="constant")
            fns[f"MONAI sliding window {overlap}"] = lambda z, inferer=inferer: inferer(z, monai.decode)
    else:
        def autocast(decode):
            def run(z):
                with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
                    return decode(z)
            return run

        fns = {"MAISI whole": autocast(reference[0].decode), "MAISI num_splits": autocast(reference[1].decode)}
    fns["pydiffmed whole"] = mine.decode
    fns["pydiffmed tiled"] = lambda z: mine.decode(z, tile=tile)
    return fns


def worker(network, variant, dtype_name, size, device, tile, architecture="small") -> dict:
    """Peak memory of one more decode by `variant` of `network` (run in a fresh process on the CPU)."""
    from bench_scaling import forward_peak_bytes

    dtype = DTYPES[dtype_name]
    z = latent(size, device).to(dtype)
    decode = decoders(network, device, size, dtype, tile, ARCHITECTURES[architecture])[variant]
    with torch.no_grad():
        for _ in range(warm_ups(size, device)):
            decode(z)  # one-time costs (oneDNN primitives, libraries) are not counted
        sync(device)
        peak, method = forward_peak_bytes(lambda: decode(z), device)
    return {"peak_MB": peak / MIB, "memory_method": method}


def peak_subprocess(network, variant, dtype_name, size, threads, tile, architecture, timeout_s=600) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{network},{variant},{dtype_name}", "--size",
           str(size), "--tile", str(tile), "--architecture", architecture]
    cmd += ["--threads", str(threads)] if threads else []
    return run_worker(cmd, timeout_s)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="64³ output (the default)")
    sizes.add_argument("--full", action="store_true", help="128³ output")
    sizes.add_argument("--smoke", action="store_true", help="tiny sizes (tests): 16³ output, 1 repeat")
    parser.add_argument("--size", type=int, default=None, help="output side (a multiple of 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--tile", type=int, default=TILE, help="slab rows of the pydiffmed tiled decode")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="small",
                        help="maisi: MAISI's released autoencoder, 512³ output by default, MAISI num_splits against "
                             "pydiffmed tiled in bf16/fp16 (the GPU row)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "network,variant,dtype": one peak
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    maisi_scale = args.architecture == "maisi"
    config = ARCHITECTURES[args.architecture]
    size = args.size or (16 if args.smoke else 512 if maisi_scale else 128 if args.full else 64)
    if size % (4 * FACTOR):
        parser.error(f"--size must be a multiple of {4 * FACTOR}")

    if args.worker:
        network, variant, dtype_name = args.worker.split(",")
        print(json.dumps(worker(network, variant, dtype_name, size, device, args.tile, args.architecture)),
              flush=True)
        return

    repeats = args.repeats or (1 if args.smoke else 3)
    warmup = warm_ups(size, device, args.smoke)
    if maisi_scale:
        variant_sets, dtypes = MAISI_SCALE_VARIANTS, ["bf16"] + (["fp16"] if device == "cuda" else [])
    else:
        variant_sets, dtypes = VARIANTS, ["fp32", "bf16"] + (["fp16"] if device == "cuda" else [])
    z32 = latent(size, device)
    rows = []
    for network, variants in variant_sets.items():
        reference = None
        if not maisi_scale:
            with torch.no_grad():
                reference = build(network, device, size, config)[0].decode(z32).float()
        for dtype_name in dtypes:
            z = z32.to(DTYPES[dtype_name])
            fns = decoders(network, device, size, DTYPES[dtype_name], args.tile, config)
            fns = {name: fns[name] for name in variants}
            outputs = {}  # each variant's last timed output: max |Δ| costs no extra decode (minutes at 256³)

            def keeping(name, decode):
                def run():
                    outputs[name] = decode(z)
                return run

            with torch.no_grad():
                times = interleaved_medians({name: keeping(name, f) for name, f in fns.items()}, device, repeats,
                                            warmup=warmup)
            del fns
            same_dtype_reference = outputs[variants[0]].float() if maisi_scale else reference
            diffs = {name: (out.float() - same_dtype_reference).abs().max().item() for name, out in outputs.items()}
            outputs.clear()
            block = []
            for variant in variants:
                if device == "cpu":
                    peak = peak_subprocess(network, variant, dtype_name, size, args.threads, args.tile,
                                           args.architecture)
                else:
                    peak = worker(network, variant, dtype_name, size, device, args.tile, args.architecture)
                    torch.cuda.empty_cache()
                row = {"network": network, "variant": variant, "dtype": dtype_name, "device": device,
                       "output": f"{size}³", "ms": times[variant][0] * 1e3, "max_abs_diff": diffs[variant]}
                row.update(peak)
                block.append(row)
                print(row, flush=True)
            base = block[0]
            for row in block:
                row["time_ratio"] = row["ms"] / base["ms"]
                if "peak_MB" in row and base.get("peak_MB"):
                    row["memory_ratio"] = row["peak_MB"] / base["peak_MB"]
            rows += block
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    method = next((r["memory_method"] for r in rows if "memory_method" in r), "none")
    latent_side = size // FACTOR
    described = (f"`{command_line()}`: latent 1×{config['latent_channels']}×{latent_side}³ → 1×1×{size}³; "
                 f"autoencoder channels {config['channels']}, num_res_blocks {config['num_res_blocks']}, no "
                 f"attention, random weights")
    measured = (f"peak_MB: memory one more decode adds above what is in use before it, each variant in a fresh "
                f"process after {warm_ups(size, device)} warm-up decode(s), by {method}. torch threads "
                f"{torch.get_num_threads()}, 1-min load average {load:.2f}.")
    splits = (f"MAISI num_splits: {maisi_splits(size)} splits along dim_split 1, save_mem, norm_float16 off. Tiled: "
              f"decode(z, tile={args.tile}). ms: median of {repeats} interleaved rounds after {warmup} warm-up "
              f"round(s); ")
    if maisi_scale:
        name = "bench_decode_maisi"
        notes = (f"{described}, MAISI's released architecture (AutoencoderKlMaisi). {splits}time_ratio / "
                 f"memory_ratio vs MAISI num_splits (MAISI's own path, under autocast) of the same dtype; "
                 f"max_abs_diff vs its output. Targets (issue 14): peak_MB ≤ 16384 and time_ratio ≤ 1. {measured}")
    else:
        # a size other than the mode's (--size 256: the 256³ table) keeps its own results file
        name = "bench_decode" if args.size is None else f"bench_decode_{size}"
        notes = (f"{described}, as MONAI's AutoencoderKL and as MAISI's AutoencoderKlMaisi. Sliding window: roi "
                 f"{max(1, latent_side // 2)}³ on the latent, overlap 0.25 / 0.4, constant blend. {splits}"
                 f"time_ratio / memory_ratio vs the network's whole decode (MONAI whole, MAISI whole) of the same "
                 f"dtype; max_abs_diff vs that decode in fp32; {measured}")
    columns = ["network", "variant", "dtype", "device", "output", "ms", "time_ratio", "peak_MB", "memory_ratio",
               "max_abs_diff", "error"]
    print(save(name, rows, columns, notes))


if __name__ == "__main__":
    main()
