"""A converted folder one can publish: its model card and the engine-facing files convert rewrites.

``convert`` copies every non-weight file of the source except two, which would describe the converted folder
wrongly:

- ``README.md`` (the model card): its serving instructions are the source's. The output card is the source's card
  with ``nvfp4ckpt`` tags added to its YAML front matter and an nvfp4ckpt section put before its text (what was
  converted, the layout, how to serve it, how to verify it, and a verification part that ``verify --update-card``
  fills in). Without a source card, the card is that section alone.
- ``hf_quant_config.json`` (ModelOpt): TensorRT-LLM reads this file before config.json and would take the folder
  for plain ModelOpt NVFP4. The output file names ``quant_algo: NVFP4_TRTLLM``, a value no engine knows, so
  TensorRT-LLM refuses the folder at start-up; vLLM and SGLang read the file only when config.json has no
  ``quantization_config``, and a converted config.json always has one (``quant_method: nvfp4_trtllm``).

The source's own bytes of both files are kept in ``nvfp4ckpt_source/``; ``revert`` writes them back unchanged.
The card is the one file the manifest leaves out: ``verify --update-card`` and the publisher may edit it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import InputError
from ..io.json_input import MAX_JSON_BYTES, read_bounded

CARD = "README.md"
HF_QUANT = "hf_quant_config.json"
ORIGINALS = "nvfp4ckpt_source"  # the source's README.md and hf_quant_config.json, byte for byte
REWRITTEN = (CARD, HF_QUANT)
KERNEL_QUANT_ALGO = "NVFP4_TRTLLM"  # what the output hf_quant_config.json says: no engine's ModelOpt reader knows it
TAGS = ("nvfp4ckpt", "nvfp4")
BEGIN = "<!-- nvfp4ckpt:begin (written by nvfp4ckpt convert; revert restores the source's README.md) -->"
END = "<!-- nvfp4ckpt:end -->"
VERIFY_BEGIN = "<!-- nvfp4ckpt:verify:begin -->"
VERIFY_END = "<!-- nvfp4ckpt:verify:end -->"
# YAML front matter as the Hub reads it: "---" on the first line, up to the next line that is "---".
_FRONT = re.compile(r"\A(\ufeff?---[ \t]*\r?\n)(.*?)(\r?\n---[ \t]*(?:\r?\n|\Z))", re.DOTALL)


@dataclass
class PublishFiles:
    """What convert writes in place of the source's card and ModelOpt file."""

    listed: dict[str, bytes] = field(default_factory=dict)  # in the manifest (originals, hf_quant_config.json)
    unlisted: dict[str, bytes] = field(default_factory=dict)  # README.md: the manifest leaves it out
    skip: set[str] = field(default_factory=set)  # top-level source names not copied as they are


def publish_files(root: Path, label: str, descriptor: dict) -> PublishFiles:
    """The card, the rewritten hf_quant_config.json and the originals for a conversion of the source ``root``.
    ``label``: how the card names the source (a Hub id, or the folder's name: no machine paths, so the same input
    gives the same bytes everywhere)."""
    out = PublishFiles(skip={CARD, HF_QUANT})
    original_card = _read_top(root, CARD, "model card")
    if original_card is not None:
        out.listed[f"{ORIGINALS}/{CARD}"] = original_card
    out.unlisted[CARD] = build_card(original_card, label, descriptor).encode("utf-8")
    original_hf = _read_top(root, HF_QUANT, "ModelOpt quantization file")
    if original_hf is not None:
        out.listed[f"{ORIGINALS}/{HF_QUANT}"] = original_hf
        out.listed[HF_QUANT] = kernel_hf_quant_config().encode("utf-8")
    return out


def _read_top(root: Path, name: str, what: str) -> bytes | None:
    path = root / name
    if not path.is_file():
        return None
    return read_bounded(path, MAX_JSON_BYTES, what)


def kernel_hf_quant_config() -> str:
    """The output's hf_quant_config.json (ModelOpt's nested shape, so TensorRT-LLM's reader gets as far as
    ``QuantAlgo(quant_algo)`` and stops there with the value named)."""
    data = {
        "producer": {"name": "nvfp4ckpt", "version": __version__},
        "quantization": {
            "quant_algo": KERNEL_QUANT_ALGO,
            "note": (
                "routed experts are stored in FlashInfer's TRT-LLM-gen kernel layout (config.json "
                "quantization_config.moe_kernel_layout), not ModelOpt's: serve with the nvfp4ckpt plugin for SGLang "
                f"or vLLM. The source's file is {ORIGINALS}/{HF_QUANT}; nvfp4ckpt revert restores it."
            ),
        },
    }
    return json.dumps(data, indent=2) + "\n"


