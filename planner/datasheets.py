"""Which datasheet in profiles/devices/ a GPU is, from the name torch gives it and its memory: `planner profile`
names a measured profile after it, so that the cluster presets, which name datasheets, use the measurement."""

from __future__ import annotations

import re

from planner.parsing import read_mapping
from planner import specs

GPU_FORMS = ("sxm", "pcie", "nvl")
"""Form factors a GPU's name may give (NVIDIA A100-SXM4-80GB, H100 PCIe, H200 NVL): one that differs from a
datasheet's rules the datasheet out, since the same chip runs at other clocks, power and links there."""


GPU_VARIANTS = ("d", "ti", "super")
"""Words after a chip's name that make it another part (GeForce RTX 4090 D, RTX 4070 Ti SUPER)."""


def datasheet_for(gpu_name: str, memory_gib: float) -> str | None:
    """The datasheet in profiles/devices/ of a GPU named `gpu_name` (torch.cuda.get_device_name) with this much
    memory: the chip the datasheet's name begins with (h200, rtx4090) is a word of the GPU's name (or two words
    together: RTX 4090; not GH200), its memory is within 5% of the datasheet's, and the GPU's name gives no other
    form factor. None if no datasheet is that GPU's. `planner profile` names a measured profile so, and the
    cluster presets, which name datasheets, then use it."""
    words = re.findall(r"[a-z0-9]+", gpu_name.lower()) + [""]
    # A chip is a word, or two words together, not followed by a variant's suffix (RTX 4090 D is a slower 4090).
    names = ({a for a, nxt in zip(words, words[1:]) if nxt not in GPU_VARIANTS}
             | {a + b for a, b, nxt in zip(words, words[1:], words[2:]) if nxt not in GPU_VARIANTS})
    forms = [f for f in GPU_FORMS if any(w.startswith(f) for w in words)]
    for path in sorted((specs.PROFILES_DIR / "devices").glob("*.json")):
        name = path.name.removesuffix(".json")
        if name.endswith(".measured") or "-" not in name:
            continue
        chip, form = name.split("-")[:2]
        if chip in names and (not forms or form.startswith(tuple(forms))):
            sheet = read_mapping(path).get("memory_gib", 0)
            if abs(memory_gib - sheet) <= 0.05 * sheet:
                return name
    return None
