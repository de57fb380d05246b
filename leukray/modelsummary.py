"""What a model costs: layer table, parameter count and FLOPs (`leukray report`'s Model section).

Next to `leukray.model` (which builds the networks) but apart from it: summarizing runs
one forward pass under `FlopCounterMode` with hooks, which training and scoring never need.
"""

from __future__ import annotations

from typing import Any


def si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _display_modules(model) -> list[tuple[str, Any, int]]:
    """(name, module, depth) rows for the layer table: the root's children, the network's
    children, and one more level inside plain containers (Sequential, ModuleList), so
    LeukNet shows its conv blocks and torchvision models their stages, not every BatchNorm."""
    from torch import nn

    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    rows = []

    def visit(prefix: str, module, depth: int) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            rows.append((full, child, depth))
            has_children = any(True for _ in child.children())
            if has_children and (depth == 0 or (depth == 1 and type(child) in containers)):
                visit(full, child, depth + 1)

    visit("", model, 0)
    return rows


def model_summary(model, image_size: int) -> dict:
    """Layer table with output shapes, parameter count and FLOPs for one (1, S, S, 3) uint8
    image. FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (a multiply-add is
    2 FLOPs), i.e. the cost of scoring one image at the size the model was trained on."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    rows = _display_modules(model)
    shapes: dict[str, str] = {}
    hooks = []
    for name, module, _ in rows:
        def hook(_m, _inp, output, name=name):
            if isinstance(output, torch.Tensor):
                shapes[name] = "x".join(map(str, output.shape))
        hooks.append(module.register_forward_hook(hook))
    x = torch.zeros((1, image_size, image_size, 3), dtype=torch.uint8)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    table = []
    for name, module, depth in rows:
        flops = sum(per_module.get(f"{root}.{name}", {}).values())
        table.append({
            "name": "  " * depth + name, "type": type(module).__name__, "output": shapes.get(name, "-"),
            "params": sum(p.numel() for p in module.parameters()), "flops": flops,
        })
    return {
        "input": f"1x{image_size}x{image_size}x3 uint8",
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "flops": int(counter.get_total_flops()),
        "layers": table,
        "repr": repr(model),
    }


def format_summary(s: dict) -> str:
    """The layer table as fixed-width text (used in model_summary.txt and the report)."""
    w = max([len(r["name"]) for r in s["layers"]] + [5])
    t = max([len(r["type"]) for r in s["layers"]] + [4])
    o = max([len(r["output"]) for r in s["layers"]] + [6])
    lines = [f"{'layer':<{w}}  {'type':<{t}}  {'output':<{o}}  {'params':>10}  {'FLOPs':>10}"]
    for r in s["layers"]:
        lines.append(f"{r['name']:<{w}}  {r['type']:<{t}}  {r['output']:<{o}}  {r['params']:>10,}  "
                     f"{si(r['flops']) if r['flops'] else '-':>10}")
    lines += [
        "",
        f"input       {s['input']}",
        f"parameters  {s['params']:,} ({s['trainable']:,} trainable)",
        f"FLOPs       {s['flops']} ({si(s['flops'])}FLOPs per image; {si(s['flops'] / 2)}MACs)",
    ]
    return "\n".join(lines)