# ----------------------------------------------------------------------------------------------
# The card


def split_front_matter(text: str) -> tuple[str | None, str]:
    """(the YAML between the ``---`` lines or None, the rest of the card)."""
    m = _FRONT.match(text)
    if m is None:
        return None, text
    return m.group(2), text[m.end() :]


def tagged_front_matter(yaml_text: str | None) -> str | None:
    """The front matter with nvfp4ckpt's tags added (a new one holding only them when there was none). Front
    matter that is not a YAML mapping is kept as it is: the card must stay valid whatever the source held."""
    import yaml

    if yaml_text is None:
        return yaml.safe_dump({"tags": list(TAGS)}, sort_keys=False)
    try:
        data = yaml.safe_load(yaml_text)
    except yaml.YAMLError:
        return yaml_text
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return yaml_text
    tags = data.get("tags")
    if tags is None:
        tags = []
    elif isinstance(tags, str):
        tags = [tags]
    elif not isinstance(tags, list):
        return yaml_text  # an unusual value: not ours to reinterpret
    data["tags"] = tags + [t for t in TAGS if t not in tags]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1 << 20)


def build_card(original: bytes | None, label: str, descriptor: dict) -> str:
    """The output README.md: front matter (tags added), the nvfp4ckpt section, then the source's card."""
    body = ""
    front: str | None = None
    if original is not None:
        try:
            text = original.decode("utf-8")
        except UnicodeDecodeError:
            text = ""  # kept byte for byte in nvfp4ckpt_source/, but not quoted into a UTF-8 card
            body = f"\n(The source's model card is not UTF-8 text; it is kept as `{ORIGINALS}/{CARD}`.)\n"
        if text:
            front, body = split_front_matter(text)
            body = "\n## The source's model card\n\n" + body.lstrip("\r\n") if body.strip() else ""
    yaml_text = tagged_front_matter(front)
    head = f"---\n{yaml_text.rstrip(chr(10))}\n---\n" if yaml_text is not None else ""
    return head + section(label, descriptor) + body


