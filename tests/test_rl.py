"""llada-rl's parts without a training run: the prompt reader's order, the rollouts' rows and
keyed RNG, the reward plug-ins, and ESPO's group skipping."""

from __future__ import annotations

import json

import pytest
import torch

from llada_train.data.prompts import PromptDataConfig, PromptReader, PromptSet, load_prompt_set
from llada_train.errors import LladaError
from llada_train.eval.decode import decode_config
from llada_train.rl.rewards import (
    demo_exact_match,
    gsm8k_exact_match,
    gsm8k_format,
    load_reward,
    score,
)
from llada_train.rl.rollout import RolloutTask


def _prompts(n: int) -> PromptSet:
    return PromptSet([[5, 6 + i % 3] for i in range(n)], [{"answer": str(i)} for i in range(n)],
                     [f"p.jsonl line {i + 1}" for i in range(n)])  # fmt: skip


def test_reader_repeats_each_round_for_the_inner_iterations_and_covers_an_epoch():
    prompts = _prompts(10)
    # 2 ranks x 2 micro-batches of 1 prompt per step, mu = 3 steps per round
    readers = [PromptReader(prompts, 1, 2, 3, 7, r, 2, 1) for r in range(2)]
    steps = [[[next(rd)["sample_index"].item() for _ in range(2)] for rd in readers] for _ in range(6)]
    assert steps[0] == steps[1] == steps[2]  # one round: the same prompts for mu steps
    assert steps[3] == steps[4] == steps[5] and steps[3] != steps[0]
    first_round = sorted(p for rank in steps[0] for p in rank)
    assert first_round == [0, 1, 2, 3]  # distinct positions over ranks and micro-batches
    order = readers[0].records_at(torch.arange(10).numpy()).tolist()
    assert sorted(order) == list(range(10)) and order != list(range(10))  # a permutation
    resumed = PromptReader(prompts, 1, 2, 3, 7, 0, 2, 1)
    resumed.load_state_dict(readers[0].state_dict())
    assert next(resumed)["sample_index"].tolist() == next(readers[0])["sample_index"].tolist()


def test_reader_refuses_a_checkpoint_of_other_prompts():
    reader = PromptReader(_prompts(4), 1, 1, 1, 0, 0, 1, 1)
    with pytest.raises(LladaError, match="had 5 records, these have 4"):
        reader.load_state_dict({"drawn": 3, "records": 5})


def test_prompt_records_from_messages_or_fields(tmp_path, demo_data):
    path = tmp_path / "p.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "what is 2 plus 3 ?"},
                      {"role": "assistant", "content": "it is 5 ."}]},
        {"question": "how many ?", "answer": "3 and 4 #### 7"},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = str(demo_data / "tokenizer.json")
    cfg = PromptDataConfig(path=str(path), tokenizer=tok, prompt_field="question")
    got = load_prompt_set(cfg, 200)
    assert [r["answer"] for r in got.records] == ["it is 5 .", "3 and 4 #### 7"]
    assert len(got.prompt_ids[0]) < 200 and got.where[1].endswith("line 2")
    with pytest.raises(LladaError, match=r"p.jsonl line 1: the prompt has \d+ tokens, over the 5"):
        load_prompt_set(cfg, 5)
    path.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(LladaError, match="line 1 has no gold answer"):
        load_prompt_set(PromptDataConfig(path=str(path), tokenizer=tok), 200)


def test_shipped_rewards():
    gsm = {"answer": "48 / 2 = 24 ...\n#### 72"}
    assert gsm8k_exact_match("so 48 + 24 = 72.\n#### 72", gsm) == 1.0
    assert gsm8k_exact_match("the answer is 1,0", gsm) == 0.0
    assert gsm8k_exact_match("72", {"answer": "#### 72"}) == 1.0  # last number without ####
    assert (gsm8k_format("#### 72", gsm), gsm8k_format("72", gsm)) == (1.0, 0.0)
    demo = {"answer": "it is 7 ."}
    assert (demo_exact_match(" it is 7 . ", demo), demo_exact_match("it is 8 .", demo)) == (1.0, 0.0)


