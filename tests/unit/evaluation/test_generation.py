import pytest

pytestmark = pytest.mark.slow


def test_left_padding_does_not_change_greedy_answers(gen):
    short = gen.prompt("Reverse the words: red fox")
    long = gen.prompt("Reverse the words: the quick brown fox jumps over the lazy dog again and again")
    side = gen.tokenizer.padding_side
    alone = gen.generate([short], max_new_tokens=12)
    batched = gen.generate([long, short], max_new_tokens=12)
    assert batched[1] == alone[0]
    assert gen.tokenizer.padding_side == side  # restored after generating
    assert gen.generate([short], max_new_tokens=12) == alone  # greedy is deterministic


def test_conversation_prompts_for_each_template(gen):
    from dataclasses import replace

    chat = gen.conversation(["Hi?", "And then?"], ["Hello."])
    assert chat.index("Hi?") < chat.index("Hello.") < chat.index("And then?") and chat.endswith("<|assistant|>")
    alpaca = replace(gen, template="alpaca").conversation(["Hi?", "And then?"], ["Hello."])
    assert alpaca.startswith("Below is an instruction") and alpaca.endswith(
        "### Instruction:\nAnd then?\n\n### Response:\n"
    )
    vicuna = replace(gen, template="vicuna").conversation(["Hi?"], [])
    assert vicuna.endswith("USER: Hi? ASSISTANT: ")


def test_sampling_with_a_temperature_varies_and_greedy_does_not(gen):
    import torch

    prompt = [gen.prompt("Tell me a story about a fox")] * 4
    torch.manual_seed(0)
    sampled = gen.generate(prompt, max_new_tokens=12, temperature=1.5)
    assert len(set(sampled)) > 1
    assert len(set(gen.generate(prompt, max_new_tokens=12))) == 1
