import pytest

from evaluation.multiple_choice import MMLU_GROUP, extract_letter, question_block, to_item

OPTS = ("Paris", "Rome", "Berlin", "Madrid")


@pytest.mark.parametrize(
    ("text", "index"),
    [
        ("B", 1),
        ("(c)", 2),
        ("D.", 3),
        ("**A**", 0),
        ("The answer is (C).", 2),
        ("Answer: B", 1),
        ("the answer is: D because", 3),
        ("A. Paris", 0),
        ("A good guess would be Rome", 1),  # 'A' as an article; the option text decides
        ("I think it is Berlin", 2),
        ("Paris or Rome", None),
        ("no idea", None),
        ("E", None),
        ("The answer is a city", None),
    ],
)
def test_extract_letter_on_tricky_answers(text, index):
    assert extract_letter(text, OPTS) == index


def test_rows_map_to_items_with_the_right_gold(rows):
    mmlu = [to_item("mmlu", r) for r in rows("mmlu")]
    assert [it.gold for it in mmlu] == [2, 0, 1, 3] and mmlu[0].options == ("5", "6", "7", "8")
    assert to_item("medqa", rows("medqa")[1]).options[1] == "Heart" and to_item("medqa", rows("medqa")[1]).gold == 1
    assert [to_item("medmcqa", r).gold for r in rows("medmcqa")] == [2, 0]
    pub = to_item("pubmedqa", rows("pubmedqa")[2])
    assert pub.options == ("yes", "no", "maybe") and pub.gold == 2 and "mixed results" in pub.question
    care = to_item("careqa", rows("careqa")[0])  # CareQA's cop counts from 1
    assert care.options[care.gold] == "Red cells"
    assert "C. 7" in question_block(mmlu[0])


def test_the_headline_prompt_is_the_harness_mmlu_form(fixtures_dir, rows):
    from evaluation.multiple_choice import DEV_SOURCES, few_shot_examples, harness_prompt
    from evaluation.sources import load_rows

    items = [to_item("mmlu", r) for r in rows("mmlu")]
    assert harness_prompt(items[0]) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 3 + 4?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer:"
    )
    (shot,) = few_shot_examples(items[:1], load_rows(DEV_SOURCES["mmlu"], fixtures_dir), "mmlu", 1)[0]
    one_shot = harness_prompt(items[0], [shot])
    assert "\n\nWhat is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\nWhat is 3 + 4?\n" in one_shot
    medqa = to_item("medqa", rows("medqa")[1])
    assert harness_prompt(medqa, bench="medqa").startswith(medqa.question.strip() + "\nA. ")  # no subject line


def test_harness_tokenisation_moves_the_contexts_trailing_space_to_the_continuation():
    from transformers import AutoTokenizer

    from evaluation.generation import harness_pair
    from fedllm_app.tiny_model import ensure_tiny_model

    tok = AutoTokenizer.from_pretrained(ensure_tiny_model())
    ctx, cont = harness_pair(tok, "Answer: ", "A")
    assert tok.decode(cont) == " A" and tok.decode(ctx, skip_special_tokens=True) == "Answer:"
    assert ctx + cont == tok("Answer: A")["input_ids"]


def test_mmlu_subject_groups_cover_57_subjects():
    assert len(MMLU_GROUP) == 57
    assert MMLU_GROUP["abstract_algebra"] == "stem" and MMLU_GROUP["jurisprudence"] == "humanities"
    assert MMLU_GROUP["econometrics"] == "social_sciences" and MMLU_GROUP["virology"] == "other"


@pytest.mark.slow
def test_loglikelihoods_match_a_direct_forward_pass_and_ignore_padding(gen):
    import torch

    ctx, cont = gen.prompt("Question: 2+2?"), "four"
    tok, model = gen.tokenizer, gen.model
    c = tok(ctx, add_special_tokens=False)["input_ids"]
    x = tok(cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([c + x])).logits.float().log_softmax(-1)[0]
    expected = sum(float(logp[len(c) - 1 + i, t]) for i, t in enumerate(x))
    long_neighbour = (gen.prompt("a much longer question " * 5), "a long continuation")
    got = gen.loglikelihoods([(ctx, cont), long_neighbour])[0]
    assert got == pytest.approx(expected, abs=1e-4)
    assert got < 0


@pytest.mark.slow
@pytest.mark.parametrize("bench", ["mmlu", "medqa", "medmcqa", "pubmedqa", "careqa"])
def test_each_multiple_choice_benchmark_end_to_end(gen, rows, bench):
    from evaluation.multiple_choice import evaluate

    data = rows(bench)
    m = evaluate(gen, bench, data)
    assert m["n"] == len(data)
    for key in ("accuracy", "accuracy_option_text", "accuracy_option_text_norm", "accuracy_generated_letter"):
        assert 0.0 <= m[key] <= 1.0
    if bench == "mmlu":
        assert {"accuracy/stem", "accuracy/humanities", "accuracy/social_sciences"} <= set(m)
        assert "accuracy_generated_letter/subject/formal_logic" in m


def test_few_shot_prompts_use_solved_questions_of_the_same_subject(fixtures_dir, rows):
    from evaluation.multiple_choice import DEV_SOURCES, few_shot_examples
    from evaluation.sources import load_rows

    dev = load_rows(DEV_SOURCES["mmlu"], fixtures_dir)
    items = [to_item("mmlu", r) for r in rows("mmlu")]
    examples = few_shot_examples(items, dev, "mmlu", 1)
    block = question_block(items[0], examples[0])
    assert block.startswith("Here are solved questions about elementary mathematics.")
    assert "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\nQuestion: What is 3 + 4?" in block
    assert block.endswith("Answer with the letter of the correct option.")
    with pytest.raises(ValueError, match="2-shot needs 2 dev questions of subject 'conceptual_physics'"):
        few_shot_examples(items, dev, "mmlu", 2)


@pytest.mark.slow
def test_mmlu_few_shot_end_to_end(gen, rows, fixtures_dir):
    from evaluation.multiple_choice import DEV_SOURCES, evaluate
    from evaluation.sources import load_rows

    m = evaluate(gen, "mmlu", rows("mmlu"), shots=1, dev_rows=load_rows(DEV_SOURCES["mmlu"], fixtures_dir))
    assert m["shots"] == 1 and 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["accuracy_generated_letter"] <= 1.0
