"""The speed bench's variant matrix: every run `bench/train.py` can make, by name, and the groups that
reproduce a claim in one call (`python bench/train.py list` prints them).

A variant is a runner (cptkit, the seed's recipe, unsloth), a mode, a model shape, rows of `seq` x
`batch`, the LoRA settings and the checkpointing setting, plus cptkit config overrides. Every variant
not stated otherwise uses LoRA r=16 alpha=32 on all seven linear layers, rows of 2048 x 8.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int | None) -> dict:
    """LlamaConfig sizes; vocab None: the bench tokenizer's."""
    sizes = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
    )
    return sizes if vocab is None else {**sizes, "vocab_size": vocab}


# Random-init Llama shapes; `tiny` stands in for every shape under --tiny (CPU check of the script).
SHAPES = {
    "llama3-8b": _llama(4096, 32, 32, 8, 14336, 128256),
    "llama-1b": _llama(2048, 16, 32, 8, 8192, 128256),
    "tiny": _llama(128, 2, 4, 2, 256, None),
}
TINY_BATCH = 2
SEED_PRESET = Path(__file__).resolve().parents[1] / "src/cptkit/presets/seed-llama3-8b-qlora.yaml"


@dataclass(frozen=True)
class Variant:
    """One training run of the bench."""

    name: str
    runner: str  # cptkit | seed | unsloth
    mode: str  # lora | qlora | full
    shape: str = "llama3-8b"
    seq: int = 2048
    batch: int = 8
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ALL_LINEAR
    double_quant: bool = True  # NF4 double quantisation (cptkit's default; the seed's recipe: off)
    # cptkit: auto | true | false; seed: true (its recipe); unsloth: unsloth (offloaded) | false
    checkpointing: str = "auto"
    overrides: tuple[str, ...] = ()  # further cptkit config overrides (memory budget, kernels)
    groups: tuple[str, ...] = field(default=(), compare=False)

    def for_tiny(self) -> Variant:
        """The same run on the tiny shape with rows an eighth as long (distinct lengths stay distinct):
        what a CPU can check in seconds."""
        return replace(self, shape="tiny", seq=self.seq // 8, batch=min(self.batch, TINY_BATCH))

    def cptkit_overrides(self) -> list[str]:
        """The variant as `cptkit train` config overrides (cptkit runner only)."""
        assert self.runner == "cptkit", self.name
        lora = [
            f"train.lora.r={self.lora_r}",
            f"train.lora.alpha={self.lora_alpha}",
            f"train.lora.dropout={self.lora_dropout}",
            f"train.lora.target_modules=[{','.join(self.lora_targets)}]",
        ]
        return [
            f"train.mode={self.mode}",
            f"train.gradient_checkpointing={self.checkpointing}",
            f"train.quantization.double_quant={str(self.double_quant).lower()}",
            f"train.hf.per_device_train_batch_size={self.batch}",
            *(lora if self.mode != "full" else []),
            *self.overrides,
        ]

    def describe(self) -> str:
        lora = "" if self.mode == "full" else f" r{self.lora_r}/a{self.lora_alpha} d{self.lora_dropout:g}"
        targets = (
            ""
            if self.lora_targets == ALL_LINEAR or self.mode == "full"
            else f" {'+'.join(self.lora_targets)}"
        )
        extra = f" {' '.join(self.overrides)}" if self.overrides else ""
        return (
            f"{self.runner} {self.mode} {self.shape} {self.seq}x{self.batch}{lora}{targets} "
            f"checkpointing={self.checkpointing}{extra}"
        )


def _seed_preset() -> dict:
    """The shipped seed preset's settings that decide speed (read from the file, so the bench follows it)."""
    cfg = yaml.safe_load(SEED_PRESET.read_text())
    train = cfg["train"]
    return dict(
        mode=train["mode"],
        seq=cfg["data"]["seq_length"],
        batch=train["hf"]["per_device_train_batch_size"],
        lora_r=train["lora"]["r"],
        lora_alpha=train["lora"]["alpha"],
        lora_dropout=train["lora"].get("dropout", 0.0),
        lora_targets=tuple(train["lora"]["target_modules"]),
        double_quant=train["quantization"].get("double_quant", True),
        checkpointing=str(train.get("gradient_checkpointing", "auto")).lower(),
    )


def _matrix() -> list[Variant]:
    v: list[Variant] = []
    for mode in ("lora", "qlora"):  # the table
        for dropout, d in ((0.05, "d05"), (0.0, "d0")):
            for ckpt, c in (("true", "ckpt"), ("false", "nockpt")):
                v.append(
                    Variant(
                        f"cptkit-{mode}-{d}-{c}",
                        "cptkit",
                        mode,
                        lora_dropout=dropout,
                        checkpointing=ckpt,
                        groups=("issue",),
                    )
                )
    for mode in ("lora", "qlora"):
        v.append(
            Variant(
                f"unsloth-{mode}-offload",
                "unsloth",
                mode,
                checkpointing="unsloth",
                groups=("issue",) + (("budget24",) if mode == "qlora" else ()),
            )
        )
        v.append(Variant(f"unsloth-{mode}-nockpt", "unsloth", mode, checkpointing="false", groups=("issue",)))
        v.append(
            Variant(
                f"seed-{mode}",
                "seed",
                mode,
                lora_dropout=0.05,
                double_quant=False,
                checkpointing="true",
                groups=("issue",),
            )
        )
    for mode in ("lora", "qlora"):
        v.append(Variant(f"cptkit-{mode}-default", "cptkit", mode, groups=("default",)))
        v.append(
            Variant(
                f"cptkit-{mode}-budget24",
                "cptkit",
                mode,
                overrides=("train.memory_budget=24GiB",),
                groups=("budget24",),
            )
        )
    for batch in (1, 2):
        v.append(
            Variant(
                f"cptkit-qlora-8192x{batch}-budget24",
                "cptkit",
                "qlora",
                seq=8192,
                batch=batch,
                overrides=("train.memory_budget=24GiB",),
                groups=("long",),
            )
        )
    v.append(Variant("cptkit-full-1b-default", "cptkit", "full", shape="llama-1b", groups=("full1b",)))
    preset = _seed_preset()
    v.append(Variant("cptkit-seed-preset", "cptkit", groups=("seed-preset",), **preset))
    v.append(
        Variant("seed-at-preset", "seed", groups=("seed-preset",), **{**preset, "checkpointing": "true"})
    )
    for kernel in ("fast_lora", "rms_norm", "swiglu", "rope"):
        v.append(
            Variant(
                f"cptkit-lora-{kernel}-off",
                "cptkit",
                "lora",
                overrides=(f"train.kernels.{kernel}=off",),
                groups=("kernels",),
            )
        )
    v.append(
        Variant(
            "cptkit-lora-compile-on",
            "cptkit",
            "lora",
            overrides=("train.kernels.compile=on",),
            groups=("kernels",),
        )
    )
    return v


VARIANTS: dict[str, Variant] = {v.name: v for v in _matrix()}
GROUPS: dict[str, list[str]] = {}
for _v in VARIANTS.values():
    for _g in _v.groups:
        GROUPS.setdefault(_g, []).append(_v.name)
# the kernels group is measured against the default it switches one kernel off from
GROUPS["kernels"].insert(0, "cptkit-lora-default")


def select(names: str | None, groups: str | None) -> list[Variant]:
    """The variants named and those of the groups named (both comma-separated), in that order, each
    once; ValueError naming what exists for an unknown name."""
    wanted = [n for n in (names or "").split(",") if n]
    for group in filter(None, (groups or "").split(",")):
        if group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; groups: {', '.join(GROUPS)}")
        wanted += GROUPS[group]
    unknown = [n for n in wanted if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; `bench/train.py list` shows them")
    return [VARIANTS[n] for n in dict.fromkeys(wanted)]


def listing() -> str:
    """The matrix and the groups, as `bench/train.py list` prints them."""
    width = max(len(n) for n in VARIANTS)
    lines = [f"{v.name:{width}}  {v.describe()}" for v in VARIANTS.values()]
    lines += ["", "groups:"] + [f"  {g:12} {','.join(names)}" for g, names in GROUPS.items()]
    return "\n".join(lines)
