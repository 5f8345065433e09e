"""An independent transcription of how the official LLaDA lm-eval harness (ML-GSAI/LLaDA
eval_llada.py, `generate_until`, the revision stored as 6d73fd1d1e5240291abf7c2e7e314eebbf1b3d24)
turns a generated canvas into the answer lm-eval scores, used only by the tests as the reference
for `pretrain.evaluation.lm_eval_model.answer_text`.

It goes through the Hugging Face tokenizer the official code loads (`AutoTokenizer` gives a
`PreTrainedTokenizerFast` over the same tokenizer.json; the stack's export writes
clean_up_tokenization_spaces False), and keeps the official order of operations:
- every generated id (the whole canvas after the prompt) is decoded, special tokens included;
  `max_gen_toks` is never read;
- each stop string, in the request's order, cuts the text before its first occurrence if it
  occurs in what is left;
- the text is tokenized again with `tokenizer(text)` (special-token strings become their ids,
  the tokenizer.json's post-processor applies) and decoded without special tokens.
"""

from pathlib import Path

from transformers import PreTrainedTokenizerFast


def harness_tokenizer(tokenizer_json: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), clean_up_tokenization_spaces=False)


def harness_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """What the official code feeds the model for `text` (a prompt, a context)."""
    return list(tokenizer(text)["input_ids"])


def official_answer(tokenizer: PreTrainedTokenizerFast, canvas_ids: list[int], until: list[str]) -> str:
    answer = tokenizer.decode(canvas_ids, skip_special_tokens=False)
    for stop in until:
        if stop in answer:
            answer = answer.split(stop)[0]
    return tokenizer.decode(harness_ids(tokenizer, answer), skip_special_tokens=True)
