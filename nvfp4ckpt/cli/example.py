"""``nvfp4ckpt example OUT``: the built-in tiny NVFP4 MoE checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from ..example import SHAPES, write_example
from ..source import architectures
from ..source.formats import SourceFormat
from ._options import JsonOpt, OutArg, OverwriteOpt, QuietOpt
from ..io import count
from ._output import Output

EXAMPLE_EXAMPLES = """Examples:\n\n  nvfp4ckpt example ./tiny\n\n  nvfp4ckpt example ./tiny-ds --arch deepseek_v3 --format compressed-tensors\n\n  nvfp4ckpt example ./q30 --shape qwen3-30b-a3b --layers 8 --max-shard-size 2GB"""


def example(
    out: OutArg,
    format: Annotated[SourceFormat, typer.Option("--format", help="Source format.")] = SourceFormat.MODELOPT,
    arch: Annotated[str, typer.Option("--arch", help=f"Family, by name or by any transformers model_type it covers (see `nvfp4ckpt inspect --families`): {', '.join(a.name for a in architectures.registered())}.")] = "qwen3_moe",
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Random seed (same seed, same bytes).")] = 0,
    shards: Annotated[int, typer.Option("--shards", min=1, help="Number of safetensors shards (tiny example).")] = 2,
    shape: Annotated[str | None, typer.Option("--shape", help=f"Synthetic checkpoint at real layer shapes: {' | '.join(SHAPES)}.")] = None,
    layers: Annotated[int | None, typer.Option("--layers", min=1, help="MoE decoder layers (with --shape; default: the model's).")] = None,
    max_shard_size: Annotated[str | None, typer.Option("--max-shard-size", help="Shard size with --shape (default 5GB).")] = None,
    untied_gate_up: Annotated[bool, typer.Option("--untied-gate-up", help="Give gate and up their own global scales (the producers share one; vLLM refuses it).")] = False,
    overwrite: OverwriteOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a tiny, seeded NVFP4 MoE checkpoint (config, tokenizer, sharded weights)."""
    output = Output(json_mode=json, quiet=quiet, command="example")
    with output.progress() as view:
        result = write_example(
            out, format=format.value, arch=arch, seed=seed, shards=shards, overwrite=overwrite, shape=shape,
            layers=layers, max_shard_size=max_shard_size, progress=lambda label, done, total: view.update(label, done, total, "B"),
            untied_gate_up=untied_gate_up,
        )
    output.result({"path": str(result.path), "architecture": result.architecture, "format": result.format, "files": result.files, "num_tensors": result.num_tensors})
    output.text(f"wrote {result.architecture} {result.format} example ({count(result.num_tensors, 'tensor')}) to {result.path}")
