import pytest

from fedllm_app.config import ConfigError, load_config
from fedllm_app.data import pipeline as data
from fedllm_app.data import synthetic
from fedllm_app.data.partitions import split_by_dominance
from fedllm_app.data.sampling import round_indices


def test_generation_is_deterministic_and_covers_all_domains():
    a, b = synthetic.generate(20, seed=3), synthetic.generate(20, seed=3)
    assert a == b
    assert a != synthetic.generate(20, seed=4)
    assert {r.domain for r in a} == set(synthetic.DOMAINS)
    assert len(a) == 80


@pytest.mark.parametrize("domain", synthetic.DOMAINS)
def test_answers_are_correct(domain):
    import random

    rng = random.Random(0)
    for _ in range(50):
        ex = synthetic.make_example(domain, rng)
        if domain == "reverse":
            words = ex.instruction.split(": ", 1)[1].split()
            assert ex.response == " ".join(reversed(words))
        elif domain == "arithmetic":
            expr = ex.instruction.removeprefix("What is ").removesuffix("?")
            assert str(eval(expr)) == ex.response  # noqa: S307 - our own generated digits
            assert 0 <= int(ex.response) <= 9
        elif domain == "units":
            assert ex.response == str(int(ex.instruction.split()[1]) * 1000)
        else:
            positive = any(w in ex.instruction for w in synthetic.POSITIVE)
            assert ex.response == ("positive" if positive else "negative")


def test_pretraining_corpus_never_contains_a_task_answer_form():
    corpus = synthetic.pretraining_corpus(500, seed=0)
    assert not any(r.response in ("positive", "negative") for r in corpus)
    assert not any(r.response.endswith("000") for r in corpus)


def test_non_iid_split_gives_each_client_mostly_one_domain():
    rows = [r.as_dict() for r in synthetic.generate(100, seed=0)]
    parts = split_by_dominance(rows, 4, 0.9, seed=0)
    assert [len(p) for p in parts] == [100, 100, 100, 100] or all(len(p) == len(parts[0]) for p in parts)
    for i, part in enumerate(parts):
        own = sum(r["domain"] == synthetic.DOMAINS[i] for r in part)
        assert own / len(part) >= 0.85
    ids = [id(r) for p in parts for r in p]
    assert len(ids) == len(set(ids)), "a row was given to two clients"


def test_dataset_too_small_for_partitioning_fails_with_the_fix():
    cfg = load_config({"overrides": "dataset.train_per_domain=3 num_clients=8 sample_clients=2"})
    with pytest.raises(ConfigError, match="too small.*raise dataset.train_per_domain"):
        data.partition(cfg, 0)


def test_round_indices_are_openfedllm_sized_and_round_dependent():
    cfg = load_config({})
    rows = data.partition(cfg, 0)
    n = cfg.training.batch_size * cfg.training.grad_accum * cfg.training.max_steps
    r1, r1b, r2 = (round_indices(len(rows), cfg, r, 0) for r in (1, 1, 2))
    assert len(r1) == n and len(set(r1)) == n
    assert r1 == r1b and r1 != r2


def test_a_client_with_fewer_rows_than_a_round_trains_all_of_them_in_a_round_dependent_order():
    cfg = load_config({})
    n = cfg.training.batch_size * cfg.training.grad_accum * cfg.training.max_steps
    rows = n - 1
    r1, r1b, r2 = (round_indices(rows, cfg, r, 0) for r in (1, 1, 2))
    assert sorted(r1) == list(range(rows)) and sorted(r2) == list(range(rows))
    assert r1 == r1b and r1 != r2


def test_partition_id_out_of_range_names_num_clients():
    with pytest.raises(ConfigError, match="partition-id=9.*num_clients=4"):
        data.partition(load_config({}), 9)


@pytest.mark.parametrize(
    "overrides",
    ["", "task=dpo", "num_clients=8 sample_clients=2 partition=dirichlet partition.alpha=0.5", "partition=iid"],
)
def test_no_heldout_prompt_is_in_any_clients_training_rows(overrides):
    from fedllm_app.data.catalogue import prompt_key

    cfg = load_config({"overrides": overrides})
    trained = {prompt_key(r) for part in data.all_partitions(cfg) for r in part}
    heldout = data.heldout(cfg)
    assert len(heldout) == cfg.dataset.test_per_domain * len(synthetic.DOMAINS)
    assert {r["domain"] for r in heldout} == set(synthetic.DOMAINS)
    assert [r for r in heldout if prompt_key(r) in trained] == []


def test_prompt_space_holds_every_example_the_generator_draws():
    import random

    rng = random.Random(1)
    for domain in synthetic.DOMAINS:
        space = set(synthetic.prompt_space(domain))
        assert len(space) == len(synthetic.prompt_space(domain))
        assert all(synthetic.make_example(domain, rng).instruction in space for _ in range(300))


def test_heldout_prompts_are_a_share_of_every_domain_and_follow_the_seed():
    held = synthetic.heldout_prompts(0)
    for domain in synthetic.DOMAINS:
        space = synthetic.prompt_space(domain)
        assert len(held & set(space)) == -(-len(space) // 4)  # a quarter, rounded up
    assert held == synthetic.heldout_prompts(0) and held != synthetic.heldout_prompts(1)
    with pytest.raises(ValueError, match="share 1.0"):
        synthetic.heldout_prompts(0, share=1.0)