def section(label: str, d: dict) -> str:
    routing = d.get("routing") or {}
    layers = d.get("layers") or {}
    parallel = d.get("parallel") or {}
    tp, ep = int(parallel.get("tp", 1)), int(parallel.get("ep", 1))
    fmt = {"modelopt": "ModelOpt NVFP4", "compressed-tensors": "compressed-tensors nvfp4-pack-quantized"}.get(
        d.get("source_format", ""), str(d.get("source_format"))
    )
    h, hp = d.get("hidden_size"), d.get("hidden_size_padded")
    i, ip = d.get("intermediate_size"), d.get("intermediate_size_padded")
    sizes = f"hidden {h}" + (f" (stored padded to {hp})" if hp != h else "")
    sizes += f", intermediate {i}" + (f" (stored padded to {ip})" if ip != i else "")
    ranks = f"\n| ranks | `--tp {tp} --ep {ep}`: each MoE rank's experts in `ranks/rank-NNN/` |" if tp * ep > 1 else ""
    gated = d.get("activation", "swiglu") != "relu2"
    w13 = "`[up; gate]` rows, interleaved for the gated activation" if gated else "`up` rows (non-gated relu2)"
    vllm_note = ""
    if hp is not None and hp % 256:
        vllm_note = " vLLM needs the hidden size padded to 256: convert again with `--pad-hidden 256` to serve with vLLM."
    return f"""{BEGIN}
# {label}, kernel-ready for FlashInfer's TRT-LLM-gen fused MoE

This is **{label}** with its routed experts rewritten once, offline, into the layout of FlashInfer's
`trtllm_fp4_block_scale_moe` kernel by nvfp4ckpt {d.get("tool_version", __version__)}. Engines
serve it with the nvfp4ckpt plugin and no re-shuffle at start-up or weight reload. It is not a drop-in copy of the
source: the source's model card, below this section, describes the source checkpoint, and its serving instructions
do not apply to this folder.

## What was converted

| | |
|---|---|
| source | `{label}`, {fmt} |
| architecture | `{d.get("architecture")}`: {len(layers)} MoE layers, {routing.get("num_experts")} experts, top-{routing.get("top_k")}, routing `{routing.get("method")}` |
| expert sizes | {sizes} |{ranks}
| everything else | carried over byte for byte (attention, dense and shared-expert layers, routers, norms, embeddings, tokenizer) |

## Layout

- Each MoE layer `P` holds `P.w13_weight` / `P.w13_weight_scale` ({w13}, then `shuffle_matrix_a` with
  `epilogue_tile_m` {d.get("epilogue_tile_m")}; block scales swizzled {d.get("scale_swizzle")}), `P.w2_weight` /
  `P.w2_weight_scale`, and the kernel's float32 scalars (`g1_alphas`, `g1_scale_c`, `g2_alphas`,
  `w13_input_scale_quant`, the weight and input scales).
- `config.json` → `quantization_config`: `quant_method` is `nvfp4_trtllm`, `moe_kernel_layout` the layout
  descriptor (`{d.get("layout")}` version {d.get("layout_version")}), `source_quantization_config` the source's own
  section. Engines without the plugin refuse the folder instead of shuffling the experts a second time.
- `hf_quant_config.json` (ModelOpt sources) names `quant_algo: {KERNEL_QUANT_ALGO}`, so TensorRT-LLM, which reads
  that file first, refuses the folder too. The source's copy is `{ORIGINALS}/{HF_QUANT}`.
- `nvfp4ckpt_manifest.json` lists the size and sha256 of every file except this card.

## Serving

```bash
MODEL=path/to/this-folder   # or the Hub repo it was uploaded to
pip install -e "./nvfp4ckpt[sglang]"   # or [vllm]: the plugin from a clone of nvfp4ckpt, next to the engine
python -m sglang.launch_server --model-path $MODEL --quantization nvfp4_trtllm --moe-runner-backend flashinfer_trtllm
vllm serve $MODEL --quantization nvfp4_trtllm --load-format nvfp4_trtllm --moe-backend flashinfer_trtllm
```

The TRT-LLM-gen kernel needs a Blackwell GPU (SM100/SM103).{vllm_note}

## Verification

{VERIFY_BEGIN}
Not verified yet. `nvfp4ckpt verify $MODEL --source {label} --update-card` checks the structure and every
file's sha256, the exact layout against the source (byte for byte) and the fused MoE against a float32 reference
(`--gsm8k`: GSM8K end to end as well), and writes its summary here.
{VERIFY_END}

## Reverting

`nvfp4ckpt revert $MODEL OUT` writes the source checkpoint back: every tensor byte-identical, and the source's
`README.md` and `hf_quant_config.json` restored from `{ORIGINALS}/`.
{END}
"""


# ----------------------------------------------------------------------------------------------
# verify --update-card


def check_card(root: Path) -> Path:
    """The card ``verify --update-card`` will write into, checked before the run (a missing section fails now,
    not after an hour of GSM8K)."""
    path = Path(root) / CARD
    if path.is_symlink() or not path.is_file():
        raise InputError(
            f"{path}: no model card to update (convert writes one; this folder was converted by an nvfp4ckpt without "
            "model cards, or the card was removed); convert again, or run verify without --update-card"
        )
    text = read_bounded(path, MAX_JSON_BYTES, "model card").decode("utf-8", errors="replace")
    if VERIFY_BEGIN not in text or VERIFY_END not in text or text.index(VERIFY_BEGIN) > text.index(VERIFY_END):
        raise InputError(
            f"{path}: the model card has no nvfp4ckpt verification part ({VERIFY_BEGIN} ... {VERIFY_END}); put the "
            "two markers back where the summary belongs, or run verify without --update-card"
        )
    return path


def update_card(root: Path, summary: str) -> Path:
    """Replace the card's verification part with ``summary`` (markdown), atomically."""
    from .safe_paths import write_output_file

    path = check_card(root)
    text = read_bounded(path, MAX_JSON_BYTES, "model card").decode("utf-8")
    start = text.index(VERIFY_BEGIN) + len(VERIFY_BEGIN)
    end = text.index(VERIFY_END)
    write_output_file(path, (text[:start] + "\n" + summary.strip("\n") + "\n" + text[end:]).encode("utf-8"))
    return path


