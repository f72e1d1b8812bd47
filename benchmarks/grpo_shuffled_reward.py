"""The control for the GRPO worked example (README, "Reinforcement learning with a verifiable
reward"): ChartQA's relaxed accuracy against another question's reference. Each group of samples
is scored with the next group's answer, so the reward keeps its scale and spread but says
nothing about the right answer. (If every prompt of a batch has the same answer, the reward is
the true one for that batch.)

    vlmkit train src/vlmkit/recipes/grpo-quickstart.yaml train.data_dir=runs/quickstart/data \\
        train.output_dir=runs/grpo-shuffled \\
        train.stages.grpo.grpo.reward=benchmarks/grpo_shuffled_reward.py:reward
"""

from vlmkit.eval.metrics import relaxed_correctness


def reward(completions, references, **_):
    groups = list(dict.fromkeys(references))  # the batch's references in order, one per prompt
    shifted = {r: groups[(i + 1) % len(groups)] for i, r in enumerate(groups)}
    return [float(relaxed_correctness(shifted[r], c)) for c, r in zip(completions, references)]
