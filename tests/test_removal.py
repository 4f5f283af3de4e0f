"""Layer removal: config, layer_idx, per-layer lists and logits equal to a hand-built smaller model."""

import copy
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, random_calibration, tiny_model
from gradmap.adapters import SUPPORTED_MODEL_TYPES, get_adapter
from gradmap.removal import remove_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_removal_equals_hand_built_model(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    keep = [0, 2, 3, 5]
    small_cfg = copy.deepcopy(model.config)
    cfg = model.config.to_dict()
    remove_layers(model, [1, 4])
    layers = adapter.layers(model)
    assert model.config.num_hidden_layers == 4 and len(layers) == 4
    idx = [[m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
           for layer in layers]
    assert all(idx[i] and set(idx[i]) == {i} for i in range(4)), idx
    if cfg.get("layer_types"):
        assert model.config.layer_types == [cfg["layer_types"][i] for i in keep]

    # hand-built: a fresh 4-layer model with the kept layers' weights copied by name
    small_cfg.num_hidden_layers = 4
    if cfg.get("layer_types"):
        small_cfg.layer_types = [cfg["layer_types"][i] for i in keep]
    small = AutoModelForCausalLM.from_config(small_cfg).eval()
    original = tiny_model(family).state_dict()
    marker = "." + adapter.layers_path.rsplit(".", 1)[-1] + "."
    state = {}
    for name in small.state_dict():
        if name.startswith(adapter.layers_path + "."):
            prefix, rest = name.split(marker, 1)
            new_idx, tail = rest.split(".", 1)
            state[name] = original[f"{prefix}{marker}{keep[int(new_idx)]}.{tail}"]
        else:
            state[name] = original[name]
    small.load_state_dict(state)
    ids = random_calibration(nsamples=2, seqlen=12).input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, small(ids).logits, rtol=0, atol=0)


def test_generate_with_cache_after_removal():
    model = tiny_model("llama")
    remove_layers(model, [0, 3])
    ids = random_calibration(nsamples=1, seqlen=5).input_ids
    with_cache = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    without = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(with_cache, without)


def test_bad_positions():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"positions: \[6\] out of range"):
        remove_layers(model, [6])
    with pytest.raises(ValueError, match="would leave none"):
        remove_layers(model, range(6))


def test_unsupported_architecture_error():
    from transformers import BloomConfig
    model = AutoModelForCausalLM.from_config(BloomConfig(n_layer=2, hidden_size=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError) as err:
        get_adapter(model)
    msg = str(err.value)
    assert "model_type='bloom'" in msg and "gradmap/adapters.py" in msg
    assert all(t in msg for t in SUPPORTED_MODEL_TYPES)
