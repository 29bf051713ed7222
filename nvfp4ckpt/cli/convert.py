"""``nvfp4ckpt convert SRC DST``: write the kernel-ready checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..convert import DEFAULT_MAX_SHARD_SIZE, convert_checkpoint
from ._options import JsonOpt, OutArg, OverwriteOpt, QuietOpt, RevisionOpt, SrcArg
from ..io import count, format_size
from ._output import Output

CONVERT_EXAMPLES = """Examples:\n\n  nvfp4ckpt convert ./Qwen3-30B-A3B-NVFP4 ./Qwen3-30B-A3B-NVFP4-trtllm\n\n  nvfp4ckpt convert nvidia/DeepSeek-R1-NVFP4 ./r1-trtllm --max-shard-size 5GB --quiet\n\n  nvfp4ckpt convert nvidia/DeepSeek-R1-NVFP4 ./r1-trtllm --max-shard-size 5GB --resume   # after a crash or a full disk"""


def convert(
    src: SrcArg,
    dst: OutArg,
    overwrite: OverwriteOpt = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB.")] = DEFAULT_MAX_SHARD_SIZE,
    device: Annotated[str, typer.Option("--device", help="Where to run the byte permutation: cpu or cuda.")] = "cpu",
    revision: RevisionOpt = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Threads reading and transforming layers ahead of the writer (default: cores minus 2, from 2 to 4). Output bytes do not depend on it.")] = None,
    tp: Annotated[int, typer.Option("--tp", min=1, help="MoE tensor parallelism: split each expert's intermediate size over T ranks.")] = 1,
    ep: Annotated[int, typer.Option("--ep", min=1, help="Expert parallelism: split the experts over P ranks (T*P rank folders).")] = 1,
    pad_hidden: Annotated[int, typer.Option("--pad-hidden", min=128, help="Zero-pad the MoE hidden size to a multiple of this: 128 (the kernel's need), 256 (what vLLM pads to; needed to serve with vLLM when H % 256 != 0) or 512 (vLLM/SGLang with per-token activation scales on non-gated experts).")] = 128,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run into DST: keep its finished shards (re-hashed), write the rest. Without it a leftover partial folder is removed.")] = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Pre-apply the TRT-LLM-gen shuffle and swizzle to every MoE layer of SRC and write DST."""
    out = Output(json_mode=json, quiet=quiet, command="convert")
    with out.progress() as view:
        result = convert_checkpoint(
            src, dst, overwrite=overwrite, max_shard_size=max_shard_size, device=device, revision=revision,
            progress=out.writer_progress(view), workers=workers, tp=tp, ep=ep, resume=resume, pad_hidden=pad_hidden,
        )
    out.result(result.to_dict())
    reused = set(result.reused)
    columns = ("file", "size", "sha256", "resumed") if resume else ("file", "size", "sha256")
    table = Table(*columns, title=f"{result.destination}", title_justify="left")
    for f in result.files:
        row = [f["name"], format_size(f["size"]), f["sha256"][:16] + "..."]
        table.add_row(*row, *(["reused" if f["name"] in reused else ""] if resume else []))
    out.table(table)
    out.text(
        f"converted {count(result.num_moe_layers, 'MoE layer')} ({result.architecture}, {result.source_format}) "
        f"in {result.seconds:.2f} s, {format_size(result.bytes_written)} written"
        + (f" ({count(len(reused), 'shard')} reused from the interrupted run, not rewritten)" if resume else "")
    )
