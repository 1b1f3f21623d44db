"""The GPUs `cptkit plan --gpu NAME` knows: memory and dense bf16 tensor-core peak, from the vendors'
data sheets (no sparsity), and the one present (torch.cuda) when there is one.

Memory is the total `nvidia-smi` reports (MiB), the figure the training budget is taken from; the
default budget leaves `cptkit.train.memory.DEFAULT_MARGIN` of it to CUDA and the allocator."""

from __future__ import annotations

from dataclasses import dataclass

from cptkit.errors import CptkitError

MIB = 1 << 20


@dataclass(frozen=True)
class Gpu:
    """One GPU model: its name on the command line, its full name, memory and bf16 peak."""

    name: str
    label: str
    memory_bytes: int
    peak_bf16_tflops: float

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / (1 << 30)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "label": self.label,
            "memory_bytes": self.memory_bytes,
            "peak_bf16_tflops": self.peak_bf16_tflops,
        }


def _gpu(name: str, label: str, memory_mib: int, peak: float) -> Gpu:
    return Gpu(name, label, memory_mib * MIB, peak)


# name -> GPU; peaks are the data sheets' dense BF16 (FP32 accumulate for the GeForce cards) TFLOP/s
CATALOG = {
    g.name: g
    for g in (
        _gpu("h200", "NVIDIA H200 SXM 141GB", 143_771, 989.0),
        _gpu("h100-80gb", "NVIDIA H100 SXM 80GB", 81_559, 989.0),
        _gpu("h100-pcie", "NVIDIA H100 PCIe 80GB", 81_559, 756.0),
        _gpu("h100-94gb", "NVIDIA H100 NVL 94GB", 95_830, 835.0),
        _gpu("a100-80gb", "NVIDIA A100 80GB", 81_920, 312.0),
        _gpu("a100-40gb", "NVIDIA A100 40GB", 40_960, 312.0),
        _gpu("l40s", "NVIDIA L40S 48GB", 46_068, 362.0),
        _gpu("rtx6000-ada", "NVIDIA RTX 6000 Ada 48GB", 49_140, 364.0),
        _gpu("a6000", "NVIDIA RTX A6000 48GB", 49_140, 155.0),
        _gpu("a10g", "NVIDIA A10G 24GB (AWS; the A10 data sheet's peak)", 23_028, 125.0),
        _gpu("l4", "NVIDIA L4 24GB", 23_034, 121.0),
        _gpu("rtx4090", "NVIDIA GeForce RTX 4090 24GB", 24_564, 165.0),
        _gpu("rtx3090", "NVIDIA GeForce RTX 3090 24GB", 24_576, 71.0),
    )
}


def gpu_named(name: str) -> Gpu:
    """The catalog's GPU of that name (case and `_`/`-` insensitive), or a CptkitError listing them."""
    key = name.strip().lower().replace("_", "-")
    if key in CATALOG:
        return CATALOG[key]
    raise CptkitError(
        f"--gpu {name}: not a GPU cptkit knows; choose one of {', '.join(CATALOG)} "
        "(or run on the machine, where the GPU present is planned too)"
    )


def present_gpu() -> Gpu | None:
    """The first CUDA device, with the peak cptkit.model.flops knows for its name; None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    from cptkit.model.flops import peak_tflops

    props = torch.cuda.get_device_properties(0)
    return Gpu("present", props.name, int(props.total_memory), peak_tflops(props.name) or 0.0)


def gpus_to_plan(name: str | None, default: str = "h200") -> tuple[list[Gpu], list[str]]:
    """The GPU named and the one present; `default` (and a note saying so) when there is neither."""
    gpus = [gpu_named(name)] if name else []
    if (present := present_gpu()) is not None:
        gpus.append(present)
    if gpus:
        return gpus, []
    return [CATALOG[default]], [
        f"no --gpu named and no GPU here: planned for {default} (the calibration table's GPU)"
    ]
