"""Real clients of a Hugging Face causal LM on tiny Hope models, offline: the text-generation pipeline, PEFT LoRA
(train, save, reload, merge), lm-eval's HFLM loglikelihood, and torch.compile / torch.export (issue 12)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import ByT5Tokenizer, pipeline

from hope import HopeForCausalLM
from tests.hope.utils_hope import F64, max_diff, random_ids, same_to_rounding, tiny_config, tiny_model


@pytest.fixture(scope="module")
def tokenizer() -> ByT5Tokenizer:
    return ByT5Tokenizer()  # bytes: needs no files


def byte_model(tokenizer, **overrides) -> HopeForCausalLM:
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **{"momentum": False, **overrides})
    return tiny_model(config)


def test_text_generation_pipeline_from_a_checkpoint(tmp_path, tokenizer):
    model = byte_model(tokenizer)
    model.generation_config.eos_token_id = None  # a random model: never stop early
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path), tokenizer=str(tmp_path), device="cpu", dtype=F64)
    assert isinstance(generator.model, HopeForCausalLM)
    # Prompts of one length (left padding would shift the chunk phases of the shorter one, SPEC §5), without the
    # EOS that ByT5 appends by default.
    prompts = ["Hope learns", "in contexts"]
    results = generator(prompts, max_new_tokens=6, do_sample=False, batch_size=2, add_special_tokens=False)
    for prompt, result in zip(prompts, results):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        assert result[0]["generated_text"] == tokenizer.decode(expected[0], skip_special_tokens=True)
        assert result[0]["generated_text"].startswith(prompt)


def test_peft_lora_train_save_reload_merge(tmp_path, tokenizer):
    from peft import LoraConfig, PeftModel, get_peft_model

    targets = ["q_proj", "a_proj", "g_proj", "o_proj"]
    torch.manual_seed(0)
    lora = get_peft_model(byte_model(tokenizer), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=targets, task_type="CAUSAL_LM"))
    trainable = {name for name, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".")[-4] for name in trainable} == set(targets)  # ...q_proj.lora_A.default.weight
    ids = random_ids(2, 12, len(tokenizer))
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    lora.eval()
    with torch.no_grad():
        trained = lora(input_ids=ids).logits
        assert max_diff(trained, byte_model(tokenizer)(ids).logits) > 1e-4  # the adapters changed the model
    lora.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(byte_model(tokenizer), tmp_path / "adapter").eval()
    merged = reloaded.merge_and_unload()
    assert type(merged) is HopeForCausalLM and not any("lora_" in name for name, _ in merged.named_parameters())
    merged.save_pretrained(tmp_path / "merged")
    loaded = HopeForCausalLM.from_pretrained(tmp_path / "merged", dtype=F64).eval()
    with torch.no_grad():
        assert max_diff(merged(ids).logits, trained) < 1e-10
        assert same_to_rounding(loaded(ids).logits, merged(ids).logits)  # merged's weights are other tensors


def test_lm_eval_loglikelihood_equals_a_direct_forward(tokenizer):
    """lm-eval's HFLM scores continuations as a harness does; the numbers equal the model's own log-probs."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model = byte_model(tokenizer)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, device="cpu")
    pairs = [("The memory", " learns"), ("Hope", " is a nested learner."), ("abc", "abc")]
    requests = [Instance("loglikelihood", {}, pair, index) for index, pair in enumerate(pairs)]
    scores = lm.loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip(pairs, scores):
        # lm-eval's own token split (ByT5 appends EOS to each encoded string, which lm-eval then keeps).
        context_ids, target = lm._encode_pair(context, continuation)
        ids = torch.tensor([context_ids + target])
        with torch.no_grad():
            logprobs = F.log_softmax(model(ids[:, :-1]).logits[0, len(context_ids) - 1 :], dim=-1)
        assert logprob == pytest.approx(logprobs.gather(1, torch.tensor(target)[:, None]).sum().item(), abs=1e-9)
        assert greedy == bool((logprobs.argmax(-1) == torch.tensor(target)).all())


def _compile_case():
    """One tiny model and batch for the traced paths: one layer, one Titans chunk and one CMS chunk per sequence
    of 4 (tracing unrolls the chunk loop), a padded row (the mask path, whose checks run only eagerly)."""
    model = tiny_model(tiny_config(num_hidden_layers=1, momentum=False, cms_chunk_sizes=[4, None]))
    ids = random_ids(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    return model, ids, mask


def test_torch_compile_fullgraph_forward_and_backward_equal_eager():
    """Bug 7: fullgraph=True means no graph break anywhere (the host checks of the inputs are off the traced path).
    aot_eager traces forward and backward through AOTAutograd without generating kernels (fast on CPU)."""
    model, ids, mask = _compile_case()
    model.train()

    def loss_and_grads(forward):
        model.zero_grad()
        loss = forward(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = loss_and_grads(model)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert abs(compiled_loss.item() - eager_loss.item()) < 1e-10
    assert compiled_grads.keys() == eager_grads.keys()
    assert max(max_diff(compiled_grads[name], eager_grads[name]) for name in eager_grads) < 1e-10


def test_torch_export_forward_equals_eager():
    """The unpadded path (the compile test takes the masked one); the exported program keeps no host check."""
    model, ids, mask = _compile_case()
    program = torch.export.export(model, (ids,), {"use_cache": False})
    for batch in (ids, random_ids(2, 4)):
        with torch.no_grad():
            assert max_diff(program.module()(batch, use_cache=False).logits, model(batch, use_cache=False).logits) < 1e-12
    # Eager keeps the checks that the traced paths skip.
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(ids + 1000)
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        model(ids, attention_mask=mask * 0.5)