def test_reward_paths_and_failures_are_one_line():
    assert load_reward("tests.rl_rewards:odd_word_count")("a b c", {}) == 1.0
    assert load_reward("llada_train.rl.rewards.gsm8k_format") is gsm8k_format
    with pytest.raises(LladaError, match="reward 'nope.mod:f' does not import"):
        load_reward("nope.mod:f")
    with pytest.raises(LladaError, match="is not a dotted path"):
        load_reward("justaname")
    bad = load_reward("tests.rl_rewards:raises")
    with pytest.raises(LladaError, match=r"reward r failed on p.jsonl line 3 \(ValueError: no answer"):
        score(bad, "r", "text", {}, "p.jsonl line 3")


class _EchoModel(torch.nn.Module):
    """A 'model' whose logits are random from the sampler's generator: rollouts of it show
    the keyed RNG and the row layout without training anything."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, attention_mask=None, **_):  # (B, L) -> (B, L, V)
        g = torch.Generator().manual_seed(int(x.sum()))
        return torch.randn(*x.shape, self.vocab, generator=g)


def _task(temperature: float = 1.0) -> RolloutTask:
    from llada_train.data.prompts import RewardConfig

    decode = decode_config("low_confidence", gen_length=6, steps=6, block_length=6,
                           temperature=temperature)  # fmt: skip
    data = PromptDataConfig(rewards=[RewardConfig("tests.rl_rewards:odd_word_count")],
                            accuracy="tests.rl_rewards:odd_word_count")  # fmt: skip
    text = lambda ids: " ".join(str(i) for i in ids)  # noqa: E731
    return RolloutTask(decode, data, _prompts(6), 3, 2, 1, 4, text)


def _batch(positions: list[int]) -> dict[str, torch.Tensor]:
    reader = PromptReader(_prompts(6), len(positions), 1, 1, 0, 0, 1, 1)
    batch = next(reader)
    batch["sample_index"] = torch.tensor(positions)
    return batch


def test_rollouts_are_keyed_and_rows_hold_prompt_then_eos_filled_completion():
    task, model = _task(), _EchoModel(12)
    a = task.rollout(model, _batch([0, 1]), 3, round_=0)
    again = task.rollout(model, _batch([0, 1]), 3, round_=0)
    other = task.rollout(model, _batch([0, 1]), 3, round_=1)
    assert torch.equal(a.x0, again.x0)  # same key: same completions
    assert not torch.equal(a.x0, other.x0)  # the next round draws anew
    assert a.x0.shape == (6, 2 + 6) and a.completion_index.tolist() == [0, 1, 2, 3, 4, 5]
    for row, plen, n in zip(a.x0, a.prompt_len, a.completion_len, strict=True):
        completion = row[plen:]
        if n < completion.numel():  # a stop token at n; everything after it is EOS (1)
            assert completion[n].item() in (1, 4) and (completion[n + 1 :] == 1).all()
        assert not torch.isin(completion[:n], torch.tensor([1, 4])).any()
    assert torch.equal(a.rewards, torch.tensor([float(len(t.split()) % 2) for t in a.texts]))


def test_groups_without_a_reward_spread_are_counted_and_left_out():
    from llada_train.diffusion.objective_base import ObjectiveConfig
    from llada_train.rl.objective import ESPOObjective
    from llada_train.rl.rollout import Rollouts

    espo = ESPOObjective(ObjectiveConfig(name="espo", group_size=2), 2, 1, _task())

    def kept(rewards: list[float]) -> tuple[list[int], float, int]:
        n = len(rewards)
        ro = Rollouts(torch.zeros(n, 4, dtype=torch.long), torch.ones(n, dtype=torch.long),
                      torch.arange(n), torch.tensor(rewards), torch.zeros(n),
                      torch.zeros(n, dtype=torch.long), [], 0.0)  # fmt: skip
        rows, weight, skipped = espo._kept_rows(ro)
        return rows.tolist(), weight, skipped

    assert kept([1, 1, 0, 1, 0, 0]) == ([2, 3], 1.0, 2)
    assert kept([1, 1, 0, 0]) == ([0, 1], 0.0, 2)  # nothing to learn: one group, weight 0
