"""The PyTorch LightKV runtime (lightkv_export/torch_runtime.py) on the tiny presets."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lightkv_export.torch_runtime as rt
from lightkv_export.errors import InputError
from lightkv_export.method.guidance import text_guidance
from lightkv_export.method.layout import plan_stage
from lightkv_export.method.schedule import Schedule, Stage, solve

PROMPT = "Describe this image."
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def inputs_by_model(tiny_qwen_vl, tiny_qwen2_vl, test_image):
    return {id(m): m.family.prepare(m, [test_image], PROMPT) for m in (tiny_qwen_vl, tiny_qwen2_vl)}


def num_layers(loaded) -> int:
    return len(loaded.family.text_model(loaded.model).layers)


def schedule_for(loaded, ratio: float) -> Schedule:
    return solve(num_layers(loaded), ratio, loaded.spec.default_windows)


class RotaryPositions:
    """Records the position ids [3, 1, S] the runtime hands to the text model's rotary embedding, per call."""

    def __init__(self, loaded):
        self.calls: list[torch.Tensor] = []
        rotary = loaded.family.text_model(loaded.model).rotary_emb
        self.handle = rotary.register_forward_pre_hook(lambda _mod, args: self.calls.append(args[1].clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_ratio_zero_equals_hf_generate(tiny_model, inputs_by_model, test_image):
    """Ratio 0 runs every stage with nothing merged: the tokens equal transformers' own greedy generate."""
    loaded = tiny_model
    processed = loaded.family.process(loaded.processor, [test_image], PROMPT)
    with torch.no_grad():
        hf = loaded.model.generate(**processed, max_new_tokens=NEW_TOKENS, do_sample=False)
        hf_logits = loaded.model(**processed).logits[:, -1]  # [1, V]
    hf_tokens = hf[0, processed["input_ids"].shape[1] :].tolist()
    schedule = schedule_for(loaded, 0.0)
    assert schedule.stages and schedule.is_identity
    inputs = inputs_by_model[id(loaded)]
    result = rt.generate(loaded, inputs, schedule, max_new_tokens=NEW_TOKENS)
    assert result.tokens == hf_tokens
    pre = rt.prefill(loaded, inputs, schedule)
    torch.testing.assert_close(pre.logits, hf_logits, rtol=1e-4, atol=1e-4)
    assert pre.kv_lengths() == [inputs.input_ids.shape[1]] * num_layers(loaded)


def test_kv_lengths_follow_the_plan(tiny_model, inputs_by_model):
    """Layers up to lambda_1 cache the full prompt; each later group exactly the plan's out_lengths."""
    loaded = tiny_model
    inputs = inputs_by_model[id(loaded)]
    schedule = schedule_for(loaded, 0.55)
    assert len(schedule.stages) == 3
    expected, spans, seq = [], inputs.spans, inputs.input_ids.shape[1]
    prev = 0
    for stage in schedule.stages:
        expected += [seq] * (stage.layer - prev)
        plan = plan_stage(spans, seq, windows=stage.windows, ratio=stage.ratio)
        assert not any(any(row) for row in plan.skipped)  # the default windows fit the default image
        seq, spans, prev = plan.out_lengths[0], plan.spans, stage.layer
    expected += [seq] * (num_layers(loaded) - prev)

    pre = rt.prefill(loaded, inputs, schedule)
    assert pre.kv_lengths() == expected
    assert expected[0] > expected[-1]
    assert [r.layer for r in pre.stages] == [s.layer for s in schedule.stages]
    assert pre.spans == tuple(tuple(row) for row in spans)
    for layer in pre.cache.layers:
        assert layer.keys.shape[-2] == layer.values.shape[-2]

    result = rt.generate(loaded, inputs, schedule, max_new_tokens=2, stop_at_eos=False)
    assert result.kv_lengths == expected
    vanilla = rt.generate(loaded, inputs, Schedule(num_layers(loaded), ()), max_new_tokens=1)
    assert result.kv_bytes < vanilla.kv_bytes
    assert result.kv_bytes == vanilla.kv_bytes * sum(expected) // (len(expected) * expected[0])
    vision_in = inputs.spans[0][0].length
    assert result.vision_tokens_per_group[0] == ((1, schedule.stages[0].layer), vision_in)


def composed_kept(stages) -> list[torch.Tensor]:
    """Per stage, the original (prompt) index of each survivor: kept indices composed through the stages."""
    out, index = [], None
    for record in stages:
        kept = record.kept[0]  # [S']
        index = kept if index is None else index[kept]
        out.append(index)
    return out


@pytest.mark.parametrize("mode", ["preserve", "official"])
def test_positions_after_a_merge(tiny_qwen_vl, inputs_by_model, mode):
    """preserve: survivors keep their original M-RoPE ids; official: 0..S'-1. Decode goes on from the full length."""
    loaded = tiny_qwen_vl
    inputs = inputs_by_model[id(loaded)]
    schedule = schedule_for(loaded, 0.55)
    with RotaryPositions(loaded) as rec:
        pre = rt.prefill(loaded, inputs, schedule, positions=mode)
        token = torch.tensor([[int(pre.logits.argmax())]])
        rt.decode_step(loaded, token, pre.cache, pre.next_position)
    per_layer, decode = rec.calls[:-1], rec.calls[-1]
    assert len(per_layer) == num_layers(loaded)
    survivors = composed_kept(pre.stages)
    stage_of_layer = [sum(s.layer < layer for s in schedule.stages) for layer in range(1, num_layers(loaded) + 1)]
    for layer_idx, pos in enumerate(per_layer):
        k = stage_of_layer[layer_idx]
        if k == 0:
            assert torch.equal(pos, inputs.position_ids)
        elif mode == "preserve":
            assert torch.equal(pos, inputs.position_ids[:, :, survivors[k - 1]])
        else:
            n = survivors[k - 1].numel()
            assert torch.equal(pos, torch.arange(n).view(1, 1, n).expand(3, 1, n))
    full = inputs.input_ids.shape[1]
    assert torch.equal(decode, (full + inputs.decode_offset).view(1, 1, 1).expand(3, 1, 1))
    assert int(decode[0, 0, 0]) == int(inputs.position_ids.max()) + 1  # the vanilla model's next position


def test_decode_positions_advance_from_uncompressed_length(tiny_qwen2_vl, inputs_by_model):
    loaded = tiny_qwen2_vl
    inputs = inputs_by_model[id(loaded)]
    with RotaryPositions(loaded) as rec:
        result = rt.generate(loaded, inputs, schedule_for(loaded, 0.55), max_new_tokens=4, stop_at_eos=False)
    decode = rec.calls[num_layers(loaded) :]
    assert len(decode) == len(result.tokens) - 1 == 3
    start = inputs.input_ids.shape[1] + int(inputs.decode_offset)
    assert [int(p[0, 0, 0]) for p in decode] == [start, start + 1, start + 2]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def test_guidance_equals_text_guidance_on_recomputed_qk(tiny_model, inputs_by_model):
    """The xi captured at layer lambda_1 equals text_guidance on that layer's q / k recomputed from its input."""
    loaded = tiny_model
    inputs = inputs_by_model[id(loaded)]
    schedule = schedule_for(loaded, 0.55)
    lam = schedule.stages[0].layer
    text = loaded.family.text_model(loaded.model)
    layer = text.layers[lam - 1]
    seen: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.setdefault("hidden", args[0].clone()))
    try:
        pre = rt.prefill(loaded, inputs, schedule)
    finally:
        handle.remove()

    with torch.no_grad():
        hidden = seen["hidden"]  # [1, S, D] input of layer lambda_1
        attn = layer.self_attn
        bsz, seq, _ = hidden.shape
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(bsz, seq, -1, attn.head_dim).transpose(1, 2)  # [1, Hq, S, d]
        k = attn.k_proj(x).view(bsz, seq, -1, attn.head_dim).transpose(1, 2)  # [1, Hkv, S, d]
        cos, sin = text.rotary_emb(hidden, inputs.position_ids)  # [1, S, d]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        expected = text_guidance(q, k, rt.vision_mask(inputs.spans, seq))  # [1, S]
    got = pre.stages[0].guidance
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    vision = rt.vision_mask(inputs.spans, seq)
    assert bool((got[vision] > 0).all())


def test_runtime_rejects_mismatched_inputs(tiny_qwen_vl, inputs_by_model):
    inputs = inputs_by_model[id(tiny_qwen_vl)]
    with pytest.raises(InputError, match="schedule is for 12 layers"):
        rt.prefill(tiny_qwen_vl, inputs, Schedule(12, (Stage(3, 2, 0.5),)))
    with pytest.raises(InputError, match="positions must be one of"):
        rt.prefill(tiny_qwen_vl, inputs, schedule_for(tiny_qwen_vl, 0.55), positions="reset")
    with pytest.raises(InputError, match="max_new_tokens"):
        rt.generate(tiny_qwen_vl, inputs, schedule_for(tiny_qwen_vl, 0.55), max_new_tokens=0)


def test_main_in_process(capsys):
    """The CLI's options on a cached tiny model: explicit schedule, official compat, and user errors -> 2."""
    argv = ["--model", "tiny-qwen2-vl", "--schedule", "2:2:0.5,5:1:0.5", "--max-new-tokens", "2"]
    assert rt.main(argv) == 0
    assert "tokens:" in capsys.readouterr().out
    assert rt.main(["--model", "tiny-qwen-vl", "--ratio", "0.55", "--compat", "official", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert rt.main(["--model", "tiny-qwen-vl", "--ratio", "0.05"]) == 2
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())  # rich wraps lines
    assert "ratio 0.05 cannot be reached with 8 decoder layers" in err and "reachable range is" in err
    assert captured.out == "" and "Traceback" not in err  # no tokens printed: it stopped before generating
    assert rt.main(["--model", "tiny-qwen-vl", "--image", "/nonexistent.png"]) == 2
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert err.startswith("error: cannot read image '/nonexistent.png'") and "Expected a PNG or JPEG file" in err
    assert captured.out == "" and "Traceback" not in err


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightkv_export.torch_runtime", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_subprocess():
    ok = run_cli("--model", "tiny-qwen-vl", "--ratio", "0.55", "--max-new-tokens", "3")
    assert ok.returncode == 0, ok.stderr
    assert "tokens:" in ok.stdout and "KV cache held" in ok.stderr
    bad = run_cli("--model", "no-such-model")
    assert bad.returncode == 2
    message = " ".join(bad.stderr.split())  # rich wraps lines
    assert "unknown model 'no-such-model'" in message and "tiny-qwen-vl" in message
    assert "Traceback" not in bad.stderr


def test_the_cache_keyword_follows_the_installed_transformers(tiny_qwen_vl):
    """5.24 (the pin) says `cache`, 5.17 (the lent GPU machine) `past_key_values`; a wrong keyword would vanish into
    the layer's **kwargs and leave the cache empty, so the runtime reads it from the layer's signature."""

    class Older(torch.nn.Module):
        def forward(self, hidden_states, past_key_values=None, use_cache=False, **kwargs):
            return hidden_states

    layer = tiny_qwen_vl.family.text_model(tiny_qwen_vl.model).layers[0]
    assert rt.cache_kwarg(layer) == "cache"
    assert rt.cache_kwarg(Older()) == "past_key_values"
