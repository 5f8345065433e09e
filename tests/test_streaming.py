"""The training data stream: exact coverage, bit-for-bit resume, lockstep, mixing and the 1% rule.

Every token id in these corpora is unique (and above 65535), so where a token went is exact.
Resuming under another layout is tested in test_elastic_stream.py.
"""

import json
import math

import numpy as np
import pytest
import torch

from data_pipeline.seeding import keyed_generator
from data_pipeline.shards import Manifest, ShardError, read_manifest, shard_name, write_manifest, write_shard
from data_pipeline.streaming import SourceSpec, TokenBatchLoader

VOCAB = 200_000
SHA = "5" * 64
SEED = 1234
# sample lengths per shard: shards of different sizes
UNEVEN_SHARDS = [[5, 9, 13], [7], [11, 4], [3, 8, 6, 10], [12, 2], [9, 9]]
FIVE_SHARDS = UNEVEN_SHARDS[:5]
THREE_SHARDS = UNEVEN_SHARDS[:3]


def shorten_batch(batch: torch.Tensor, generator: torch.Generator, prob: float) -> torch.Tensor:
    """The reference code's 1% rule: with probability prob, cut the whole batch to a length drawn
    from U{1..L} and drop the tails (draws: one uniform, then one length, every time)."""
    shorten = torch.rand((), generator=generator).item() < prob
    length = int(torch.randint(1, batch.shape[1] + 1, (), generator=generator))
    return batch[:, :length] if shorten else batch


def write_source(directory, shards, first_id, sha=SHA):
    """Write shards of consecutive unique ids; return each shard's samples (in file order)."""
    directory.mkdir(parents=True)
    next_id, infos, shard_samples = first_id, [], []
    for index, lengths in enumerate(shards):
        samples = []
        for length in lengths:
            samples.append(np.arange(next_id, next_id + length, dtype=np.uint32))
            next_id += length
        infos.append(write_shard(directory / shard_name(index), samples, documents=len(samples)))
        shard_samples.append(samples)
    write_manifest(directory, Manifest(tokenizer_sha256=sha, vocab_size=VOCAB, eos_id=0, shards=infos))
    return shard_samples


def make_loader(specs, **overrides):
    options = dict(seq_len=8, batch_size=2, grad_accum=1, seed=SEED, dp_rank=0, dp_size=1, num_workers=0,
                   vocab_size=VOCAB, tokenizer_sha256=SHA, variable_length_prob=0.0)
    options.update(overrides)
    return TokenBatchLoader(specs, **options)


def take(loader, steps):
    return [next(loader) for _ in range(steps)]


def flat(batches):
    return np.concatenate([b.input_ids.flatten().numpy() for b in batches])


@pytest.fixture
def two_sources(tmp_path):
    write_source(tmp_path / "a", UNEVEN_SHARDS, 70_000)
    write_source(tmp_path / "b", [[6, 6], [10, 3, 5], [8], [4, 4, 4]], 150_000)
    return [SourceSpec("a", str(tmp_path / "a"), 0.6), SourceSpec("b", str(tmp_path / "b"), 0.4)]


