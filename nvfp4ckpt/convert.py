"""Source checkpoint -> kernel-ready checkpoint, streaming one MoE layer at a time.

The output is planned from headers alone (names, dtypes, shapes, shards), then written shard by
shard into a temporary folder next to DST that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import layouts
from ._args import Args
from .errors import InputError
from .io import Array, PlannedTensor, format_size
from .output import DEFAULT_MAX_SHARD_SIZE, CheckpointJob, check_destination, max_shard_bytes, write_checkpoint
from .output.card import publish_files, source_label
from .output.destination import refuse_output_names
from .runtime.device import parse_device
from .progress import ProgressFn
from .source.checkpoint import SourceCheckpoint, SourceMoELayer, natural_key, open_checkpoint
from .source.formats import DESCRIPTOR_KEY, KERNEL_QUANT_METHOD, SOURCE_QUANT_KEY


@dataclass
class ConvertResult:
    source: Path
    destination: Path
    source_format: str
    architecture: str
    num_moe_layers: int
    files: list[dict] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0
    descriptor: dict = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)  # shards kept from an interrupted run (--resume)

    def to_dict(self) -> dict:
        return {
            "source": str(self.source),
            "destination": str(self.destination),
            "source_format": self.source_format,
            "architecture": self.architecture,
            "num_moe_layers": self.num_moe_layers,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "shards_reused": len(self.reused),
            "files": self.files,
        }


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    device: str = "cpu",
    revision: str | None = None,
    progress: ProgressFn | None = None,
    workers: int | None = None,
    tp: int = 1,
    ep: int = 1,
    resume: bool = False,
    pad_hidden: int = 128,
) -> ConvertResult:
    """Write the kernel-ready version of ``src`` to ``dst``; see README "Output contract".

    ``workers`` threads read and transform MoE layers ahead of the writer (default: ``default_workers()``);
    the output bytes are the same for any value. ``tp``/``ep`` > 1 write one set of MoE files per rank
    (see ``nvfp4ckpt.layouts.trtllm_gen.ranks``); non-expert tensors stay whole at the top level. ``resume`` continues an
    interrupted run into the same DST, reusing its finished shards (see ``output.write_checkpoint``). ``pad_hidden``:
    the hidden size is zero-padded to a multiple of it (128, the kernel's need; 256 for vLLM, which pads to 256)."""
    start = time.perf_counter()
    a = Args("convert_checkpoint")
    a.path("src", src)
    a.path("dst", dst)
    a.bool("overwrite", overwrite, "--overwrite")
    a.size("max_shard_size", max_shard_size, "--max-shard-size")
    a.str("device", device, "--device")
    a.str("revision", revision, "--revision", optional=True)
    a.callable("progress", progress)
    a.int("workers", workers, "--workers", lo=1, hi=1024, optional=True)
    a.int("tp", tp, "--tp", lo=1, hi=1 << 16)
    a.int("ep", ep, "--ep", lo=1, hi=1 << 16)
    a.bool("resume", resume, "--resume")
    a.int("pad_hidden", pad_hidden, "--pad-hidden", lo=1)
    max_bytes = max_shard_bytes(max_shard_size)
    ckpt = open_checkpoint(src, revision)
    dst_path = Path(dst).expanduser()
    dst_path = check_destination(ckpt.root, dst_path, overwrite)
    refuse_output_names(ckpt.root)
    layout = layouts.get(layouts.DEFAULT_LAYOUT)
    layout.check_pad_hidden(pad_hidden)
    if device != "cpu":
        parse_device(device)  # a one-line InputError for anything not usable here (cuda:99, "gpu", ...)

    ranks = {
        l.prefix: layout.rank_specs(tp, ep, l.num_experts, l.intermediate_size, f"{ckpt.root}: {l.prefix}", l.gated)
        for l in ckpt.layers
    }
    sharded = tp * ep > 1
    descriptor = layout.checkpoint_descriptor(ckpt, ranks if sharded else None, tp, ep, pad_hidden)
    planned, layer_of = _plan_tensors(ckpt, layout, ranks if sharded else None, pad_hidden)
    by_prefix = {layer.prefix: layer for layer in ckpt.layers}
    # README.md and hf_quant_config.json describe the source: rewritten, with the originals kept (output/card.py)
    publish = publish_files(ckpt.root, source_label(src, ckpt.config, revision), descriptor)

    def compute(prefix: str) -> dict[str, Array]:
        layer = by_prefix[prefix]
        if sharded:
            return layout.convert_layer_ranks(ckpt, layer, ranks[prefix], device, pad_hidden)
        return layout.convert_layer(ckpt, layer, device, pad_hidden)

    job = CheckpointJob(
        source=ckpt.files,
        planned=planned,
        computed={key: layer.prefix for key, layer in layer_of.items()},
        compute=compute,
        metadata=layout.header_metadata(descriptor),
        part_metadata={r.part: {"nvfp4ckpt_rank": json.dumps(r.to_dict(), sort_keys=True)} for r in next(iter(ranks.values()))} if sharded else {},
        config=_output_config(ckpt, descriptor),
        max_shard_bytes=max_bytes,
        manifest_fields={"tool": "nvfp4ckpt", "layout": descriptor["layout"], "layout_version": descriptor["layout_version"]},
        options={"--max-shard-size": format_size(max_bytes), "--tp": tp, "--ep": ep, "--pad-hidden": pad_hidden},
        skip_files=publish.skip,
        files=publish.listed,
        unlisted_files=publish.unlisted,
    )
    if workers is not None and workers < 1:
        raise InputError("--workers must be at least 1")
    written = write_checkpoint(job, dst_path, progress, workers=workers or default_workers(), overwrite=overwrite, resume=resume)
    files = written.files
    return ConvertResult(
        source=ckpt.root,
        destination=dst_path,
        source_format=ckpt.format.name,
        architecture=ckpt.arch.name,
        num_moe_layers=len(ckpt.layers),
        files=files,
        bytes_written=sum(f["size"] for f in files),
        seconds=time.perf_counter() - start,
        descriptor=descriptor,
        reused=written.reused,
    )


# ----------------------------------------------------------------------------------------------
# Planning


def default_workers() -> int:
    """Layer threads: one per core left over by the writer's write and hash threads, 2 to 4. On the 2-core machine
    2 was faster than 1 in two alternating series (medians 8.16 vs 9.36 s and 10.02 vs 11.54 s, docs/benchmarks.md);
    beyond 4 the copy is memory- and disk-bound."""
    return max(2, min(4, (os.cpu_count() or 1) - 2))


def _plan_tensors(
    ckpt: SourceCheckpoint, layout, ranks: dict[str, list] | None = None, pad_hidden: int = 128
) -> tuple[list[PlannedTensor], dict[str, SourceMoELayer]]:
    """Every output tensor in a deterministic order: source names in natural order, each MoE
    layer's canonical tensors placed where its first expert tensor would have been."""
    expert_names = {}
    for layer in ckpt.layers:
        for n in layer.source_names():
            expert_names[n] = layer
    planned: list[PlannedTensor] = []
    layer_of: dict[str, SourceMoELayer] = {}
    emitted: set[str] = set()
    for name in sorted(ckpt.files.tensors, key=natural_key):
        layer = expert_names.get(name)
        if layer is None:
            info = ckpt.files.tensors[name]
            planned.append(PlannedTensor(name, info.dtype, info.shape))
        elif layer.prefix not in emitted:
            emitted.add(layer.prefix)
            specs = layout.layer_specs(layer, ckpt.format.name, None if ranks is None else ranks[layer.prefix], pad_hidden)
            for spec in specs:
                if spec.name in ckpt.files.tensors:
                    raise InputError(
                        f"{ckpt.files.info(spec.name).file}: tensor {spec.name!r} already exists next to per-expert tensors; "
                        "the checkpoint mixes fused and per-expert experts"
                    )
                planned.append(spec)
                layer_of[spec.key] = layer
    return planned, layer_of


# ----------------------------------------------------------------------------------------------
# Files


def _output_config(ckpt: SourceCheckpoint, descriptor: dict) -> dict:
    """config.json of the output: the source config with its quantization_config wrapped (see
    ``formats.base.KERNEL_QUANT_METHOD``): engines without the nvfp4ckpt plugin refuse it instead of shuffling twice."""
    config = json.loads(json.dumps(ckpt.config))
    qcfg = config.get("quantization_config")
    if not isinstance(qcfg, dict):
        # e.g. ModelOpt with only hf_quant_config.json: the plugins' dense layers need the flat form.
        qcfg = ckpt.format.flat_quantization_config()
    config["quantization_config"] = {
        "quant_method": KERNEL_QUANT_METHOD,
        SOURCE_QUANT_KEY: qcfg,
        DESCRIPTOR_KEY: descriptor,
    }
    return config
