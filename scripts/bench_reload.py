#!/usr/bin/env python3
"""Reload one MoE layer's weights in place (RL weight sync): nvfp4ckpt.runtime.update.update_live_ against the engine-style
per-expert loop and a plain copy of the same bytes.

    python scripts/bench_reload.py [--device cpu|cuda] [--shape qwen3-30b-a3b --shape deepseek-v3] [--experts N]
                                   [--repeats 5] [--threads N] [--source-device cpu] [--json out.json]
                                   [--model-layers 48 [--only-model]] [--bf16] [--host-overhead]

``--model-layers N``: also every MoE layer of an N-layer model of the shape at once (model-level update_live_ and
UpdateStream fed one tensor per add(), against the sum of the per-layer floors). ``--bf16``: unquantized sources
(issue 21) in both source formats, against the engine refit path (FlashInfer's fp4_quantize per expert + the
shuffle loop) and the memory floor (bf16 read + FP4 written). ``--host-overhead``: only the GPU path's host work,
timed on the CPU with the launches stubbed out. On CUDA the NVFP4 run also times pinned and pageable host sources
against host-to-device copies of the same bytes, records whether update_live_ can be captured in a CUDA graph, and
loads the Triton kernels first (``warmup()``; its time is a row of its own).

Per shape, with ModelOpt per-expert source tensors (random valid NVFP4 bytes, on --device, as a trainer holds them)
and live kernel-layout tensors already allocated on --device:
- ``nvfp4ckpt``: ``update_live_`` (index maps cached per shape; cold = first call with empty caches).
- ``engine loop``: what SGLang/vLLM's ``prepare_static_weights_for_trtllm_fp4_moe`` + ``copy_or_rebind_param`` do: per
  expert ``[up; gate]`` cat, FlashInfer's cached permutation indices (``_maybe_get_cached_w3_w1_permute_indices``,
  ``get_w2_permute_indices_with_cache``), gather, ``block_scale_interleave`` of the scales, then ``torch.stack`` of the
  layer and ``param.copy_``. On CPU FlashInfer's ``block_scale_interleave`` refuses CPU tensors, so the loop uses
  nvfp4ckpt's ``layout.swizzle_scales_128x4`` (same bytes) in its place; everything else is FlashInfer's.
- ``copy floor``: ``Tensor.copy_`` of the same bytes, one copy per source tensor into contiguous slices (the floor for
  per-expert sources), and one copy of a layer-sized buffer (the device-to-device floor of the issue).
- ``check_live``: proving the live tensors equal the kernel layout of the source tensors.
Times: median of --repeats (CUDA: events, synchronized). Memory: extra peak over the state before the call
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak RSS, /proc/self/status VmHWM after resetting it).
Every method's bytes are checked against the others.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvfp4ckpt.layouts.trtllm_gen import transform as kl  # noqa: E402
from nvfp4ckpt.runtime import update as live_mod  # noqa: E402
from nvfp4ckpt.runtime.update import table as live_table, views as live_views  # noqa: E402
from nvfp4ckpt.layouts.trtllm_gen.descriptor import LayerInfo, build_descriptor, canonical_specs  # noqa: E402
from nvfp4ckpt.io import torch_dtype  # noqa: E402

# (architecture, experts, hidden, moe intermediate): the public configs
SHAPES = {"qwen3-30b-a3b": ("qwen3_moe", 128, 2048, 768), "deepseek-v3": ("deepseek_v3", 256, 7168, 2048)}
PREFIX = "model.layers.3.mlp.experts"
KERNEL = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def make_source(e: int, h: int, i: int, dev: torch.device, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for x in range(e):
        for proj, (n, k) in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            p = f"{PREFIX}.{x}.{proj}"
            out[f"{p}.weight"] = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g).to(dev)
            scale = torch.randint(0x28, 0x60, (n, k // 16), dtype=torch.uint8, generator=g)
            out[f"{p}.weight_scale"] = scale.view(torch.float8_e4m3fn).to(dev)
            out[f"{p}.weight_scale_2"] = torch.tensor(1e-4 * (1 + x % 7), dtype=torch.float32).to(dev)
            out[f"{p}.input_scale"] = torch.tensor(2e-3, dtype=torch.float32).to(dev)
    return out


def descriptor(arch: str, e: int, h: int, i: int) -> dict:
    info = LayerInfo(PREFIX, e, h, i, {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}, "F32", (), h, i)
    return build_descriptor(source_format="modelopt", architecture=arch, routing={}, layers=[info], config_had_quantization_config=True)


def make_live(e: int, h: int, i: int, dev: torch.device, fmt: str = "modelopt") -> dict[str, torch.Tensor]:
    return {
        name: torch.zeros(shape, dtype=torch_dtype(dtype), device=dev)
        for name, dtype, shape in canonical_specs(PREFIX, e, h, i, fmt, "F32")
    }


def engine_loop(src: dict[str, torch.Tensor], live: dict[str, torch.Tensor], e: int, dev: torch.device, cache: dict) -> None:
    """prepare_static_weights_for_trtllm_fp4_moe (per expert, cached indices) + copy_or_rebind_param (param.copy_)."""
    from flashinfer.fused_moe.core import _maybe_get_cached_w3_w1_permute_indices, get_w2_permute_indices_with_cache

    if dev.type == "cuda":
        from flashinfer import block_scale_interleave as interleave
    else:  # FlashInfer's wrapper refuses CPU tensors: the same 128x4 bytes from nvfp4ckpt
        interleave = kl.swizzle_scales_128x4
    w13, s13, w2, s2 = [], [], [], []
    for x in range(e):
        p = f"{PREFIX}.{x}"
        # the loader first: [w3; w1] on the device (a no-op copy when the trainer's tensors are already there)
        w31 = torch.cat([src[f"{p}.up_proj.weight"], src[f"{p}.gate_proj.weight"]]).to(dev)
        sc31 = torch.cat([src[f"{p}.up_proj.weight_scale"].view(torch.uint8), src[f"{p}.gate_proj.weight_scale"].view(torch.uint8)]).to(dev)
        perm = _maybe_get_cached_w3_w1_permute_indices(cache, w31, 128).to(dev)
        w13.append(w31[perm])
        perm_s = _maybe_get_cached_w3_w1_permute_indices(cache, sc31, 128, num_elts_per_sf=16).to(dev)
        s13.append(interleave(sc31[perm_s].contiguous()).reshape(sc31.shape))
        down, down_s = src[f"{p}.down_proj.weight"].to(dev), src[f"{p}.down_proj.weight_scale"].view(torch.uint8).to(dev)
        perm2 = get_w2_permute_indices_with_cache(cache, down, 128).to(dev)
        w2.append(down[perm2])
        perm2_s = get_w2_permute_indices_with_cache(cache, down_s, 128, num_elts_per_sf=16).to(dev)
        s2.append(interleave(down_s[perm2_s].contiguous()).reshape(down_s.shape))
    for name, parts in zip(KERNEL, (w13, s13, w2, s2)):
        live[f"{PREFIX}.{name}"].view(torch.uint8).copy_(torch.stack(parts))


def stack_like_a_trainer(src: dict[str, torch.Tensor], e: int) -> dict[str, torch.Tensor]:
    """The same tensors as per-expert views of one [E, ...] buffer per projection and kind (grouped-GEMM weights)."""
    out: dict[str, torch.Tensor] = {}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for kind in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
            names = [f"{PREFIX}.{x}.{proj}.{kind}" for x in range(e)]
            buf = torch.stack([src[n] for n in names])
            out.update({n: buf[x] for x, n in enumerate(names)})
    return out


def copy_per_tensor(src: dict[str, torch.Tensor], flat: torch.Tensor) -> None:
    off = 0
    for t in src.values():
        if t.dim() == 2:
            n = t.numel()
            flat[off : off + n].view(t.shape).copy_(t.view(torch.uint8))
            off += n


class Meter:
    """Median wall time and extra peak memory of a callable on one device."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev

    def peak_reset(self) -> int:
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
            return torch.cuda.memory_allocated(self.dev)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return _status("VmRSS")

    def peak_extra(self, base: int) -> int:
        if self.dev.type == "cuda":
            return torch.cuda.max_memory_allocated(self.dev) - base
        return max(0, _status("VmHWM") - base)

    def once(self, fn) -> tuple[float, int]:
        sync(self.dev)
        base = self.peak_reset()
        if self.dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t
        return seconds, self.peak_extra(base)

    def median(self, fn, repeats: int) -> tuple[float, int]:
        runs = [self.once(fn) for _ in range(repeats)]
        return statistics.median(r[0] for r in runs), max(r[1] for r in runs)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def u8(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def copy_floor(meter: "Meter", nbytes: int, dev: torch.device, repeats: int) -> tuple[float, int]:
    """(median seconds, extra bytes) of one ``Tensor.copy_`` of ``nbytes`` between two touched buffers on ``dev``."""
    dst = torch.zeros(nbytes, dtype=torch.uint8, device=dev)  # touched: page faults are not the copy's cost
    src = torch.ones(nbytes, dtype=torch.uint8, device=dev)
    return meter.median(lambda: dst.copy_(src), repeats)


def about(shape: str, e: int, e_full: int, h: int, i: int, layer_bytes: int, dev: torch.device) -> dict:
    """What every per-layer result says of its run: the shape, the bytes the floor is of, the device."""
    return {
        "shape": shape, "experts": e, "experts_full": e_full, "hidden": h, "intermediate": i, "layer_bytes": layer_bytes,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch_threads": torch.get_num_threads(),
    }  # fmt: skip


def bench_shape(shape: str, experts: int | None, dev: torch.device, repeats: int, src_dev: torch.device | None = None) -> dict:
    arch, e_full, h, i = SHAPES[shape]
    e = experts or e_full
    src = make_source(e, h, i, src_dev or dev, seed=1)
    layout = descriptor(arch, e, h, i)
    live = make_live(e, h, i, dev)
    layer_bytes = sum(live[f"{PREFIX}.{k}"].numel() for k in KERNEL)
    meter = Meter(dev)
    rows: dict[str, dict] = {}

    if dev.type == "cuda":  # Triton kernels: loaded once per process (an engine does this at start-up)
        t0 = time.perf_counter()
        live_mod.warmup(dev)
        torch.cuda.synchronize(dev)
        rows["warmup(): load the Triton kernels, once per process"] = {"s": time.perf_counter() - t0, "extra_bytes": 0}
    live_views._maps.cache_clear()
    live_views._maps_on.cache_clear()
    live_table._row_map.cache_clear()
    t, m = meter.once(lambda: live_mod.update_live_(live, src, layout))
    rows["nvfp4ckpt update_live_, cold"] = {"s": t, "extra_bytes": m}
    t, m = meter.median(lambda: live_mod.update_live_(live, src, layout), repeats)
    rows["nvfp4ckpt update_live_, warm"] = {"s": t, "extra_bytes": m}
    ours = {k: u8(live[f"{PREFIX}.{k}"]).clone() for k in KERNEL}

    cache: dict = {}
    t, m = meter.once(lambda: engine_loop(src, live, e, dev, cache))
    rows["engine-style per-expert loop, cold"] = {"s": t, "extra_bytes": m}
    t, m = meter.median(lambda: engine_loop(src, live, e, dev, cache), repeats)
    rows["engine-style per-expert loop, warm"] = {"s": t, "extra_bytes": m}
    identical = all(torch.equal(ours[k], u8(live[f"{PREFIX}.{k}"])) for k in KERNEL)
    del ours
    engine_out = {k: live[f"{PREFIX}.{k}"].clone() for k in KERNEL}
    for k in KERNEL:
        live[f"{PREFIX}.{k}"].zero_()

    stacked = stack_like_a_trainer(src, e)
    t, m = meter.median(lambda: live_mod.update_live_(live, stacked, layout), repeats)
    rows["nvfp4ckpt update_live_, warm, sources = views of stacked [E, ...] trainer buffers"] = {"s": t, "extra_bytes": m}
    identical &= all(torch.equal(u8(engine_out[k]), u8(live[f"{PREFIX}.{k}"])) for k in KERNEL)
    del stacked, engine_out

    ours_again = {k: live[f"{PREFIX}.{k}"].clone() for k in KERNEL}
    t, m = meter.median(lambda: live_mod.check_live(live, src, layout), repeats)
    rows["nvfp4ckpt check_live"] = {"s": t, "extra_bytes": m}

    if dev.type == "cuda":  # a trainer's host tensors: pinned and pageable, against host-to-device floors
        for pinned in (True, False):
            host = {n: (t.cpu().pin_memory() if pinned else t.cpu()) for n, t in src.items()}
            t, m = meter.median(lambda: live_mod.update_live_(live, host, layout), repeats)
            rows[f"nvfp4ckpt update_live_, warm, {'pinned' if pinned else 'pageable'} host sources"] = {"s": t, "extra_bytes": m}
            identical &= all(torch.equal(u8(ours_again[k]), u8(live[f"{PREFIX}.{k}"])) for k in KERNEL)
            buf = torch.ones(layer_bytes, dtype=torch.uint8).pin_memory() if pinned else torch.ones(layer_bytes, dtype=torch.uint8)
            dst = torch.empty(layer_bytes, dtype=torch.uint8, device=dev)
            t, m = meter.median(lambda: dst.copy_(buf, non_blocking=pinned), repeats)
            rows[f"host-to-device floor: one layer-sized copy from {'pinned' if pinned else 'pageable'} memory"] = {"s": t, "extra_bytes": m}
            del host, buf, dst
        rows["CUDA graph capture of update_live_ (fixed source addresses)"] = {"s": float("nan"), "extra_bytes": 0, "note": _capture(live, src, layout)}

    flat = torch.zeros(layer_bytes, dtype=torch.uint8, device=dev)  # touched: page faults are not the copy's cost
    t, m = meter.median(lambda: copy_per_tensor(src, flat), repeats)
    rows["copy floor: Tensor.copy_ per source tensor"] = {"s": t, "extra_bytes": m}
    t, m = copy_floor(meter, layer_bytes, dev, repeats)
    rows["copy floor: one layer-sized Tensor.copy_"] = {"s": t, "extra_bytes": m}
    return {**about(shape, e, e_full, h, i, layer_bytes, dev), "source_device": str(src_dev or dev), "identical_bytes": identical, "rows": rows}


def _capture(live: dict, src: dict, layout: dict) -> str:
    """Whether update_live_ itself can be captured in a CUDA graph (it reads the global scales on the host: no)."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            live_mod.update_live_(live, src, layout)
    except Exception as exc:  # noqa: BLE001  (the capture's failure is the finding)
        torch.cuda.synchronize()
        return f"not capturable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return "captured"


def bench_model(shape: str, layers: int, dev: torch.device, repeats: int) -> dict:
    """Every MoE layer of a model of this shape at once: the model-level update_live_, UpdateStream fed one tensor at a
    time, and the sum of the per-layer floors (one layer-sized copy each)."""
    arch, e, h, i = SHAPES[shape]
    prefixes = [PREFIX.replace("layers.3", f"layers.{n}") for n in range(layers)]
    one = descriptor(arch, e, h, i)
    layout = dict(one, layers={p: one["layers"][PREFIX] for p in prefixes})
    live: dict[str, torch.Tensor] = {}
    src: dict[str, torch.Tensor] = {}
    for n, p in enumerate(prefixes):
        live |= {k.replace(PREFIX, p): v for k, v in make_live(e, h, i, dev).items()}
        src |= {k.replace(PREFIX, p): v for k, v in make_source(e, h, i, dev, seed=n).items()}
    layer_bytes = sum(live[f"{PREFIX.replace('layers.3', 'layers.0')}.{k}"].numel() for k in KERNEL)
    meter = Meter(dev)
    rows: dict[str, dict] = {}
    t, m = meter.median(lambda: live_mod.update_live_(live, src, layout), repeats)
    rows["model-level update_live_, warm"] = {"s": t, "extra_bytes": m}

    def stream() -> None:
        s = live_mod.UpdateStream(live, layout)
        for name, tensor in src.items():
            s.add({name: tensor})
        s.finish()

    t, m = meter.median(stream, repeats)
    rows["UpdateStream, one tensor per add()"] = {"s": t, "extra_bytes": m}
    t, m = copy_floor(meter, layer_bytes, dev, repeats)
    rows["floor: one layer-sized copy x layers"] = {"s": t * layers, "extra_bytes": m}
    return {"shape": shape, "layers": layers, "model_bytes": layer_bytes * layers, "rows": rows,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}  # fmt: skip


def model_table(r: dict) -> str:
    floor = r["rows"]["floor: one layer-sized copy x layers"]["s"]
    out = [f"### {r['shape']}, {r['layers']} MoE layers ({r['model_bytes'] / 1e9:.2f} GB), {r['device']}", "",
           "| method | time ms | x sum of layer floors | extra peak memory MB |", "|---|---|---|---|"]  # fmt: skip
    for name, row in r["rows"].items():
        out.append(f"| {name} | {row['s'] * 1e3:.1f} | {row['s'] / floor:.2f}x | {row['extra_bytes'] / 1e6:.1f} |")
    return "\n".join(out)


def host_overhead(shape: str, experts: int | None, repeats: int) -> dict:
    """The table path's host work alone (validation, scalars, the address table), on the CPU with the launches
    replaced by nothing: what a GPU update costs the host before any byte moves."""
    from nvfp4ckpt.runtime.kernels import layout_write
    from nvfp4ckpt.runtime.update import write

    arch, e_full, h, i = SHAPES[shape]
    e = experts or e_full
    cpu = torch.device("cpu")
    src, layout, live = make_source(e, h, i, cpu, seed=1), descriptor(arch, e, h, i), make_live(e, h, i, cpu)
    write.CPU_TABLE, real = True, layout_write.launch
    layout_write.launch = lambda *a, **k: None
    try:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            live_mod.update_live_(live, src, layout)
            times.append(time.perf_counter() - t)
    finally:
        write.CPU_TABLE, layout_write.launch = False, real
    return {"shape": shape, "experts": e, "source_tensors": len(src), "host_s": statistics.median(times)}


def table(r: dict) -> str:
    floor = r["rows"][r.get("floor_key", "copy floor: one layer-sized Tensor.copy_")]["s"]
    scaled = "" if r["experts"] == r["experts_full"] else f", {r['experts']} of its {r['experts_full']} experts"
    out = [
        f"### {r['shape']} layer shape ({r['layer_bytes'] / 1e9:.3f} GB of kernel tensors{scaled}), {r['device']} "
        f"(sources on {r['source_device']}{', bf16 sources, ' + r['format'] + ' layout' if 'format' in r else ''}), "
        f"{r['torch_threads']} torch threads; bytes identical across methods: {r['identical_bytes']}",
        "",
        "| method | time ms | x layer copy floor | extra peak memory MB | extra memory % of layer |",
        "|---|---|---|---|---|",
    ]
    for name, row in r["rows"].items():
        out.append(
            f"| {name} | {row['s'] * 1e3:.1f} | {row['s'] / floor:.2f}x | {row['extra_bytes'] / 1e6:.1f} | "
            f"{100 * row['extra_bytes'] / r['layer_bytes']:.1f}% |" + (f" {row['note']}" if "note" in row else "")
        )
    return "\n".join(out)


def make_bf16_source(e: int, h: int, i: int, dev: torch.device, seed: int, fmt: str) -> dict[str, torch.Tensor]:
    """A trainer's unquantized experts (bf16, N(0, 0.02)); ModelOpt: plus each expert's input scales (live ones are
    kept otherwise, as compressed-tensors' raw input global scales are here)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for x in range(e):
        for proj, (n, k) in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            out[f"{PREFIX}.{x}.{proj}.weight"] = (torch.randn((n, k), generator=g, device=dev) * 0.02).to(torch.bfloat16)
            if fmt == "modelopt":
                out[f"{PREFIX}.{x}.{proj}.input_scale"] = torch.tensor(2e-3, dtype=torch.float32, device=dev)
    return out


def flashinfer_refit(src: dict[str, torch.Tensor], live: dict[str, torch.Tensor], e: int, dev: torch.device, cache: dict) -> str:
    """What an engine's online NVFP4 refit does: FlashInfer's fp4_quantize per expert and projection (global scale
    2688/amax), then the per-expert shuffle loop. Falls back to nvfp4ckpt.producer_quant where fp4_quantize does not
    run (it needs a Blackwell GPU); returns which quantizer ran."""
    from nvfp4ckpt import producer_quant

    try:
        from flashinfer import fp4_quantize
    except ImportError:
        fp4_quantize = None
    quantized: dict[str, torch.Tensor] = {}
    which = "flashinfer.fp4_quantize"
    for x in range(e):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w = src[f"{PREFIX}.{x}.{proj}.weight"]
            gs = (448.0 * 6.0) / w.float().abs().amax()
            try:
                if fp4_quantize is None:
                    raise RuntimeError("no flashinfer")
                packed, sf = fp4_quantize(w, gs, 16, False, False)
                scale = sf.view(torch.float8_e4m3fn).reshape(w.shape[0], -1)
            except Exception:  # noqa: BLE001  (SM90: no FP4 conversion instructions)
                which = "nvfp4ckpt.producer_quant (fp4_quantize does not run on this GPU)"
                (q,) = producer_quant.quantize_compressed_tensors([w])
                packed, scale = q.weight[0], q.weight_scale[0]
            quantized[f"{PREFIX}.{x}.{proj}.weight"] = packed.view(torch.uint8)
            quantized[f"{PREFIX}.{x}.{proj}.weight_scale"] = scale
    engine_loop(quantized, live, e, dev, cache)
    return which


def bench_bf16(shape: str, experts: int | None, dev: torch.device, repeats: int, fmt: str) -> dict:
    """Unquantized (bf16) sources: update_live_ (quantize + layout in one pass on CUDA) against the path it replaces
    (fp4_quantize per expert + the per-expert shuffle loop) and the memory floor (bf16 bytes read plus FP4 bytes
    written, at the device copy bandwidth). The GPU bytes are checked against the CPU path on two experts."""
    arch, e_full, h, i = SHAPES[shape]
    e = experts or e_full
    src = make_bf16_source(e, h, i, dev, 3, fmt)
    layout = dict(descriptor(arch, e, h, i), source_format=fmt)
    live = make_live(e, h, i, dev, fmt)
    for name, t in live.items():
        if name.endswith("input_global_scale"):
            t.fill_(500.0)  # calibration, kept by a weight update
        elif name.endswith("input_scale"):
            t.fill_(1 / 500)
    meter = Meter(dev)
    rows: dict[str, dict] = {}
    if dev.type == "cuda":
        live_mod.warmup(dev)
    t, m = meter.once(lambda: live_mod.update_live_(live, src, layout))
    rows["nvfp4ckpt update_live_ from bf16, cold"] = {"s": t, "extra_bytes": m}
    t, m = meter.median(lambda: live_mod.update_live_(live, src, layout), repeats)
    rows["nvfp4ckpt update_live_ from bf16, warm"] = {"s": t, "extra_bytes": m}
    two = {n: v.cpu() for n, v in src.items() if n.startswith((f"{PREFIX}.0.", f"{PREFIX}.1."))}
    cpu_layout = dict(descriptor(arch, 2, h, i), source_format=fmt)
    cpu_live = {k: v[:2].cpu().clone() if v.dim() and v.shape[0] == e else v.cpu().clone() for k, v in live.items()}
    live_mod.update_live_(cpu_live, two, cpu_layout)
    identical = all(torch.equal(u8(cpu_live[f"{PREFIX}.{k}"]), u8(live[f"{PREFIX}.{k}"][:2].cpu())) for k in KERNEL)
    cache: dict = {}
    which = flashinfer_refit(src, live, e, dev, cache)
    t, m = meter.median(lambda: flashinfer_refit(src, live, e, dev, cache), repeats)
    rows[f"engine refit: {which} + per-expert shuffle loop, warm"] = {"s": t, "extra_bytes": m}
    bf16_bytes = sum(v.numel() * v.element_size() for n, v in src.items() if n.endswith(".weight"))
    fp4_bytes = sum(live[f"{PREFIX}.{k}"].numel() for k in KERNEL)
    t, m = copy_floor(meter, (bf16_bytes + fp4_bytes) // 2, dev, repeats)  # a copy of n bytes reads n and writes n
    rows["memory floor: bf16 read + FP4 written, at copy bandwidth"] = {"s": t, "extra_bytes": m}
    return {
        **about(shape, e, e_full, h, i, fp4_bytes, dev), "source_device": str(dev), "format": fmt, "identical_bytes": identical,
        "rows": rows, "floor_key": "memory floor: bf16 read + FP4 written, at copy bandwidth",
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES))
    ap.add_argument("--experts", type=int, help="use this many experts (memory-bound hosts); the shape's sizes otherwise")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--source-device", help="where the trainer's tensors are (default: --device); e.g. cpu with --device cuda")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); torch's default otherwise")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model-layers", type=int, help="also update every MoE layer of a model of --shape at once (e.g. 48)")
    ap.add_argument("--host-overhead", action="store_true", help="only time the GPU path's host work (runs on the CPU)")
    ap.add_argument("--bf16", action="store_true", help="unquantized bf16 sources (issue 21) instead of NVFP4 ones")
    ap.add_argument("--only-model", action="store_true", help="with --model-layers: skip the per-layer runs")
    args = ap.parse_args()
    if args.host_overhead:
        for shape in args.shape or sorted(SHAPES, reverse=True):
            r = host_overhead(shape, args.experts, args.repeats)
            print(f"{shape}: {r['experts']} experts, {r['source_tensors']} source tensors: host work {r['host_s'] * 1e3:.2f} ms "
                  f"({r['host_s'] / r['source_tensors'] * 1e6:.2f} us per source tensor)", flush=True)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    results = []

    def keep(r: dict, text: str) -> None:
        """Print a result and rewrite the JSON with everything so far: a run stopped by a time limit keeps its rows."""
        results.append(r)
        print(text + "\n", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))

    for shape in [] if args.only_model else args.shape or sorted(SHAPES, reverse=True):
        if args.bf16:
            for fmt in ("modelopt", "compressed-tensors"):
                r = bench_bf16(shape, args.experts, dev, args.repeats, fmt)
                keep(r, table(r))
            continue
        r = bench_shape(shape, args.experts, dev, args.repeats, torch.device(args.source_device) if args.source_device else None)
        keep(r, table(r))
    if args.model_layers:
        for shape in args.shape or ["qwen3-30b-a3b"]:
            r = bench_model(shape, args.model_layers, dev, args.repeats)
            keep(r, model_table(r))
    return 0 if all(r.get("identical_bytes", True) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
