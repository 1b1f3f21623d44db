"""The `grpo` section: reinforcement learning with group-relative rewards (TRL's GRPOTrainer) after SFT,
the seed's appendix A step 5."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cptkit.config.fields import at_least, opt
from cptkit.config.train import TrainingRun

REWARD_TYPES = ("exact", "regex", "numeric", "format", "length", "function")


@dataclass
class RewardConfig:
    """One reward function; the total reward of a completion is the weighted sum of all of them.

    exact: 1 when the answer (the completion, or `extract`'s first group) equals the reference, else 0.
    regex: 1 when `pattern` is found in the completion (`{answer}` in it stands for the escaped reference).
    numeric: 1 when the answer's number (`extract`'s group, else the last number written) is within
      `tolerance` of the reference number, else 0.
    format: 1 when the whole completion matches `pattern` (dot matches newlines), else 0.
    length: 1 for a completion of min_chars..max_chars characters, falling linearly to 0 at 0 characters
      below and at twice max_chars above.
    function: a user function `module:function` or `path/to/file.py:function`, called as TRL calls reward
      functions: fn(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None].
    """

    type: Literal["exact", "regex", "numeric", "format", "length", "function"] = opt(
        help="exact, regex, numeric, format, length, or function"
    )
    weight: float = opt(1.0, "the reward's weight in the total")
    name: str | None = opt(
        None, "name in the logs (rewards/NAME/mean); default: the type, or the function's name"
    )
    answer_field: str = opt("answer", "exact/regex/numeric: the prompt record's field holding the reference")
    extract: str | None = opt(
        None, "exact/numeric: a regex whose first group is the answer (e.g. '<answer>(.*?)</answer>')"
    )
    pattern: str | None = opt(None, "regex/format: the pattern (Python re syntax)")
    case_sensitive: bool = opt(False, "exact/regex: compare case-sensitively")
    tolerance: float = opt(1e-6, "numeric: the largest absolute difference that still earns the reward")
    relative_tolerance: float = opt(
        0.0, "numeric: also accept a difference up to this fraction of the reference"
    )
    min_chars: int = opt(0, "length: the shortest completion that earns the full reward")
    max_chars: int = opt(200, "length: the longest completion that earns the full reward")
    function: str | None = opt(None, "function: module:function or path/to/file.py:function")

    def check(self, path: str):
        problems = []
        if self.type in ("regex", "format") and not self.pattern:
            problems.append((f"{path}.pattern", f"type {self.type} needs a pattern"))
        if self.type == "function" and not self.function:
            problems.append((f"{path}.function", "type function needs function: module:function"))
        if self.tolerance < 0 or self.relative_tolerance < 0:
            problems.append((f"{path}.tolerance", "tolerances must be 0 or more"))
        if self.type == "length" and not 0 <= self.min_chars <= self.max_chars:
            problems.append(
                (
                    f"{path}.max_chars",
                    f"need 0 <= min_chars <= max_chars ({self.min_chars}, {self.max_chars})",
                )
            )
        return problems


@dataclass(kw_only=True)  # required fields after the inherited defaults
class GrpoConfig(TrainingRun):
    """`cptkit grpo`: prompts + rewards -> a policy trained with GRPO (TRL's GRPOTrainer). Training options
    as in `train`; `hf` goes to trl.GRPOConfig (learning_rate, per_device_train_batch_size, max_steps,
    num_iterations, epsilon, loss_type, scale_rewards, ...)."""

    prompts: str = opt(
        help="prompt file: .jsonl/.json records with `prompt` (text, or chat messages) and the fields the "
        "rewards read (e.g. `answer`)"
    )
    rewards: list[RewardConfig] = opt(help="reward functions, combined by weight")
    model: str | None = opt(
        None, "model to train (default: the SFT output, else the merged CPT model, else the trained one)"
    )
    heldout_prompts: str | None = opt(
        None, "prompts scored before and after training (default: heldout_fraction of `prompts`)"
    )
    heldout_fraction: float = opt(0.1, "share of `prompts` held out when heldout_prompts is not set")
    heldout_max: int = opt(128, "at most this many held-out prompts are scored")
    template: Literal["auto", "chat", "seed"] = opt(
        "auto",
        "how prompts are rendered, as sft renders them: chat template, the seed's ###Question, or auto",
    )
    system_prompt: str | None = opt(
        None, "system prompt for records without one (default: sft.system_prompt)"
    )
    max_prompt_length: int = opt(512, "prompts longer than this many tokens are skipped (and counted)")
    num_generations: int = opt(8, "group size: completions sampled per prompt")
    max_completion_length: int = opt(256, "new tokens per completion")
    temperature: float = opt(1.0, "sampling temperature of the training completions")
    top_p: float = opt(1.0, "nucleus sampling of the training completions")
    beta: float = opt(0.04, "KL coefficient to the reference (starting) model; 0 skips the reference")
    generation: Literal["auto", "transformers", "vllm"] = opt(
        "auto", "auto: vLLM (TRL's colocate mode) where installed on a GPU, else transformers' generate"
    )
    vllm_gpu_memory_utilization: float = opt(0.3, "vLLM's share of the GPU when generation is vllm")

    def check(self, path: str):
        problems = list(super().check(path))
        for name in ("prompts", "heldout_prompts"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                problems.append(
                    (
                        f"{path}.{name}",
                        f"{value} does not exist (expected a .jsonl or .json file of prompt records)",
                    )
                )
        if not self.rewards:
            problems.append((f"{path}.rewards", "at least one reward is needed"))
        for i, reward in enumerate(self.rewards):
            problems += reward.check(f"{path}.rewards[{i}]")
        if not 0 <= self.heldout_fraction < 1:
            problems.append((f"{path}.heldout_fraction", f"{self.heldout_fraction} must be in [0, 1)"))
        if self.beta < 0:
            problems.append((f"{path}.beta", f"{self.beta} must be 0 or more"))
        problems += at_least(
            self, path, num_generations=2, max_completion_length=1, max_prompt_length=1, heldout_max=0
        )
        return problems

    def hf_problems(self, path: str):
        """`grpo.hf` goes to trl.GRPOConfig: checked against its fields, and the batch against TRL's rule
        that a generation batch holds whole groups (imported here: trl is slow to import)."""
        from cptkit.grpo.trainer import grpo_hf_problems

        return grpo_hf_problems(self, path)