@pytest.mark.parametrize("layout", [UNEVEN_SHARDS, THREE_SHARDS], ids=["6-shards", "3-shards"])
def test_epoch_zero_is_spread_over_ranks_and_workers_exactly_once(tmp_path, layout):
    shards = write_source(tmp_path / "a", layout, 70_000)
    spec = [SourceSpec("a", str(tmp_path / "a"), 1.0)]
    dp_size, workers, batch_size, grad_accum, seq_len = 2, 2, 2, 2, 8
    lanes, num_shards = dp_size * batch_size * grad_accum, len(shards)  # a lane: a row of the global batch
    order = torch.randperm(num_shards, generator=keyed_generator(SEED, "shards", "a", 0)).tolist()

    def item_tokens(item):  # the shard at this place of epoch 0, its samples in their keyed order
        samples = shards[order[item]]
        visit = torch.randperm(len(samples), generator=keyed_generator(SEED, "samples", "a", item)).tolist()
        return [samples[i] for i in visit]

    epoch_zero = {lane: np.concatenate([t for item in range(lane, num_shards, lanes) for t in item_tokens(item)]
                                       or [np.zeros(0, np.uint32)]) for lane in range(lanes)}
    micro_batches = grad_accum * (max(len(t) for t in epoch_zero.values()) // seq_len + 2)

    rank_tokens = []
    for rank in range(dp_size):
        batches = take(make_loader(spec, dp_rank=rank, dp_size=dp_size, num_workers=workers, batch_size=batch_size,
                                   grad_accum=grad_accum, seq_len=seq_len), micro_batches)
        assert [b.micro_batch for b in batches] == list(range(micro_batches))
        prefixes = []
        for micro_step in range(grad_accum):
            for row in range(batch_size):
                lane = (micro_step * dp_size + rank) * batch_size + row
                assert all(b.lanes[row] == lane for b in batches[micro_step::grad_accum])
                stream = np.concatenate([b.input_ids[row].numpy() for b in batches[micro_step::grad_accum]])
                expected = epoch_zero[lane]
                assert len(stream) > len(expected)
                prefixes.append(stream[:len(expected)])
                assert np.array_equal(prefixes[-1], expected)
        rank_tokens.append(np.concatenate(prefixes))
    assert not set(rank_tokens[0]) & set(rank_tokens[1])
    corpus = np.concatenate([t for samples in shards for t in samples])
    assert np.array_equal(np.sort(np.concatenate(rank_tokens)), np.sort(corpus))


@pytest.mark.parametrize("num_workers,mode,micro_batches_before", [(2, "carry", 40), (0, "carry", 40),
                                                                   (2, "discard", 40), (2, "carry", 2)])
def test_resume_continues_bit_for_bit_without_replaying(two_sources, num_workers, mode, micro_batches_before):
    options = dict(num_workers=num_workers, variable_length_prob=0.3, variable_length_mode=mode,
                   batch_size=3, grad_accum=2, dp_size=2)
    micro_batches_after = 9
    reference = make_loader(two_sources, dp_rank=1, **options)
    expected = take(reference, micro_batches_before + micro_batches_after)

    states = []
    for rank in range(2):
        interrupted = make_loader(two_sources, dp_rank=rank, **options)
        take(interrupted, micro_batches_before)
        states.append(json.loads(json.dumps(interrupted.state_dict())))  # checkpoints store plain data
        interrupted.close()
    resumed = make_loader(two_sources, dp_rank=1, **options)
    resumed.load_state_dict(TokenBatchLoader.merge(states))
    got = take(resumed, micro_batches_after)

    for want, have in zip(expected[micro_batches_before:], got):
        assert torch.equal(want.input_ids, have.input_ids)
        assert (want.micro_batch, want.lanes, want.source_tokens) == (have.micro_batch, have.lanes,
                                                                      have.source_tokens)
    assert any(b.shortened for b in got)
    not_resumed = take(make_loader(two_sources, dp_rank=1, **options), micro_batches_after)  # negative control
    assert not all(a.input_ids.shape == b.input_ids.shape and torch.equal(a.input_ids, b.input_ids)
                   for a, b in zip(expected[micro_batches_before:], not_resumed))
    # the run's tokens so far are counted on data-parallel rank 0 (the trainer sums over ranks)
    assert {name: c["tokens"] for name, c in resumed.counters().items()} == {
        name: sum(b.source_tokens[name] for b in got) for name in ("a", "b")}
    assert [c["epoch"] for c in resumed.counters().values()] == [c["epoch"] for c in reference.counters().values()]
    assert resumed.state_dict()["lanes"] == reference.state_dict()["lanes"]
    rank_lanes = options["batch_size"] * options["grad_accum"]  # every row of a step reads its own place
    one_shard_per_lane = rank_lanes * sum(max(s.samples for s in read_manifest(spec.path).shards)
                                          for spec in two_sources)
    assert all(b.restore_decoded_samples <= one_shard_per_lane for b in got)
    if micro_batches_before > 2:  # the lanes had decoded more by then: a restore that replayed would too
        assert expected[micro_batches_before - 1].decoded_samples > one_shard_per_lane


@pytest.mark.parametrize("layout", [FIVE_SHARDS, THREE_SHARDS], ids=["5-shards", "3-shards"])
def test_every_rank_yields_batches_forever(tmp_path, layout):
    write_source(tmp_path / "a", layout, 70_000)
    spec = [SourceSpec("a", str(tmp_path / "a"), 1.0)]
    for rank in range(2):
        loader = make_loader(spec, dp_rank=rank, dp_size=2, num_workers=2)
        batches = take(loader, 40)
        assert all(b.input_ids.shape == (2, 8) for b in batches)
        assert loader.counters()["a"]["epoch"] >= 2  # went through several epochs without stopping


def test_mixing_meets_the_weights_in_tokens(tmp_path):
    write_source(tmp_path / "a", UNEVEN_SHARDS, 70_000)
    write_source(tmp_path / "b", UNEVEN_SHARDS, 150_000)
    specs = [SourceSpec("a", str(tmp_path / "a"), 0.75), SourceSpec("b", str(tmp_path / "b"), 0.25)]
    loader = make_loader(specs, dp_rank=1, dp_size=2)
    batches = take(loader, 200)
    rows = 200 * 2
    # row k * 2 + i is row i of step k: lane (micro-step 0 * dp_size 2 + rank 1) * 2 + i
    draws = [torch.rand((), dtype=torch.float64,
                        generator=keyed_generator(SEED, "mix", 2 + row % 2, row // 2)).item()
             for row in range(rows)]
    from_a = torch.cat([b.input_ids for b in batches])[:, 0] < 150_000
    assert from_a.tolist() == [draw < 0.75 for draw in draws]  # each row's source is its keyed draw
    for b in batches:  # the reported counts match where the tokens came from
        assert b.source_tokens == {"a": int((b.input_ids < 150_000).sum()), "b": int((b.input_ids >= 150_000).sum())}
    tokens_a = sum(b.source_tokens["a"] for b in batches)
    assert {name: c["tokens"] for name, c in loader.counters().items()} == {"a": tokens_a, "b": rows * 8 - tokens_a}
    share = tokens_a / (rows * 8)
    assert abs(share - 0.75) <= 3 * math.sqrt(0.75 * 0.25 / rows)


def test_one_percent_rule_shortens_about_one_percent_with_keyed_lengths(tmp_path):
    write_source(tmp_path / "a", [[50] * 10] * 6, 70_000)
    spec = [SourceSpec("a", str(tmp_path / "a"), 1.0)]
    steps, seq_len, prob = 4000, 16, 0.01
    shortened_at, lengths = {}, []
    for seed in (0, 1):
        shapes = [b.input_ids.shape[1] for b in take(make_loader(spec, seed=seed, batch_size=1, seq_len=seq_len,
                                                               variable_length_prob=prob), steps)]
        reference = [shorten_batch(torch.zeros(1, seq_len), keyed_generator(seed, "length", i, 0),
                                   prob).shape[1] for i in range(steps)]
        assert shapes == reference
        shortened_at[seed] = {i for i, n in enumerate(shapes) if n < seq_len}
        lengths += [n for n in shapes if n < seq_len]
        expected = steps * prob * (seq_len - 1) / seq_len
        assert abs(len(shortened_at[seed]) - expected) <= 3 * math.sqrt(expected)
    assert shortened_at[0] != shortened_at[1]
    assert min(lengths) <= seq_len // 4 and max(lengths) >= 3 * seq_len // 4


def test_carry_loses_no_token_and_discard_cuts_like_the_reference(tmp_path):
    write_source(tmp_path / "a", UNEVEN_SHARDS, 70_000)
    spec = [SourceSpec("a", str(tmp_path / "a"), 1.0)]
    steps, prob = 150, 0.3
    full = take(make_loader(spec), steps)
    carry = take(make_loader(spec, variable_length_prob=prob), steps)
    discard = take(make_loader(spec, variable_length_prob=prob, variable_length_mode="discard"), steps)
    assert 0 < sum(b.shortened for b in carry) < steps
    for lane in range(2):  # each row of the micro-batch is its own stream
        carried = np.concatenate([b.input_ids[lane].numpy() for b in carry])
        unshortened = np.concatenate([b.input_ids[lane].numpy() for b in full])
        assert np.array_equal(carried, unshortened[:len(carried)])
    for i, (whole, cut) in enumerate(zip(full, discard)):
        lengths = keyed_generator(SEED, "length", i, 0)
        assert torch.equal(cut.input_ids, shorten_batch(whole.input_ids, lengths, prob))
    assert [b.input_ids.shape for b in carry] == [b.input_ids.shape for b in discard]


def test_batches_depend_on_the_data_parallel_rank_only(two_sources):
    options = dict(dp_size=2, num_workers=2, variable_length_prob=0.3)
    first, same = (take(make_loader(two_sources, dp_rank=0, **options), 8) for _ in range(2))
    other = take(make_loader(two_sources, dp_rank=1, **options), 8)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, same))
    assert not any(a.input_ids.shape == b.input_ids.shape and torch.equal(a.input_ids, b.input_ids)
                   for a, b in zip(first, other))


@pytest.mark.parametrize("num_workers,batch_size,grad_accum", [(1, 2, 2), (2, 2, 2), (2, 1, 1)],
                         ids=["1-worker", "2-workers", "more-workers-than-lanes"])
def test_the_stream_does_not_depend_on_the_number_of_workers(two_sources, num_workers, batch_size, grad_accum):
    options = dict(variable_length_prob=0.3, batch_size=batch_size, grad_accum=grad_accum)
    in_process = take(make_loader(two_sources, num_workers=0, **options), 10)
    in_workers = take(make_loader(two_sources, num_workers=num_workers, **options), 10)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(in_process, in_workers))
    other_seed = take(make_loader(two_sources, num_workers=num_workers, **dict(options, seed=SEED + 1)), 10)
    assert not all(a.input_ids.shape == b.input_ids.shape and torch.equal(a.input_ids, b.input_ids)
                   for a, b in zip(in_process, other_seed))


def test_tokenizer_mismatch_names_the_directory_and_both_hashes(tmp_path):
    write_source(tmp_path / "a", THREE_SHARDS, 70_000, sha="e" * 64)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'a'}.*{'e' * 64}.*{SHA}.*training tokenizer"):
        make_loader([SourceSpec("a", str(tmp_path / "a"), 1.0)])


def test_truncated_shard_is_reported_by_name(tmp_path):
    write_source(tmp_path / "a", UNEVEN_SHARDS, 70_000)
    spec = [SourceSpec("a", str(tmp_path / "a"), 1.0)]
    first = torch.randperm(len(UNEVEN_SHARDS), generator=keyed_generator(SEED, "shards", "a", 0))[0].item()
    shard = tmp_path / "a" / shard_name(first)
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(ShardError, match=shard_name(first)):  # the manifest's size check, at start
        make_loader(spec)
    manifest = read_manifest(tmp_path / "a", verify_sizes=False)
    manifest.shards[first].bytes = 700
    write_manifest(tmp_path / "a", manifest)
    with pytest.raises(ShardError, match=shard_name(first)):  # decoding it, in a worker process
        next(make_loader(spec, num_workers=2))
