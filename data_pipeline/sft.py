"""SFT data: JSONL dialogues -> LLaDA chat-template (prompt, response) pairs -> Algorithm 2 batches.

The template is the released LLaDA-8B-Instruct `chat_template` (Llama-3 style):
BOS once, then per message `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>`,
and the generation prompt `<|start_header_id|>assistant<|end_header_id|>\\n\\n`.

Tokenization follows what a Hugging Face tokenizer does to the rendered template string: the
special tokens split the string and every text piece between two of them is encoded on its own
with `TokenizerInfo.encode`. So a rendered message body is ONE piece, `encode("\\n\\n" + content)`,
while a prompt ends with the piece `encode("\\n\\n")` (the string ends there at inference time) and
the response is `encode(content) + [eot]`. A byte-level BPE may merge "\\n\\n" when it stands alone
but not in front of text, so an answer that is later part of the history can be tokenized
differently there than as a response: both are exactly what inference sees.

A dialogue with n assistant messages gives n pairs; by default one is drawn per dialogue and
epoch (paper B.1) from `keyed_generator(seed, "sft_pair", dialogue_index, epoch)`, the example
order from `keyed_generator(seed, "sft_order", epoch)`. Rows are prompt + response, right-padded
with EOS; the padding belongs to the response (`sft_loss` masks and trains it). Each epoch is cut
into optimizer-step batches whose pairs, row by row, do not depend on how the global batch is
split over data-parallel ranks, micro-batches and accumulation; `SFTStream` runs the epochs back
to back for the training loop and checkpoints its position so that a run resumes under another
split of the same global batch without reading a pair twice or skipping one.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import torch

from data_pipeline.seeding import keyed_generator
from data_pipeline.tokenizer import TokenizerInfo

ROLES = ("system", "user", "assistant")
PAIR_MODES = ("one", "all")
OVERLONG_MODES = ("truncate", "drop")
HEADER_BODY_SEPARATOR = "\n\n"

Message = dict[str, str]


@dataclass(frozen=True)
class SFTPair:
    prompt: list[int]    # BOS, the earlier messages rendered, the assistant header and "\n\n"
    response: list[int]  # the answer's tokens, then <|eot_id|> (possibly cut by truncation)


class SFTBatch(NamedTuple):
    input_ids: torch.Tensor       # [b, l] int64: prompt + response, right-padded with EOS
    prompt_lengths: torch.Tensor  # [b] int64


@dataclass
class SFTCounts:
    truncated: int = 0  # pairs whose response was cut to fit seq_len
    dropped: int = 0    # pairs left out: overlong under "drop", or a prompt alone >= seq_len
    left_over: int = 0  # pairs of an epoch's last, incomplete optimizer-step batch (not trained that epoch)


# ---- reading ---------------------------------------------------------------------------------

def read_dialogues(path: str | os.PathLike) -> list[list[Message]]:
    """The dialogues of a JSONL file, one `{"messages": [...]}` per line; blank lines are skipped.

    Every problem raises ValueError naming `file:line`.
    """
    dialogues = []
    with open(path, "rb") as file:
        for line_number, raw_line in enumerate(file, start=1):
            where = f"{path}:{line_number}"
            line = _decode_line(raw_line, where)
            if line.strip():
                dialogues.append(_parse_dialogue(line, where))
    return dialogues


def _decode_line(raw_line: bytes, where: str) -> str:
    try:
        return raw_line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not valid UTF-8 at byte {err.start} of the line") from None


def _parse_dialogue(line: str, where: str) -> list[Message]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list):
        raise ValueError(f'{where}: expected an object with a "messages" list, got {line.strip()[:80]!r}')
    checked = [_check_message(message, position, where) for position, message in enumerate(messages)]
    if not any(message["role"] == "assistant" for message in checked):
        raise ValueError(f"{where}: no assistant message, so no (prompt, response) pair to train on")
    return checked


def _check_message(message: object, position: int, where: str) -> Message:
    if not isinstance(message, dict):
        raise ValueError(f"{where}: message {position} is not an object")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ValueError(f"{where}: message {position} has role {role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"{where}: message {position} ({role}) has content of type "
                         f"{type(content).__name__}; expected a string")
    return {"role": role, "content": content}


# ---- template --------------------------------------------------------------------------------

class ChatTemplate:
    """The LLaDA chat template as token ids; special ids come from the tokenizer."""

    def __init__(self, tokenizer: TokenizerInfo):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.special_ids["bos"]
        self.start_header_id = tokenizer.special_ids["start_header"]
        self.end_header_id = tokenizer.special_ids["end_header"]
        self.eot_id = tokenizer.special_ids["eot"]
        self._role_ids = {role: tokenizer.encode(role) for role in ROLES}

    def header(self, role: str) -> list[int]:
        return [self.start_header_id, *self._role_ids[role], self.end_header_id]

    def message(self, message: Message) -> list[int]:
        body = self.tokenizer.encode(HEADER_BODY_SEPARATOR + message["content"].strip())
        return [*self.header(message["role"]), *body, self.eot_id]

    def generation_prompt(self) -> list[int]:
        return [*self.header("assistant"), *self.tokenizer.encode(HEADER_BODY_SEPARATOR)]

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        """What the model answers at inference: BOS, the dialogue so far, the assistant header."""
        return [self.bos_id, *(i for message in messages for i in self.message(message)),
                *self.generation_prompt()]

    def response(self, answer: Message) -> list[int]:
        return [*self.tokenizer.encode(answer["content"].strip()), self.eot_id]

    def pairs(self, messages: Sequence[Message]) -> list[SFTPair]:
        """One (all earlier messages -> this answer) pair per assistant message, in order."""
        pairs, history = [], [self.bos_id]
        for message in messages:
            if message["role"] == "assistant":
                pairs.append(SFTPair(prompt=history + self.generation_prompt(), response=self.response(message)))
            history.extend(self.message(message))
        return pairs


def load_sft_pairs(path: str | os.PathLike, tokenizer: TokenizerInfo) -> list[list[SFTPair]]:
    """Every dialogue of a JSONL file as its list of pairs."""
    template = ChatTemplate(tokenizer)
    return [template.pairs(messages) for messages in read_dialogues(path)]


# ---- selection, length, batching -------------------------------------------------------------

def choose_pairs(pairs: Sequence[SFTPair], mode: str, seed: int, dialogue_index: int, epoch: int) -> list[SFTPair]:
    """The pairs to train on: mode "one" draws a single pair from
    keyed_generator(seed, "sft_pair", dialogue_index, epoch), mode "all" keeps every pair."""
    _check_choice("pairs", mode, PAIR_MODES)
    if mode == "all":
        return list(pairs)
    generator = keyed_generator(seed, "sft_pair", dialogue_index, epoch)
    return [pairs[int(torch.randint(len(pairs), (1,), generator=generator))]]


def fit_to_length(pairs: Sequence[SFTPair], seq_len: int, overlong: str) -> tuple[list[SFTPair], SFTCounts]:
    """Pairs that fit seq_len; "truncate" cuts an overlong response (keeping >= 1 of its tokens),
    "drop" leaves the pair out; a prompt alone >= seq_len is dropped either way. Returns the counts."""
    _check_choice("overlong", overlong, OVERLONG_MODES)
    kept, counts = [], SFTCounts()
    for pair in pairs:
        room = seq_len - len(pair.prompt)
        if len(pair.response) <= room:
            kept.append(pair)
        elif overlong == "truncate" and room >= 1:
            kept.append(SFTPair(prompt=pair.prompt, response=pair.response[:room]))
            counts.truncated += 1
        else:
            counts.dropped += 1
    return kept, counts


def collate_sft(pairs: Sequence[SFTPair], eos_id: int, pad_to: str | int = "longest") -> SFTBatch:
    """Rows of prompt + response right-padded with EOS to the longest row ("longest") or to a fixed width."""
    if not pairs:
        raise ValueError("collate_sft needs at least one pair")
    rows = [pair.prompt + pair.response for pair in pairs]
    longest = max(len(row) for row in rows)
    width = _padded_width(pad_to, longest)
    input_ids = torch.full((len(rows), width), eos_id, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    prompt_lengths = torch.tensor([len(pair.prompt) for pair in pairs], dtype=torch.long)
    return SFTBatch(input_ids=input_ids, prompt_lengths=prompt_lengths)


def _padded_width(pad_to: str | int, longest: int) -> int:
    if pad_to == "longest":
        return longest
    if not isinstance(pad_to, int) or isinstance(pad_to, bool):
        raise ValueError(f'pad_to must be "longest" or a length, got {pad_to!r}')
    if pad_to < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the batch's longest row ({longest} tokens): "
                         "fit the pairs to seq_len first or pad to a larger length")
    return pad_to


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


# ---- the epoch iterator ----------------------------------------------------------------------

class SFTBatches:
    """Micro-batches of one data-parallel rank, epoch by epoch, resumable at any micro-batch.

    An epoch is planned from (seed, epoch) alone: the dialogue order, the pairs chosen, the
    overlong policy, then optimizer-step batches of G = batch_size x dp_size x grad_accum pairs
    (the last incomplete one is left out, `counts.left_over`). Within a step, global row
    g = (m x dp_size + dp_rank) x batch_size + i is row i of this rank's micro-step m, the row
    numbering of `pretrain.training.step_loss.first_global_row` that keys each row's noise. So the
    pairs of every step and the global row each lands on depend on (seed, data, G) only, not on
    the split into ranks, micro-batches and accumulation; every rank runs the same number of
    micro-batches (lockstep), full steps x grad_accum per epoch, on disjoint pairs.

    Padding stays per micro-batch and does depend on the split: under pad_to="longest" a row is
    padded with EOS to the longest row of its micro-batch, and which rows share a micro-batch
    changes with the split. A row's t and noise key do not change; its width does, and in
    Algorithm 2 the padding EOS are answer positions: masked, trained, and counted in the row's
    answer length, the divisor of `sft_loss_from_ce`. A row padded by k more EOS thus has k more
    EOS targets and its sum divided by (answer + k), so the row's expected loss, the mean CE over
    the answer and its padding, weights the learned stop differently: loss, gradient and
    `SFTStream.answer_tokens` differ between splits, the pairs trained do not. (On CPU the mask of
    a row's first positions is the prefix of the same draw whatever the width; on CUDA that is not
    promised.) With pad_to=seq_len every row has width seq_len and a step's rows are the same
    tensors in every split.

    Iterating runs the rest of the current epoch from `position`, then moves to the next epoch;
    `counts` are those of the epoch being iterated.
    """

    def __init__(self, dialogue_pairs: Sequence[Sequence[SFTPair]], *, batch_size: int, seq_len: int, seed: int,
                 eos_id: int, overlong: str, pairs: str = "one", pad_to: str | int = "longest",
                 dp_rank: int = 0, dp_size: int = 1, grad_accum: int = 1):
        _check_choice("overlong", overlong, OVERLONG_MODES)
        _check_choice("pairs", pairs, PAIR_MODES)
        if pad_to != "longest" and not (isinstance(pad_to, int) and pad_to >= seq_len):
            raise ValueError(f'pad_to must be "longest" or a length >= seq_len={seq_len}, got {pad_to!r}')
        if batch_size < 1 or seq_len < 1 or grad_accum < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need batch_size >= 1, seq_len >= 1, grad_accum >= 1 and 0 <= dp_rank < dp_size, got "
                             f"batch_size={batch_size}, seq_len={seq_len}, grad_accum={grad_accum}, "
                             f"dp_rank={dp_rank}, dp_size={dp_size}")
        self.dialogue_pairs = dialogue_pairs
        self.batch_size, self.seq_len, self.seed, self.eos_id = batch_size, seq_len, seed, eos_id
        self.overlong, self.pairs, self.pad_to = overlong, pairs, pad_to
        self.dp_rank, self.dp_size, self.grad_accum = dp_rank, dp_size, grad_accum
        self.epoch, self.position = 0, 0
        self.counts = SFTCounts()

    @property
    def global_batch_size(self) -> int:
        """G: the pairs of one optimizer step over all data-parallel ranks and micro-steps."""
        return self.batch_size * self.dp_size * self.grad_accum

    def first_row(self, micro_step: int) -> int:
        """The global row, within its step, of the first pair of this rank's `micro_step`-th
        micro-batch (`pretrain.training.step_loss.first_global_row`)."""
        return (micro_step * self.dp_size + self.dp_rank) * self.batch_size

    def epoch_steps(self, epoch: int) -> tuple[list[list[SFTPair]], SFTCounts]:
        """The optimizer steps of `epoch`, each its G pairs by global row, and the epoch's counts:
        the same for every split of G."""
        order = torch.randperm(len(self.dialogue_pairs), generator=keyed_generator(self.seed, "sft_order", epoch))
        chosen = [pair for index in order.tolist()
                  for pair in choose_pairs(self.dialogue_pairs[index], self.pairs, self.seed, index, epoch)]
        fitted, counts = fit_to_length(chosen, self.seq_len, self.overlong)
        size = self.global_batch_size
        full_steps = len(fitted) // size
        counts.left_over = len(fitted) - full_steps * size
        return [fitted[s * size : (s + 1) * size] for s in range(full_steps)], counts

    def epoch_plan(self, epoch: int) -> tuple[list[list[SFTPair]], SFTCounts]:
        """This rank's micro-batches of pairs for `epoch`, step by step, and the epoch's counts (all ranks')."""
        steps, counts = self.epoch_steps(epoch)
        rows = [self.first_row(micro_step) for micro_step in range(self.grad_accum)]
        return [step[row : row + self.batch_size] for step in steps for row in rows], counts

    def __iter__(self) -> Iterator[SFTBatch]:
        batches, self.counts = self.epoch_plan(self.epoch)
        while self.position < len(batches):
            pairs = batches[self.position]
            self.position += 1
            yield collate_sft(pairs, self.eos_id, self.pad_to)
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class SFTStream:
    """The trainer's never-ending SFT stream: `SFTBatches` epoch after epoch behind the loader
    interface the training loop uses for pretraining data (`next`, `counters`, `state_dict`,
    `load_state_dict`, `close`).

    `state_dict()` is this rank's: its epoch, position in micro-batches, answer tokens, its
    layout and the run's settings. `merge` turns the states of all ranks, saved at an optimizer
    step boundary, into the run's layout-free state (epoch, steps done in it, total answer tokens),
    which `load_state_dict` resumes under any data-parallel size, micro-batch size and
    accumulation with the same global batch: no pair is read twice or skipped. `identity` (the
    files' and tokenizer's hashes, for one) and the settings that decide the epoch plans must
    match on resume.
    """

    RUN_FIELDS = ("global_batch_size", "seq_len", "seed", "pairs", "overlong", "pad_to")
    LAYOUT_FIELDS = ("dp_size", "batch_size", "grad_accum")

    def __init__(self, batches: SFTBatches, identity: dict[str, str]):
        self.batches, self.identity = batches, dict(identity)
        self._iterator: Iterator[SFTBatch] | None = None
        self.answer_tokens = 0  # response and padding positions this rank has trained on

    @functools.cached_property
    def first_epoch(self) -> tuple[int, SFTCounts]:
        """(micro-batches each rank runs in epoch 0: full steps x grad_accum, that epoch's counts),
        planned once: "drop" and "one" pair per dialogue can change the count by a step or two in
        later epochs."""
        plan, counts = self.batches.epoch_plan(0)
        return len(plan), counts

    def __iter__(self) -> "SFTStream":
        return self

    def __next__(self) -> SFTBatch:
        for _ in range(2):  # the rest of this epoch, else the start of the next
            if self._iterator is None:
                self._iterator = iter(self.batches)
            batch = next(self._iterator, None)
            if batch is not None:
                self.answer_tokens += int((batch.input_ids.shape[1] - batch.prompt_lengths).sum())
                return batch
            self._iterator = None
        b = self.batches
        raise ValueError(f"SFT data: epoch {b.epoch - 1} has no full optimizer step of {b.global_batch_size} pairs "
                         f"({b.batch_size} x DP {b.dp_size} x accumulation {b.grad_accum}); give more dialogues "
                         f"or a smaller train.global_batch_size")

    def counters(self) -> dict[str, dict[str, int]]:
        return {"sft": {"tokens": self.answer_tokens, "epoch": self.batches.epoch}}

    def layout(self) -> dict[str, int]:
        return {name: getattr(self.batches, name) for name in self.LAYOUT_FIELDS}

    def settings(self) -> dict:
        return {name: getattr(self.batches, name) for name in self.RUN_FIELDS}

    def state_dict(self) -> dict:
        """This rank's state; `merge` the states of all ranks for one that resumes under any layout."""
        settings = {**self.settings(), **self.layout(), "dp_rank": self.batches.dp_rank}
        return {**self.batches.state_dict(), "answer_tokens": self.answer_tokens,
                "settings": settings, "identity": self.identity}

    @staticmethod
    def merge(states: list[dict]) -> dict:
        """The run's layout-free state from every rank's `state_dict()` (tensor and pipeline peers
        of a data-parallel rank may repeat it): {"epoch", "steps" done in that epoch, "answer_tokens"
        summed over the data-parallel ranks, "settings", "saved_layout", "identity"}. Refuses states
        that disagree, miss a data-parallel rank, or were saved in the middle of an optimizer step."""
        if not states:
            raise ValueError("SFT data state: no rank state to merge")
        first = states[0]
        shared = ("epoch", "position", "identity")
        by_rank: dict[int, dict] = {}
        for state in states:
            settings = {**state["settings"], "dp_rank": first["settings"]["dp_rank"]}
            differ = [name for name in shared if state[name] != first[name]]
            differ += [f"settings.{name}" for name in settings if settings[name] != first["settings"].get(name)]
            rank = state["settings"]["dp_rank"]
            if rank in by_rank and state["answer_tokens"] != by_rank[rank]["answer_tokens"]:
                differ.append("answer_tokens of one data-parallel rank")
            if differ:
                raise ValueError(f"SFT data state: the ranks disagree on {', '.join(differ)} (data-parallel rank "
                                 f"{rank} vs {first['settings']['dp_rank']}); merge the states of one save")
            by_rank.setdefault(rank, state)
        layout = {name: first["settings"][name] for name in SFTStream.LAYOUT_FIELDS}
        missing = sorted(set(range(layout["dp_size"])) - by_rank.keys())
        if missing:
            raise ValueError(f"SFT data state: no state from data-parallel rank(s) {missing} of {layout['dp_size']}; "
                             "merge the states of every rank")
        position, accumulation = first["position"], layout["grad_accum"]
        if position % accumulation:
            raise ValueError(f"SFT data state: saved after micro-batch {position} of epoch {first['epoch']}, "
                             f"{position % accumulation} into an optimizer step of {accumulation}; save at a step "
                             "boundary")
        return {"epoch": first["epoch"], "steps": position // accumulation,
                "answer_tokens": sum(state["answer_tokens"] for state in by_rank.values()),
                "settings": {name: first["settings"][name] for name in SFTStream.RUN_FIELDS},
                "saved_layout": layout, "identity": dict(first["identity"])}

    def load_state_dict(self, run_state: dict) -> None:
        """Continue from the run's merged state (`merge`) under this stream's layout: the same
        global batch, seed, data and settings, any split of the global batch. The answer-token
        total goes to data-parallel rank 0."""
        if "steps" not in run_state:
            raise ValueError("SFT data state: expected the run's merged state (SFTStream.merge of every rank's "
                             f"state_dict()), got one with keys {sorted(run_state)}")
        saved = {**run_state["settings"], **run_state["identity"]}
        now = {**self.settings(), **self.identity}
        changed = [f"{name}: {saved.get(name)!r} in the checkpoint, {value!r} now"
                   for name, value in now.items() if saved.get(name) != value]
        if changed:
            raise ValueError("SFT data state: " + "; ".join(changed) + ". Resume with the same conversations, "
                             "tokenizer, seed, global batch and data settings, or start the data afresh")
        epoch, steps = int(run_state["epoch"]), int(run_state["steps"])
        full_steps = len(self.batches.epoch_steps(epoch)[0])
        if not 0 <= steps <= full_steps:
            raise ValueError(f"SFT data state: {steps} steps done in epoch {epoch}, which has {full_steps}; "
                             "the state does not belong to these conversations")
        self.batches.load_state_dict({"epoch": epoch, "position": steps * self.batches.grad_accum})
        self.answer_tokens = int(run_state["answer_tokens"]) if self.batches.dp_rank == 0 else 0
        self._iterator = None

    def describe_change(self, run_state: dict) -> str | None:
        """How this stream's layout differs from the one `run_state` was saved under, or None."""
        saved, now = run_state["saved_layout"], self.layout()
        if saved == now:
            return None
        return f"SFT data: continues from {_spelled_layout(saved)} to {_spelled_layout(now)}"

    def close(self) -> None:
        self._iterator = None


def _spelled_layout(layout: dict[str, int]) -> str:
    return f"DP {layout['dp_size']} x micro {layout['batch_size']} x accumulation {layout['grad_accum']}"
