"""The precision part of `rayq bench train`: bf16 native vs emulated, emulated fp16 with eager or
fused (compiled) rounding, and what `precision_mode: auto` picks on this CPU — each as tokens/s of
the one rayq loop on the same data, beside the fp32 figure of the same run.
"""

from __future__ import annotations

import os

from rayq import config as config_io
from rayq import precision


def precision_report(cfg, data, fp32_tokens_per_s: float, say, local_rate, fused: bool = True) -> dict:
    """bf16 native vs emulated, emulated fp16 (eager and fused rounding) and what
    `precision_mode: auto` picks on this CPU, each as tokens/s of the rayq loop (same data;
    `local_rate(cfg, data)` runs it in-process)."""
    def rate(prec: str, mode: str) -> float:
        run_cfg = config_io.with_values(cfg, {"recipe.precision": prec, "recipe.precision_mode": mode})
        return local_rate(run_cfg, data)

    out: dict = {"fp32_tokens_per_s": fp32_tokens_per_s}
    for prec, mode in (("bf16", "native"), ("bf16", "emulated"), ("fp16", "emulated")):
        say(f"rayq loop without Ray ({mode} {prec})")
        out[f"{prec}_{mode}_tokens_per_s"] = rate(prec, mode)
    if not fused:  # the compile alone takes 40 s or more here: not in a smoke test
        out["fp16_emulated_fused_tokens_per_s"] = None
    else:
        say("rayq loop without Ray (emulated fp16, fused compiled rounding; includes one compile in warm-up)")
        out.update(_fused_fp16(rate))
    probe = precision.native_bf16_probe()
    auto = precision.PrecisionPolicy.from_recipe(config_io.with_values(cfg, {"recipe.precision": "bf16"}).recipe, "cpu")
    out["auto_bf16_mode"], out["auto_bf16_reason"], out["bf16_probe"] = auto.mode, auto.reason, probe
    bf16 = out["bf16_native_tokens_per_s"]
    out["bf16_native_vs_fp32"] = bf16 / fp32_tokens_per_s
    out["bf16_native_slower_than_fp32"] = bf16 < fp32_tokens_per_s  # where true, auto should emulate
    out["fp16_emulated_vs_bf16_native"] = out["fp16_emulated_tokens_per_s"] / bf16
    if out["fp16_emulated_fused_tokens_per_s"]:
        out["fp16_emulated_fused_vs_bf16_native"] = out["fp16_emulated_fused_tokens_per_s"] / bf16
        out["fp16_fused_vs_eager_rounding"] = out["fp16_emulated_fused_tokens_per_s"] / out["fp16_emulated_tokens_per_s"]
    return out


def _fused_fp16(rate) -> dict:
    """Emulated fp16 with RAYQ_FUSED_ROUNDING=1 for this one run (the env is restored after)."""
    before = os.environ.get("RAYQ_FUSED_ROUNDING")
    os.environ["RAYQ_FUSED_ROUNDING"] = "1"
    try:
        return {"fp16_emulated_fused_tokens_per_s": rate("fp16", "emulated"),
                "fused_rounding_active": precision.fused_round() is not None}
    finally:
        if before is None:
            os.environ.pop("RAYQ_FUSED_ROUNDING", None)
        else:
            os.environ["RAYQ_FUSED_ROUNDING"] = before
