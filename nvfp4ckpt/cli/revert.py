"""``nvfp4ckpt revert DST OUT``: back to the source format, byte-identical per tensor."""

from __future__ import annotations

from typing import Annotated

import typer

from ..revert import DEFAULT_MAX_SHARD_SIZE, revert_checkpoint
from ._options import JsonOpt, OutArg, OverwriteOpt, QuietOpt
from ..io import count, format_size
from ._output import Output

REVERT_EXAMPLES = """Examples:\n\n  nvfp4ckpt revert ./qwen3-trtllm ./qwen3-modelopt"""


def revert(
    dst: Annotated[str, typer.Argument(help="Converted checkpoint folder (what `convert` wrote).", show_default=False)],
    out: OutArg,
    overwrite: OverwriteOpt = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB.")] = DEFAULT_MAX_SHARD_SIZE,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run into OUT, keeping its finished shards.")] = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write the source-format checkpoint (ModelOpt or compressed-tensors, as recorded) back."""
    output = Output(json_mode=json, quiet=quiet, command="revert")
    with output.progress() as view:
        result = revert_checkpoint(
            dst, out, overwrite=overwrite, max_shard_size=max_shard_size, resume=resume, progress=output.writer_progress(view)
        )
    output.result(result.to_dict())
    total = sum(f["size"] for f in result.files)
    output.text(
        f"reverted {count(result.num_moe_layers, 'MoE layer')} to {result.source_format} in {result.seconds:.2f} s "
        f"({format_size(total)}) at {result.destination}"
    )
