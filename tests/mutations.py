"""Damage a converted checkpoint's MoE tensors the way a buggy tool would, keeping dtypes, shapes, scalars and the
manifest consistent, so that only checks which look at what the bytes mean can catch it (tests/test_verify_mutations.py,
scripts/verify_thresholds.py).

Every mutation takes the tensors of one safetensors file (or of one layer) by full name and an expert prefix
(``model.layers.1.mlp.experts.``, or ``""`` for a layer's tensors by short name) and returns whether it changed
anything (a file may hold only part of a layer).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from nvfp4ckpt.layouts.trtllm_gen import transform as layout

EXPERT = 3  # the expert every mutation damages (the examples have 8)


def _has(t: dict, p: str, *names: str) -> bool:
    return all(p + n in t for n in names)


def block_scale_step(t: dict, p: str, expert: int = EXPERT, row: int = 5, block: int = 1) -> bool:
    """One e4m3 block scale of one expert's down_proj one step up (the next e4m3 value: +1 on its byte)."""
    if not _has(t, p, "w2_weight", "w2_weight_scale"):
        return False
    down, ds = layout.w2_from_kernel(t[p + "w2_weight"], t[p + "w2_weight_scale"])
    b = ds.view(torch.uint8)
    assert 0 < int(b[expert, row, block]) < 0x7E, "pick a finite, non-maximal positive scale"
    b[expert, row, block] += 1
    t[p + "w2_weight"], t[p + "w2_weight_scale"] = layout.w2_to_kernel(down, ds)
    return True


def swap_experts(t: dict, p: str, a: int = EXPERT, b: int = EXPERT + 1) -> bool:
    """Experts a and b exchanged in every per-expert tensor (weights, block scales and scalars together)."""
    names = [n for n in t if n.startswith(p) and "." not in n[len(p) :] and t[n].dim() >= 1 and t[n].shape[0] > max(a, b)]
    for n in names:
        v = t[n].clone()
        v[[a, b]] = t[n][[b, a]]
        t[n] = v
    return bool(names)


def swap_gate_up(t: dict, p: str) -> bool:
    """Gate and up halves of w13 exchanged in every expert."""
    if not _has(t, p, "w13_weight", "w13_weight_scale"):
        return False
    gate, up, gs, us = layout.w13_from_kernel(t[p + "w13_weight"], t[p + "w13_weight_scale"])
    t[p + "w13_weight"], t[p + "w13_weight_scale"] = layout.w13_to_kernel(up, gate, us, gs)
    return True


def misplaced_row(t: dict, p: str, expert: int = EXPERT, row: int = 5) -> bool:
    """One up_proj row of one expert (codes and block scales) written where the next row belongs, and that one
    where it belongs: the smallest permutation error."""
    if not _has(t, p, "w13_weight", "w13_weight_scale"):
        return False
    gate, up, gs, us = layout.w13_from_kernel(t[p + "w13_weight"], t[p + "w13_weight_scale"])
    for x in (up, us.view(torch.uint8)):
        x[expert, [row, row + 1]] = x[expert, [row + 1, row]].clone()
    t[p + "w13_weight"], t[p + "w13_weight_scale"] = layout.w13_to_kernel(gate, up, gs, us)
    return True


MUTATIONS = {
    "block scale +1 step": block_scale_step,
    "experts swapped": swap_experts,
    "gate/up swapped": swap_gate_up,
    "row misplaced": misplaced_row,
}


def rewrite(dst: Path, edit, prefix: str) -> None:
    """Apply ``edit(tensors, prefix)`` to every safetensors file of a converted checkpoint folder, keeping the header
    metadata and re-hashing the manifest."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    manifest_path = dst / "nvfp4ckpt_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    changed = False
    for f in sorted(dst.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            meta = sf.metadata()
        tensors = load_file(f)
        if edit(tensors, prefix):
            changed = True
            save_file(tensors, f, metadata=meta)
            for entry in manifest["files"]:
                if entry["name"] == f.name:
                    entry["size"] = f.stat().st_size
                    entry["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    assert changed, f"{edit.__name__} found nothing to change under {prefix}"
    manifest_path.write_text(json.dumps(manifest))
