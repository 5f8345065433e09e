"""The autoregressive baseline (a causal checkpoint, `train.objective: arm`) scored on the same task
files as the masked diffusion model, exactly, so `pretrain.evaluate` compares the two with one command.

Multiple choice: `causal_log_likelihood` is the exact log p(answer | prompt) from one forward over
prompt + answer (position i predicts token i + 1, as `pretrain.diffusion.objectives.next_token_targets`
trains it), where the diffusion model's Algorithm 3 is a Monte Carlo bound; a task's mc_num and
batch_size are not used, and cfg_scale must be 0. Generation: `greedy_answers` decodes left to right by
argmax, one token per forward for exactly gen_length forwards, and returns the records
`pretrain.inference.batched.sample_prompts` returns. Only gen_length (and chat, stop, extract) of a
generation task's settings apply: steps and block_length schedule the reverse process, which the
baseline does not run, and neither do the diffusion sampler's EOS/EoT confidence, logits, cache and
early-stop settings; a task asking for sampling (temperature > 0), random remasking, guidance or a
confidence threshold is refused (`check_greedy_settings`), since the baseline is decoded greedily.
"""

from __future__ import annotations

import torch

from data_pipeline.eval_sampler import gather_in_order, shard_examples
from pretrain.diffusion.sampling import generate_autoregressive, strip_at_eos
from pretrain.evaluation.tasks import Task, TaskFileError


def check_greedy_settings(task: Task) -> None:
    """Raise TaskFileError naming the task if its settings ask for more than exact scoring and
    greedy decoding."""
    s = task.settings
    asked = [f"cfg_scale {s['cfg_scale']}"] if s["cfg_scale"] else []
    if task.type == "generation":
        asked += [f"temperature {s['temperature']}"] if s["temperature"] else []
        asked += ["remasking 'random'"] if s["remasking"] == "random" else []
        asked += [f"threshold {s['threshold']}"] if s["threshold"] is not None else []
    if asked:
        raise TaskFileError(f"task {task.name!r}: {', '.join(asked)} on a causal model: the AR baseline is scored "
                            f"exactly and decoded greedily; set temperature 0, cfg_scale 0, remasking "
                            f"low_confidence and no threshold")


@torch.no_grad()
def causal_log_likelihood(model, prompt: torch.Tensor, answer: torch.Tensor) -> float:
    """sum_j log p(answer_j | prompt, answer_<j) from one forward over prompt + answer, in float32;
    prompt [p] (non-empty: the model has no BOS to predict the first token from), answer [L]."""
    if prompt.numel() == 0:
        raise ValueError("prompt is empty: a causal model predicts a token from the ones before it, and the "
                         "first answer token would have none")
    if answer.numel() == 0:
        raise ValueError("answer is empty: there is nothing to score")
    p = prompt.numel()
    seq = torch.cat([prompt.to(answer.device), answer]).long()[None, :]
    logits = model(seq)[0, p - 1:-1]  # position i predicts token i + 1
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(-1, answer.to(log_probs.device).long()[:, None]).sum().item()


def greedy_answers(model, prompts: list[list[int]], *, gen_length: int, cut_at_eot: bool = False) -> list[dict]:
    """Answers to every prompt, in order, as `sample_prompts` returns them ({"ids", "reveal_steps",
    "steps_run"}): each prompt decoded by argmax for gen_length forwards (no early stop, so every
    rank runs as many), cut at the first EOS (and EoT with cut_at_eot); token k comes from forward
    k. Prompts are split over data-parallel ranks as `sample_prompts` splits them (a short rank
    decodes a dummy) and gathered in order."""
    tok = model.tokenizer
    share = shard_examples(prompts, model.dp_rank, model.dp_size)
    results = []
    for _, prompt in share:
        ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
        out = generate_autoregressive(model, ids, gen_length=gen_length)
        answer = strip_at_eos(out[0, len(prompt):].tolist(), tok.eos_id)
        if cut_at_eot:
            answer = strip_at_eos(answer, tok.special_ids["eot"])
        results.append({"ids": answer, "reveal_steps": list(range(1, len(answer) + 1)), "steps_run": gen_length})
    return gather_in_order(results, [index for index, _ in share], group=model.dp_group)