def _cell(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def verify_summary(report, gsm8k=None, command: str = "nvfp4ckpt verify") -> str:
    """The verification part of the card for a ``VerifyReport`` (and its GSM8K report): the verdict, each check's
    one-line summary, and GSM8K's numbers. No dates or timings: the same run gives the same text."""
    verdict = "PASS" if report.passed else "FAIL"
    lines = [
        f"**{verdict}**: `{command}` with nvfp4ckpt {__version__}"
        + (f", source `{Path(report.source).name}`" if report.source else ", without the source (self-consistency only)")
        + ".",
        "",
        "| check | status | details |",
        "|---|---|---|",
    ]
    lines += [f"| {c.name} | {c.status} | {_cell(c.summary)} |" for c in report.checks]
    if gsm8k is not None:
        s = gsm8k.settings
        conv = gsm8k.converted
        line = (
            f"GSM8K: {conv.num_questions} questions, {s.get('num_shots')}-shot, at most {s.get('max_new_tokens')} new "
            f"tokens, {s.get('backend')} backend on {s.get('device_name') or s.get('device')}: converted "
            f"{conv.accuracy:.1f}%"
        )
        if gsm8k.source_side is not None:
            line += f", source {gsm8k.source_side.accuracy:.1f}%"
            if gsm8k.identical is not None:
                line += f", completions identical on {100 * gsm8k.identical:.1f}%"
            if gsm8k.agreement is not None:
                line += f", answers agree on {100 * gsm8k.agreement:.1f}%"
        elif gsm8k.baseline_accuracy is not None:
            line += f", baseline {gsm8k.baseline_accuracy:.1f}%"
        lines += ["", line + "."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# revert


def restore_plan(converted_root: Path) -> PublishFiles:
    """What revert writes in place of the converted folder's card and ModelOpt file: the originals kept in
    ``nvfp4ckpt_source/``; a card or file convert made with no original behind it is dropped; a folder converted
    before cards existed keeps its files as they are."""
    root = Path(converted_root)
    out = PublishFiles(skip={ORIGINALS})
    for name in REWRITTEN:
        kept = root / ORIGINALS / name
        if kept.is_file():
            out.skip.add(name)
            out.listed[name] = read_bounded(kept, MAX_JSON_BYTES, "kept source file")
        elif _written_by_convert(root / name):
            out.skip.add(name)
    return out


def _written_by_convert(path: Path) -> bool:
    if not path.is_file():
        return False
    head = read_bounded(path, MAX_JSON_BYTES, "file")
    if path.name == CARD:
        return BEGIN.encode() in head
    try:
        data = json.loads(head)
    except ValueError:
        return False
    return isinstance(data, dict) and (data.get("producer") or {}).get("name") == "nvfp4ckpt"


def hf_quant_root(converted_root: Path) -> Path:
    """Where the source's hf_quant_config.json is in a converted folder (``nvfp4ckpt_source/``, or the folder
    itself for one converted before it was rewritten)."""
    kept = Path(converted_root) / ORIGINALS
    return kept if (kept / HF_QUANT).is_file() else Path(converted_root)


def source_label(src: str | Path, config: dict, revision: str | None = None) -> str:
    """How the card names the source, from the input's content only (a copy of the folder under another name gives
    the same card): the Hub id it was downloaded from (with its revision), else config.json's ``_name_or_path``
    (a Hub id, or the last part of a producer's path), else a description."""
    if not os.path.exists(os.path.expanduser(str(src))):
        return f"{src}@{revision}" if revision else str(src)
    name = config.get("_name_or_path")
    if isinstance(name, str) and name.strip():
        name = name.strip().rstrip("/")
        return name if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) else (name.replace("\\", "/").rsplit("/", 1)[-1] or name)
    return "the source checkpoint"


__all__ = [
    "CARD",
    "HF_QUANT",
    "KERNEL_QUANT_ALGO",
    "ORIGINALS",
    "PublishFiles",
    "build_card",
    "check_card",
    "hf_quant_root",
    "publish_files",
    "restore_plan",
    "source_label",
    "split_front_matter",
    "update_card",
    "verify_summary",
]
